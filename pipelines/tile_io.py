"""Tiles on scratch and the output written tile by tile: each tile's raw records and context fields
in files of their own while the input is scanned, and the classified records appended to the output
in tile order as their classes come in."""

from __future__ import annotations

import copy
import datetime
import fcntl
import glob
import hashlib
import json
import logging
import os
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import laspy
import numpy as np

from pipelines.lasio import CHUNK_POINTS, group_order, take_records
from pipelines.tile_tasks import TILE_FIELDS, TileResult, TileRuns, read_runs, tile_fields

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): stage is "scan", "classify" or "write"."""


class TileFiles:
    """Every occupied tile's points on the local scratch disk. Each scanned chunk is written once,
    grouped by tile, as one file per kind ("core": the file's records of `point_format`, for the
    output and the tasks, which take their TILE_FIELDS; "context": TILE_FIELDS records of the buffer
    rings), and an index keeps where each tile's runs lie: a file of 20,000 one-point tiles costs
    two files per chunk, not 40,000. (The core's TILE_FIELDS were once written beside its records,
    a third file per chunk: the scan's main thread, which the run waits for, spent more writing
    them than the tasks now spend taking them from the records.)"""

    KINDS = {"core": None, "context": TILE_FIELDS}

    def __init__(self, folder: Path, core: np.dtype, point_format: int) -> None:
        self.folder, self.point_format = folder, point_format
        self.dtypes = {kind: core if dtype is None else dtype for kind, dtype in self.KINDS.items()}
        self.files: dict[str, list[Path]] = {kind: [] for kind in self.KINDS}
        self.runs: dict[str, dict[int, list[tuple[int, int, int]]]] = {kind: {} for kind in self.KINDS}
        self._handles: dict[tuple[str, int], Any] = {}

    def append(
        self, records: dict[str, np.ndarray], tile_ids: np.ndarray, index: np.ndarray | None = None
    ) -> list[tuple[int, int, int]]:
        """records[index] of each kind (all records by default), grouped by tile id: the arrays hold
        the same points, sorted once. The (tile id, start, end) of each tile's run in them."""
        order, runs = group_order(tile_ids, index)
        for kind, kind_records in records.items():
            number = len(self.files[kind])
            path = self.folder / f"{kind}-{number}"
            take_records(kind_records, order).tofile(path)
            self.files[kind].append(path)
            for tile_id, start, end in runs:
                self.runs[kind].setdefault(tile_id, []).append((number, start, end - start))
        return runs

    def counts(self, kind: str) -> dict[int, int]:
        return {tile_id: sum(n for _, _, n in runs) for tile_id, runs in self.runs[kind].items()}

    def read(self, kind: str, tile_id: int, out: np.ndarray | None = None) -> np.ndarray:
        """The tile's records of this kind, into `out` (as many records, contiguous) if given."""
        runs = self.runs[kind].get(tile_id, [])
        # Opened as they are read: the handles kept open are only the latest few (`_opened`).
        opened = ((self._opened(kind, number), self.files[kind][number].name, start, n) for number, start, n in runs)
        return read_runs(opened, sum(n for _, _, n in runs), self.dtypes[kind], out)

    def fields(self, kind: str, tile_id: int) -> np.ndarray:
        """The tile's TILE_FIELDS records of this kind, as `locate(...).records()` gives them."""
        records = self.read(kind, tile_id)
        return tile_fields(records, self.point_format) if kind == "core" else records

    def locate(self, kind: str, tile_id: int) -> TileRuns:
        """Where the tile's records of this kind lie (as they are now), for a worker on this machine to read."""
        runs = tuple((str(self.files[kind][n]), start, count) for n, start, count in self.runs[kind].get(tile_id, []))
        return TileRuns(runs, self.dtypes[kind], self.point_format if kind == "core" else None)

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


