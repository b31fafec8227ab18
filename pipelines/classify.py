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
from pipelines.lasio import CHUNK_POINTS, group_runs, iter_checked, read_info
from pipelines.orphans import OWNER_VARIABLE
from pipelines.scratch import work_dir
from pipelines.settings import ClusterStartError, Settings
from pipelines.tile import TileGrid
from pipelines.units import METRES, CoordinateUnits, coordinate_units

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): stage is "scan", "classify" or "write"."""


# What a tile task carries per point: the classifier's inputs as the file stores them (integer
# coordinates), not the whole record (whose extra bytes may be hundreds per point), nor metres:
# 16 bytes instead of 28 to copy, send through the scheduler and receive. Workers scale them to
# metres exactly as laspy does (`Scaling`), so the classifier sees the very same numbers.
TILE_FIELDS = np.dtype(
    [
        ("X", "<i4"),
        ("Y", "<i4"),
        ("Z", "<i4"),
        ("intensity", "<u2"),
        ("return_number", "u1"),
        ("number_of_returns", "u1"),
    ]
)
TASK_POINTS = 2_000
MIN_TILE_POINTS = 10
# From this many points on, the local cluster starts while the file is scanned: its processes'
# start-up (seconds of imports) then overlaps the scan. Below, a file may need no cluster at all
# (every tile too sparse to model), and its scan is shorter than a cluster's start anyway.
EARLY_CLUSTER_POINTS = 1_000_000


@dataclass(frozen=True)
class TileTask:
    tile_id: int
    # TILE_FIELDS records, as arrays rather than bytes: pickle protocol 5 (Dask's) sends an array's
    # memory as a frame of its own, while bytes are copied into the pickle stream, and out of it,
    # at every hop (client, scheduler, worker): 31 ms per 1.43 M point tile each way.
    core: np.ndarray  # the tile's own points
    context: np.ndarray  # points of the buffer ring around it, for context only


@dataclass(frozen=True)
class Scaling:
    """TILE_FIELDS' integers to the classifier's metres: laspy's X * scale + offset (see
    laspy.point.dims.ScaledArrayView), times the unit's metres, as `lasio.point_block` computes them."""

    scales: tuple[float, float, float]
    offsets: tuple[float, float, float]
    horizontal: float = 1.0
    vertical: float = 1.0

    def axis(self, fields: np.ndarray, k: int) -> np.ndarray:
        unit = self.vertical if k == 2 else self.horizontal
        return (fields["XYZ"[k]] * np.float64(self.scales[k]) + np.float64(self.offsets[k])) * unit

    def block(self, fields: np.ndarray) -> PointBlock:
        return PointBlock(
            x=self.axis(fields, 0),
            y=self.axis(fields, 1),
            z=self.axis(fields, 2),
            intensity=np.ascontiguousarray(fields["intensity"]),
            return_number=np.ascontiguousarray(fields["return_number"]),
            number_of_returns=np.ascontiguousarray(fields["number_of_returns"]),
        )


@dataclass(frozen=True)
class TileBatch:
    """One Dask task: one tile, or several small ones, and the classifier to apply to each."""

    tiles: tuple[TileTask, ...]
    scaling: Scaling
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


def tile_fields(points) -> np.ndarray:
    """The classifier's inputs of laspy points (a record of the file's point format), packed as TILE_FIELDS records."""
    fields = np.empty(len(points), dtype=TILE_FIELDS)
    for name in TILE_FIELDS.names:
        fields[name] = np.asarray(points[name])
    return fields


def scaling_of(header: laspy.LasHeader, units: CoordinateUnits = METRES) -> Scaling:
    return Scaling(
        tuple(float(v) for v in header.scales),
        tuple(float(v) for v in header.offsets),
        units.horizontal,
        units.vertical,
    )


def _counted(tile_id: int, classes: np.ndarray, context_points: int, seconds: float) -> TileResult:
    counts = np.bincount(classes, minlength=1)
    return TileResult(
        tile_id, classes.tobytes(), context_points, {int(c): int(n) for c, n in enumerate(counts) if n}, seconds
    )


def classify_tile(task: TileTask, classifier: Classifier, scaling: Scaling) -> TileResult:
    """Classify core + context, return the core points' classes."""
    started = time.perf_counter()
    core, context = task.core, task.context
    fields = np.concatenate([core, context]) if len(context) else core
    classes = np.asarray(classifier.classify(scaling.block(fields)), dtype=np.uint8)[: len(core)]
    return _counted(task.tile_id, classes, len(context), time.perf_counter() - started)


