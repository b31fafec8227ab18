"""Tiled classification of a LAS/LAZ file on Dask, reader -> tiles -> classifier -> writer.

1. scan: stream the input in chunks; append each point's raw record to its owner tile's file
   and to the context file of every neighbour whose buffer ring it falls in.
2. classify: one Dask task per tile carries its core + context records (by value: workers need no
   shared filesystem, and a task whose worker dies can be rerun elsewhere) and returns one class
   code per core point. A bounded number of tiles is in flight at once.
3. write: read each tile's core records again, set their classes, and append them to the output,
   written to a temporary name and renamed at the end, so a failure never leaves a partial file.
Memory is bounded by the chunk and tile sizes and the number of tiles in flight, not by the file size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import laspy
import numpy as np

from pipelines.classifiers import Classifier, get_classifier
from pipelines.classifiers.trained import TrainedClassifier, TrainedModel
from pipelines.copc import COPC_SUFFIX, write_copc
from pipelines.lasio import CHUNK_POINTS, NotPointCloudError, append_grouped, iter_chunks, point_block, read_info
from pipelines.settings import Settings
from pipelines.tile import TileGrid

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): stage is "scan", "classify" or "write"."""


@dataclass(frozen=True)
class TileTask:
    tile_id: int
    core: bytes  # the tile's own points, as raw point records
    context: bytes  # points of the buffer ring around it, for context only
    point_format: laspy.PointFormat
    scales: tuple[float, float, float]
    offsets: tuple[float, float, float]
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
    tile_size: float
    tile_buffer: float
    workers: int
    timings: dict[str, float] = field(default_factory=dict)
    dashboard: str | None = None