# The VLR every classified LAS/LAZ pointflow writes carries: JSON naming the classifier that made
# its classes (name, version, digest of its parameters, a trained model's digest) and pointflow's version.
CLASSIFIER_VLR_USER_ID = "pointflow"
CLASSIFIER_VLR_RECORD_ID = 1


def classifier_label(name: str, version: str) -> str:
    """What classified a file's points, as its header's `generating_software` and its previews say it."""
    return f"pointflow {name} {version}"


def classified_header(
    header: laspy.LasHeader,
    name: str,
    version: str,
    params: dict[str, Any],
    model_sha256: str | None = None,
    today: datetime.date | None = None,
) -> laspy.LasHeader:
    """`header` (a copy) stamped with what classified its points: `generating_software`
    "pointflow <classifier> <version>" (ASCII, at most 32 bytes), the creation date of today (UTC),
    and the classifier VLR, replacing one the input had; the input's other VLRs (its CRS) stay."""
    from pipelines import __version__

    out = copy.deepcopy(header)
    out.generating_software = classifier_label(name, version).encode("ascii", "replace").decode()[:32]
    out.creation_date = today or datetime.datetime.now(datetime.UTC).date()
    record = {
        "classifier": name,
        "version": version,
        "params_sha256": hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest(),
        "pointflow": __version__,
    }
    if model_sha256 is not None:
        record["model_sha256"] = model_sha256
    out.vlrs = [
        *(v for v in out.vlrs if (v.user_id, v.record_id) != (CLASSIFIER_VLR_USER_ID, CLASSIFIER_VLR_RECORD_ID)),
        laspy.VLR(CLASSIFIER_VLR_USER_ID, CLASSIFIER_VLR_RECORD_ID, "classifier (JSON)", json.dumps(record).encode()),
    ]
    return out


def classifier_record(header: laspy.LasHeader) -> dict[str, Any] | None:
    """The classifier VLR's JSON of a file pointflow classified, or None."""
    for vlr in header.vlrs:
        if (vlr.user_id, vlr.record_id) == (CLASSIFIER_VLR_USER_ID, CLASSIFIER_VLR_RECORD_ID):
            return json.loads(bytes(vlr.record_data))
    return None


# An output is written to a hidden partial file beside it (the rename onto it stays on one file
# system), named for its writer and locked (flock) by it until the rename: the kernel drops the lock
# when the writer dies however it dies, so the next writer of the same output removes what a killed
# one left, never a live one's.
PARTIAL_SUFFIX = ".partial"
# The name every writer used before partials were locked: one unchanged this long is a dead writer's.
_UNLOCKED_PARTIAL_AGE_S = 3600


def sweep_partials(target: Path) -> list[Path]:
    """Remove the partial files of `target` that no live writer holds; returns them."""
    removed = []
    named = list(target.parent.glob(f".{glob.escape(target.name)}.*{PARTIAL_SUFFIX}"))
    legacy = target.with_name(f".{target.name}{PARTIAL_SUFFIX}")
    try:
        if time.time() - os.lstat(legacy).st_mtime > _UNLOCKED_PARTIAL_AGE_S:
            named.append(legacy)
    except OSError:
        pass
    for path in named:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue  # renamed onto the output or removed meanwhile; or a link: not ours
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            try:
                same = os.lstat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False  # renamed onto the output just before we locked it
            if same and stat.S_ISREG(os.fstat(fd).st_mode):
                path.unlink(missing_ok=True)
                removed.append(path)
        finally:
            os.close(fd)
    return removed


