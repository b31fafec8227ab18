"""What a tile task carries and what a worker does with it: a tile's core and context points, in the
file's integer coordinates, classified into one class code per core point (`classify_batch`)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.classifiers import Classifier, PointBlock, get_classifier
from pipelines.compiled import compiled
from pipelines.units import METRES, CoordinateUnits

if TYPE_CHECKING:  # workers never read a header: laspy's import (about 0.08 CPU-s) stays out of them
    import laspy

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class TileRuns:
    """Where a tile's points lie in the tile files of the command that scanned the file
    (`pipelines.tile_io.TileFiles`): (file, first record, records) per run, in file order, as the
    file's point records (a core) or TILE_FIELDS records (a context). `records` gives their
    TILE_FIELDS: read by a worker of the local cluster itself, on the same machine, or by the
    command for a remote cluster's task."""

    runs: tuple[tuple[str, int, int], ...]
    dtype: np.dtype = TILE_FIELDS  # TILE_FIELDS (a tile's context), or the file's point records (its core)
    point_format: int | None = None  # of the file's point records

    @property
    def count(self) -> int:
        return sum(n for _, _, n in self.runs)

    def records(self) -> np.ndarray:
        """TILE_FIELDS records, whatever the files hold."""
        with contextlib.closing(self._opened()) as runs:
            records = read_runs(runs, self.count, self.dtype)
        return records if self.point_format is None else tile_fields(records, self.point_format)

    def _opened(self) -> Iterator[tuple[int, str, int, int]]:
        # One file open at a time (each chunk's file holds one run of a tile): a tile of a large file
        # has runs in thousands of files, more than a process may hold open.
        for path, start, n in self.runs:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                yield descriptor, path, start, n
            finally:
                os.close(descriptor)


def read_runs(
    runs: Iterable[tuple[int, str, int, int]], count: int, dtype: np.dtype, out: np.ndarray | None = None
) -> np.ndarray:
    """The `count` records of (open file descriptor, its name, first record, records) runs one after
    the other, into `out` (as many records, contiguous) if given. Each descriptor is used before the
    next run is taken, so the iterable may open them as it goes."""
    size = dtype.itemsize
    if out is None:
        out = np.empty(count, dtype=dtype)
    buffer, at = memoryview(out.view(np.uint8)), 0
    for descriptor, name, start, n in runs:
        # Read, not memory-mapped: mapped pages count as the process's resident memory while
        # the map lives (16 maps of 1 M point chunks were 0.4 GB of a 2 GB budget).
        done = os.preadv(descriptor, [buffer[at : at + n * size]], start * size)
        if done != n * size:
            raise OSError(f"tile file {os.path.basename(name)} is shorter than written")
        at += done
    return out


@dataclass(frozen=True)
class TileTask:
    tile_id: int
    # TILE_FIELDS records, or where the points lie in the command's tile files (TileRuns: the core
    # as the file's records, whose fields the worker takes) when the worker is on the same machine
    # (a local cluster): reading them there is one copy, where sending them
    # is five (the command reads them, sends them to the scheduler in its own process, which sends
    # them on, and the worker receives them). On the 10 M point benchmark that took about 0.4 CPU-s
    # of the command's, and the run from 5.6-6.3 to 5.3-5.6 s (six alternating runs, a helper's work
    # beside them). As arrays, not bytes: pickle protocol 5 (Dask's) sends an array's
    # memory as a frame of its own, while bytes are copied into the pickle stream, and out of it,
    # at every hop (client, scheduler, worker): 31 ms per 1.43 M point tile each way.
    core: np.ndarray | TileRuns  # the tile's own points
    context: np.ndarray | TileRuns  # points of the buffer ring around it, for context only


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

    def block(self, *parts: np.ndarray) -> PointBlock:
        """The points of `parts` (TILE_FIELDS records) one after the other, as `axis` scales them: in
        one compiled pass per part, where concatenating the records first and then scaling each axis
        and copying each field apart took ten passes over the tile (0.05 CPU-s per 1.43 M points)."""
        n = sum(len(part) for part in parts)
        x, y, z = np.empty(n), np.empty(n), np.empty(n)
        intensity = np.empty(n, np.uint16)
        return_number, number_of_returns = np.empty(n, np.uint8), np.empty(n, np.uint8)
        start = 0
        for part in parts:
            _fill_block(
                part, start, np.array(self.scales), np.array(self.offsets), self.horizontal, self.vertical,
                x, y, z, intensity, return_number, number_of_returns,
            )  # fmt: skip
            start += len(part)
        return PointBlock(x, y, z, intensity, return_number, number_of_returns)


