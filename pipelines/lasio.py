"""Reading LAS/LAZ: content sniffing, header facts, chunked and sampled point access."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import laspy
import numpy as np

from pipelines.classifiers.base import PointBlock

LAS_SIGNATURE = b"LASF"
CHUNK_POINTS = 1_000_000
# Header size, offset to point data and number of VLRs, at byte 94 of every LAS 1.0-1.4 header.
_VLR_LAYOUT = struct.Struct("<HII")
_VLR_LAYOUT_OFFSET = 94
VLR_HEADER_BYTES = 54


class NotPointCloudError(ValueError):
    """The content is not LAS/LAZ, or its header cannot be read."""


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

    def to_dict(self) -> dict:
        return asdict(self)


def _crs_text(header: laspy.LasHeader) -> str | None:
    try:
        crs = header.parse_crs()
    except Exception:
        # An unreadable CRS record is reported as missing rather than failing the whole file.
        return None
    if crs is None:
        return None
    return crs.to_wkt() if hasattr(crs, "to_wkt") else str(crs)


def read_info(path: Path) -> LasInfo:
    """Header facts of a LAS/LAZ file; raises NotPointCloudError for anything else."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(_VLR_LAYOUT_OFFSET + _VLR_LAYOUT.size)
    if head[:4] != LAS_SIGNATURE:
        raise NotPointCloudError(f"{path.name} is not a LAS/LAZ file (no 'LASF' signature)")
    if len(head) == _VLR_LAYOUT_OFFSET + _VLR_LAYOUT.size:
        header_size, offset_to_points, vlr_count = _VLR_LAYOUT.unpack_from(head, _VLR_LAYOUT_OFFSET)
        room = max(offset_to_points - header_size, 0)
        # laspy reads every declared VLR, even past the end of the file: 4 billion of them hang it.
        if vlr_count * VLR_HEADER_BYTES > room:
            raise NotPointCloudError(
                f"{path.name} has a LAS signature but an unreadable header: it declares {vlr_count:,} variable-length "
                f"records, and only {room:,} bytes lie between the header and the point data"
            )
    try:
        with laspy.open(path) as reader:
            header = reader.header
            return LasInfo(
                version=f"{header.version.major}.{header.version.minor}",
                point_format=header.point_format.id,
                point_count=int(header.point_count),
                compressed=header.are_points_compressed,
                scales=tuple(float(v) for v in header.scales),
                offsets=tuple(float(v) for v in header.offsets),
                mins=tuple(float(v) for v in header.mins),
                maxs=tuple(float(v) for v in header.maxs),
                crs=_crs_text(header),
                extra_dimensions=tuple(header.point_format.extra_dimension_names),
                point_record_length=header.point_format.size,
                offset_to_points=int(header.offset_to_point_data),
                file_size=path.stat().st_size,
            )
    except NotPointCloudError:
        raise
    except Exception as error:
        raise NotPointCloudError(f"{path.name} has a LAS signature but an unreadable header: {error}") from None


def point_block(points) -> PointBlock:
    """The classifier's view of laspy points (a LasData or a ScaleAwarePointRecord)."""
    return PointBlock(
        x=np.asarray(points.x, dtype=np.float64),
        y=np.asarray(points.y, dtype=np.float64),
        z=np.asarray(points.z, dtype=np.float64),
        intensity=np.asarray(points.intensity),
        return_number=np.asarray(points.return_number, dtype=np.uint8),
        number_of_returns=np.asarray(points.number_of_returns, dtype=np.uint8),
    )


def iter_chunks(path: Path, chunk_points: int = CHUNK_POINTS) -> Iterator[laspy.ScaleAwarePointRecord]:
    """Points in file order, `chunk_points` at a time, so memory stays bounded whatever the file size."""
    with laspy.open(path, laz_backend=laspy.LazBackend.LazrsParallel) as reader:
        yield from reader.chunk_iterator(chunk_points)


def append_grouped(raw: np.ndarray, group_ids: np.ndarray, folder: Path, kind: str, index: np.ndarray | None = None) -> None:
    """Append raw[index] (all of raw by default) to the file `<group id>.<kind>` of each group in `folder`."""
    # Group ids (tiles, octree bins) mostly fit in 16 bits, and numpy sorts uint16 stably by radix in O(n).
    keys = group_ids.astype(np.uint16) if group_ids.max(initial=0) < 2**16 else group_ids
    order = np.argsort(keys, kind="stable")
    sorted_ids = group_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    ends = np.r_[starts[1:], len(sorted_ids)]
    # Records as opaque bytes: gathering them is a memcpy, many times faster than field by field.
    grouped = np.take(raw.view(np.dtype((np.void, raw.dtype.itemsize))), order if index is None else index[order])
    for start, end in zip(starts, ends):
        with open(folder / f"{sorted_ids[start]}.{kind}", "ab") as handle:
            grouped[start:end].tofile(handle)


def read_sample(path: Path, windows: int, window_points: int) -> laspy.ScaleAwarePointRecord:
    """Contiguous windows spread evenly through the file: seekable in LAZ, unlike a random sample."""
    with laspy.open(path, laz_backend=laspy.LazBackend.LazrsParallel) as reader:
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
