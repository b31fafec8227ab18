"""Tiled classification of a LAS/LAZ file on Dask, reader -> tiles -> classifier -> writer.

1. scan (`pipelines.scan`): stream the input in chunks through the gate's point checks
   (`lasio.iter_checked`); append each point's raw record to its owner tile's file, and the fields
   the classifier reads (TILE_FIELDS) to the context file of every neighbour whose buffer ring it
   falls in. Only occupied tiles get files: cost follows the points, not the
   extent. Large tiles that the scan has left behind go to the workers before it ends (checked
   at its end, sent again if more of their points came).
2. classify: Dask tasks carry tiles' core + context fields (by value: a remote cluster's workers
   need no shared filesystem, and a task whose worker dies can be rerun elsewhere; the local
   cluster's workers, on this machine, are told where the records lie in the tile files and read
   them themselves, which the rerun of a task can do again) and return one class code per
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
import ctypes
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import laspy
import numpy as np

import pipelines.cluster
from pipelines.classifiers import describe_classifier
from pipelines.classifiers.base import UNCLASSIFIED
from pipelines.cluster import WORKER_START_SECONDS, dashboard_link, dask_client, local_cluster, wait_for_workers
from pipelines.copc import COPC_SUFFIX, write_copc
from pipelines.errors import InvalidValue, PointflowError
from pipelines.gate import NotPointCloudError
from pipelines.lasio import read_info
from pipelines.scan import EarlyTiles, scan
from pipelines.scratch import work_dir
from pipelines.settings import ClusterStartError, Settings
from pipelines.tile import MIN_TILE_POINTS, TileGrid
from pipelines.tile_io import Progress, TileFiles, TileWriter, classified_header, writable_header
from pipelines.tile_tasks import (
    TileBatch,
    TileResult,
    TileTask,
    classify_batch,
    scaling_of,
    tile_result,
)
from pipelines.units import CoordinateUnits, coordinate_units

if TYPE_CHECKING:
    from pipelines.classifiers.trained import TrainedClassifier

log = logging.getLogger(__name__)


TASK_POINTS = 2_000
# From this many points on, the local cluster starts while the file is scanned: its processes'
# start-up (seconds of imports) then overlaps the scan. Below, a file may need no cluster at all
# (every tile too sparse to model), and its scan is shorter than a cluster's start anyway.
EARLY_CLUSTER_POINTS = 1_000_000
# The highest class point formats 0-5 hold (5 bits); formats 6-10 hold 0-255.
LEGACY_MAX_CLASS = 31


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
    early_tiles: int = 0  # sent to the workers while the file was scanned, with all their points (pipelines.scan)


class ClassificationAborted(PointflowError):
    """`should_stop` said to stop: no more tiles were sent, those in flight were cancelled, nothing
    was written. `points`: the core points of the tiles classified before (each input point once)."""

    def __init__(self, points: int, tiles: int) -> None:
        super().__init__(f"classification stopped on request after {tiles} tile(s), {points:,} point(s)")
        self.points, self.tiles = points, tiles


def _classified_points(results: dict[int, TileResult]) -> int:
    return sum(len(result.classes) for result in results.values())


# glibc's mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _keep_heap() -> None:
    """This process's large arrays from a heap that is kept, as in the local cluster's workers
    (dask-local.yaml's MALLOC_ variables, read by glibc at a process's start, so set here by call).

    A scan's chunk arrays and the writer's tiles are 8-30 MB each: above glibc's default mmap
    threshold, every one was a fresh mapping whose pages the kernel zeroed (huge pages) and
    unmapped when freed, a million-point chunk after another: half of the command's main thread
    in a perf profile of the 10 M point benchmark was page faults."""
    from pipelines.cluster import local_malloc_settings

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its own defaults
        return
    settings = local_malloc_settings()
    for name, parameter in (
        ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD),
        ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD),
    ):
        if name not in os.environ:  # the user's own setting stands, as it does for the workers
            libc.mallopt(parameter, int(settings[name]))


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
    should_stop: Callable[[], bool] | None = None,
) -> ClassifyResult:
    """Classify `input_path` into `output_path` (.las, .laz or .copc.laz); every input point is written once.

    `classifier` is a built-in name or an account's TrainedClassifier (see pipelines.training).
    `account_id` and `job_id` say whose points the scratch folder holds (for deletion on request).
    `should_stop` (cheap, called between tiles) asks to stop: ClassificationAborted, nothing written.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    suffix = output_path.suffix.lower()
    if suffix not in (".las", ".laz"):
        raise InvalidValue(f"output {output_path.name} must end in .las, .laz or {COPC_SUFFIX}")
    copc = output_path.name.lower().endswith(COPC_SUFFIX)
    if output_path.resolve() == input_path.resolve():
        raise InvalidValue("output must not overwrite the input")
    info = read_info(input_path)
    _keep_heap()
    # Name and parameters are refused before a cluster is started for them.
    model = describe_classifier(classifier, params) if isinstance(classifier, str) else classifier
    # A trained model answers in the customer's own codes, up to 255; point formats 0-5 hold 0-31,
    # and writing the first tile's answer would fail only after the cluster has classified them all.
    beyond = sorted(c for c in model.params.get("classes", ()) if c > LEGACY_MAX_CLASS)
    if beyond and info.point_format < 6:
        raise InvalidValue(
            f"{model.name} gives class(es) {', '.join(map(str, beyond))}, which point format {info.point_format} of "
            f"{input_path.name} cannot hold (classes 0-{LEGACY_MAX_CLASS}): give the file as LAS 1.4 with point "
            "format 6 or above, or use a model trained without those classes"
        )
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

    # The cluster is a local one, started for this run: its workers share this machine's disk.
    local = client is None and not settings.dask_address
    early = local and info.point_count >= EARLY_CLUSTER_POINTS
    results: dict[int, TileResult] = {}
    dashboard, n_workers = None, 0
    with contextlib.ExitStack() as starting:
        started = time.perf_counter()
        # A large file's local cluster is started first: this returns once its scheduler is up and
        # its worker processes are launched, and they start (about a CPU-second of imports each)
        # while this process scans the file. (Started from a thread instead, a 50 M point run once
        # never got its workers.)
        early_cluster = starting.enter_context(local_cluster(settings, workers)) if early else None
        model_bytes = None if isinstance(classifier, str) else classifier.model.to_bytes()
        with work_dir(settings.scratch_dir, "classify", account_id, job_id) as work:
            with laspy.open(input_path) as reader:
                header = classified_header(
                    writable_header(reader.header),
                    model.name,
                    model.version,
                    model.params,
                    None if isinstance(classifier, str) else classifier.sha256,
                )
            tiles = TileFiles(work, header.point_format.dtype(), header.point_format.id)

            # Tiles travel by value to another machine's workers; a local worker reads them itself.
            tile = tiles.locate if local else tiles.fields
            # The output is written while tiles are classified and renamed into place only once the
            # cluster is closed and every point written: a failure on the way never leaves it behind.
            with (
                contextlib.closing(tiles),
                TileWriter(header, tiles, work / "classified.laz" if copc else output_path, progress) as writer,
                starting.pop_all() as clients,
            ):

                def batch(tile_ids: list[int]) -> TileBatch:
                    return TileBatch(
                        tuple(TileTask(t, *(tile(kind, t) for kind in ("core", "context"))) for t in tile_ids),
                        scaling,
                        model.name,
                        model.params,
                        model_bytes,
                        model.version,
                    )

                active = client

                def connect() -> int:
                    """The client (a local cluster's: every worker registered), its worker count taken
                    once; the number of tasks to keep in flight."""
                    nonlocal active, n_workers
                    if active is None:
                        active = clients.enter_context(dask_client(settings, workers, early_cluster))
                    if not n_workers:
                        # A remote scheduler's workers come and go, so take the count at hand, at least one.
                        n_workers = wait_for_workers(active, 1, WORKER_START_SECONDS, "the Dask scheduler")
                    return _window(n_workers)

                sending = EarlyTiles(connect, lambda tile_ids: _submit(active, batch(tile_ids)))
                scan(input_path, info, scaling, grid, tiles, progress, sending)
                owned, context = tiles.counts("core"), tiles.counts("context")
                sparse = {t for t in owned if owned[t] + context.get(t, 0) < MIN_TILE_POINTS}
                early_results, sent = sending.settle(owned, context)
                early_tiles = len(early_results) + len(sent)
                timings["scan_s"] = time.perf_counter() - started

                results = early_results | {
                    t: tile_result(t, np.full(owned[t], UNCLASSIFIED, dtype=np.uint8), context.get(t, 0), 0.0)
                    for t in sparse
                }
                modelled = {t: n for t, n in owned.items() if t not in results and t not in sent}
                # Tiles are written in id order as their classes come in, while the next ones are classified.
                writer.plan(sorted(owned))
                writer.ready(results)
                if should_stop is not None and should_stop():
                    for future in sent.values():
                        future.cancel()
                    raise ClassificationAborted(_classified_points(results), len(results))
                if modelled or sent:
                    # classify_s: from here, the cluster's start included (what is left of it after the scan).
                    started = time.perf_counter()
                    window = connect()
                    dashboard = dashboard_link(active, settings)
                    if dashboard and len(modelled) + len(sent) > 1:
                        log.info("Dask dashboard: %s", dashboard)
                    tiling = _run_tiles(
                        active, _batches(modelled, context), batch, window, list(sent.values()), len(owned), progress
                    )
                    # Closed on the way out, whatever ends the loop: the tasks still in flight are cancelled.
                    with contextlib.closing(tiling):
                        for finished in tiling:
                            results |= finished
                            if should_stop is not None and should_stop():
                                raise ClassificationAborted(_classified_points(results), len(results))
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
        early_tiles=early_tiles,
    )


