"""COPC output, read back with laspy's COPC reader: every point once with its class, bounds and
level queries that return exactly the expected points, each node holding only points inside it."""

from __future__ import annotations

from pathlib import Path

import laspy
import numpy as np
import pytest

from pipelines import copc
from pipelines.classify import classify_file
from pipelines.copc import GRID, write_copc
from pipelines.export import POINT_MEDIA_TYPES, read_manifest
from pipelines.runtime import Runtime
from pipelines.settings import Settings
from pipelines.steps.export import export_step
from pipelines.steps.record import job_view
from tests.conftest import shared_file
from tests.lasfiles import MAX_X, patch, write_points
from tests.test_export import classified_job

FIELDS = ["X", "Y", "Z", "intensity", "classification", "gps_time", "return_number", "number_of_returns"]


def records(points, fields=FIELDS) -> np.ndarray:
    """The points as a sorted structured array of `fields`: equal arrays are equal multisets."""
    table = np.zeros(len(points), dtype=[(f, np.asarray(points[f]).dtype) for f in fields])
    for name in fields:
        table[name] = np.asarray(points[name])
    return np.sort(table, order=fields)


def node_points(reader: laspy.CopcReader) -> list[tuple]:
    """(level, bounds, points) of every node with points, decoded one node at a time."""
    nodes = laspy.copc.load_octree_for_query(reader.source, reader.copc_info, reader.root_page)
    return [
        (node.key.level, node.bounds, reader._fetch_and_decompress_points_of_nodes([node]))
        for node in nodes
        if node.point_count > 0
    ]


def check_nodes_hold_their_points(reader: laspy.CopcReader) -> int:
    total = 0
    for _, bounds, points in node_points(reader):
        xyz = np.stack([np.asarray(points.x), np.asarray(points.y), np.asarray(points.z)], axis=1)
        assert (xyz >= bounds.mins).all() and (xyz <= bounds.maxs).all()
        total += len(points)
    return total


@pytest.fixture(scope="module")
def ign(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, copc.CopcSummary]:
    source = shared_file("ign_st_barth_100m.laz")
    work = tmp_path_factory.mktemp("copc")
    target = work / "ign.copc.laz"
    return source, target, write_copc(source, target, work / "scratch")


def test_every_point_is_written_once_with_its_class(ign) -> None:
    source, target, summary = ign
    original = laspy.read(source)
    with laspy.CopcReader.open(target) as reader:
        assert str(reader.header.version) == "1.4" and reader.header.point_format.id == 6  # format 1 becomes 6
        assert reader.header.point_count == summary.points == len(original)
        everything = reader.query()
        assert np.array_equal(records(everything), records(original))
        assert np.array_equal(np.bincount(everything.classification), np.bincount(original.classification))
        assert (
            reader.copc_info.gps_min == original.gps_time.min() and reader.copc_info.gps_max == original.gps_time.max()
        )
        assert reader.copc_info.spacing == pytest.approx(2 * reader.copc_info.halfsize / GRID)
        assert check_nodes_hold_their_points(reader) == len(original)
    # A plain LAZ reader reads it whole, chunk table and all.
    assert np.array_equal(records(laspy.read(target)), records(original))


def test_a_bounds_query_returns_exactly_the_points_inside(ign) -> None:
    source, target, _ = ign
    original = laspy.read(source)
    scales, offsets = original.header.scales, original.header.offsets

    # Query faces a quarter unit outside the coordinate grid: laspy compares the stored integers
    # with the rounded faces, and the float test here agrees only if no point lies on a face.
    def face(value, side):
        return offsets + (np.round((value - offsets) / scales) + side * 0.25) * scales

    low, high = face(original.header.mins + [30, 30, 5], -1), face(original.header.mins + [55, 55, 12], 1)
    for mins, maxs in [(low[:2], high[:2]), (low, high)]:
        xyz = np.stack([original.x, original.y, original.z], axis=1)[:, : len(mins)]
        expected = original.points[np.all((xyz >= mins) & (xyz <= maxs), axis=1)]
        with laspy.CopcReader.open(target) as reader:
            found = reader.query(bounds=laspy.copc.Bounds(np.asarray(mins), np.asarray(maxs)))
        assert 1000 < len(expected) < len(original) / 4
        assert np.array_equal(records(found), records(expected))


def test_a_level_query_returns_one_point_per_voxel_and_the_levels_add_up(ign) -> None:
    source, target, summary = ign
    original = laspy.read(source)
    with laspy.CopcReader.open(target) as reader:
        levels = [reader.query(level=level) for level in range(summary.depth + 1)]
        info = reader.copc_info
    assert [len(points) for points in levels] == list(summary.points_per_level.values())
    assert summary.depth >= 1 and len(levels[0]) < len(original) / 4
    joined = laspy.PackedPointRecord(np.concatenate([p.array for p in levels]), levels[0].point_format)
    assert np.array_equal(records(joined), records(original.points))

    def voxels(points) -> np.ndarray:
        xyz = np.stack([points.x, points.y, points.z], axis=1)
        cells = np.clip(np.floor((xyz - (info.center - info.halfsize)) / info.spacing).astype(np.int64), 0, GRID - 1)
        return (cells[:, 0] * GRID + cells[:, 1]) * GRID + cells[:, 2]

    # The root is a sample at its spacing: one point in every voxel that holds any point, no more.
    root = voxels(levels[0])
    assert len(np.unique(root)) == len(root) == len(np.unique(voxels(original)))
    # A coarser level query is a subset of a finer resolution query.
    with laspy.CopcReader.open(target) as reader:
        assert len(reader.query(resolution=info.spacing)) == len(levels[0])


