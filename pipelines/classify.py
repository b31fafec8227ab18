"""Tiled classification of a LAS/LAZ file on Dask, reader -> tiles -> classifier -> writer.

1. scan: stream the input in chunks through the gate's point checks (`lasio.iter_checked`);
   append each point's raw record to its owner tile's file, and the fields the classifier reads
   (TILE_FIELDS) to the context file of every neighbour whose buffer ring it falls in. Only
   occupied tiles get files: cost follows the points, not the extent.
2. classify: Dask tasks carry tiles' core + context fields (by value: workers need no shared
   filesystem, and a task whose worker dies can be rerun elsewhere) and return one class code per
   core point. Small tiles share a task (up to TASK_POINTS points), so a sparse file is not
   thousands of one-point tasks; a tile that sees fewer than MIN_TILE_POINTS points, ring
   included, is too sparse for any surface model and is written as class 1 without a task. A
   bounded number of tasks is in flight at once.
3. write: read each tile's core records again, set their classes, and append them to the output,
   written to a temporary name and renamed at the end, so a failure never leaves a partial file.
   LAS 1.0/1.1 inputs are written as the LAS version that holds their format; COPC inputs are read
   as the LAZ they are (OUTPUT's name asks for COPC output, written by pipelines.copc from the LAZ).
Memory is bounded by the chunk and tile sizes and the number of tasks in flight, not by the file
size; the work folder is a `scratch.work_dir`, swept by the next run if this one is killed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import laspy
import numpy as np

from pipelines.classifiers import Classifier, PointBlock, get_classifier
from pipelines.classifiers.base import UNCLASSIFIED
from pipelines.classifiers.trained import TrainedClassifier, TrainedModel
from pipelines.copc import COPC_SUFFIX, write_copc
from pipelines.gate import NotPointCloudError
from pipelines.lasio import CHUNK_POINTS, group_runs, iter_checked, point_block, read_info
from pipelines.orphans import OWNER_VARIABLE
from pipelines.scratch import work_dir
from pipelines.settings import ClusterStartError, Settings
from pipelines.tile import TileGrid
from pipelines.units import METRES, CoordinateUnits, coordinate_units

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): stage is "scan", "classify" or "write"."""


# What a tile task carries per point: the classifier's inputs, not the whole record (whose extra
# bytes may be hundreds per point).
TILE_FIELDS = np.dtype([("x", "<f8"), ("y", "<f8"), ("z", "<f8"), ("intensity", "<u2"), ("return_number", "u1"), ("number_of_returns", "u1")])
TASK_POINTS = 2_000
MIN_TILE_POINTS = 10


@dataclass(frozen=True)
class TileTask:
    tile_id: int
    core: bytes  # the tile's own points, TILE_FIELDS records
    context: bytes  # points of the buffer ring around it, for context only


@dataclass(frozen=True)
class TileBatch:
    """One Dask task: one tile, or several small ones, and the classifier to apply to each."""

    tiles: tuple[TileTask, ...]
    classifier: str
    params: dict[str, Any]
    # A customer's trained model travels with its tiles; built-in classifiers are built by name.
    model: bytes | None = None
    model_version: str | None = None


@dataclass(frozen=True)
class TileResult:
    tile_id: int
    classes: bytes  # one class code per core point, in the core's order
    context_points: int
    class_counts: dict[int, int]
    seconds: float


@dataclass
class ClassifyResult:
    input_points: int
    output_points: int
    class_counts: dict[int, int]
    classifier: str
    classifier_version: str
    classifier_params: dict[str, Any]
    tiles: int
    tile_size: float  # metres
    tile_buffer: float  # metres
    workers: int
    units: CoordinateUnits
    timings: dict[str, float] = field(default_factory=dict)
    dashboard: str | None = None
    sparse_points: int = 0  # in tiles too sparse to model: written as class 1


def tile_fields(points, units: CoordinateUnits = METRES) -> np.ndarray:
    """The classifier's inputs of laspy points, in metres, packed as TILE_FIELDS records."""
    block = point_block(points, units)
    fields = np.empty(len(block), dtype=TILE_FIELDS)
    for name in TILE_FIELDS.names:
        fields[name] = getattr(block, name)
    return fields