def classify_batch(batch: TileBatch) -> list[TileResult]:
    """Runs on a Dask worker: every tile of the batch, each on its own (as if alone in a task)."""
    classifier = _worker_classifier(batch)
    return [classify_tile(task, classifier, batch.scaling) for task in batch.tiles]


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


# The in-process scheduler's share of dask-local.yaml (its housekeeping intervals), and how long its
# tasks may wait with no worker at all: nanny-less workers are not restarted, so a run whose every
# worker died fails after this instead of waiting for ever.
_SCHEDULER_CONFIG_KEYS = (
    "distributed.admin.tick.interval",
    "distributed.admin.system-monitor.interval",
    "distributed.scheduler.work-stealing-interval",
)
NO_WORKERS_TIMEOUT = "60s"


def _local_config() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(LOCAL_DASK_CONFIG.read_text())


@contextlib.contextmanager
def local_cluster(settings: Settings, workers: int | None = None) -> Iterator[Any]:
    """A local cluster of `workers` processes (POINTFLOW_WORKERS by default), one thread each.

    The scheduler runs in this process (one Python process fewer to start and import); the workers are `python -m dask spec` subprocesses, not
    multiprocessing children: spawned children re-import the parent's __main__, and inside an
    Airflow task that is the `airflow` script, which refuses to start without its database. They
    run without nannies (two processes fewer, about 1 CPU-second of imports a run): a worker that
    dies is not restarted, its tasks are rerun on the others, and if none is left the run fails
    after NO_WORKERS_TIMEOUT.
    """
    import dask
    from distributed import Scheduler, SpecCluster
    from distributed.deploy.subprocess import SubprocessWorker
    from distributed.worker_memory import parse_memory_limit

    count = workers or settings.workers
    config = _local_config()
    scheduler_config = {key: _lookup(config, key) for key in _SCHEDULER_CONFIG_KEYS}
    # A nanny would set these in its worker's environment (pre-spawn-environ): the workers inherit them from here.
    malloc = {k: str(v) for k, v in config["distributed"]["nanny"]["pre-spawn-environ"].items()}
    worker = {
        "cls": SubprocessWorker,
        "options": {
            "worker_class": "distributed.Worker",
            "worker_kwargs": {
                "host": "127.0.0.1",
                "nthreads": 1,
                "silence_logs": logging.ERROR,
                "memory_limit": parse_memory_limit("auto", 1, count, logger=log),
            },
        },
    }
    scheduler = {
        "cls": Scheduler,
        "options": {"host": "127.0.0.1", "port": 0, "dashboard": True, "dashboard_address": ":0"},
    }
    # The cluster's processes end when this one does (pipelines/orphans.py, loaded by the config).
    with (
        _environment({"DASK_CONFIG": str(LOCAL_DASK_CONFIG), **malloc}, {OWNER_VARIABLE: str(os.getpid())}),
        dask.config.set(
            {
                **scheduler_config,
                "distributed.scheduler.no-workers-timeout": NO_WORKERS_TIMEOUT,
                # Never the orphan watch in here (a DASK_CONFIG of dask-local.yaml would load it):
                # it would end this process with its parent.
                "distributed.scheduler.preload": [],
            }
        ),
        SpecCluster(
            workers={i: worker for i in range(count)},
            scheduler=scheduler,
            worker=worker,
            silence_logs=logging.ERROR,
            name="pointflow",
        ) as cluster,
    ):
        yield cluster


