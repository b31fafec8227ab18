"""Tiled classification of a LAS/LAZ file on Dask, reader -> tiles -> classifier -> writer.

1. scan: stream the input in chunks; append each point's raw record to its owner tile's file
   and to the context file of every neighbour whose buffer ring it falls in.
2. classify: one Dask task per tile reads core + context, classifies, keeps only core points.
3. write: concatenate the classified tiles into the output, written to a temporary name and
   renamed at the end, so a failure never leaves a partial file.
Memory is bounded by the chunk and tile sizes, not by the file size.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import laspy
import numpy as np

from pipelines.classifiers import Classifier, get_classifier
from pipelines.classifiers.trained import TrainedClassifier, TrainedModel
from pipelines.lasio import CHUNK_POINTS, NotPointCloudError, iter_chunks, point_block, read_info
from pipelines.settings import Settings
from pipelines.tile import TileGrid

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): stage is "scan", "classify" or "write"."""


@dataclass(frozen=True)
class TileTask:
    tile_id: int
    core_path: Path
    context_path: Path
    output_path: Path
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
    points: int
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


def _load(path: Path, point_format: laspy.PointFormat) -> np.ndarray:
    if not path.exists():
        return np.zeros(0, dtype=point_format.dtype())
    return np.fromfile(path, dtype=point_format.dtype())


def classify_tile(task: TileTask) -> TileResult:
    """Runs on a Dask worker: classify core + context, write the core points with their classes."""
    started = time.perf_counter()
    core = _load(task.core_path, task.point_format)
    context = _load(task.context_path, task.point_format)
    raw = np.concatenate([core, context]) if len(context) else core
    records = laspy.ScaleAwarePointRecord(raw, task.point_format, np.array(task.scales), np.array(task.offsets))
    classifier = _worker_classifier(task)
    classes = np.asarray(classifier.classify(point_block(records)), dtype=np.uint8)[: len(core)]
    output = laspy.PackedPointRecord(core.copy(), task.point_format)
    output.classification = classes
    output.array.tofile(task.output_path)
    counts = np.bincount(classes, minlength=1)
    return TileResult(
        task.tile_id,
        len(core),
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
        _append_grouped(raw, owner, tiles_dir, "core")
        owners.update(np.flatnonzero(np.bincount(owner)).tolist())
        context = list(grid.context(x, y))
        if context:
            # One grouped write for all neighbours: one sort and one append per tile, not eight.
            index = np.concatenate([i for i, _ in context])
            tile_ids = np.concatenate([t for _, t in context])
            _append_grouped(raw, tile_ids, tiles_dir, "context", index)
        done += len(raw)
        if progress:
            progress("scan", done, total)
    return owners


def _append_grouped(raw: np.ndarray, tile_ids: np.ndarray, tiles_dir: Path, kind: str, index: np.ndarray | None = None) -> None:
    """Append raw[index] (all of raw by default) to each tile's file, grouped by tile id."""
    # Tile ids fit in 16 bits for any sane grid, and numpy sorts uint16 stably by radix in O(n).
    keys = tile_ids.astype(np.uint16) if tile_ids.max(initial=0) < 2**16 else tile_ids
    order = np.argsort(keys, kind="stable")
    sorted_ids = tile_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    ends = np.r_[starts[1:], len(sorted_ids)]
    # Records as opaque bytes: gathering them is a memcpy, many times faster than field by field.
    grouped = np.take(raw.view(np.dtype((np.void, raw.dtype.itemsize))), order if index is None else index[order])
    for start, end in zip(starts, ends):
        with open(tiles_dir / f"{sorted_ids[start]}.{kind}", "ab") as handle:
            grouped[start:end].tofile(handle)


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
    """Classify `input_path` into `output_path` (.las or .laz); every input point is written once.

    `classifier` is a built-in name or an account's TrainedClassifier (see pipelines.training).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    suffix = output_path.suffix.lower()
    if suffix not in (".las", ".laz"):
        raise ValueError(f"output {output_path.name} must end in .las or .laz")
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

        tasks = [
            TileTask(
                tile_id=t,
                core_path=tiles_dir / f"{t}.core",
                context_path=tiles_dir / f"{t}.context",
                output_path=tiles_dir / f"{t}.out",
                point_format=header.point_format,
                scales=tuple(header.scales),
                offsets=tuple(header.offsets),
                classifier=model.name,
                params=model.params,
                model=model_bytes,
                model_version=model.version,
            )
            for t in owners
        ]
        started = time.perf_counter()
        with (contextlib.nullcontext(client) if client is not None else dask_client(settings, workers)) as active:
            dashboard = getattr(active, "dashboard_link", None)
            if dashboard and len(tasks) > 1:
                log.info("Dask dashboard: %s", dashboard)
            results = _run_tiles(active, tasks, progress)
            n_workers = len(active.scheduler_info(n_workers=-1).get("workers", {})) or 1
        timings["classify_s"] = time.perf_counter() - started

        started = time.perf_counter()
        written = _write(header, tasks, output_path, progress)
        timings["write_s"] = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)

    counts: dict[int, int] = {}
    for result in results:
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
        tiles=len(tasks),
        tile_size=grid.size,
        tile_buffer=grid.buffer,
        workers=n_workers,
        timings={k: round(v, 3) for k, v in timings.items()},
        dashboard=dashboard,
    )


def _run_tiles(client: Any, tasks: list[TileTask], progress: Progress | None) -> list[TileResult]:
    from distributed import as_completed

    # Tile ids are unique per run, and pure=False stops Dask from reusing an earlier result.
    futures = client.map(classify_tile, tasks, pure=False, retries=2)
    results = []
    for future in as_completed(futures):
        results.append(future.result())
        if progress:
            progress("classify", len(results), len(tasks))
    return results


def _write(header: laspy.LasHeader, tasks: list[TileTask], output_path: Path, progress: Progress | None) -> int:
    compress = output_path.suffix.lower() == ".laz"
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(f".{output_path.name}.partial")
    written = 0
    try:
        with laspy.open(partial, mode="w", header=header, do_compress=compress, laz_backend=laspy.LazBackend.LazrsParallel if compress else None) as writer:
            for done, task in enumerate(tasks, 1):
                raw = np.fromfile(task.output_path, dtype=task.point_format.dtype())
                writer.write_points(laspy.PackedPointRecord(raw, task.point_format))
                written += len(raw)
                task.output_path.unlink()
                if progress:
                    progress("write", done, len(tasks))
        os.replace(partial, output_path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return written
