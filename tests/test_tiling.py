"""Tiling invariants and the tiled Dask runner: every point exactly once, buffers, agreement."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from pathlib import Path

import laspy
import numpy as np
import psutil
import pytest

from pipelines import classify, cluster, scan
from pipelines.classifiers import describe_classifier
from pipelines.classify import classify_file
from pipelines.cluster import dashboard_link, dask_client, wait_for_workers
from pipelines.gate import NotPointCloudError
from pipelines.settings import ClusterStartError
from pipelines.tile import TileGrid
from pipelines.tile_io import TileFiles
from pipelines.tile_tasks import TILE_FIELDS
from tests.conftest import shared_file
from tests.lasfiles import write_points


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        yield client


def test_each_point_has_one_owner_and_context_is_exactly_the_buffer_ring() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 230, 20000), rng.uniform(0, 170, 20000)
    grid = TileGrid.covering((0, 0), (230, 170), size=50, buffer=7)
    owner = grid.owner(x, y)
    assert grid.count == 5 * 4 and owner.min() >= 0 and owner.max() < grid.count
    seen: dict[int, set[int]] = {t: set() for t in range(grid.count)}
    for index, tiles in grid.context(x, y):
        for i, t in zip(index.tolist(), tiles.tolist()):
            assert t != owner[i]
            seen[t].add(i)
    for t in range(grid.count):
        x0, y0, x1, y1 = grid.bounds(t)
        dx = np.maximum(np.maximum(x0 - x, x - x1), 0)
        dy = np.maximum(np.maximum(y0 - y, y - y1), 0)
        expected = set(np.flatnonzero((np.maximum(dx, dy) <= 7) & (owner != t)).tolist())
        # Points exactly on the ring's outer edge may fall either way by rounding.
        assert len(expected ^ seen[t]) <= 2, t


def test_workers_are_counted_once_registered_and_missing_ones_are_a_clear_error(client) -> None:
    assert wait_for_workers(client, 2, 30, "the test cluster") == 2
    with pytest.raises(ClusterStartError, match=r"the test cluster has 2 of the 3 worker\(s\) asked for after 1 s"):
        wait_for_workers(client, 3, 1, "the test cluster")


@pytest.mark.parametrize("asked", [False, True])
def test_the_local_clusters_dashboard_runs_only_when_asked_for(settings, asked: bool) -> None:
    import urllib.error
    import urllib.request

    settings = dataclasses.replace(settings, dashboard=asked)
    with dask_client(settings, 1) as client:
        link = dashboard_link(client, settings)
        # The scheduler's HTTP port serves its health either way; the dashboard's pages only when asked.
        port = client.scheduler_info()["services"]["dashboard"]
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30).status == 200
        if asked:
            assert link == f"http://127.0.0.1:{port}/status"
            assert urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=30).status == 200
        else:
            assert link is None
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=30)


def test_grid_edge_cases() -> None:
    single = TileGrid.covering((10, 10), (10, 10), size=0, buffer=0)
    assert single.count == 1
    assert single.owner(np.array([10.0]), np.array([10.0])).tolist() == [0]
    with pytest.raises(ValueError, match="smaller than the tile size"):
        TileGrid.covering((0, 0), (100, 100), size=20, buffer=20)


def _records_without_class(path: Path) -> np.ndarray:
    data = laspy.read(path)
    keys = np.stack([data.X, data.Y, data.Z, data.intensity, data.return_number], axis=1)
    return keys[np.lexsort(keys.T[::-1])]


def test_every_input_point_is_written_exactly_once(tmp_path: Path, settings, client) -> None:
    source = shared_file("isprs/samp11.las")
    output = tmp_path / "out.laz"
    result = classify_file(source, output, settings, classifier="ground", tile_size=40, buffer=15, client=client)
    assert result.tiles > 4
    assert result.input_points == result.output_points == laspy.open(source).header.point_count
    assert np.array_equal(_records_without_class(source), _records_without_class(output))
    classes = laspy.read(output).classification
    assert set(np.unique(classes)) <= {1, 2}
    assert sum(result.class_counts.values()) == result.output_points


def test_tiled_run_agrees_with_untiled_run(tmp_path: Path, settings, client) -> None:
    source = shared_file("ign_st_barth_100m.laz")
    tiled, whole = tmp_path / "tiled.las", tmp_path / "whole.las"
    classify_file(source, tiled, settings, tile_size=40, buffer=settings.tile_buffer, client=client)
    classify_file(source, whole, settings, tile_size=0, buffer=0, client=client)

    def by_position(path: Path) -> tuple[np.ndarray, np.ndarray]:
        data = laspy.read(path)
        keys = np.stack([data.X, data.Y, data.Z, data.gps_time.view(np.int64)], axis=1)
        order = np.lexsort(keys.T[::-1])
        return keys[order], np.asarray(data.classification)[order]

    keys_tiled, classes_tiled = by_position(tiled)
    keys_whole, classes_whole = by_position(whole)
    assert np.array_equal(keys_tiled, keys_whole)
    agreement = float(np.mean(classes_tiled == classes_whole))
    assert agreement >= 0.995, f"tiled and untiled runs agree on {agreement:.2%} of points"


@pytest.mark.parametrize(
    "version,point_format",
    [
        ("1.2", 0),
        ("1.2", 1),
        ("1.2", 2),
        ("1.2", 3),
        ("1.3", 4),
        ("1.3", 5),
        ("1.4", 6),
        ("1.4", 7),
        ("1.4", 8),
        ("1.4", 9),
        ("1.4", 10),
    ],
)
def test_all_point_formats_are_classified(tmp_path: Path, settings, client, version: str, point_format: int) -> None:
    source = write_points(
        tmp_path / "in.las", n=3000, version=version, point_format=point_format, extra_bytes=point_format in (3, 6)
    )
    output = tmp_path / "out.las"
    result = classify_file(source, output, settings, tile_size=20, buffer=5, client=client)
    data = laspy.read(output)
    assert len(data) == 3000 == result.output_points
    assert data.header.point_format.id == point_format and str(data.header.version) == version
    assert set(np.unique(data.classification)) <= {1, 2, 3, 4, 5, 6, 7, 9, 18}
    if point_format in (3, 6):
        assert np.allclose(np.sort(data.confidence), np.sort(laspy.read(source).confidence))


def test_text_input_is_refused_and_nothing_is_written(tmp_path: Path, settings) -> None:
    source = tmp_path / "points.las"
    source.write_text("not a point cloud")
    output = tmp_path / "out.laz"
    with pytest.raises(NotPointCloudError, match="not a LAS/LAZ file"):
        classify_file(source, output, settings)
    assert not output.exists() and list(tmp_path.iterdir()) == [source]


def test_bad_output_name_is_refused(tmp_path: Path, settings) -> None:
    with pytest.raises(ValueError, match=r"\.las, \.laz or \.copc\.laz"):
        classify_file(shared_file("isprs/samp11.las"), tmp_path / "out.txt", settings)


def test_truncated_input_fails_cleanly_without_output(tmp_path: Path, settings, client) -> None:
    source = tmp_path / "cut.laz"
    source.write_bytes(shared_file("lidr_megaplot.laz").read_bytes()[:200_000])
    output = tmp_path / "out.laz"
    with pytest.raises(NotPointCloudError, match="corrupt or truncated"):
        classify_file(source, output, settings, client=client)
    assert not output.exists()
    assert list(settings.scratch_dir.glob("*")) == []


def test_a_cluster_started_while_scanning_gives_the_same_file_and_a_failed_scan_leaves_nothing(
    tmp_path: Path, settings, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = shared_file("isprs/samp11.las")
    reference, early = tmp_path / "reference.las", tmp_path / "early.las"
    read = _record_tile_reads(monkeypatch)
    # Another cluster's workers (here a client's) may be on other machines: the tiles go by value.
    classify_file(source, reference, settings, tile_size=40, buffer=15, client=client)
    assert set(read) == {"core", "context"}
    read.clear()
    # Large files start their local cluster during the scan: make this small one do so.
    monkeypatch.setattr(classify, "EARLY_CLUSTER_POINTS", 0)
    result = classify_file(source, early, settings, tile_size=40, buffer=15, workers=2)
    assert result.workers == 2 and result.timings["scan_s"] > 0
    # The local cluster's workers read their tiles from the tile files: the command only the output's records.
    assert set(read) == {"core"}
    assert laspy.read(early).points.array.tobytes() == laspy.read(reference).points.array.tobytes()

    cut, output = tmp_path / "cut.laz", tmp_path / "out" / "out.laz"
    cut.write_bytes(shared_file("lidr_megaplot.laz").read_bytes()[:200_000])
    with pytest.raises(NotPointCloudError, match="corrupt or truncated"):
        classify_file(cut, output, settings, workers=1)
    assert not output.parent.exists()
    assert list(settings.scratch_dir.glob("*")) == []


def _record_tile_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The kinds of tile records the command reads from its tile files, from now on."""
    kinds: list[str] = []
    read = TileFiles.read

    def recording(self, kind: str, *args, **kwargs):
        kinds.append(kind)
        return read(self, kind, *args, **kwargs)

    monkeypatch.setattr(TileFiles, "read", recording)
    return kinds