def _block(fields: np.ndarray) -> PointBlock:
    return PointBlock(**{name: np.ascontiguousarray(fields[name]) for name in TILE_FIELDS.names})


def _counted(tile_id: int, classes: np.ndarray, context_points: int, seconds: float) -> TileResult:
    counts = np.bincount(classes, minlength=1)
    return TileResult(tile_id, classes.tobytes(), context_points, {int(c): int(n) for c, n in enumerate(counts) if n}, seconds)


def classify_tile(task: TileTask, classifier: Classifier) -> TileResult:
    """Classify core + context, return the core points' classes."""
    started = time.perf_counter()
    core = np.frombuffer(task.core, dtype=TILE_FIELDS)
    context = np.frombuffer(task.context, dtype=TILE_FIELDS)
    fields = np.concatenate([core, context]) if len(context) else core
    classes = np.asarray(classifier.classify(_block(fields)), dtype=np.uint8)[: len(core)]
    return _counted(task.tile_id, classes, len(context), time.perf_counter() - started)


def classify_batch(batch: TileBatch) -> list[TileResult]:
    """Runs on a Dask worker: every tile of the batch, each on its own (as if alone in a task)."""
    classifier = _worker_classifier(batch)
    return [classify_tile(task, classifier) for task in batch.tiles]


def _worker_classifier(batch: TileBatch) -> Classifier:
    if batch.model is None:
        return get_classifier(batch.classifier, batch.params)
    # The client checked the model's signature before sending it.
    return TrainedClassifier(TrainedModel.from_bytes(batch.model), batch.classifier, batch.model_version)


# Read by the local cluster's subprocesses (see the file for why).
LOCAL_DASK_CONFIG = Path(__file__).with_name("data") / "dask-local.yaml"