def open_partial(target: Path) -> tuple[Path, BinaryIO]:
    """A new partial file beside `target`, open for writing and locked until it is closed (after
    its rename onto `target`); the partials killed writers of `target` left are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(target)
    path = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    handle = open(path, "x+b")  # noqa: SIM115 - closed by its writer after the rename
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    return path, handle


class TileWriter:
    """The output, written tile by tile in id order (the order of the file's tiles, whatever order
    their classes come in) to a temporary name, renamed at the end: a failure never leaves a partial file."""

    def __init__(self, header: laspy.LasHeader, tiles: TileFiles, output_path: Path, progress: Progress | None) -> None:
        self.header, self.tiles, self.output_path, self.progress = header, tiles, output_path, progress
        self.order: list[int] = []
        self.writer: Any = None
        self.partial: Path | None = None
        self.partial_handle: BinaryIO | None = None
        self.classes: dict[int, bytes] = {}
        self.next = 0  # position in `order` of the next tile to write
        self.points: dict[int, int] = {}  # core points per tile
        # Tiles smaller than a chunk are read straight into one buffer, reused from write to write:
        # concatenating them into a fresh array each time cost a copy and the kernel's zeroing of
        # its pages (0.2 CPU-s of the 10 M point benchmark's command).
        self.buffer = np.empty(0, dtype=header.point_format.dtype())
        self.buffer_classes = np.empty(0, dtype=np.uint8)
        self.buffered = 0
        self.written = 0

    def __enter__(self) -> TileWriter:
        return self

    def plan(self, order: list[int]) -> None:
        """The tiles to write, in the order to write them: the output is created now, once the input is known good."""
        self.order = order
        self.points = self.tiles.counts("core")
        compress = self.output_path.suffix.lower() == ".laz"
        self.partial, self.partial_handle = open_partial(self.output_path)
        try:
            self.writer = laspy.open(
                self.partial_handle,
                mode="w",
                header=self.header,
                do_compress=compress,
                laz_backend=laspy.LazBackend.LazrsParallel if compress else None,
                closefd=False,
            )
        except BaseException:
            self.partial.unlink(missing_ok=True)
            self.partial_handle.close()
            raise

    def ready(self, results: dict[int, TileResult]) -> None:
        """Take these tiles' classes; write every tile whose predecessors are all written."""
        self.classes.update((t, r.classes) for t, r in results.items())
        while self.next < len(self.order) and self.order[self.next] in self.classes:
            tile_id = self.order[self.next]
            points, classes = self.points[tile_id], np.frombuffer(self.classes.pop(tile_id), dtype=np.uint8)
            if self.buffered + points > CHUNK_POINTS:
                self._flush()
            if points >= CHUNK_POINTS:
                self._write(self.tiles.read("core", tile_id), classes)
            else:
                if not len(self.buffer):
                    self.buffer = np.empty(CHUNK_POINTS, dtype=self.buffer.dtype)
                    self.buffer_classes = np.empty(CHUNK_POINTS, dtype=np.uint8)
                end = self.buffered + points
                self.tiles.read("core", tile_id, self.buffer[self.buffered : end])
                self.buffer_classes[self.buffered : end] = classes
                self.buffered = end
            self.written += points
            self.next += 1
            if self.progress:
                self.progress("write", self.next, len(self.order))

    def _flush(self) -> None:
        # Many small tiles go out in one call: the writer's cost is per call, not per point. (The
        # LAZ written is the same whichever calls its points come in: lazrs compresses whole chunks.)
        if self.buffered:
            self._write(self.buffer[: self.buffered], self.buffer_classes[: self.buffered])
            self.buffered = 0

    def _write(self, raw: np.ndarray, classes: np.ndarray) -> None:
        records = laspy.PackedPointRecord(raw, self.header.point_format)
        records.classification = classes
        self.writer.write_points(records)

    def __exit__(self, kind, error, trace) -> None:
        if self.writer is None:
            return
        try:
            if kind is None:
                if self.next != len(self.order):
                    raise RuntimeError(f"{len(self.order) - self.next} tile(s) were never classified")
                self._flush()
            self.writer.close()
            self.partial_handle.flush()
            if kind is None:
                os.replace(self.partial, self.output_path)
        except BaseException:
            self.partial.unlink(missing_ok=True)
            raise
        finally:
            if kind is not None:
                self.partial.unlink(missing_ok=True)
            self.partial_handle.close()  # the lock goes only now: after the rename or the unlink
