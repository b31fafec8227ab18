"""Validation suites against real files and real-world kinds of broken ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import laspy
import pytest

from pipelines.validate import SUITES_DIR, VALID_CLASSES, validate_file
from tests.conftest import shared_file
from tests.lasfiles import LEGACY_POINT_COUNT, MAX_X, OFFSETS, patch, truncated, write_points


def test_suites_are_files_great_expectations_accepts() -> None:
    names = sorted(p.stem for p in SUITES_DIR.glob("*.json"))
    assert names == ["las_header", "las_points"]
    for path in SUITES_DIR.glob("*.json"):
        suite = json.loads(path.read_text())
        assert all(
            e["meta"]["severity"] in ("error", "warning") and e["meta"]["explain"] for e in suite["expectations"]
        )


@pytest.mark.parametrize("name", ["isprs/samp11.las", "lidr_topography.laz"])
def test_real_files_pass(name: str) -> None:
    report = validate_file(shared_file(name))
    assert report.ok, report.reason
    assert report.mode == "full" and report.points_checked == report.header["point_count"]


def test_missing_crs_is_only_a_warning() -> None:
    report = validate_file(shared_file("isprs/samp11.las"))
    assert report.ok
    assert any("coordinate reference system" in w.explain for w in report.warnings)


def broken_crs(path: Path) -> Path:
    """A LAS 1.4 file whose WKT record PROJ cannot parse."""
    header = laspy.LasHeader(point_format=6, version="1.4")
    header.global_encoding.wkt = True
    header.vlrs.append(laspy.vlrs.known.WktCoordinateSystemVlr('PROJCS["broken", GEOGCS[ nonsense'))
    points = laspy.LasData(header)
    points.x = points.y = points.z = [float(v) for v in range(10)]
    points.write(path)
    return path


def test_an_unreadable_crs_is_told_apart_from_none(tmp_path: Path) -> None:
    """Before, a CRS record PROJ cannot parse read as "no coordinate reference system in the file"
    and "metres (assumed: the file states no CRS)": a file in feet would be classified as metres
    with a report saying the file gave no CRS at all."""
    from pipelines.frame import file_frame

    report = validate_file(broken_crs(tmp_path / "broken.las"))
    assert report.ok and report.header["crs"] is None and "missing , or ]" in report.header["crs_unreadable"]
    [warning] = [w for w in report.warnings if "coordinate reference system" in w.explain]
    assert "record cannot be read, so its coordinates are taken as metres" in warning.explain
    assert "unreadable (" in report.to_html().decode() and "none stated" not in report.to_html().decode()
    assert file_frame(tmp_path / "broken.las").describe() == (
        "an unreadable CRS in the file: metres (assumed: the file's CRS record could not be read)"
    )
    assert validate_file(shared_file("isprs/samp11.las")).header["crs_unreadable"] is None


def test_the_report_says_what_to_do_only_when_there_is_something_to_do(tmp_path: Path) -> None:
    accepted = validate_file(shared_file("isprs/samp11.las")).to_html().decode()
    assert "upload it again" not in accepted and "Nothing to do: the file was accepted" in accepted
    # Header facts read as such, not as raw Python values or a check's row count.
    assert "38,010" in accepted and "1 of 1 values" not in accepted and "(0.01, 0.01, 0.01)" not in accepted
    path = tmp_path / "cut.laz"
    path.write_bytes(shared_file("lidr_megaplot.laz").read_bytes())
    refused = validate_file(truncated(path, 0.4)).to_html().decode()
    assert "fix the file at its source" in refused and "upload it again" in refused


def test_text_file_named_las_is_refused_by_content(tmp_path: Path) -> None:
    path = tmp_path / "notes.las"
    path.write_text("x,y,z\n1,2,3\n")
    report = validate_file(path)
    assert not report.ok and report.mode == "none"
    assert "not a LAS/LAZ file" in report.reason


def test_truncated_laz_is_refused(tmp_path: Path) -> None:
    source = shared_file("lidr_megaplot.laz")
    path = tmp_path / "cut.laz"
    path.write_bytes(source.read_bytes())
    report = validate_file(truncated(path, 0.4))
    assert not report.ok
    assert "corrupt or truncated" in report.reason


def test_wrong_point_count_is_refused(tmp_path: Path) -> None:
    path = patch(write_points(tmp_path / "count.las", n=1000), LEGACY_POINT_COUNT, "I", 1500)
    report = validate_file(path)
    assert not report.ok
    assert "point count" in report.reason or "truncated" in report.reason


def test_nan_coordinates_are_refused(tmp_path: Path) -> None:
    path = patch(write_points(tmp_path / "nan.las"), OFFSETS, "d", math.nan)
    report = validate_file(path)
    assert not report.ok
    assert "not a finite number" in report.reason or "NaN" in report.reason


def test_points_outside_header_bounds_are_refused(tmp_path: Path) -> None:
    path = patch(write_points(tmp_path / "bounds.las"), MAX_X, "d", 500020.0)
    report = validate_file(path)
    assert not report.ok
    assert "outside the header's x bounds" in report.reason


def test_zero_points_are_refused(tmp_path: Path) -> None:
    path = write_points(tmp_path / "empty.las", n=0)
    report = validate_file(path)
    assert not report.ok
    assert "zero points" in report.reason


def test_return_number_above_number_of_returns_is_refused(tmp_path: Path) -> None:
    path = write_points(tmp_path / "returns.las")
    data = laspy.read(path)
    data.return_number[:10] = 3
    data.write(path)
    report = validate_file(path)
    assert not report.ok and "return number" in report.reason


def test_large_files_are_checked_on_a_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.validate as validate

    monkeypatch.setattr(validate, "FULL_READ_MAX_POINTS", 10_000)
    monkeypatch.setattr(validate, "SAMPLE_WINDOW_POINTS", 2_000)
    report = validate_file(shared_file("ign_st_barth_100m.laz"))
    assert report.ok, report.reason
    assert report.mode == "sample" and 0 < report.points_checked < report.header["point_count"]


def test_report_renders_for_people(tmp_path: Path) -> None:
    path = patch(write_points(tmp_path / "bounds.las"), MAX_X, "d", 500020.0)
    html = validate_file(path).to_html().decode()
    assert "refused (quarantined)" in html and "What to do" in html


@pytest.mark.parametrize(
    "suite, frame, parameters",
    [
        ("las_header", {"bounds_tight": [True], "crs_present": [True], "crs_readable": [True]}, None),
        ("las_header", {"bounds_tight": [False], "crs_present": [False], "crs_readable": [False]}, None),
        (
            "las_points",
            {"classification": [2, 6, 9, 40, 64, 40], "intensity": [0, 0, 0, 0, 0, 0]},
            {"valid_classes": VALID_CLASSES},
        ),
        ("las_points", {"classification": [2, 2], "intensity": [0, 12]}, {"valid_classes": VALID_CLASSES}),
    ],
)
def test_numpy_checks_find_what_great_expectations_finds(suite: str, frame: dict, parameters: dict | None) -> None:
    """The suites run in numpy (no Great Expectations set-up per task); same findings as GE's."""
    import pandas as pd

    from pipelines.validate import _validator, run_suite

    data = pd.DataFrame(frame)
    assert run_suite(suite, data, parameters) == _validator().run(suite, data, parameters)