def test_splitting_large_bins_and_piles_of_one_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory bounds at work on a small file: bins split until they fit, a pile of identical
    points beyond any depth streamed as one leaf, and still every point once, inside its node."""
    source = shared_file("ign_st_barth_100m.laz")
    data = laspy.read(source)
    # 30,000 returns at one spot (a stuck scanner): no octree depth separates them.
    pile = data.points.array[:30_000].copy()
    for name in ("X", "Y", "Z"):
        pile[name] = data.points.array[name][0]
    piled = laspy.LasData(
        data.header,
        points=laspy.ScaleAwarePointRecord(
            np.concatenate([data.points.array, pile]), data.header.point_format, data.header.scales, data.header.offsets
        ),
    )
    piled.write(tmp_path / "piled.laz")
    for name, value in {"BIN_TARGET": 5_000, "BIN_LIMIT": 20_000, "LEAF_POINTS": 5_000, "MAX_DEPTH": 9}.items():
        monkeypatch.setattr(copc, name, value)
    summary = write_copc(tmp_path / "piled.laz", tmp_path / "piled.copc.laz", tmp_path / "scratch")
    assert summary.depth == 9 and summary.nodes > 100
    with laspy.CopcReader.open(tmp_path / "piled.copc.laz") as reader:
        assert check_nodes_hold_their_points(reader) == len(piled.points)
        assert np.array_equal(records(reader.query()), records(piled.points))
    assert list((tmp_path / "scratch").iterdir()) == []


def test_formats_colours_extra_bytes_and_crs_are_kept(tmp_path: Path, scene_path: Path) -> None:
    source = write_points(tmp_path / "rgb.las", n=5000, point_format=3, extra_bytes=True)
    data = laspy.read(source)
    n = len(data.points)
    data.red, data.green, data.blue = np.arange(n, dtype=np.uint16), np.full(n, 7, np.uint16), np.full(n, 9, np.uint16)
    data.scan_angle_rank = np.resize(np.array([-12, 0, 30], dtype=np.int8), n)
    data.write(source)
    write_copc(source, tmp_path / "rgb.copc.laz", tmp_path / "scratch")
    with laspy.CopcReader.open(tmp_path / "rgb.copc.laz") as reader:
        assert reader.header.point_format.id == 7 and "confidence" in reader.header.point_format.extra_dimension_names
        points = reader.query()
    assert np.array_equal(
        records(points, ["X", "Y", "Z", "red", "green", "blue", "confidence"]),
        records(data.points, ["X", "Y", "Z", "red", "green", "blue", "confidence"]),
    )
    # Whole degrees in formats 0-5, units of 0.006 degrees in 6-10.
    assert sorted(set(np.asarray(points.scan_angle).tolist())) == [-2000, 0, 5000]

    write_copc(scene_path, tmp_path / "scene.copc.laz", tmp_path / "scratch")
    header = laspy.CopcReader.open(tmp_path / "scene.copc.laz").header
    assert header.parse_crs().to_epsg() == 32632 and header.global_encoding.wkt
    assert header.generating_software.startswith("pointflow")


def test_the_same_input_gives_the_same_bytes(tmp_path: Path, scene_path: Path) -> None:
    write_copc(scene_path, tmp_path / "a.copc.laz", tmp_path / "scratch")
    write_copc(scene_path, tmp_path / "b.copc.laz", tmp_path / "scratch")
    assert (tmp_path / "a.copc.laz").read_bytes() == (tmp_path / "b.copc.laz").read_bytes()


def test_a_header_whose_bounds_lie_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    # Maximum x and y (max y follows min x) say 10 m, the points spread over 50 m.
    source = patch(patch(write_points(tmp_path / "lies.las", n=3000), MAX_X, "d", 500010.0), MAX_X + 16, "d", 5400010.0)
    with pytest.raises(ValueError, match="outside the bounds its header gives"):
        write_copc(source, tmp_path / "lies.copc.laz", tmp_path / "scratch")
    assert not (tmp_path / "lies.copc.laz").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "lies.las",
        "scratch",
    ]


def test_classify_writes_copc_by_the_output_name(settings: Settings, scene_path: Path, tmp_path: Path) -> None:
    result = classify_file(scene_path, tmp_path / "out" / "out.copc.laz", settings, workers=1)
    assert "copc_s" in result.timings
    with laspy.CopcReader.open(tmp_path / "out" / "out.copc.laz") as reader:
        points = reader.query()
    assert {int(c): int(n) for c, n in enumerate(np.bincount(points.classification)) if n} == result.class_counts
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["out.copc.laz"]
    assert list(settings.scratch_dir.iterdir()) == []


def test_copc_export_format(runtime: Runtime, scene_path: Path, tmp_path: Path) -> None:
    from pipelines.accounts import upsert_accounts
    from tests.conftest import make_account

    upsert_accounts(runtime.catalog, [make_account("pro")])
    job_id = classified_job(runtime, "pro", scene_path)
    export_step(runtime, job_id, export_format="copc")
    manifest = read_manifest(runtime.store, job_view(runtime, job_id).export_prefix)
    [points] = [a for a in manifest["artifacts"] if a["kind"] == "points"]
    assert points["name"] == "scene.copc.laz" and points["media_type"] == POINT_MEDIA_TYPES["copc"]
    runtime.store.get_file(points["key"], tmp_path / "scene.copc.laz")
    with laspy.CopcReader.open(tmp_path / "scene.copc.laz") as reader:
        assert len(reader.query()) == manifest["points"]["output"]
