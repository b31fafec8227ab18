"""Previews a person can read: units from the CRS, the class map with a profile, the 3D sample."""

from __future__ import annotations

from pathlib import Path

import laspy
import numpy as np
import pyproj
import pytest
from PIL import Image

from pipelines.class_table import CLASS_COLOURS, summary_csv
from pipelines.frame import coordinate_frame, file_frame
from pipelines.preview import PROFILE_POINTS, Profile, write_previews
from tests.conftest import shared_file
from tests.lasfiles import write_points


def test_axes_name_the_crs_and_its_units_feet_included() -> None:
    feet = file_frame(shared_file("corpus/USGS_NM_4_6_crop_ftUS.las"))
    # The CRS says US survey feet for x and y; the GeoTIFF vertical units key says it for z.
    assert (feet.epsg, feet.units.name, feet.units.vertical_name) == (2903, "US survey foot", "US survey foot")
    assert feet.label(0) == "Easting [ftUS]" and feet.label(2) == "Elevation [ftUS]"
    metres = file_frame(shared_file("corpus/IGN_bat_grenoble.laz"))
    assert (metres.epsg, metres.units.name) == (2154, "metre") and metres.label(1) == "Northing [m]"
    assert metres.describe().startswith("RGF93") and "(EPSG:2154)" in metres.describe()
    none = file_frame(shared_file("ign_st_barth_100m.laz"))
    # pipelines.units takes a file without a CRS as metres; the axes say it is an assumption.
    assert none.crs is None and none.label(0) == "x [m, assumed]" and none.describe().startswith("no CRS in the file")
    assert none.to_dict()["assumed"] is True


def test_compound_and_geographic_crs() -> None:
    header = laspy.LasHeader(point_format=6, version="1.4")
    header.add_crs(pyproj.CRS("EPSG:2154+5720"))
    compound = coordinate_frame(header)
    assert (compound.units.name, compound.units.vertical_name, compound.axes) == (
        "metre",
        "metre",
        ("Easting", "Northing"),
    )
    header = laspy.LasHeader(point_format=6, version="1.4")
    header.add_crs(pyproj.CRS.from_epsg(4326))
    geographic = coordinate_frame(header)
    # Latitude comes first in the CRS; the map's x is the longitude.
    assert geographic.units is None and geographic.label(0) == "Geodetic longitude [°]"


def test_the_profile_runs_along_the_longer_side_through_a_thin_band() -> None:
    profile = Profile.through(np.array([0.0, 0.0]), np.array([300.0, 100.0]), 10_000_000)
    assert profile.along == 0 and profile.centre == 50.0
    assert 2 * profile.half_width == pytest.approx(100 * PROFILE_POINTS / 10_000_000)
    small = Profile.through(np.array([0.0, 0.0]), np.array([50.0, 200.0]), 1000)
    assert small.along == 1 and 2 * small.half_width == pytest.approx(50 / 25)


@pytest.mark.parametrize("name", ["corpus/USGS_NM_4_6_crop_ftUS.las", "ign_st_barth_100m.laz"])
def test_preview_shows_the_map_the_profile_and_every_class(name: str, tmp_path: Path) -> None:
    source = shared_file(name)
    output = tmp_path / "preview.png"
    write_previews(source, output, None, f"{name}: classes")
    image = np.asarray(Image.open(output).convert("RGB")).reshape(-1, 3).astype(int)
    for cls in np.unique(laspy.read(source).classification):
        colour = np.array([int(CLASS_COLOURS[int(cls)][i : i + 2], 16) for i in (1, 3, 5)])
        # Every class has at least its legend swatch.
        assert (np.abs(image - colour).sum(axis=1) < 12).sum() >= 50, cls
    write_previews(source, tmp_path / "again.png", None, f"{name}: classes")
    assert output.read_bytes() == (tmp_path / "again.png").read_bytes()


def test_the_class_table_has_one_precision() -> None:
    text = summary_csv(
        [
            {"class": 2, "name": "ground", "points": 5, "percent": 12.3},
            {"class": 6, "name": "building", "points": 1, "percent": 0.0},
        ]
    ).decode()
    assert text.splitlines()[1:] == ["2,ground,5,12.300", "6,building,1,0.000"]


