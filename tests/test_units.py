"""Coordinate units from the file's CRS: every metre-based parameter works in feet too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import laspy
import numpy as np
import pyproj
import pytest

from pipelines.classify import classify_file
from pipelines.lasio import point_block
from pipelines.settings import Settings
from pipelines.units import coordinate_units

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
US_FOOT = 1200.0 / 3937.0
FOOT = 0.3048


def need(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"test data {path} not available")
    return path


def header_units(path: Path):
    with laspy.open(path) as reader:
        return coordinate_units(reader.header)


def test_us_survey_feet_from_geotiff_keys() -> None:
    units = header_units(need("corpus/USGS_NM_4_6_crop_ftUS.las"))
    assert units.name == units.vertical_name == "US survey foot"
    assert units.horizontal == pytest.approx(US_FOOT) and units.vertical == pytest.approx(US_FOOT)
    assert not units.assumed


def test_metres_from_wkt() -> None:
    units = header_units(need("corpus/IGN_crop1_rural.laz"))
    assert units.is_metric and not units.assumed
    assert units.describe() == "metre (from the file's CRS)"


def test_no_crs_is_taken_as_metres_and_says_so() -> None:
    units = header_units(need("isprs/samp11.las"))
    assert units.is_metric and units.assumed
    assert "assumed" in units.describe()


def test_compound_crs_with_metric_heights() -> None:
    header = laspy.LasHeader(point_format=6, version="1.4")
    header.add_crs(pyproj.CRS("EPSG:2263+5703"))  # NY Long Island (ftUS) + NAVD88 height (m)
    units = coordinate_units(header)
    assert units.horizontal == pytest.approx(US_FOOT) and units.vertical == 1.0
    assert units.vertical_name == "metre"


def test_geographic_coordinates_are_refused() -> None:
    header = laspy.LasHeader(point_format=6, version="1.4")
    header.add_crs(pyproj.CRS.from_epsg(4326))
    with pytest.raises(ValueError, match="geographic"):
        coordinate_units(header)


def write_in_feet(source: Path, target: Path, crs: pyproj.CRS, foot: float) -> None:
    """The same points with coordinates in feet and a CRS that says so."""
    las = laspy.read(source)
    header = laspy.LasHeader(point_format=las.header.point_format.id, version="1.4")
    header.scales = np.array([0.01, 0.01, 0.01])
    header.offsets = np.floor(las.header.mins / foot)
    header.add_crs(crs)
    out = laspy.LasData(header)
    out.points = laspy.ScaleAwarePointRecord.zeros(len(las.points), header=header)
    for name in ("intensity", "return_number", "number_of_returns", "classification"):
        out[name] = las[name]
    out.x, out.y, out.z = las.x / foot, las.y / foot, las.z / foot
    out.write(target)


@pytest.mark.slow
def test_a_file_in_feet_is_classified_as_the_same_file_in_metres(tmp_path: Path) -> None:
    source = need("corpus/IGN_montpellier_6tiles.laz")
    feet = tmp_path / "feet.las"
    write_in_feet(source, feet, pyproj.CRS("EPSG:2263+6360"), US_FOOT)  # ftUS, heights in ftUS
    settings = Settings.from_env({"POINTFLOW_HOME": str(tmp_path / "home"), "POINTFLOW_WORKERS": "1"})
    metric = classify_file(source, tmp_path / "metres.laz", settings, tile_size=60.0)
    imperial = classify_file(feet, tmp_path / "feet.laz", settings, tile_size=60.0)
    assert imperial.units.name == "US survey foot" and metric.units.is_metric
    # Tiles are laid out in metres whatever the unit: the same grid, the same buffer.
    assert imperial.tiles == metric.tiles and imperial.tile_buffer == pytest.approx(metric.tile_buffer)

    def classes(path: Path) -> dict[tuple[int, int], int]:
        las = laspy.read(path)
        block = point_block(las, coordinate_units(las.header))
        # Match points by their position in centimetres (both files keep 1 cm or better).
        keys = zip(np.round(block.x * 100).astype(np.int64), np.round(block.y * 100).astype(np.int64))
        return dict(zip(keys, np.asarray(las.classification).tolist()))

    ours, reference = classes(tmp_path / "feet.laz"), classes(tmp_path / "metres.laz")
    matched = [(ours[key], cls) for key, cls in reference.items() if key in ours]
    assert len(matched) > 0.95 * len(reference)
    # Feet rounding moves points by up to 1.5 mm. Ground is decided point by point, so only
    # borderline points flip (0.075 % here); a parameter left in the wrong unit moves far more.
    assert np.mean([(ours == 2) == (cls == 2) for ours, cls in matched]) > 0.998
    # Building and vegetation are decided per roof segment, and a segment that crosses a threshold
    # by a millimetre flips whole (standard 2.4.0: 0.41 % of the points, 2.6.0: 0.52 %).
    assert np.mean([ours == cls for ours, cls in matched]) > 0.99


@pytest.mark.slow
def test_classify_command_says_which_unit_it_assumed(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POINTFLOW_")}
    env |= {"POINTFLOW_HOME": str(tmp_path / "home"), "POINTFLOW_WORKERS": "1"}
    script = Path(sys.executable).with_name("pointflow")
    outputs = {}
    for name, relative in (("feet", "corpus/USGS_NM_4_6_crop_ftUS.las"), ("none", "isprs/samp21.las")):
        run = subprocess.run(
            [str(script), "classify", str(need(relative)), str(tmp_path / f"{name}.laz")],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=True,
        )
        outputs[name] = run.stdout
    assert "coordinates: US survey foot (from the file's CRS)" in outputs["feet"]
    assert "coordinates: metres (assumed: the file states no CRS)" in outputs["none"]


def test_classify_refuses_geographic_coordinates_in_one_line(tmp_path: Path) -> None:
    las = laspy.read(need("isprs/samp21.las"))
    header = laspy.LasHeader(point_format=las.header.point_format.id, version="1.4")
    header.scales = np.array([1e-7, 1e-7, 0.01])
    header.offsets = np.array([9.0, 48.0, 0.0])
    header.add_crs(pyproj.CRS.from_epsg(4326))
    out = laspy.LasData(header)
    out.points = laspy.ScaleAwarePointRecord.zeros(len(las.points), header=header)
    # The sample's metres as a small patch of degrees near Stuttgart.
    out.x = 9.0 + (np.asarray(las.x) - las.header.mins[0]) * 1e-5
    out.y = 48.0 + (np.asarray(las.y) - las.header.mins[1]) * 1e-5
    out.z = las.z
    source = tmp_path / "degrees.las"
    out.write(source)
    env = {k: v for k, v in os.environ.items() if not k.startswith("POINTFLOW_")}
    env |= {"POINTFLOW_HOME": str(tmp_path / "home"), "POINTFLOW_WORKERS": "1"}
    run = subprocess.run(
        [str(Path(sys.executable).with_name("pointflow")), "classify", str(source), str(tmp_path / "out.laz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert "geographic" in run.stderr and "reproject" in run.stderr
    assert not (tmp_path / "out.laz").exists()


UTM_32N = pyproj.CRS.from_epsg(32632).to_wkt("WKT1_GDAL")


def with_wkt_unit(target: Path, unit: str, factor: str) -> Path:
    """samp11 (LAS 1.4) with a UTM 32N WKT whose linear unit is `unit` = `factor` metres."""
    from laspy.vlrs.known import WktCoordinateSystemVlr

    wkt = UTM_32N.replace('UNIT["metre",1,', f'UNIT["{unit}",{factor},')
    las = laspy.read(need("isprs/samp11.las"))
    las.header.vlrs.append(WktCoordinateSystemVlr(wkt))
    las.header.global_encoding.wkt = True
    las.write(target)
    return target


@pytest.mark.parametrize("unit, factor", [("zero", "0"), ("neg", "-1"), ("tiny", "1e-9"), ("mega", "1e6")])
def test_implausible_wkt_units_are_refused_naming_the_unit(tmp_path: Path, unit: str, factor: str) -> None:
    path = with_wkt_unit(tmp_path / f"{unit}.las", unit, factor)
    with pytest.raises(ValueError, match=f"'{unit}'") as refused:
        header_units(path)
    assert "reproject" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "unit, factor, metres",
    [
        ("metre", "1", 1.0),
        ("foot", "0.3048", FOOT),
        ("US survey foot", "0.304800609601219", 0.30480060960121924),  # PROJ knows the unit: its value, as before
        ("millimetre", "0.001", 0.001),
        ("kilometre", "1000", 1000.0),
        ("Statute mile", "1609.344", 1609.344),
    ],
)
def test_real_linear_units_from_wkt_are_accepted_exactly(tmp_path: Path, unit: str, factor: str, metres: float) -> None:
    units = header_units(with_wkt_unit(tmp_path / "unit.las", unit, factor))
    assert (units.name, units.horizontal, units.vertical) == (unit, metres, metres) and not units.assumed


def test_a_vertical_unit_out_of_range_is_refused() -> None:
    header = laspy.LasHeader(point_format=6, version="1.4")
    compound = pyproj.CRS("EPSG:32632+5703").to_wkt("WKT1_GDAL")
    assert compound.count('UNIT["metre",1,') == 2
    header.add_crs(pyproj.CRS.from_wkt(compound[::-1].replace(',1,"ertem"[TINU', ',0,"orez"[TINU', 1)[::-1]))
    with pytest.raises(ValueError, match="'zero'"):
        coordinate_units(header)


def test_classify_refuses_a_zero_unit_in_one_line(tmp_path: Path) -> None:
    source = with_wkt_unit(tmp_path / "zero.las", "zero", "0")
    env = {k: v for k, v in os.environ.items() if not k.startswith("POINTFLOW_")}
    env |= {"POINTFLOW_HOME": str(tmp_path / "home"), "POINTFLOW_WORKERS": "1"}
    run = subprocess.run(
        [str(Path(sys.executable).with_name("pointflow")), "classify", str(source), str(tmp_path / "out.laz")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    [line] = run.stderr.strip().splitlines()
    assert "'zero'" in line and not (tmp_path / "out.laz").exists()
