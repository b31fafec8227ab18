"""Hostile input: every file of tests/hostile.py (issue 13's recipes and the classic breakages, made
from the real files in ../shared/data) through `pointflow classify`, `pointflow ingest --run` and
`pointflow train`.

Each file is refused with one line and leaves no output, no export and no scratch behind, and is
billed nothing; or it is classified completely. No traceback, no hang (a file that makes no
progress for QUIET_LIMIT seconds fails the suite), and the whole process tree (the commands and
their Dask cluster) stays under PEAK_LIMIT of memory, watched while it runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO
from tests.hostile import CASES, Case, make_all

PEAK_LIMIT = 4 * 1024**3
QUIET_LIMIT = 120.0
POLL = 0.1


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            continue
    return total


def kill_tree(process: psutil.Process) -> None:
    for member in [*process.children(recursive=True), process]:
        try:
            member.kill()
        except psutil.Error:
            continue


def read_results(path: Path) -> tuple[dict[str, dict], str | None]:
    """Finished results by file name, and the file being worked on (started, not finished)."""
    finished: dict[str, dict] = {}
    current = None
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "start" in record:
                current = record["start"]
            else:
                finished[record["name"]] = record
                current = None
    return finished, current


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("hostile")
    make_all(folder / "cases")
    results = folder / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POINTFLOW_")}
    env |= {"POINTFLOW_HOME": str(folder / "home"), "POINTFLOW_WORKERS": "2", "DASK_LOGGING__DISTRIBUTED": "error"}
    with open(folder / "driver.log", "wb") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "tests.hostile_run", str(folder / "cases"), str(results)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        watched = psutil.Process(driver.pid)
        peak, progress, last_count, failure = 0, time.monotonic(), -1, None
        while driver.poll() is None:
            peak = max(peak, tree_rss(watched))
            finished, current = read_results(results)
            if len(finished) != last_count:
                progress, last_count = time.monotonic(), len(finished)
            if peak > PEAK_LIMIT:
                failure = f"the process tree used {peak / 1024**3:.1f} GiB while working on {current}"
            elif time.monotonic() - progress > QUIET_LIMIT:
                failure = f"no progress for {QUIET_LIMIT:.0f} s on {current} (a hang)"
            if failure:
                kill_tree(watched)
                driver.wait()
                break
            time.sleep(POLL)
    finished, current = read_results(results)
    if failure is None and driver.returncode != 0:
        failure = f"the driver ended with {driver.returncode} while working on {current}: {(folder / 'driver.log').read_text()[-3000:]}"
    return {"results": finished, "peak": peak, "failure": failure}


def test_the_suite_ran_without_hang_or_blow_up(hostile: dict) -> None:
    assert hostile["failure"] is None
    assert hostile["peak"] < PEAK_LIMIT
    assert sorted(hostile["results"]) == sorted(case.name for case in CASES)


def _no_traceback(*outputs: str) -> None:
    for text in outputs:
        assert "Traceback" not in text and "panicked" not in text, text


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_each_file_is_refused_in_one_line_or_classified_completely(hostile: dict, case: Case) -> None:
    result = hostile["results"].get(case.name)
    assert result is not None, hostile["failure"]
    classify, ingest, train = result["classify"], result["ingest"], result["train"]
    _no_traceback(classify["out"], classify["err"], ingest["out"], ingest["err"], train["out"], train["err"])
    assert result["scratch_left"] == []
    job = ingest["job"]
    if case.classified:
        assert classify["code"] == 0, classify["err"]
        assert classify["output_points"] == case.points
        assert ingest["code"] == 0 and job["state"] == "exported", job
        assert job["points"] == case.points and ingest["exports"]
        assert ingest["usage"] == [["succeeded", case.points]]
        # As labels (classes 1 and 2 learnt): a model offered (its file and evaluation stored), not
        # better than standard, or too few classes, in one line.
        assert train["code"] in (0, 1, 2) and train["objects_stored"] == (2 if train["code"] == 0 else 0)
        if train["code"] == 2:
            [refusal] = train["err"].strip().splitlines()
            assert "a classifier needs at least two" in refusal
        return
    [line] = classify["err"].strip().splitlines()
    assert classify["code"] == 2 and line.startswith("pointflow: error: ") and classify["output_points"] is None
    assert classify["out"] == ""
    # Training reads labels through the same gate: the same refusal, and no model.
    assert train["code"] == 2 and train["err"].strip().splitlines() == [line] and train["objects_stored"] == 0
    # The job refuses it, says why, keeps the file in quarantine, tells the customer, bills nothing.
    assert ingest["code"] == 1 and job["state"] == "quarantined" and job["error"], job
    assert ingest["exports"] == [] and ingest["usage"] == [["failed", 0]] and ingest["mails"] == 1


def test_a_decoder_panic_is_refused_like_any_decode_error(tmp_path: Path) -> None:
    """The gate refuses this file before decoding; decoded anyway, lazrs panics (a BaseException)."""
    import laspy

    from pipelines.gate import NotPointCloudError
    from pipelines.lasio import decoding
    from tests.hostile import chunk_size

    path = chunk_size(tmp_path / "chunk-size-1.laz", 1)
    with (
        pytest.raises(NotPointCloudError, match="cannot be read"),
        decoding("chunk-size-1.laz: the point data cannot be read"),
    ):
        with laspy.open(path, laz_backend=laspy.LazBackend.LazrsParallel) as reader:
            for _ in reader.chunk_iterator(1000):
                pass