def _lookup(config: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config[part]
    return config


@contextlib.contextmanager
def dask_client(settings: Settings, workers: int | None = None, cluster: Any = None) -> Iterator[Any]:
    """A client on POINTFLOW_DASK_ADDRESS, or on a local cluster of `workers` processes: `cluster`
    when it is already started (`local_cluster`), else one started here."""
    from distributed import Client

    if settings.dask_address:
        with Client(settings.dask_address, timeout="30s") as client:
            yield client
        return
    wanted = workers or settings.workers
    with (
        contextlib.nullcontext(cluster) if cluster is not None else local_cluster(settings, workers) as running,
        Client(running) as client,
    ):
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
        self._handles: dict[tuple[str, int], Any] = {}

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
        runs = self.runs[kind].get(tile_id, [])
        size = self.dtypes[kind].itemsize
        out = np.empty(sum(n for _, _, n in runs), dtype=self.dtypes[kind])
        buffer, at = memoryview(out.view(np.uint8)), 0
        for number, start, count in runs:
            # Read, not memory-mapped: mapped pages count as the process's resident memory while
            # the map lives (16 maps of 1 M point chunks were 0.4 GB of a 2 GB budget).
            done = os.preadv(self._opened(kind, number), [buffer[at : at + count * size]], start * size)
            if done != count * size:
                raise OSError(f"tile file {self.files[kind][number].name} is shorter than written")
            at += done
        return out

    def _opened(self, kind: str, number: int) -> int:
        # Tiles are read in id order, the order of the runs in each file: the same few files are
        # read again and again, so keep the latest ones open (a bounded number of descriptors).
        key = (kind, number)
        if key not in self._handles:
            if len(self._handles) >= 16:
                self._handles.pop(next(iter(self._handles))).close()
            self._handles[key] = open(self.files[kind][number], "rb")
        return self._handles[key].fileno()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def _scan(
    input_path: Path, info, scaling: Scaling, grid: TileGrid, tiles: TileFiles, progress: Progress | None
) -> None:
    """Partition the input into tiles: every point once as core of its tile, and as context of
    every neighbour whose buffer ring it falls in."""
    done = 0
    for chunk in iter_checked(input_path, info, CHUNK_POINTS):
        fields = tile_fields(chunk)
        x, y = scaling.axis(fields, 0), scaling.axis(fields, 1)
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
    grid = TileGrid.covering(
        tuple(v * units.horizontal for v in info.mins),
        tuple(v * units.horizontal for v in info.maxs),
        tile_size,
        buffer,
    )
    scaling = scaling_of(header, units)
    timings: dict[str, float] = {}

    early = client is None and not settings.dask_address and info.point_count >= EARLY_CLUSTER_POINTS
    results: dict[int, TileResult] = {}
    dashboard, n_workers = None, 0
    with work_dir(settings.scratch_dir, "classify", account_id, job_id) as work:
        with laspy.open(input_path) as reader:
            header = writable_header(reader.header)
        tiles = TileFiles(work, header.point_format.dtype())
        # The output is written while tiles are classified and renamed into place only once the
        # cluster is closed and every point written: a failure on the way never leaves it behind.
        with (
            contextlib.closing(tiles),
            _TileWriter(header, tiles, work / "classified.laz" if copc else output_path, progress) as writer,
        ):
            with contextlib.ExitStack() as clients:
                started = time.perf_counter()
                # A large file's local cluster is started first: this returns once its scheduler is
                # up and its worker processes are launched, and they start (seconds of imports)
                # while the file is scanned. (Started from a thread instead, a 50 M point run once
                # never got its workers.)
                early_cluster = clients.enter_context(local_cluster(settings, workers)) if early else None
                _scan(input_path, info, scaling, grid, tiles, progress)
                owned, context = tiles.counts("core"), tiles.counts("context")
                sparse = {t for t in owned if owned[t] + context.get(t, 0) < MIN_TILE_POINTS}
                timings["scan_s"] = time.perf_counter() - started

                def tile_task(t: int) -> TileTask:
                    core = laspy.PackedPointRecord(tiles.read("core", t), header.point_format)
                    return TileTask(t, tile_fields(core), tiles.read("context", t))

                def batch(tile_ids: list[int]) -> TileBatch:
                    return TileBatch(
                        tuple(tile_task(t) for t in tile_ids),
                        scaling,
                        model.name,
                        model.params,
                        model_bytes,
                        model.version,
                    )

                modelled = {t: n for t, n in owned.items() if t not in sparse}
                results = {
                    t: _counted(t, np.full(owned[t], UNCLASSIFIED, dtype=np.uint8), context.get(t, 0), 0.0)
                    for t in sparse
                }
                # Tiles are written in id order as their classes come in, while the next ones are classified.
                writer.plan(sorted(owned))
                writer.ready(results)
                if modelled:
                    # classify_s: from here, the cluster's start included (what is left of it after the scan).
                    started = time.perf_counter()
                    active = (
                        client
                        if client is not None
                        else clients.enter_context(dask_client(settings, workers, early_cluster))
                    )
                    dashboard = getattr(active, "dashboard_link", None)
                    if dashboard and len(modelled) > 1:
                        log.info("Dask dashboard: %s", dashboard)
                    # Every worker of a local cluster has registered (dask_client waits for them); a
                    # remote scheduler's workers come and go, so take the count at hand, at least one.
                    n_workers = wait_for_workers(active, 1, WORKER_START_SECONDS, "the Dask scheduler")
                    for finished in _run_tiles(
                        active, _batches(modelled, context), batch, n_workers, len(owned), progress
                    ):
                        results |= finished
                        writer.ready(finished)
                    timings["classify_s"] = time.perf_counter() - started
                started = time.perf_counter()
        written = writer.written
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


def _run_tiles(
    client: Any,
    batches: list[list[int]],
    make_batch: Callable[[list[int]], TileBatch],
    n_workers: int,
    total_tiles: int,
    progress: Progress | None,
) -> Iterator[dict[int, TileResult]]:
    """Each finished task's results, as they come in."""
    import dask
    from distributed import as_completed
    from distributed.scheduler import NoWorkerError

    pending = iter(batches)
    # One task per worker and one more queued: every worker stays busy while a finished task's
    # successor is sent, and the scheduler holds only that many tasks' points at a time.
    window = n_workers + 1

    def submit(tile_ids: list[int]):
        # A fresh key: the same tiles in a later run must be classified again, not reused.
        return client.submit(classify_batch, make_batch(tile_ids), retries=2, key=f"classify_tile-{uuid.uuid4().hex}")

    # A tile's points travel inside its task on purpose (see the module docstring); Dask's
    # warning about large graphs assumes data that could be loaded on the workers instead.
    done = 0
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1GiB"}):
        running = as_completed([submit(b) for _, b in zip(range(window), pending)])
        for future in running:
            try:
                outcome = future.result()
            except NoWorkerError:
                raise ClusterStartError(
                    f"every worker of the Dask cluster is gone (killed, or out of memory) and none came back within "
                    f"{NO_WORKERS_TIMEOUT}: nothing was written; retry, with fewer workers (--workers, POINTFLOW_WORKERS) "
                    f"if memory is short"
                ) from None
            finished = {result.tile_id: result for result in outcome}
            future.release()
            following = next(pending, None)
            if following is not None:
                # Sent before the caller writes what came in, so the workers are not kept waiting.
                running.add(submit(following))
            done += len(finished)
            if progress:
                progress("classify", done, total_tiles)
            yield finished


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
        version = next(
            v
            for v in _WRITABLE_VERSIONS
            if v >= current and is_point_fmt_compatible_with_version(header.point_format.id, v)
        )
        out.version = laspy.header.Version.from_str(version)
    out.vlrs = [v for v in out.vlrs if v.user_id != "copc"]
    if out.evlrs is not None:
        out.evlrs = [v for v in out.evlrs if v.user_id != "copc"]
    return out


class _TileWriter:
    """The output, written tile by tile in id order (the order of the file's tiles, whatever order
    their classes come in) to a temporary name, renamed at the end: a failure never leaves a partial file."""

    def __init__(self, header: laspy.LasHeader, tiles: TileFiles, output_path: Path, progress: Progress | None) -> None:
        self.header, self.tiles, self.output_path, self.progress = header, tiles, output_path, progress
        self.order: list[int] = []
        self.writer: Any = None
        self.partial = output_path.with_name(f".{output_path.name}.partial")
        self.classes: dict[int, bytes] = {}
        self.next = 0  # position in `order` of the next tile to write
        self.pending: list[tuple[np.ndarray, bytes]] = []
        self.buffered = 0
        self.written = 0

    def __enter__(self) -> _TileWriter:
        return self

    def plan(self, order: list[int]) -> None:
        """The tiles to write, in the order to write them: the output is created now, once the input is known good."""
        self.order = order
        compress = self.output_path.suffix.lower() == ".laz"
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = laspy.open(
            self.partial,
            mode="w",
            header=self.header,
            do_compress=compress,
            laz_backend=laspy.LazBackend.LazrsParallel if compress else None,
        )

    def ready(self, results: dict[int, TileResult]) -> None:
        """Take these tiles' classes; write every tile whose predecessors are all written."""
        self.classes.update((t, r.classes) for t, r in results.items())
        while self.next < len(self.order) and self.order[self.next] in self.classes:
            tile_id = self.order[self.next]
            raw = self.tiles.read("core", tile_id)
            self.pending.append((raw, self.classes.pop(tile_id)))
            self.buffered += len(raw)
            self.written += len(raw)
            self.next += 1
            if self.buffered >= CHUNK_POINTS:
                self._flush()
            if self.progress:
                self.progress("write", self.next, len(self.order))

    def _flush(self) -> None:
        # Many small tiles go out in one call: the writer's cost is per call, not per point.
        if not self.pending:
            return
        records = laspy.PackedPointRecord(np.concatenate([raw for raw, _ in self.pending]), self.header.point_format)
        records.classification = np.frombuffer(b"".join(classes for _, classes in self.pending), dtype=np.uint8)
        self.writer.write_points(records)
        self.pending.clear()
        self.buffered = 0

    def __exit__(self, kind, error, trace) -> None:
        if self.writer is None:
            return
        try:
            if kind is None:
                if self.next != len(self.order):
                    raise RuntimeError(f"{len(self.order) - self.next} tile(s) were never classified")
                self._flush()
            self.writer.close()
            if kind is None:
                os.replace(self.partial, self.output_path)
        except BaseException:
            self.partial.unlink(missing_ok=True)
            raise
        if kind is not None:
            self.partial.unlink(missing_ok=True)