def read_ply(path: Path) -> tuple[list[str], np.ndarray]:
    data = path.read_bytes()
    head, body = data.split(b"end_header\n", 1)
    lines = head.decode().splitlines()
    dtype = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("class", "u1")]
    return lines, np.frombuffer(body, dtype=dtype)


def test_the_3d_sample_is_a_thinned_ply_in_class_colours(tmp_path: Path) -> None:
    source = shared_file("ign_st_barth_100m.laz")
    original = laspy.read(source)
    write_previews(source, None, tmp_path / "sample.ply", sample_points=20_000)
    lines, vertices = read_ply(tmp_path / "sample.ply")
    assert lines[:2] == ["ply", "format binary_little_endian 1.0"]
    assert f"element vertex {len(vertices)}" in lines and 18_000 < len(vertices) < 22_000
    origin = np.array(
        [float(v) for v in next(line for line in lines if line.startswith("comment origin")).split()[2:5]]
    )
    xyz = np.stack([vertices["x"], vertices["y"], vertices["z"]], axis=1) + origin
    assert (xyz >= original.header.mins - 0.01).all() and (xyz <= original.header.maxs + 0.01).all()
    assert set(np.unique(vertices["class"])) <= set(np.unique(original.classification))
    ground = vertices[vertices["class"] == 2]
    assert {tuple(c) for c in np.stack([ground["red"], ground["green"], ground["blue"]], axis=1).tolist()} == {
        (0xA1, 0x88, 0x7F)
    }
    # A file smaller than the sample is sampled whole.
    small = write_points(tmp_path / "small.las", n=3000)
    write_previews(small, None, tmp_path / "small.ply")
    assert len(read_ply(tmp_path / "small.ply")[1]) == 3000


def test_one_read_makes_both_previews_as_separate_reads_do(tmp_path: Path) -> None:
    source = shared_file("ign_st_barth_100m.laz")
    frame = write_previews(source, tmp_path / "both.png", tmp_path / "both.ply", "both")
    write_previews(source, tmp_path / "map.png", None, "both")
    write_previews(source, None, tmp_path / "sample.ply")
    assert (tmp_path / "both.png").read_bytes() == (tmp_path / "map.png").read_bytes()
    assert (tmp_path / "both.ply").read_bytes() == (tmp_path / "sample.ply").read_bytes()
    assert frame == file_frame(source)


def _points_file(path: Path, x: np.ndarray, y: np.ndarray, z: np.ndarray, classes: np.ndarray) -> Path:
    header = laspy.LasHeader(point_format=6, version="1.4")
    header.scales, header.offsets = np.array([0.01, 0.01, 0.01]), np.array([np.floor(x.min()), np.floor(y.min()), 0.0])
    header.add_crs(pyproj.CRS.from_epsg(32632))
    data = laspy.LasData(header)
    data.x, data.y, data.z, data.classification = x, y, z, classes
    data.write(path)
    return path


@pytest.mark.parametrize("shape", ["one point", "thin strip"])
def test_previews_of_odd_shapes_show_every_class(shape: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    if shape == "one point":
        x, y, z, classes = np.array([500_000.0]), np.array([5_400_000.0]), np.array([10.0]), np.array([6])
    else:
        # 2,000 m by 3 m: the map is a line, its axis labels and the legend still need their room.
        n = 20_000
        x, y, z = 500_000 + rng.uniform(0, 2000, n), 5_400_000 + rng.uniform(0, 3, n), rng.uniform(0, 5, n)
        classes = rng.choice([2, 5, 6, 9, 17, 18], n)
    source = _points_file(tmp_path / "odd.las", x, y, z, classes.astype(np.uint8))
    write_previews(source, tmp_path / "odd.png", tmp_path / "odd.ply", "odd.las: classes")
    image = np.asarray(Image.open(tmp_path / "odd.png").convert("RGB")).reshape(-1, 3).astype(int)
    for cls in np.unique(classes):
        colour = np.array([int(CLASS_COLOURS[int(cls)][i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(image - colour).sum(axis=1) < 12).sum() >= 50, cls
    assert len(read_ply(tmp_path / "odd.ply")[1]) == len(classes)