def test_a_tile_read_from_the_tile_files_is_the_same_records_and_a_short_file_is_an_error(tmp_path: Path) -> None:
    records = np.zeros(10, dtype=TILE_FIELDS)
    records["X"] = np.arange(10)
    tiles = TileFiles(tmp_path, np.dtype("u1"), 0)
    for tile_ids in ([1, 2, 1, 1, 2], [2, 1, 2, 2, 1]):
        tiles.append({"context": records[:5] if tile_ids[0] == 1 else records[5:]}, np.array(tile_ids))
    located = tiles.locate("context", 1)
    assert located.count == 5 and len(located.runs) == 2
    assert located.records().tobytes() == tiles.read("context", 1).tobytes()
    assert list(located.records()["X"]) == [0, 2, 3, 6, 9]
    tiles.close()
    first = Path(located.runs[0][0])
    first.write_bytes(first.read_bytes()[: TILE_FIELDS.itemsize])
    with pytest.raises(OSError, match=f"tile file {first.name} is shorter than written"):
        located.records()


@pytest.mark.parametrize("case", ["empty", "single_point", "identical_points", "zero_area_line", "extreme_coordinates"])
def test_degenerate_inputs_are_classified_or_refused_clearly(tmp_path: Path, settings, client, case: str) -> None:
    source = tmp_path / f"{case}.las"
    header = laspy.LasHeader(point_format=1, version="1.2")
    header.scales = np.array([0.01, 0.01, 0.01])
    n = {"empty": 0, "single_point": 1}.get(case, 500)
    rng = np.random.default_rng(3)
    x, y, z = np.full(n, 1000.0), np.full(n, 2000.0), np.full(n, 50.0)
    if case == "zero_area_line":
        x = 1000.0 + np.linspace(0, 100, n)
    if case == "extreme_coordinates":
        header.offsets = np.array([9.9e6, 9.9e6, 0.0])
        x, y, z = 9.9e6 + rng.uniform(0, 40, n), 9.9e6 + rng.uniform(0, 40, n), 8000 + rng.normal(0, 0.1, n)
    else:
        header.offsets = np.array([1000.0, 2000.0, 0.0])
    data = laspy.LasData(header)
    data.x, data.y, data.z = x, y, z
    data.write(source)
    output = tmp_path / "out.laz"
    # The same gate as validation's: no points, or all on one spot or one line, is refused.
    refusal = {
        "empty": "holds no points",
        "single_point": "zero area",
        "identical_points": "zero area",
        "zero_area_line": "zero area",
    }
    if case in refusal:
        with pytest.raises(NotPointCloudError, match=refusal[case]):
            classify_file(source, output, settings, client=client)
        assert not output.exists()
        return
    result = classify_file(source, output, settings, client=client)
    classes = laspy.read(output).classification
    assert len(classes) == n == result.output_points
    assert set(np.unique(classes)) <= {1, 2, 3, 4, 5, 6, 7, 9, 18}


