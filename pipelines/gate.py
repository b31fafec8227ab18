"""The one gate every LAS/LAZ input passes, before anything is allocated from what the file claims.

`pipelines.lasio.read_info` runs `check_structure` on the raw bytes and `check_header` on the
parsed header; the point readers in `lasio` run `point_problems` on every chunk and turn decoder
failures (Rust panics included) into refusals. `pointflow classify`, ingest, validation, the
pipeline's classify step and training all read through those functions, so a file is refused
everywhere for the same reason, in one line.

What a file may declare (documented in the README, "What pointflow accepts"):

- LAS 1.0 to 1.4, point formats 0 to 10, at least one point;
- at most MAX_RECORDS variable-length records and as many extended ones, each inside the file;
- point records at most MAX_EXTRA_BYTES longer than their format's standard fields;
- exactly as many points as the point data holds: in a LAS, nothing after the points but extended
  records; in a LAZ, a chunk table that fits the file and the count, and where the chunks state
  their points (variable-size chunks, point formats 6-10), the header's count;
- LAZ chunks of 1 to MAX_CHUNK_POINTS points, as many as the header's count needs;
- scale factors in [MIN_SCALE, MAX_SCALE], finite offsets, finite ordered bounds within
  +/-MAX_COORDINATE, an extent of at most MAX_EXTENT per axis and of non-zero area;
- points inside the header's bounds, no return number above the number of returns.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.errors import UserError

MAX_RECORDS = 10_000
MAX_EXTRA_BYTES = 256
MIN_SCALE, MAX_SCALE = 1e-9, 1.0
MAX_COORDINATE = 1e8
MAX_EXTENT = 1e7
# Points per LAZ chunk: LASzip writes 50,000 by default. The decoder allocates a whole chunk
# (points x record length, up to 323 MB at this bound) when it seeks, so the chunk size a file
# claims is bounded before anything is decoded.
MAX_CHUNK_POINTS = 1_000_000

# The standard fields of point formats 0-10, in bytes.
FORMAT_SIZES = (20, 28, 26, 34, 57, 63, 30, 36, 38, 59, 67)
# The smallest header each LAS minor version defines.
HEADER_SIZES = {0: 227, 1: 227, 2: 227, 3: 235, 4: 375}
VLR_HEADER_BYTES, EVLR_HEADER_BYTES = 54, 60
LASZIP_USER_ID, LASZIP_RECORD_ID = b"laszip encoded", 22204
VARIABLE_CHUNKS = 0xFFFFFFFF
INT32 = (-(2**31), 2**31 - 1)

_HEADER = struct.Struct("<4s20xBB64x4xHIIBHI")  # signature, version, header size .. legacy point count
_HEADER_14 = struct.Struct("<QIQ")  # start of first EVLR, number of EVLRs, point count (at byte 235)
_VLR = struct.Struct("<2x16sHH32x")
_EVLR = struct.Struct("<2x16sHQ32x")
_LASZIP = struct.Struct("<HHBBHIIqqH")
# LASzip's compressor for point formats 6-10: each chunk holds its own point count after its first point.
LAYERED_COMPRESSOR = 3


class NotPointCloudError(UserError, ValueError):
    """The content is not a LAS/LAZ file we can read; `check` names the rule that refused it."""

    def __init__(self, message: str, check: str = "content") -> None:
        super().__init__(message)
        self.check = check


def _unreadable(name: str, what: str, check: str) -> NotPointCloudError:
    return NotPointCloudError(f"{name} has a LAS signature but an unreadable header: {what}", check)


def check_structure(path: Path) -> None:
    """Sizes and counts of the header, records and point data, checked against the file's size."""
    path = Path(path)
    name, size = path.name, path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(max(HEADER_SIZES.values()))
        if head[:4] != b"LASF":
            raise NotPointCloudError(f"{name} is not a LAS/LAZ file (no 'LASF' signature)", "signature")
        if len(head) < _HEADER.size:
            raise _unreadable(name, f"the file ends after {size} bytes, inside the header", "header_size")
        _, major, minor, header_size, offset, vlr_count, format_byte, record_length, count = _HEADER.unpack_from(head)
        if (major, minor) not in {(1, m) for m in HEADER_SIZES}:
            raise NotPointCloudError(f"{name}: LAS version {major}.{minor} is not one we read (1.0 to 1.4)", "version")
        if not HEADER_SIZES[minor] <= header_size <= min(offset, size):
            raise _unreadable(
                name,
                f"header size {header_size}, point data at byte {offset}, file size {size:,} "
                f"(LAS {major}.{minor} needs a header of {HEADER_SIZES[minor]} bytes before the point data)",
                "header_size",
            )
        evlr_start = evlr_count = 0
        if minor >= 4:
            evlr_start, evlr_count, count = _HEADER_14.unpack_from(head, 235)
        # laspy's rule: bit 7 alone marks LAZ (bit 6 as well marked an old, incompatible variant).
        point_format, compressed = format_byte & 0x3F, format_byte & 0xC0 == 0x80
        if point_format >= len(FORMAT_SIZES):
            raise NotPointCloudError(f"{name}: point data format {point_format} is not one of 0 to 10", "point_format")
        extra = record_length - FORMAT_SIZES[point_format]
        if extra < 0:
            raise _unreadable(
                name,
                f"point records of {record_length} bytes are shorter than format {point_format}'s {FORMAT_SIZES[point_format]}",
                "record_length",
            )
        if extra > MAX_EXTRA_BYTES:
            raise NotPointCloudError(
                f"{name}: each point carries {extra:,} extra bytes beyond format {point_format}'s fields; "
                f"we accept at most {MAX_EXTRA_BYTES}: drop unneeded extra dimensions when exporting",
                "extra_bytes",
            )
        if count == 0:
            raise NotPointCloudError(f"{name} holds no points (zero points in the header)", "point_count")
        room = offset - header_size
        # laspy reads every declared record, even past the end of the file: 4 billion of them hang it.
        if vlr_count > MAX_RECORDS:
            raise _unreadable(
                name, f"it declares {vlr_count:,} variable-length records; at most {MAX_RECORDS:,} are read", "vlrs"
            )
        if vlr_count * VLR_HEADER_BYTES > room:
            raise _unreadable(
                name,
                f"it declares {vlr_count:,} variable-length records, and only {room:,} bytes lie between the header and the point data",
                "vlrs",
            )
        handle.seek(header_size)
        vlrs = handle.read(room)
        _check_evlrs(handle, name, size, offset, evlr_start, evlr_count)
        data_end = evlr_start if evlr_count and evlr_start > offset else size
        if compressed:
            _check_laz(handle, name, vlrs, vlr_count, offset, data_end, record_length, count)
            return
        if minor >= 3 and struct.unpack_from("<H", head, 6)[0] & 0b10:
            # Waveform packets inside the file (LAS 1.3+, global encoding bit 1) follow the points.
            (waveforms,) = struct.unpack_from("<Q", head, 227)
            data_end = waveforms if offset < waveforms < data_end else data_end
        held = max(data_end - offset, 0)
        if count * record_length > held:
            raise NotPointCloudError(
                f"{name}: the header's point count ({count:,} points of {record_length} bytes) needs "
                f"{count * record_length:,} bytes of point data; the file holds {held:,}: it is truncated "
                "or its point count is wrong",
                "point_count",
            )
        if count * record_length < held:
            # The LAS specification puts nothing between the points and the extended records (or the end).
            whole, rest = divmod(held, record_length)
            rest_text = f" and {rest:,} bytes" if rest else ""
            raise NotPointCloudError(
                f"{name}: the header says {count:,} points, the point data holds {whole:,} points{rest_text} "
                f"of {record_length} bytes: the header's point count is wrong",
                "point_count",
            )


