"""Reading LAS/LAZ through the gate (`pipelines.gate`): header facts, chunked and sampled point access.

Every reader here refuses what the gate refuses, with NotPointCloudError, and turns decoder
failures into the same error, so callers handle one exception type for "this file is bad".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import laspy
import numpy as np

from pipelines.classifiers.base import PointBlock
from pipelines.gate import (
    NotPointCloudError,
    check_header,
    check_structure,
    count_problem,
    is_decoder_panic,
    point_problems,
)
from pipelines.units import METRES, CoordinateUnits

CHUNK_POINTS = 1_000_000


@dataclass(frozen=True)
class LasInfo:
    """What the header says (not yet checked against the points)."""

    version: str
    point_format: int
    point_count: int
    compressed: bool
    scales: tuple[float, float, float]
    offsets: tuple[float, float, float]
    mins: tuple[float, float, float]
    maxs: tuple[float, float, float]
    crs: str | None
    extra_dimensions: tuple[str, ...]
    point_record_length: int
    offset_to_points: int
    file_size: int
    # Why the CRS record the file has could not be read (`crs` is then None); None when it could.
    crs_unreadable: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _crs_text(header: laspy.LasHeader) -> tuple[str | None, str | None]:
    """The file's CRS as WKT, and why a CRS record it has cannot be read. An unreadable one does
    not refuse the file: validation warns, and units are then taken as metres, as without a CRS."""
    try:
        crs = header.parse_crs()
    except Exception as error:
        return None, (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    if crs is None:
        return None, None
    return (crs.to_wkt() if hasattr(crs, "to_wkt") else str(crs)), None


def read_info(path: Path) -> LasInfo:
    """Header facts of a LAS/LAZ file that passed the gate; raises NotPointCloudError for anything else."""
    path = Path(path)
    check_structure(path)
    with decoding(f"{path.name} has a LAS signature but an unreadable header", "header"), laspy.open(path) as reader:
        header = reader.header
        crs, crs_unreadable = _crs_text(header)
        info = LasInfo(
            version=f"{header.version.major}.{header.version.minor}",
            point_format=header.point_format.id,
            point_count=int(header.point_count),
            compressed=header.are_points_compressed,
            scales=tuple(float(v) for v in header.scales),
            offsets=tuple(float(v) for v in header.offsets),
            mins=tuple(float(v) for v in header.mins),
            maxs=tuple(float(v) for v in header.maxs),
            crs=crs,
            extra_dimensions=tuple(header.point_format.extra_dimension_names),
            point_record_length=header.point_format.size,
            offset_to_points=int(header.offset_to_point_data),
            file_size=path.stat().st_size,
            crs_unreadable=crs_unreadable,
        )
    check_header(path.name, info.scales, info.offsets, info.mins, info.maxs)
    return info


@contextlib.contextmanager
def decoding(refusal: str, check: str = "points_readable") -> Iterator[None]:
    """Any failure of laspy or the LAZ decoder inside becomes NotPointCloudError("<refusal>: <cause>")."""
    try:
        yield
    except NotPointCloudError:
        raise
    except BaseException as error:
        if not (isinstance(error, Exception) or is_decoder_panic(error)):
            raise
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise NotPointCloudError(f"{refusal}: {cause}", check) from None


def unreadable_points(path: Path) -> str:
    return f"{Path(path).name}: the point data cannot be read, the file is corrupt or truncated"


def point_block(points, units: CoordinateUnits = METRES) -> PointBlock:
    """The classifier's view of laspy points (a LasData or a ScaleAwarePointRecord), in metres."""
    return PointBlock(
        x=np.asarray(points.x, dtype=np.float64) * units.horizontal,
        y=np.asarray(points.y, dtype=np.float64) * units.horizontal,
        z=np.asarray(points.z, dtype=np.float64) * units.vertical,
        intensity=np.asarray(points.intensity),
        return_number=np.asarray(points.return_number, dtype=np.uint8),
        number_of_returns=np.asarray(points.number_of_returns, dtype=np.uint8),
    )


