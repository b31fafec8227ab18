"""Scratch folders: locked while in use, swept when their process is gone, found by account."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipelines.scratch import account_folders, folders, job_folders, sweep, work_dir


def test_a_folder_in_use_is_never_swept_and_is_removed_after_use(tmp_path: Path) -> None:
    with work_dir(tmp_path, "classify", "acme", "job-1") as folder:
        (folder / "tiles").write_bytes(b"points")
        assert sweep(tmp_path) == []
        assert account_folders(tmp_path, "acme") == [folder] and job_folders(tmp_path, "job-1") == [folder]
        assert account_folders(tmp_path, "other") == []
    assert list(tmp_path.iterdir()) == []


def test_a_dead_processs_folder_is_swept_by_the_next_work_dir(tmp_path: Path) -> None:
    # A process that made a folder and was killed before it could remove it.
    code = ("import os, sys; from pathlib import Path; from pipelines.scratch import work_dir\n"
            "with work_dir(Path(sys.argv[1]), 'classify', 'acme') as f:\n"
            "    (f / 'core-0').write_bytes(b'points'); os._exit(9)")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == 9
    [left] = folders(tmp_path)
    assert left.account_id == "acme" and (left.path / "core-0").exists()
    assert account_folders(tmp_path, "acme") == [left.path]
    with work_dir(tmp_path, "export") as fresh:
        assert [f.path for f in folders(tmp_path)] == [fresh]
    assert list(tmp_path.iterdir()) == []