@contextlib.contextmanager
def _environment(defaults: dict[str, str], fixed: dict[str, str]) -> Iterator[None]:
    """Variables the local cluster's subprocesses inherit: `defaults` unless the user set them, `fixed` always."""
    saved = {name: os.environ.get(name) for name in [*defaults, *fixed]}
    os.environ.update({k: v for k, v in defaults.items() if k not in os.environ} | fixed)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def dask_client(settings: Settings, workers: int | None = None) -> Iterator[Any]:
    """A client on POINTFLOW_DASK_ADDRESS, or on a local cluster of `workers` processes.

    The local cluster starts its scheduler and workers with `python -m dask`, not with
    multiprocessing: spawned children re-import the parent's __main__, and inside an Airflow task
    that is the `airflow` script, which refuses to start without its database.
    """
    from distributed import Client
    from distributed.deploy.subprocess import SubprocessCluster

    if settings.dask_address:
        with Client(settings.dask_address, timeout="30s") as client:
            yield client
        return
    # The cluster's processes end when this one does (pipelines/orphans.py, loaded by the config).
    wanted = workers or settings.workers
    with _environment({"DASK_CONFIG": str(LOCAL_DASK_CONFIG)}, {OWNER_VARIABLE: str(os.getpid())}), SubprocessCluster(
        n_workers=wanted,
        threads_per_worker=1,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster, Client(cluster) as client:
        # The cluster returns once its scheduler is up, before its workers have registered: counted
        # then, 2 workers were reported (and the in-flight window sized) as 1.
        wait_for_workers(client, wanted, WORKER_START_SECONDS, "the local Dask cluster")
        yield client


# How long a local cluster's workers may take to start: a few seconds, longer on a loaded machine.
WORKER_START_SECONDS = 120.0


def wait_for_workers(client: Any, wanted: int, timeout: float, where: str) -> int:
    """Block until `wanted` workers are registered with the client's scheduler; their number."""
    try:
        client.wait_for_workers(wanted, timeout=timeout)
    except TimeoutError:
        started = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        raise ClusterStartError(
            f"{where} has {started} of the {wanted} worker(s) asked for after {timeout:.0f} s: the machine may be short of "
            f"memory or processes; ask for fewer (--workers, POINTFLOW_WORKERS) or retry"
        ) from None
    return len(client.scheduler_info(n_workers=-1).get("workers", {}))


class TileFiles:
    """Every occupied tile's points on the local scratch disk. Each scanned chunk is written once,
    grouped by tile, as one file per kind ("core": raw records, for the output; "context":
    TILE_FIELDS records), and an index keeps where each tile's runs lie: a file of 20,000 one-point
    tiles costs two files per chunk, not 40,000."""

    def __init__(self, folder: Path, core: np.dtype) -> None:
        self.folder = folder
        self.dtypes = {"core": core, "context": TILE_FIELDS}
        self.files: dict[str, list[Path]] = {"core": [], "context": []}
        self.runs: dict[str, dict[int, list[tuple[int, int, int]]]] = {"core": {}, "context": {}}
        self._maps: dict[tuple[str, int], np.ndarray] = {}

    def append(self, kind: str, records: np.ndarray, tile_ids: np.ndarray, index: np.ndarray | None = None) -> None:
        """records[index] (all records by default), grouped by tile id."""
        grouped, runs = group_runs(records, tile_ids, index)
        number = len(self.files[kind])
        path = self.folder / f"{kind}-{number}"
        grouped.tofile(path)
        self.files[kind].append(path)
        for tile_id, start, end in runs:
            self.runs[kind].setdefault(tile_id, []).append((number, start, end - start))

    def counts(self, kind: str) -> dict[int, int]:
        return {tile_id: sum(n for _, _, n in runs) for tile_id, runs in self.runs[kind].items()}

    def read(self, kind: str, tile_id: int) -> np.ndarray:
        parts = [self._mapped(kind, number)[start : start + count] for number, start, count in self.runs[kind].get(tile_id, [])]
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtypes[kind])

    def _mapped(self, kind: str, number: int) -> np.ndarray:
        # Tiles are read in id order, the order of the runs in each file: the same few files map
        # again and again, so keep the latest ones mapped (a bounded number of open files).
        key = (kind, number)
        if key not in self._maps:
            if len(self._maps) >= 16:
                self._maps.pop(next(iter(self._maps)))
            self._maps[key] = np.memmap(self.files[kind][number], dtype=self.dtypes[kind], mode="r")
        return self._maps[key]


def _scan(input_path: Path, info, units: CoordinateUnits, grid: TileGrid, tiles: TileFiles, progress: Progress | None) -> None:
    """Partition the input into tiles: every point once as core of its tile, and as context of
    every neighbour whose buffer ring it falls in."""
    done = 0
    for chunk in iter_checked(input_path, info, CHUNK_POINTS):
        fields = tile_fields(chunk, units)
        x, y = fields["x"], fields["y"]
        tiles.append("core", chunk.array, grid.owner(x, y))
        context = list(grid.context(x, y))
        if context:
            # One grouped write for all neighbours: one sort, not eight.
            index = np.concatenate([i for i, _ in context])
            tile_ids = np.concatenate([t for _, t in context])
            tiles.append("context", fields, tile_ids, index)
        done += len(fields)
        if progress:
            progress("scan", done, info.point_count)


def _batches(owned: dict[int, int], context: dict[int, int]) -> list[list[int]]:
    """Tiles in id order, grouped into tasks of at least TASK_POINTS points (or what is left)."""
    batches: list[list[int]] = []
    points = TASK_POINTS
    for tile_id in sorted(owned):
        if points >= TASK_POINTS:
            batches.append([])
            points = 0
        batches[-1].append(tile_id)
        points += owned[tile_id] + context.get(tile_id, 0)
    return batches