def _check_evlrs(handle, name: str, size: int, offset: int, start: int, count: int) -> None:
    """Walk the extended records' headers: each must lie inside the file."""
    if count == 0:
        return
    if count > MAX_RECORDS:
        raise _unreadable(
            name, f"it declares {count:,} extended variable-length records; at most {MAX_RECORDS:,} are read", "evlrs"
        )
    if start < offset or start + count * EVLR_HEADER_BYTES > size:
        raise _unreadable(
            name,
            f"it declares {count:,} extended variable-length records from byte {start:,}, and the file ends at byte {size:,}",
            "evlrs",
        )
    position = start
    for index in range(count):
        handle.seek(position)
        record = handle.read(EVLR_HEADER_BYTES)
        if len(record) < EVLR_HEADER_BYTES:
            raise _unreadable(
                name, f"extended variable-length record {index + 1} of {count} starts past the end of the file", "evlrs"
            )
        _, _, length = _EVLR.unpack(record)
        position += EVLR_HEADER_BYTES + length
        if position > size:
            raise _unreadable(
                name,
                f"extended variable-length record {index + 1} claims {length:,} bytes, past the end of the file",
                "evlrs",
            )


def _laszip_record(vlrs: bytes, count: int) -> bytes | None:
    position = 0
    for _ in range(count):
        if position + VLR_HEADER_BYTES > len(vlrs):
            return None
        user_id, record_id, length = _VLR.unpack_from(vlrs, position)
        position += VLR_HEADER_BYTES
        if user_id.rstrip(b"\0") == LASZIP_USER_ID and record_id == LASZIP_RECORD_ID:
            return vlrs[position : position + length]
        position += length
    return None