def _records(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def classify_tile(task: TileTask) -> TileResult:
    """Runs on a Dask worker: classify core + context, return the core points' classes."""
    started = time.perf_counter()
    dtype = task.point_format.dtype()
    core = np.frombuffer(task.core, dtype=dtype)
    context = np.frombuffer(task.context, dtype=dtype)
    raw = np.concatenate([core, context]) if len(context) else core
    records = laspy.ScaleAwarePointRecord(raw, task.point_format, np.array(task.scales), np.array(task.offsets))
    classifier = _worker_classifier(task)
    classes = np.asarray(classifier.classify(point_block(records)), dtype=np.uint8)[: len(core)]
    counts = np.bincount(classes, minlength=1)
    return TileResult(
        task.tile_id,
        classes.tobytes(),
        len(context),
        {int(c): int(n) for c, n in enumerate(counts) if n},
        time.perf_counter() - started,
    )


def _worker_classifier(task: TileTask) -> Classifier:
    if task.model is None:
        return get_classifier(task.classifier, task.params)
    # The client checked the model's signature before sending it.
    return TrainedClassifier(TrainedModel.from_bytes(task.model), task.classifier, task.model_version)


# Read by the local cluster's subprocesses (see the file for why).
LOCAL_DASK_CONFIG = Path(__file__).with_name("data") / "dask-local.yaml"


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """Variables the local cluster's subprocesses inherit; the user's own values win."""
    added = {k: v for k, v in variables.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


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
    with _environment({"DASK_CONFIG": str(LOCAL_DASK_CONFIG)}), SubprocessCluster(
        n_workers=workers or settings.workers,
        threads_per_worker=1,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster, Client(cluster) as client:
        yield client


def _scan(input_path: Path, grid: TileGrid, tiles_dir: Path, progress: Progress | None, total: int) -> set[int]:
    """Partition the input into per-tile raw record files; returns the tiles that own points."""
    owners: set[int] = set()
    done = 0
    for chunk in iter_chunks(input_path, CHUNK_POINTS):
        raw = chunk.array
        x, y = np.asarray(chunk.x), np.asarray(chunk.y)
        owner = grid.owner(x, y)
        append_grouped(raw, owner, tiles_dir, "core")
        owners.update(np.flatnonzero(np.bincount(owner)).tolist())
        context = list(grid.context(x, y))
        if context:
            # One grouped write for all neighbours: one sort and one append per tile, not eight.
            index = np.concatenate([i for i, _ in context])
            tile_ids = np.concatenate([t for _, t in context])
            append_grouped(raw, tile_ids, tiles_dir, "context", index)
        done += len(raw)
        if progress:
            progress("scan", done, total)
    return owners


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
) -> ClassifyResult:
    """Classify `input_path` into `output_path` (.las, .laz or .copc.laz); every input point is written once.

    `classifier` is a built-in name or an account's TrainedClassifier (see pipelines.training).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    suffix = output_path.suffix.lower()
    if suffix not in (".las", ".laz"):
        raise ValueError(f"output {output_path.name} must end in .las, .laz or {COPC_SUFFIX}")
    copc = output_path.name.lower().endswith(COPC_SUFFIX)
    if output_path.resolve() == input_path.resolve():
        raise ValueError("output must not overwrite the input")
    info = read_info(input_path)
    if info.point_count == 0:
        raise NotPointCloudError(f"{input_path.name} holds no points")
    model = classifier if isinstance(classifier, TrainedClassifier) else get_classifier(classifier, params)
    model_bytes = model.model.to_bytes() if isinstance(model, TrainedClassifier) else None
    tile_size = settings.tile_size if tile_size is None else tile_size
    buffer = settings.tile_buffer if buffer is None else buffer
    grid = TileGrid.covering(info.mins, info.maxs, tile_size, buffer)
    timings: dict[str, float] = {}

    settings.scratch_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="classify-", dir=settings.scratch_dir))
    try:
        started = time.perf_counter()
        with laspy.open(input_path) as reader:
            header = reader.header
        tiles_dir = work / "tiles"
        tiles_dir.mkdir()
        try:
            owners = sorted(_scan(input_path, grid, tiles_dir, progress, info.point_count))
        except Exception as error:
            raise NotPointCloudError(f"{input_path.name}: point data cannot be read ({error})") from None
        timings["scan_s"] = time.perf_counter() - started

        def tile_task(t: int) -> TileTask:
            return TileTask(
                tile_id=t,
                core=_records(tiles_dir / f"{t}.core"),
                context=_records(tiles_dir / f"{t}.context"),
                point_format=header.point_format,
                scales=tuple(header.scales),
                offsets=tuple(header.offsets),
                classifier=model.name,
                params=model.params,
                model=model_bytes,
                model_version=model.version,
            )

        started = time.perf_counter()
        with (contextlib.nullcontext(client) if client is not None else dask_client(settings, workers)) as active:
            dashboard = getattr(active, "dashboard_link", None)
            if dashboard and len(owners) > 1:
                log.info("Dask dashboard: %s", dashboard)
            n_workers = len(active.scheduler_info(n_workers=-1).get("workers", {})) or 1
            results = _run_tiles(active, owners, tile_task, n_workers, progress)
        timings["classify_s"] = time.perf_counter() - started

        started = time.perf_counter()
        written = _write(header, tiles_dir, results, work / "classified.laz" if copc else output_path, progress)
        timings["write_s"] = time.perf_counter() - started
        if copc and written == info.point_count:
            started = time.perf_counter()
            write_copc(work / "classified.laz", output_path, work, progress)
            timings["copc_s"] = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)

    counts: dict[int, int] = {}
    for result in results.values():
        for cls, n in result.class_counts.items():
            counts[cls] = counts.get(cls, 0) + n
    if written != info.point_count:
        output_path.unlink(missing_ok=True)
        raise RuntimeError(f"wrote {written} points but the input has {info.point_count}; output removed")
    return ClassifyResult(
        input_points=info.point_count,
        output_points=written,
        class_counts=dict(sorted(counts.items())),
        classifier=model.name,
        classifier_version=model.version,
        classifier_params=model.params,
        tiles=len(owners),
        tile_size=grid.size,
        tile_buffer=grid.buffer,
        workers=n_workers,
        timings={k: round(v, 3) for k, v in timings.items()},
        dashboard=dashboard,
    )


def _run_tiles(client: Any, owners: list[int], tile_task: Callable[[int], TileTask], n_workers: int, progress: Progress | None) -> dict[int, TileResult]:
    import dask
    from distributed import as_completed

    pending = iter(owners)
    # One tile per worker and one more queued: every worker stays busy while a finished tile's
    # successor is sent, and the scheduler holds only that many tiles' points at a time.
    window = n_workers + 1

    def submit(tile_id: int):
        # A fresh key: the same tile in a later run must be classified again, not reused.
        return client.submit(classify_tile, tile_task(tile_id), retries=2, key=f"classify_tile-{uuid.uuid4().hex}")

    # A tile's points travel inside its task on purpose (see the module docstring); Dask's
    # warning about large graphs assumes data that could be loaded on the workers instead.
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "1GiB"}):
        running = as_completed([submit(t) for _, t in zip(range(window), pending)])
        results: dict[int, TileResult] = {}
        for future in running:
            result = future.result()
            results[result.tile_id] = result
            future.release()
            following = next(pending, None)
            if following is not None:
                running.add(submit(following))
            if progress:
                progress("classify", len(results), len(owners))
    return results


def _write(header: laspy.LasHeader, tiles_dir: Path, results: dict[int, TileResult], output_path: Path, progress: Progress | None) -> int:
    compress = output_path.suffix.lower() == ".laz"
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(f".{output_path.name}.partial")
    written = 0
    try:
        with laspy.open(partial, mode="w", header=header, do_compress=compress, laz_backend=laspy.LazBackend.LazrsParallel if compress else None) as writer:
            for done, tile_id in enumerate(sorted(results), 1):
                core = tiles_dir / f"{tile_id}.core"
                records = laspy.PackedPointRecord(np.fromfile(core, dtype=header.point_format.dtype()), header.point_format)
                records.classification = np.frombuffer(results[tile_id].classes, dtype=np.uint8)
                writer.write_points(records)
                written += len(records)
                core.unlink()
                if progress:
                    progress("write", done, len(results))
        os.replace(partial, output_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return written