def classify_file(
    input_path: Path,
    output_path: Path,
    settings: Settings,
    classifier: str | TrainedClassifier = "standard",
    params: dict[str, Any] | None = None,
    tile_size: float | None = None,
    buffer: float | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    client: Any = None,
    account_id: str | None = None,
    job_id: str | None = None,
) -> ClassifyResult:
    """Classify `input_path` into `output_path` (.las, .laz or .copc.laz); every input point is written once.

    `classifier` is a built-in name or an account's TrainedClassifier (see pipelines.training).
    `account_id` and `job_id` say whose points the scratch folder holds (for deletion on request).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    suffix = output_path.suffix.lower()
    if suffix not in (".las", ".laz"):
        raise ValueError(f"output {output_path.name} must end in .las, .laz or {COPC_SUFFIX}")
    copc = output_path.name.lower().endswith(COPC_SUFFIX)
    if output_path.resolve() == input_path.resolve():
        raise ValueError("output must not overwrite the input")
    info = read_info(input_path)
    model = classifier if isinstance(classifier, TrainedClassifier) else get_classifier(classifier, params)
    model_bytes = model.model.to_bytes() if isinstance(model, TrainedClassifier) else None
    tile_size = settings.tile_size if tile_size is None else tile_size
    buffer = settings.tile_buffer if buffer is None else buffer
    with laspy.open(input_path) as reader:
        header = reader.header
    try:
        units = coordinate_units(header)
    except ValueError as error:
        raise NotPointCloudError(f"{input_path.name}: {error}") from None
    # Tiles are laid out in metres, like everything the classifiers see.
    grid = TileGrid.covering(tuple(v * units.horizontal for v in info.mins), tuple(v * units.horizontal for v in info.maxs),
                             tile_size, buffer)
    timings: dict[str, float] = {}

    with work_dir(settings.scratch_dir, "classify", account_id, job_id) as work:
        started = time.perf_counter()
        with laspy.open(input_path) as reader:
            header = writable_header(reader.header)
        tiles = TileFiles(work, header.point_format.dtype())
        _scan(input_path, info, units, grid, tiles, progress)
        owned, context = tiles.counts("core"), tiles.counts("context")
        sparse = {t for t in owned if owned[t] + context.get(t, 0) < MIN_TILE_POINTS}
        timings["scan_s"] = time.perf_counter() - started

        def tile_task(t: int) -> TileTask:
            core = laspy.ScaleAwarePointRecord(tiles.read("core", t), header.point_format, header.scales, header.offsets)
            return TileTask(t, tile_fields(core, units).tobytes(), tiles.read("context", t).tobytes())

        def batch(tile_ids: list[int]) -> TileBatch:
            return TileBatch(tuple(tile_task(t) for t in tile_ids), model.name, model.params, model_bytes, model.version)

        started = time.perf_counter()
        modelled = {t: n for t, n in owned.items() if t not in sparse}
        results = {t: _counted(t, np.full(owned[t], UNCLASSIFIED, dtype=np.uint8), context.get(t, 0), 0.0) for t in sparse}
        dashboard, n_workers = None, 0
        if modelled:
            with (contextlib.nullcontext(client) if client is not None else dask_client(settings, workers)) as active:
                dashboard = getattr(active, "dashboard_link", None)
                if dashboard and len(modelled) > 1:
                    log.info("Dask dashboard: %s", dashboard)
                # Every worker of a local cluster has registered (dask_client waits for them); a
                # remote scheduler's workers come and go, so take the count at hand, at least one.
                n_workers = wait_for_workers(active, 1, WORKER_START_SECONDS, "the Dask scheduler")
                results |= _run_tiles(active, _batches(modelled, context), batch, n_workers, len(owned), progress)
        timings["classify_s"] = time.perf_counter() - started

        started = time.perf_counter()
        written = _write(header, tiles, results, work / "classified.laz" if copc else output_path, progress)
        timings["write_s"] = time.perf_counter() - started
        if copc:
            started = time.perf_counter()
            write_copc(work / "classified.laz", output_path, work, progress)
            timings["copc_s"] = time.perf_counter() - started

    counts: dict[int, int] = {}
    for result in results.values():
        for cls, n in result.class_counts.items():
            counts[cls] = counts.get(cls, 0) + n
    return ClassifyResult(
        input_points=info.point_count,
        output_points=written,
        class_counts=dict(sorted(counts.items())),
        classifier=model.name,
        classifier_version=model.version,
        classifier_params=model.params,
        tiles=len(owned),
        tile_size=grid.size,
        tile_buffer=grid.buffer,
        workers=n_workers,
        units=units,
        timings={k: round(v, 3) for k, v in timings.items()},
        dashboard=dashboard,
        sparse_points=sum(owned[t] for t in sparse),
    )


def _run_tiles(client: Any, batches: list[list[int]], make_batch: Callable[[list[int]], TileBatch], n_workers: int, total_tiles: int,
               progress: Progress | None) -> dict[int, TileResult]:  # fmt: skip
    import dask
    from distributed import as_completed

    pending = iter(batches)
    # One task per worker and one more queued: every worker stays busy while a finished task's
    # successor is sent, and the scheduler holds only that many tasks' points at a time.
    window = n_workers + 1

    def submit(tile_ids: list[int]):
        # A fresh key: the same tiles in a later run must be classified again, not reused.
        return client.submit(classify_batch, make_batch(tile_ids), retries=2, key=f"classify_tile-{uuid.uuid4().hex}")

    # A tile's points travel inside its task on purpose (see the module docstring); Dask's
    # warning about large graphs assumes data that could be loaded on the workers instead.
    results: dict[int, TileResult] = {}
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1GiB"}):
        running = as_completed([submit(b) for _, b in zip(range(window), pending)])
        for future in running:
            for result in future.result():
                results[result.tile_id] = result
            future.release()
            following = next(pending, None)
            if following is not None:
                running.add(submit(following))
            if progress:
                progress("classify", len(results), total_tiles)
    return results


# The oldest LAS version laspy writes that holds each point format (it writes neither 1.0 nor COPC).
_WRITABLE_VERSIONS = ("1.2", "1.3", "1.4")


def writable_header(header: laspy.LasHeader) -> laspy.LasHeader:
    """The input's header for the output: the same version where laspy can write it, else the
    oldest that holds the point format (LAS 1.0 -> 1.2); COPC's octree records are dropped, since
    the output is a plain LAS/LAZ in tile order."""
    from laspy.point.dims import is_point_fmt_compatible_with_version

    out = copy.deepcopy(header)
    current = f"{header.version.major}.{header.version.minor}"
    if current not in _WRITABLE_VERSIONS or not is_point_fmt_compatible_with_version(header.point_format.id, current):
        version = next(v for v in _WRITABLE_VERSIONS if v >= current and is_point_fmt_compatible_with_version(header.point_format.id, v))
        out.version = laspy.header.Version.from_str(version)
    out.vlrs = [v for v in out.vlrs if v.user_id != "copc"]
    if out.evlrs is not None:
        out.evlrs = [v for v in out.evlrs if v.user_id != "copc"]
    return out


def _write(header: laspy.LasHeader, tiles: TileFiles, results: dict[int, TileResult], output_path: Path, progress: Progress | None) -> int:
    compress = output_path.suffix.lower() == ".laz"
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(f".{output_path.name}.partial")
    written = 0
    pending: list[tuple[np.ndarray, bytes]] = []
    try:
        with laspy.open(partial, mode="w", header=header, do_compress=compress, laz_backend=laspy.LazBackend.LazrsParallel if compress else None) as writer:

            def flush() -> None:
                # Many small tiles go out in one call: the writer's cost is per call, not per point.
                records = laspy.PackedPointRecord(np.concatenate([raw for raw, _ in pending]), header.point_format)
                records.classification = np.frombuffer(b"".join(classes for _, classes in pending), dtype=np.uint8)
                writer.write_points(records)
                pending.clear()

            buffered = 0
            for done, tile_id in enumerate(sorted(results), 1):
                raw = tiles.read("core", tile_id)
                pending.append((raw, results[tile_id].classes))
                buffered += len(raw)
                written += len(raw)
                if buffered >= CHUNK_POINTS:
                    flush()
                    buffered = 0
                if progress:
                    progress("write", done, len(results))
            if pending:
                flush()
        os.replace(partial, output_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return written