def _workers_started_since(before: set[int]) -> list:
    # The run's local cluster: this process's children that are workers ("dask worker [address]")
    # and were not there before the run (the module's LocalCluster has its own).
    workers = []
    for process in psutil.Process().children():
        try:
            if process.pid not in before and "dask worker" in " ".join(process.cmdline()):
                workers.append(process)
        except psutil.Error:  # a killed worker, not yet reaped
            continue
    return workers


def test_the_local_cluster_replaces_a_killed_worker_and_fails_clearly_when_none_is_left(
    tmp_path: Path, settings, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two tiles at once are one worker process of two threads, without a nanny: a dead one is
    # replaced from the command, its tiles rerun there; with no replacement left, a run with no
    # worker fails (after NO_WORKERS_TIMEOUT) instead of waiting for ever.
    source = shared_file("isprs/samp11.las")
    reference, survived, failed = tmp_path / "reference.las", tmp_path / "survived.las", tmp_path / "failed.las"
    classify_file(source, reference, settings, tile_size=10, buffer=3, client=client)

    def killing():
        killed: list[int] = []
        seen: set[int] = set()
        before = {p.pid for p in psutil.Process().children()}

        def progress(stage: str, done: int, total: int) -> None:
            workers = _workers_started_since(before)
            seen.update(worker.pid for worker in workers)
            if stage == "classify" and not killed:
                assert len(workers) == 1
                workers[0].kill()
                killed.append(workers[0].pid)

        return progress, killed, seen

    progress, killed, seen = killing()
    result = classify_file(source, survived, settings, tile_size=10, buffer=3, workers=2, progress=progress)
    assert len(killed) == 1 and result.output_points == laspy.open(source).header.point_count
    assert result.workers == 2 and len(seen) == 2  # the killed process and its replacement
    assert laspy.read(survived).points.array.tobytes() == laspy.read(reference).points.array.tobytes()

    monkeypatch.setattr(cluster, "NO_WORKERS_TIMEOUT", "1s")
    monkeypatch.setattr(cluster, "REPLACEMENTS_PER_PROCESS", 0)
    progress, killed, _ = killing()
    with pytest.raises(
        ClusterStartError, match="every worker of the Dask cluster is gone .* within 1s: nothing was written"
    ):
        classify_file(source, failed, settings, tile_size=10, buffer=3, workers=2, progress=progress)
    assert len(killed) == 1 and not failed.exists()
    assert list(settings.scratch_dir.glob("*")) == []


def test_closing_a_local_worker_whose_process_is_already_gone_is_not_an_error() -> None:
    # The race the killed-worker test lost now and then: the process died and was reaped, and
    # asyncio had not yet set its return code when the cluster closed it to start its replacement.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    worker = cluster._worker_process()("tcp://127.0.0.1:1")
    worker.process = _Process(gone.pid)
    asyncio.run(worker.close())
    assert worker.process is None and worker.status.name == "closed"


@dataclasses.dataclass
class _Process:
    pid: int
    returncode: int | None = None


def test_a_local_cluster_of_an_odd_number_of_workers_runs_that_many_tiles_at_once(tmp_path: Path, settings) -> None:
    before = {p.pid for p in psutil.Process().children()}
    processes: set[int] = set()

    def progress(stage: str, done: int, total: int) -> None:
        processes.update(worker.pid for worker in _workers_started_since(before))

    source = shared_file("isprs/samp11.las")
    result = classify_file(source, tmp_path / "out.las", settings, tile_size=10, buffer=3, workers=3, progress=progress)
    assert result.workers == 3 and len(processes) == 2


def test_tiles_sent_during_the_scan_give_the_same_file_in_any_point_order(
    tmp_path: Path, settings, client, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = laspy.read(shared_file("ign_st_barth_100m.laz"))
    # Written south to north, a tile is left behind by the scan long before it ends; the same order
    # with the southernmost points moved to the end brings points to tiles already sent.
    by_y = np.argsort(np.asarray(data.Y), kind="stable")
    orders = {"coherent": by_y, "returning": np.r_[by_y[500:], by_y[:500]]}
    early = {}
    for name, order in orders.items():
        source, reference, output = tmp_path / f"{name}.laz", tmp_path / f"{name}-ref.las", tmp_path / f"{name}.las"
        ordered = laspy.LasData(data.header, data.points[order])
        ordered.write(source)
        # One chunk (the default, larger than the file): nothing is sent before the scan's end.
        assert classify_file(source, reference, settings, tile_size=40, buffer=15, client=client).early_tiles == 0
        monkeypatch.setattr(scan, "CHUNK_POINTS", 5_000)
        monkeypatch.setattr(scan, "EARLY_TILE_POINTS", 1_000)
        result = classify_file(source, output, settings, tile_size=40, buffer=15, client=client)
        monkeypatch.undo()
        early[name] = result.early_tiles
        assert result.output_points == len(data)
        assert laspy.read(output).points.array.tobytes() == laspy.read(reference).points.array.tobytes()
    # The tiles of the southern row got points again at the end: classified again, not counted.
    assert early["coherent"] > early["returning"] > 0


CLASSIFY_AND_LIST_MODULES = """
import sys
from pathlib import Path
from pipelines.classify import classify_file
from pipelines.settings import Settings
result = classify_file(Path(sys.argv[1]), Path(sys.argv[2]), Settings.from_env(), workers=1)
print(result.classifier_version, result.output_points, *sorted({m.split(".")[0] for m in sys.modules}))
"""


def test_the_command_that_scans_and_sends_tiles_never_loads_the_classifiers_algorithms(tmp_path: Path, home) -> None:
    # Only the workers classify: SciPy and numba in the scanning process would cost it a CPU-second
    # of imports and compiled-code loading on the scan's way.
    source = shared_file("ign_st_barth_100m.laz")
    done = subprocess.run(
        [sys.executable, "-c", CLASSIFY_AND_LIST_MODULES, str(source), str(tmp_path / "out.laz")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    version, points, *modules = done.stdout.split()
    assert (version, int(points)) == (describe_classifier("standard").version, 249_120)
    assert {"laspy", "distributed"} <= set(modules)
    assert not {"scipy", "numba", "lightgbm"} & set(modules)
