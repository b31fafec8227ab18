"""The `pointflow` command as a user runs it."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import laspy
import numpy as np
import pytest

from pipelines.cli import build_parser, main
from tests.conftest import shared_file

CSV = "account_id,name,email,country,plan,started_at,tax_rate,tax_exempt,last_login_at\nacme,Acme,ops@acme.example,DE,free,2026-01-01,0.19,false,\n"


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, prefix + (name,))
    return paths


@pytest.mark.parametrize("path", command_paths(build_parser()), ids=lambda p: " ".join(p) or "pointflow")
def test_every_command_explains_itself(path: tuple[str, ...], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pointflow") and len(out) > 150
    # argparse unescapes %% in arguments' help, not in a description, where it would show as typed.
    assert "%%" not in out


def pointflow(*args: str, home: Path) -> subprocess.CompletedProcess:
    """The installed console script, in a separate process, as a user would run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POINTFLOW_")} | {
        "POINTFLOW_HOME": str(home),
        "POINTFLOW_WORKERS": "2",
    }
    script = Path(sys.executable).with_name("pointflow")
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=300)


def test_classify_of_a_file_too_sparse_to_model_says_no_cluster_was_needed(home: Path, tmp_path: Path) -> None:
    from tests.hostile import sparse

    source = sparse(tmp_path / "sparse.las", 200, 400_000.0)
    result = pointflow("classify", str(source), str(tmp_path / "out.laz"), home=home)
    assert result.returncode == 0, result.stderr
    assert "200 point(s) in tiles with fewer than" in result.stdout, result.stdout
    assert "without a cluster (nothing to model)" in result.stdout, result.stdout


def test_classify_real_file_writes_ground_as_class_2(home: Path, tmp_path: Path) -> None:
    source = shared_file("isprs/samp11.las")
    output = tmp_path / "out.laz"
    result = pointflow("classify", str(source), str(output), home=home)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    # The cluster's workers are counted once they have all registered, not while they start.
    assert "on 2 worker(s)" in result.stdout, result.stdout
    # Quiet by default: the local cluster's start-up and Dask's notes go to the log file only.
    assert "dask spec" not in result.stderr and "distributed." not in result.stderr, result.stderr
    assert (home / "logs" / "pointflow.log").exists()
    classes = laspy.read(output).classification
    truth = laspy.read(source).classification
    assert len(classes) == len(truth)
    # Output order may differ, so compare class totals: ground found is close to ground labelled.
    assert abs(int(np.sum(classes == 2)) - int(np.sum(truth == 2))) < 0.1 * len(truth)


def test_classify_text_file_fails_in_one_line_and_writes_nothing(home: Path, tmp_path: Path) -> None:
    source = tmp_path / "readme.las"
    source.write_text("just text\n")
    output = tmp_path / "out.laz"
    result = pointflow("classify", str(source), str(output), home=home)
    assert result.returncode != 0
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "not a LAS/LAZ file" in result.stderr
    assert not output.exists()