def _under_stated(tmp_path: Path, kind: str) -> Path:
    from tests.hostile import copc, real_laz, records_appended, with_count

    path = tmp_path / f"{kind}.{'las' if kind.startswith('las') else 'laz'}"
    if kind == "las-count":
        return with_count(real_laz(path, "isprs/samp11.las"), 37_010)
    if kind == "las-appended":
        return records_appended(path, 1000)
    if kind == "laz-layered":
        return with_count(real_laz(path), 107_379)
    if kind == "laz-fixed":
        return with_count(real_laz(path, "lidr_megaplot.laz"), 40_000)
    return with_count(copc(path), 2000)


@pytest.mark.parametrize(
    "kind, declared, held, check",
    [
        # samp11 holds 38,010 points: its header says 1,000 fewer, or 1,000 records follow its points.
        ("las-count", 37_010, 38_010, "point_count"),
        ("las-appended", 38_010, 39_010, "point_count"),
        # Grenoble's chunks (point format 6) state their points: 50,000 + 50,000 + 37,379.
        ("laz-layered", 107_379, 137_379, "point_count"),
        # A COPC file's chunk table states each chunk's points: one chunk of 3,000.
        ("laz-variable", 2000, 3000, "point_count"),
        # megaplot's chunks (point format 1) do not: 81,590 points in 2 chunks of 50,000, and 40,000 make 1.
        ("laz-fixed", 40_000, 2, "laz_chunks"),
    ],
)
def test_a_header_under_stating_the_point_count_is_refused_naming_both_counts(
    tmp_path: Path, kind: str, declared: int, held: int, check: str
) -> None:
    report = validate_file(_under_stated(tmp_path, kind))
    assert not report.ok and [e.check for e in report.errors] == [check], report.reason
    assert f"{declared:,}" in report.reason and f"{held:,}" in report.reason, report.reason