@compiled
def _fill_block(
    fields, start, scales, offsets, horizontal, vertical, x, y, z, intensity, return_number, number_of_returns
):
    """Scaling.block's loop, from `start` on: each axis as `Scaling.axis` computes it, the same
    float64 operations in the same order (no fastmath: no fused multiply-add)."""
    for i in range(len(fields)):
        point = fields[i]
        x[start + i] = (point.X * scales[0] + offsets[0]) * horizontal
        y[start + i] = (point.Y * scales[1] + offsets[1]) * horizontal
        z[start + i] = (point.Z * scales[2] + offsets[2]) * vertical
        intensity[start + i] = point.intensity
        return_number[start + i] = point.return_number
        number_of_returns[start + i] = point.number_of_returns


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


def tile_fields(records: np.ndarray, point_format: int) -> np.ndarray:
    """The classifier's inputs of LAS point records (a structured array of `point_format`, as laspy
    reads them), packed as TILE_FIELDS records. The returns are bits of one byte: three bits each
    in point formats 0-5, four in 6-10."""
    fields = np.empty(len(records), dtype=TILE_FIELDS)
    for name in ("X", "Y", "Z", "intensity"):
        fields[name] = records[name]
    bits, wide = records["bit_fields"], point_format >= 6
    np.bitwise_and(bits, 0x0F if wide else 0x07, out=fields["return_number"])
    np.right_shift(bits, 4 if wide else 3, out=fields["number_of_returns"])
    if not wide:
        fields["number_of_returns"] &= 0x07
    return fields


def scaling_of(header: laspy.LasHeader, units: CoordinateUnits = METRES) -> Scaling:
    return Scaling(
        tuple(float(v) for v in header.scales),
        tuple(float(v) for v in header.offsets),
        units.horizontal,
        units.vertical,
    )


def tile_result(tile_id: int, classes: np.ndarray, context_points: int, seconds: float) -> TileResult:
    counts = np.bincount(classes, minlength=1)
    return TileResult(
        tile_id, classes.tobytes(), context_points, {int(c): int(n) for c, n in enumerate(counts) if n}, seconds
    )


def classify_tile(task: TileTask, classifier: Classifier, scaling: Scaling) -> TileResult:
    """Classify core + context, return the core points' classes."""
    started = time.perf_counter()
    core, context = (part.records() if isinstance(part, TileRuns) else part for part in (task.core, task.context))
    classes = np.asarray(classifier.classify(scaling.block(core, context)), dtype=np.uint8)[: len(core)]
    return tile_result(task.tile_id, classes, len(context), time.perf_counter() - started)


def classify_batch(batch: TileBatch) -> list[TileResult]:
    """Runs on a Dask worker: every tile of the batch, each on its own (as if alone in a task)."""
    classifier = _worker_classifier(batch)
    return [classify_tile(task, classifier, batch.scaling) for task in batch.tiles]


def _worker_classifier(batch: TileBatch) -> Classifier:
    if batch.model is None:
        return get_classifier(batch.classifier, batch.params)
    # Imported here: the command that sends tiles (this module's other user) needs no classifier
    # code for them, and a worker imports the standard classifier as it starts (dask-local.yaml).
    from pipelines.classifiers.trained import TrainedClassifier, TrainedModel

    # The client checked the model's signature before sending it.
    return TrainedClassifier(TrainedModel.from_bytes(batch.model), batch.classifier, batch.model_version)