def test_classify_missing_input_and_unknown_classifier(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["classify", str(tmp_path / "none.laz"), str(tmp_path / "o.laz")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert (
        main(["classify", str(shared_file("isprs/samp11.las")), str(tmp_path / "o.laz"), "--classifier", "magic"]) == 2
    )
    assert "unknown classifier 'magic'" in capsys.readouterr().err


def test_accounts_ingest_and_files_list(
    home: Path, tmp_path: Path, scene_path: Path, capsys: pytest.CaptureFixture
) -> None:
    csv = tmp_path / "accounts.csv"
    csv.write_text(CSV)
    assert main(["accounts", "import", str(csv)]) == 0
    assert (
        main(
            [
                "accounts",
                "add",
                "beta",
                "--name",
                "Beta",
                "--email",
                "b@beta.example",
                "--country",
                "fr",
                "--plan",
                "api",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["files", "list", "--account", "acme", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["ingest", str(scene_path), "--account", "acme", "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert main(["ingest", str(scene_path), "--account", "acme"]) == 0
    assert "already stored" in capsys.readouterr().out
    assert main(["files", "list", "--account", "acme", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed == stored
    assert set(listed) == {"key", "name", "size", "sha256", "points", "state"}
    assert listed["key"].startswith("accounts/acme/raw/") and listed["state"] == "stored" and listed["points"] > 0
    assert main(["files", "list", "--account", "beta", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_ingest_for_unknown_account_is_refused(home: Path, scene_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["ingest", str(scene_path), "--account", "ghost"]) == 2
    err = capsys.readouterr().err
    assert "unknown account 'ghost'" in err and "pointflow accounts add" in err


def test_ingest_name_cannot_escape_the_account(
    home: Path, tmp_path: Path, scene_path: Path, capsys: pytest.CaptureFixture
) -> None:
    csv = tmp_path / "accounts.csv"
    csv.write_text(CSV)
    main(["accounts", "import", str(csv)])
    hostile = tmp_path / "..%2f..%2fx.las"
    hostile.write_bytes(scene_path.read_bytes())
    capsys.readouterr()
    assert main(["ingest", str(hostile), "--account", "acme", "--json"]) == 0
    key = json.loads(capsys.readouterr().out)["key"]
    assert key.startswith("accounts/acme/raw/") and ".." not in key
    assert main(["ingest", str(scene_path), "--account", "../acme"]) == 2


def test_ingest_run_goes_all_the_way(
    home: Path, tmp_path: Path, scene_path: Path, capsys: pytest.CaptureFixture
) -> None:
    csv = tmp_path / "accounts.csv"
    csv.write_text(CSV)
    main(["accounts", "import", str(csv)])
    capsys.readouterr()
    assert main(["ingest", str(scene_path), "--account", "acme", "--run", "--json"]) == 0
    job = json.loads(capsys.readouterr().out)
    assert job["state"] == "exported" and job["export_prefix"].startswith("accounts/acme/exports/")


def test_bad_settings_are_named(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, scene_path: Path
) -> None:
    monkeypatch.setenv("POINTFLOW_TILE_SIZE", "big")
    assert main(["files", "list", "--account", "acme"]) == 2
    assert "POINTFLOW_TILE_SIZE" in capsys.readouterr().err


def test_intake_run_with_run_classifies_a_dropped_file_and_exits_0(
    home: Path, tmp_path: Path, scene_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`pointflow intake run --run`, as cron would run it, on a small valid LAZ put in the local drop zone."""
    import shutil
    import time

    from pipelines.intake import SETTLE

    csv = tmp_path / "accounts.csv"
    csv.write_text(CSV)
    assert main(["accounts", "import", str(csv)]) == 0
    capsys.readouterr()
    dropped = home / "objects" / "incoming" / "acme" / "survey.laz"
    dropped.parent.mkdir(parents=True)
    shutil.copyfile(scene_path, dropped)
    past = time.time() - 2 * SETTLE.total_seconds()
    os.utime(dropped, (past, past))

    result = pointflow("intake", "run", "--run", home=home)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "registered incoming/acme/survey.laz -> job-" in result.stdout, result.stdout
    assert ": exported" in result.stdout, result.stdout
    assert not dropped.exists()
    again = pointflow("intake", "run", "--run", "--json", home=home)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"files": [], "errors": {}, "jobs": []}


def _xyz_intensity(points: laspy.LasData) -> np.ndarray:
    table = np.stack([np.asarray(points.X), np.asarray(points.Y), np.asarray(points.Z), np.asarray(points.intensity)])
    return table[:, np.lexsort(table[::-1])]


@pytest.mark.parametrize("suffix", [".laz", ".copc.laz"])
def test_classify_output_names_its_classifier_and_keeps_the_crs_and_points(
    home: Path, tmp_path: Path, suffix: str
) -> None:
    from datetime import UTC, datetime

    from pipelines.classifiers import describe_classifier

    source = shared_file("lidr_topography.laz")  # made by 'rlas R package' in 2017, with a GeoTIFF CRS
    output = tmp_path / ("out" + suffix)
    result = pointflow("classify", str(source), str(output), home=home)
    assert result.returncode == 0, result.stderr
    before, after = laspy.read(source), laspy.read(output)
    standard = describe_classifier("standard")
    software = after.header.generating_software
    assert software == f"pointflow standard {standard.version}"[:32] and software.isascii()
    assert after.header.creation_date == datetime.now(UTC).date()
    [vlr] = [v for v in after.header.vlrs if v.user_id == "pointflow"]
    assert vlr.record_id == 1
    record = json.loads(bytes(vlr.record_data))
    assert (record["classifier"], record["version"]) == ("standard", standard.version)
    assert len(record["params_sha256"]) == 64 and record["pointflow"]
    assert after.header.parse_crs() == before.header.parse_crs() is not None
    if suffix == ".laz":
        # The input's own VLRs all stay (GeoTIFF keys here), and its point format.
        assert [(v.user_id, v.record_id) for v in before.header.vlrs if v.user_id != "laszip encoded"] == [
            (v.user_id, v.record_id) for v in after.header.vlrs if v.user_id not in ("laszip encoded", "pointflow")
        ]
        assert after.header.point_format.id == before.header.point_format.id
    np.testing.assert_array_equal(_xyz_intensity(after), _xyz_intensity(before))