def _check_laz(
    handle, name: str, vlrs: bytes, vlr_count: int, offset: int, data_end: int, record_length: int, count: int
) -> None:
    """The laszip record and chunk table agree with the point count and fit in the file: chunks of
    at most MAX_CHUNK_POINTS points, as many as the header's count needs, and where the chunks say
    how many points they hold (variable-size chunks, point formats 6-10), exactly the header's count.
    Fixed-size chunks of point formats 0-5 do not say how many points the last one holds: there a
    count short by less than one chunk goes unnoticed (readers stop at the header's count)."""
    record = _laszip_record(vlrs, vlr_count)
    if record is None or len(record) < _LASZIP.size:
        raise NotPointCloudError(f"{name} says its points are compressed (LAZ) but has no valid laszip record", "laz")
    compressor, *_, chunk_size, _, _, items = _LASZIP.unpack_from(record)
    sizes = [
        struct.unpack_from("<HHH", record, _LASZIP.size + 6 * i)[1]
        for i in range(items)
        if _LASZIP.size + 6 * (i + 1) <= len(record)
    ]
    if len(sizes) != items or sum(sizes) != record_length:
        raise NotPointCloudError(
            f"{name}: the laszip record describes {sum(sizes)}-byte points, the header {record_length}-byte ones", "laz"
        )
    fixed = chunk_size != VARIABLE_CHUNKS
    if fixed and not 1 <= chunk_size <= MAX_CHUNK_POINTS:
        raise NotPointCloudError(
            f"{name}: the LAZ chunk size is {chunk_size:,} points; we read chunks of 1 to {MAX_CHUNK_POINTS:,} "
            "points (LASzip writes 50,000): the file is corrupt, or recompress it with the default chunk size",
            "laz_chunks",
        )
    handle.seek(offset)
    (table,) = struct.unpack("<q", handle.read(8).ljust(8, b"\xff"))
    if table == -1:
        # Written by a streaming compressor: the table's offset is in the file's last 8 bytes.
        handle.seek(data_end - 8)
        (table,) = struct.unpack("<q", handle.read(8).ljust(8, b"\xff"))
    if not offset + 8 <= table <= data_end - 8:
        raise NotPointCloudError(
            f"{name}: the LAZ chunk table lies outside the file (byte {table:,}): the file is corrupt or truncated",
            "laz_chunks",
        )
    handle.seek(table)
    _, chunks = struct.unpack("<II", handle.read(8))
    # Each chunk starts with one whole point record: the compressed bytes bound the chunk count.
    compressed = table - offset - 8
    most = compressed // record_length
    layout = f"chunks of {chunk_size:,} points" if fixed else "chunks of any size"
    if chunks == 0 or chunks > min(most, count):
        raise NotPointCloudError(
            f"{name}: the LAZ chunk table lists {chunks:,} {layout} for {count:,} points in {compressed:,} "
            "compressed bytes: the file is corrupt",
            "laz_chunks",
        )
    if fixed and chunks != -(-count // chunk_size):
        raise NotPointCloudError(
            f"{name}: the header says {count:,} points, which make {-(-count // chunk_size):,} {layout}, "
            f"and the LAZ chunk table lists {chunks:,} chunks: the header's point count is wrong or the file is corrupt",
            "laz_chunks",
        )
    entries = _chunk_entries(handle, name, record, table)
    layered = compressor == LAYERED_COMPRESSOR
    if len(entries) != chunks or sum(b for _, b in entries) != compressed:
        raise NotPointCloudError(
            f"{name}: the LAZ chunk table's {len(entries):,} chunks take {sum(b for _, b in entries):,} bytes, "
            f"and the compressed points {compressed:,}: the file is corrupt",
            "laz_chunks",
        )
    if any(b < record_length + 4 * layered for _, b in entries):
        raise NotPointCloudError(
            f"{name}: a LAZ chunk is shorter than one point record: the file is corrupt", "laz_chunks"
        )
    held = [points for points, _ in entries]
    if not fixed and max(held) > MAX_CHUNK_POINTS:
        raise NotPointCloudError(
            f"{name}: a LAZ chunk claims {max(held):,} points; we read chunks of at most {MAX_CHUNK_POINTS:,}: "
            "the file is corrupt, or recompress it with the default chunk size",
            "laz_chunks",
        )
    if layered:
        # The chunks' own counts: the fixed-size table says chunk_size for every chunk, the last one too.
        position, own = offset + 8, []
        for _, length in entries:
            handle.seek(position + record_length)
            own.append(struct.unpack("<I", handle.read(4))[0])
            position += length
        if (fixed and (any(n != chunk_size for n in own[:-1]) or not 1 <= own[-1] <= chunk_size)) or (
            not fixed and own != held
        ):
            raise NotPointCloudError(
                f"{name}: the LAZ chunks' own point counts disagree with the chunk table: the file is corrupt",
                "laz_chunks",
            )
        held = own
    if (layered or not fixed) and sum(held) != count:
        raise NotPointCloudError(
            f"{name}: the header says {count:,} points, the LAZ chunks hold {sum(held):,}: "
            "the header's point count is wrong or the file is corrupt",
            "point_count",
        )


def _chunk_entries(handle, name: str, record: bytes, table: int) -> list[tuple[int, int]]:
    """(points, bytes) of each chunk, from the (compressed) chunk table; for fixed-size chunks
    the decoder gives every chunk the chunk size."""
    import lazrs

    handle.seek(table)
    try:
        return [(int(p), int(b)) for p, b in lazrs.read_chunk_table_only(handle, lazrs.LazVlr(bytes(record)))]
    except BaseException as error:
        if not (isinstance(error, Exception) or is_decoder_panic(error)):
            raise
        raise NotPointCloudError(
            f"{name}: the LAZ chunk table cannot be read ({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}): "
            "the file is corrupt or truncated",
            "laz_chunks",
        ) from None


def check_header(name: str, scales, offsets, mins, maxs) -> None:
    """Scale factors, offsets and bounds: finite, ordered and within the documented limits."""
    if not all(MIN_SCALE <= s <= MAX_SCALE for s in scales):
        raise NotPointCloudError(
            f"{name}: a coordinate scale factor is zero, negative, not a number or outside "
            f"[{MIN_SCALE:g}, {MAX_SCALE:g}] (x, y, z scales {_numbers(scales)})",
            "scale",
        )
    if not all(math.isfinite(o) and abs(o) <= MAX_COORDINATE for o in offsets):
        raise NotPointCloudError(
            f"{name}: a coordinate offset is not a finite number within +/-{MAX_COORDINATE:g} (offsets {_numbers(offsets)})",
            "offset",
        )
    if not all(math.isfinite(v) and abs(v) <= MAX_COORDINATE for v in (*mins, *maxs)) or any(
        lo > hi for lo, hi in zip(mins, maxs)
    ):
        raise NotPointCloudError(
            f"{name}: header bounds are not finite, beyond +/-{MAX_COORDINATE:g}, or have max below min "
            f"(min {_numbers(mins)}, max {_numbers(maxs)})",
            "bounds",
        )
    extents = [hi - lo for lo, hi in zip(mins, maxs)]
    if max(extents) > MAX_EXTENT:
        raise NotPointCloudError(
            f"{name}: the points span {max(extents):,.0f} units, more than the {MAX_EXTENT:,.0f} we accept "
            "in one file: split the survey",
            "extent",
        )
    if extents[0] * extents[1] <= 0:
        raise NotPointCloudError(
            f"{name}: the extent is degenerate (zero area): all points on one spot or one line", "extent"
        )


def _numbers(values) -> str:
    return ", ".join(f"{v:g}" for v in values)


@dataclass(frozen=True)
class Problem:
    check: str
    explain: str
    detail: str


def point_problems(points, scales, offsets, mins, maxs) -> list[Problem]:
    """What is wrong with a block of laspy points against its header: every rule, not just the first."""
    problems = []
    for axis, raw, scale, offset, low, high in zip("xyz", (points.X, points.Y, points.Z), scales, offsets, mins, maxs):
        # Compared as the stored integers (no float copy of the chunk); half a scale step of slack,
        # since the header's bounds are rounded like the points. Bounds beyond int32 never bind.
        lowest = max(math.ceil((low - offset) / scale - 0.5 - 1e-6), INT32[0])
        highest = min(math.floor((high - offset) / scale + 0.5 + 1e-6), INT32[1])
        outside = int(np.count_nonzero((raw < lowest) | (raw > highest)))
        if outside:
            values = np.asarray(raw[(raw < lowest) | (raw > highest)], dtype=np.float64) * scale + offset
            problems.append(
                Problem(
                    f"points_within_{axis}_bounds",
                    f"points lie outside the header's {axis} bounds",
                    f"{outside:,} of {len(raw):,} points outside [{low:g}, {high:g}], e.g. {values[0]:g}",
                )
            )
    above = int(np.count_nonzero(np.asarray(points.return_number) > np.asarray(points.number_of_returns)))
    if above:
        problems.append(
            Problem(
                "return_numbers",
                "some points have a return number above their number of returns",
                f"{above:,} of {len(points):,} points",
            )
        )
    return problems


def count_problem(read: int, declared: int) -> Problem | None:
    if read == declared:
        return None
    return Problem(
        "point_count",
        "the header's point count does not match the point data",
        f"the header says {declared:,} points, the data holds {read:,}",
    )


def is_decoder_panic(error: BaseException) -> bool:
    """lazrs is Rust: a panic reaches Python as pyo3's PanicException, a BaseException that
    `except Exception` lets through. For a corrupt file it means what any decode error means."""
    return type(error).__name__ == "PanicException" and type(error).__module__ == "pyo3_runtime"
