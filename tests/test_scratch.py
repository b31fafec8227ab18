"""Scratch folders: locked while in use, swept when their process is gone, found by account."""

from __future__ import annotations

from pathlib import Path

from pipelines.scratch import account_folders, folders, job_folders, sweep, work_dir
from tests.conftest import abandoned_work_dir


def test_a_folder_in_use_is_never_swept_and_is_removed_after_use(tmp_path: Path) -> None:
    with work_dir(tmp_path, "classify", "acme", "job-1") as folder:
        (folder / "tiles").write_bytes(b"points")
        assert sweep(tmp_path) == []
        assert account_folders(tmp_path, "acme") == [folder] and job_folders(tmp_path, "job-1") == [folder]
        assert account_folders(tmp_path, "other") == []
    assert list(tmp_path.iterdir()) == []


def test_a_dead_processs_folder_is_swept_by_the_next_work_dir(tmp_path: Path) -> None:
    abandoned_work_dir(tmp_path, "classify", "acme", files={"core-0": b"points"})
    [left] = folders(tmp_path)
    assert left.account_id == "acme" and (left.path / "core-0").exists()
    assert account_folders(tmp_path, "acme") == [left.path]
    with work_dir(tmp_path, "export") as fresh:
        assert [f.path for f in folders(tmp_path)] == [fresh]
    assert list(tmp_path.iterdir()) == []