def iter_chunks(path: Path, chunk_points: int = CHUNK_POINTS) -> Iterator[laspy.ScaleAwarePointRecord]:
    """Points in file order, `chunk_points` at a time, so memory stays bounded whatever the file size."""
    with decoding(unreadable_points(path)), laspy.open(path, laz_backend=laspy.LazBackend.LazrsParallel) as reader:
        yield from reader.chunk_iterator(chunk_points)


def group_runs(
    records: np.ndarray, group_ids: np.ndarray, index: np.ndarray | None = None
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """records[index] (all records by default) ordered by group id, as opaque records, and the
    (group id, start, end) of each group's run in them."""
    order, runs = group_order(group_ids, index)
    return take_records(records, order), runs


def group_order(
    group_ids: np.ndarray, index: np.ndarray | None = None
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The positions (in index, or of all records by default) that order the records by group id,
    stably, and the (group id, start, end) of each group's run in that order: one sort serves every
    array of the same points."""
    # Group ids (tiles, octree bins) mostly fit in 16 bits, and numpy sorts uint16 stably by radix in O(n).
    keys = group_ids.astype(np.uint16) if group_ids.max(initial=0) < 2**16 else group_ids
    order = np.argsort(keys, kind="stable")
    sorted_ids = group_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    ends = np.r_[starts[1:], len(sorted_ids)]
    return (order if index is None else index[order]), list(
        zip(sorted_ids[starts].tolist(), starts.tolist(), ends.tolist())
    )


def take_records(records: np.ndarray, order: np.ndarray) -> np.ndarray:
    """records[order] as opaque records."""
    # Records as opaque bytes: gathering them is a memcpy, many times faster than field by field.
    return np.take(records.view(np.dtype((np.void, records.dtype.itemsize))), order)


def append_grouped(
    raw: np.ndarray, group_ids: np.ndarray, folder: Path, kind: str, index: np.ndarray | None = None
) -> None:
    """Append raw[index] (all of raw by default) to the file `<group id>.<kind>` of each group in `folder`."""
    grouped, runs = group_runs(raw, group_ids, index)
    for group_id, start, end in runs:
        with open(folder / f"{group_id}.{kind}", "ab") as handle:
            grouped[start:end].tofile(handle)


def iter_checked(path: Path, info: LasInfo, chunk_points: int = CHUNK_POINTS) -> Iterator[laspy.ScaleAwarePointRecord]:
    """`iter_chunks` through the gate's point checks: NotPointCloudError at the first bad chunk,
    or at the end when the points are not as many as the header says."""
    name, read = Path(path).name, 0
    for chunk in iter_chunks(path, chunk_points):
        problems = point_problems(chunk, info.scales, info.offsets, info.mins, info.maxs)
        if problems:
            raise NotPointCloudError(f"{name}: {problems[0].explain} ({problems[0].detail})", problems[0].check)
        read += len(chunk)
        yield chunk
    problem = count_problem(read, info.point_count)
    if problem is not None:
        raise NotPointCloudError(f"{name}: {problem.explain} ({problem.detail})", problem.check)


def read_sample(path: Path, windows: int, window_points: int) -> laspy.ScaleAwarePointRecord:
    """Contiguous windows spread evenly through the file: seekable in LAZ, unlike a random sample."""
    with decoding(unreadable_points(path)), laspy.open(path, laz_backend=laspy.LazBackend.LazrsParallel) as reader:
        total = reader.header.point_count
        if total <= windows * window_points:
            return reader.read_points(total)
        # One window at the start of each of `windows` equal strides: disjoint, whole file covered.
        parts = []
        for start in np.arange(windows) * (total // windows):
            reader.seek(int(start))
            parts.append(reader.read_points(window_points).array)
        return laspy.ScaleAwarePointRecord(
            np.concatenate(parts), reader.header.point_format, reader.header.scales, reader.header.offsets
        )