def _window(n_workers: int) -> int:
    # n_workers: worker threads (tiles at once, `cluster.wait_for_workers`).
    # Two tasks per worker and one more: Dask sends each worker its next task while it runs one
    # (worker-saturation), so a worker goes on without waiting for the scheduler, which runs in
    # this process and waits for the GIL while the output's LAZ encoder holds it (0.4-0.7 s a
    # write); with one task per worker, workers sat idle that long after a tile. The scheduler
    # still holds only that many tasks' points at a time (about 20 MB per 200 m tile).
    return 2 * n_workers + 1


def _submit(client: Any, batch: TileBatch) -> Any:
    import dask

    # A tile's points travel inside its task on purpose (see the module docstring); Dask's
    # warning about large graphs assumes data that could be loaded on the workers instead.
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1GiB"}):
        # A fresh key: the same tiles in a later run must be classified again, not reused.
        return client.submit(classify_batch, batch, retries=2, key=f"classify_tile-{uuid.uuid4().hex}")


def _run_tiles(
    client: Any,
    batches: list[list[int]],
    make_batch: Callable[[list[int]], TileBatch],
    window: int,
    sent: list[Any],
    total_tiles: int,
    progress: Progress | None,
) -> Iterator[dict[int, TileResult]]:
    """Each finished task's results, as they come in: the tasks `sent` during the scan, then `batches`,
    at most `window` in flight."""
    from distributed import as_completed

    pending = iter(batches)
    room = max(window - sum(not future.done() for future in sent), 0)
    inflight = [*sent, *(_submit(client, make_batch(b)) for _, b in zip(range(room), pending))]
    running = as_completed(inflight)
    try:
        yield from _completed(client, running, inflight, pending, make_batch, total_tiles, progress)
    finally:
        # Stopped early (an abort, a failure): the tasks not done are not left running on the cluster.
        unfinished = [future for future in inflight if not future.done()]
        if unfinished:
            with contextlib.suppress(Exception):  # a cluster gone already has nothing to cancel
                client.cancel(unfinished)


def _completed(
    client: Any,
    running: Any,
    inflight: list[Any],
    pending: Iterator[list[int]],
    make_batch: Callable[[list[int]], TileBatch],
    total_tiles: int,
    progress: Progress | None,
) -> Iterator[dict[int, TileResult]]:
    from distributed.scheduler import NoWorkerError

    done = 0
    for future in running:
        inflight.remove(future)
        try:
            outcome = future.result()
        except NoWorkerError:
            raise ClusterStartError(
                f"every worker of the Dask cluster is gone (killed, or out of memory) and none came back within "
                f"{pipelines.cluster.NO_WORKERS_TIMEOUT}: nothing was written; retry, with fewer workers (--workers, POINTFLOW_WORKERS) "
                f"if memory is short"
            ) from None
        finished = {result.tile_id: result for result in outcome}
        future.release()
        following = next(pending, None)
        if following is not None:
            # Sent before the caller writes what came in, so the workers are not kept waiting.
            inflight.append(_submit(client, make_batch(following)))
            running.add(inflight[-1])
        done += len(finished)
        if progress:
            progress("classify", done, total_tiles)
        yield finished
