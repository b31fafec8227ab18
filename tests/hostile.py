"""Hostile LAS/LAZ files, made from the real files in ../shared/data the way an adversarial
customer would: each case is a small file and what pointflow must do with it (refuse it in one
line, or classify it completely). Used by tests/test_hostile.py.

Recipes follow issue 13's table (its number in brackets) plus the other classic breakages.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import laspy
import numpy as np
from laspy.vlrs.vlrlist import VLRList

from tests.conftest import shared_file

# Byte offsets in the public header block.
HEADER_SIZE, OFFSET_TO_POINTS, NUMBER_OF_VLRS, POINT_FORMAT, RECORD_LENGTH, LEGACY_COUNT = 94, 96, 100, 104, 105, 107
SCALES, OFFSETS, MAX_X, MIN_X, MAX_Y, MIN_Y = 131, 155, 179, 187, 195, 203
START_OF_EVLRS, NUMBER_OF_EVLRS, POINT_COUNT_14 = 235, 243, 247


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], Path]
    classified: bool  # True: must be classified completely; False: refused in one line
    points: int = 0  # for classified cases: how many points the output must hold


def patch(path: Path, offset: int, fmt: str, *values) -> Path:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack("<" + fmt, *values))
    return path


def _read(path: Path, offset: int, fmt: str):
    with open(path, "rb") as handle:
        handle.seek(offset)
        return struct.unpack("<" + fmt, handle.read(struct.calcsize("<" + fmt)))


def _subset(name: str, n: int) -> laspy.LasData:
    source = laspy.read(shared_file(name))
    data = laspy.LasData(source.header)
    data.points = source.points[:n]
    return data


def megaplot(path: Path, n: int = 3000) -> Path:
    """LAS 1.2, point format 1, real forest points (LAZ or LAS by the path's suffix)."""
    _subset("lidr_megaplot.laz", n).write(path)
    return path


def samp21(path: Path, n: int = 3000) -> Path:
    """LAS 1.4, point format 6, real ISPRS points."""
    _subset("isprs/samp21.las", n).write(path)
    return path


def _laszip(path: Path) -> int:
    """Byte offset of the laszip record's data."""
    raw = path.read_bytes()
    return raw.index(b"laszip encoded") - 2 + 54


def _chunk_table(path: Path) -> int:
    (offset,) = _read(path, OFFSET_TO_POINTS, "I")
    return _read(path, offset, "q")[0]


def with_extra_bytes(path: Path, extra: int, n: int) -> Path:
    """Real points with `extra` unregistered bytes appended to every record."""
    base = megaplot(path.with_suffix(".base.las"), n)
    raw = bytearray(base.read_bytes())
    offset, length, count = (
        _read(base, OFFSET_TO_POINTS, "I")[0],
        _read(base, RECORD_LENGTH, "H")[0],
        _read(base, LEGACY_COUNT, "I")[0],
    )
    records = np.frombuffer(bytes(raw[offset : offset + count * length]), dtype=np.uint8).reshape(count, length)
    padded = np.concatenate([records, np.zeros((count, extra), np.uint8)], axis=1)
    struct.pack_into("<H", raw, RECORD_LENGTH, length + extra)
    base.unlink()
    if path.suffix == ".las":
        path.write_bytes(bytes(raw[:offset]) + padded.tobytes())
    else:
        padded_las = path.with_suffix(".padded.las")
        padded_las.write_bytes(bytes(raw[:offset]) + padded.tobytes())
        laspy.read(padded_las).write(path)
        padded_las.unlink()
    return path


def copc(path: Path, n: int = 3000) -> Path:
    """A COPC file (LAZ 1.4, one octree node in one variable-size chunk, the hierarchy EVLR),
    readable by laspy's own CopcReader."""
    import lazrs

    source = laspy.read(shared_file("isprs/samp21.las"))
    header = laspy.LasHeader(point_format=6, version="1.4")
    header.scales, header.offsets = source.header.scales, source.header.offsets
    # Written under a stand-in user id, then renamed: laspy refuses to write COPC records itself.
    header.vlrs.append(laspy.VLR("copz", 1, "copc info", b"\0" * 160))
    data = laspy.LasData(header)
    data.points = laspy.ScaleAwarePointRecord(
        source.points.array[:n], source.points.point_format, source.header.scales, source.header.offsets
    )
    data.write(path)
    raw = bytearray(path.read_bytes())
    offset, table = _read(path, OFFSET_TO_POINTS, "I")[0], _chunk_table(path)
    chunk_bytes = table - offset - 8
    laszip = _laszip(path)
    length = struct.unpack_from("<H", raw, laszip - 54 + 20)[0]
    record = bytearray(raw[laszip : laszip + length])
    struct.pack_into("<I", record, 12, 0xFFFFFFFF)  # variable-size chunks, as COPC requires
    raw[laszip : laszip + length] = record
    chunk_table = io.BytesIO()
    lazrs.write_chunk_table(chunk_table, [(n, chunk_bytes)], lazrs.LazVlr(bytes(record)))
    evlr_start = table + len(chunk_table.getvalue())
    entry = struct.pack("<iiiiQii", 0, 0, 0, 0, offset + 8, chunk_bytes, n)
    evlr = struct.pack("<H16sHQ32s", 0, b"copc", 1000, len(entry), b"EPT hierarchy") + entry
    raw = raw[:table] + chunk_table.getvalue() + evlr
    struct.pack_into("<QI", raw, START_OF_EVLRS, evlr_start, 1)
    struct.pack_into("<16s", raw, 375 + 2, b"copc")
    mins, maxs = data.header.mins, data.header.maxs
    center = (mins + maxs) / 2
    halfsize = float(max(maxs - mins)) / 2 + 1
    gps = np.asarray(data.gps_time)
    info = struct.pack(
        "<5d2Q2d11Q", *center, halfsize, halfsize / 8, evlr_start + 60, len(entry), gps.min(), gps.max(), *[0] * 11
    )
    raw[375 + 54 : 375 + 54 + 160] = info
    path.write_bytes(bytes(raw))
    return path


def las_1_0(path: Path) -> Path:
    megaplot(path)
    return patch(path, 25, "B", 0)


def sparse(path: Path, n: int = 20_000, extent: float = 4_000_000.0) -> Path:
    """Real points (their heights and returns) spread over `extent` metres: nearly one per tile."""
    source = _subset("lidr_megaplot.laz", n)
    rng = np.random.default_rng(13)
    header = laspy.LasHeader(point_format=1, version="1.2")
    header.scales, header.offsets = np.array([0.01, 0.01, 0.01]), np.array([500_000.0, 1_000_000.0, 0.0])
    data = laspy.LasData(header)
    data.x = 500_000 + rng.uniform(0, extent, n)
    data.y = 1_000_000 + rng.uniform(0, extent, n)
    data.z = np.asarray(source.z)
    data.intensity = source.intensity
    data.return_number, data.number_of_returns = source.return_number, source.number_of_returns
    data.write(path)
    return path


def far_apart(path: Path) -> Path:
    """Two real clusters at -1e9 m and +1e9 m."""
    source = _subset("lidr_megaplot.laz", 2000)
    header = laspy.LasHeader(point_format=1, version="1.2")
    header.scales, header.offsets = np.array([1.0, 1.0, 0.01]), np.array([0.0, 0.0, 0.0])
    data = laspy.LasData(header)
    side = np.where(np.arange(2000) % 2 == 0, -1e9, 1e9)
    data.x = side + (np.asarray(source.x) - source.header.mins[0])
    data.y = side + (np.asarray(source.y) - source.header.mins[1])
    data.z = np.asarray(source.z)
    data.write(path)
    return path


def outside_bounds(path: Path) -> Path:
    megaplot(path)
    (min_x,) = _read(path, MIN_X, "d")
    return patch(path, MAX_X, "d", min_x + 1.0)


def returns_above(path: Path) -> Path:
    data = laspy.read(megaplot(path))
    data.return_number[:10] = 5
    data.number_of_returns[:10] = 2
    data.write(path)
    return path


def identical_points(path: Path) -> Path:
    data = laspy.read(megaplot(path))
    data.x, data.y = np.full(len(data), data.header.mins[0]), np.full(len(data), data.header.mins[1])
    data.write(path)
    return path


def chunk_count(path: Path, chunks: int) -> Path:
    megaplot(path)
    return patch(path, _chunk_table(path) + 4, "I", chunks)


def chunk_size(path: Path, size: int) -> Path:
    megaplot(path)
    return patch(path, _laszip(path) + 12, "I", size)


def _count_at(path: Path) -> int:
    """Where the header keeps the point count: the 64-bit field of LAS 1.4, else the legacy one."""
    return POINT_COUNT_14 if _read(path, 25, "B")[0] >= 4 else LEGACY_COUNT


def with_count(path: Path, count: int) -> Path:
    """The header's point count set to `count` (the legacy field too where it is in use)."""
    if _count_at(path) == POINT_COUNT_14:
        patch(path, POINT_COUNT_14, "Q", count)
        if _read(path, LEGACY_COUNT, "I")[0]:
            patch(path, LEGACY_COUNT, "I", count if count < 2**32 else 0)
        return path
    return patch(path, LEGACY_COUNT, "I", count)


def real_laz(path: Path, name: str = "corpus/IGN_bat_grenoble.laz") -> Path:
    path.write_bytes(shared_file(name).read_bytes())
    return path


def laz_claiming(path: Path, chunk: int, count: int, base: Callable[[Path], Path] = real_laz) -> Path:
    """A LAZ whose laszip record claims chunks of `chunk` points and whose header claims `count` points."""
    base(path)
    patch(path, _laszip(path) + 12, "I", chunk)
    return with_count(path, count)


def rechunked(path: Path, n: int = 40, chunk: int = 1, extra: int = 256) -> Path:
    """A small synthetic LAZ: `n` real points, each with `extra` unregistered bytes, compressed in
    fixed chunks of `chunk` points (laspy writes one chunk of 50,000)."""
    import lazrs

    source = with_extra_bytes(path.with_suffix(".source.laz"), extra, n)
    raw = source.read_bytes()
    (offset,) = _read(source, OFFSET_TO_POINTS, "I")
    laszip = _laszip(source)
    head = bytearray(raw[:offset])
    struct.pack_into("<I", head, laszip + 12, chunk)
    (length,) = struct.unpack_from("<H", head, laszip - 54 + 20)
    points = laspy.read(source).points.array.tobytes()
    source.unlink()
    with open(path, "wb") as handle:
        handle.write(head)
        compressor = lazrs.LasZipCompressor(handle, lazrs.LazVlr(bytes(head[laszip : laszip + length])))
        compressor.compress_many(points)
        compressor.done()
    return path


def records_appended(path: Path, n: int = 1000, name: str = "isprs/samp11.las") -> Path:
    """A real LAS with copies of its first `n` point records appended, its header unchanged."""
    raw = real_laz(path, name).read_bytes()
    (offset,), (length,) = _read(path, OFFSET_TO_POINTS, "I"), _read(path, RECORD_LENGTH, "H")
    path.write_bytes(raw + raw[offset : offset + n * length])
    return path


def garbage_laz(path: Path) -> Path:
    megaplot(path)
    (offset,) = _read(path, OFFSET_TO_POINTS, "I")
    raw = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    start = offset + 8 + 28  # keep the chunk's first (raw) point, garble the compressed rest
    end = _chunk_table(path)
    raw[start:end] = rng.integers(0, 256, end - start, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    return path


def truncated(path: Path, keep: float) -> Path:
    megaplot(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    return path


def header_only(path: Path) -> Path:
    megaplot(path)
    (offset,) = _read(path, OFFSET_TO_POINTS, "I")
    path.write_bytes(path.read_bytes()[:offset])
    return path


def many_vlrs(path: Path, count: int) -> Path:
    header = laspy.read(shared_file("lidr_megaplot.laz")).header
    data = _subset("lidr_megaplot.laz", 500)
    data.header.vlrs = VLRList([*header.vlrs, *(laspy.VLR("hostile", i % 65535, "", b"") for i in range(count))])
    data.write(path)
    return path


def evlr_with_length(path: Path, length: int) -> Path:
    data = _subset("isprs/samp21.las", 2000)
    data.evlrs = VLRList([laspy.VLR("hostile", 1, "", b"x" * 100)])
    data.write(path)
    (start,) = _read(path, START_OF_EVLRS, "Q")
    return patch(path, start + 20, "Q", length)


def _text(path: Path) -> Path:
    path.write_text("x,y,z\n1,2,3\n")
    return path


def _bytes(content: bytes) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        path.write_bytes(content)
        return path

    return make


def _patched(base: Callable[[Path], Path], offset: int, fmt: str, *values) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        return patch(base(path), offset, fmt, *values)

    return make


CASES: list[Case] = [
    # Issue 13's table.
    Case("01-evlr-count-4g.las", _patched(samp21, NUMBER_OF_EVLRS, "I", 0xFFFFFFFF), False),
    Case("01b-evlr-length-past-end.las", lambda p: evlr_with_length(p, 2**40), False),
    Case("02-extra-bytes-5000.laz", lambda p: with_extra_bytes(p, 5000, 300), False),
    Case("02b-record-length-65535.las", lambda p: with_extra_bytes(p, 65535 - 28, 20), False),
    Case("03-chunk-table-4g-chunks.laz", lambda p: chunk_count(p, 0xFFFFFFFF), False),
    Case("09-copc.copc.laz", copc, True, 3000),
    Case("10-las-1-0.las", las_1_0, True, 3000),
    Case("11-laz-chunk-size-1.laz", lambda p: chunk_size(p, 1), False),
    Case("16a-bounds-inf.las", _patched(megaplot, MAX_X, "d", float("inf")), False),
    Case("16b-offset-1e300.las", _patched(megaplot, OFFSETS, "d", 1e300), False),
    Case("16c-scale-1e300.las", _patched(megaplot, SCALES, "d", 1e300), False),
    Case("16d-bounds-1e300.las", _patched(megaplot, MIN_Y, "d", -1e300), False),
    Case("17-points-at-1e9.las", far_apart, False),
    Case("17b-points-outside-header-bounds.las", outside_bounds, False),
    Case("18-sparse-20000-points-4000-km.las", sparse, True, 20_000),
    Case("21a-point-count-beyond-points.las", _patched(megaplot, LEGACY_COUNT, "I", 6000), False),
    Case("21b-header-only.las", header_only, False),
    Case("21c-point-data-past-end.las", _patched(megaplot, OFFSET_TO_POINTS, "I", 10**7), False),
    Case("21d-laz-point-count-beyond-points.laz", _patched(megaplot, LEGACY_COUNT, "I", 6000), False),
    Case("22a-scale-zero.las", _patched(megaplot, SCALES, "d", 0.0), False),
    Case("22b-scale-negative.las", _patched(megaplot, SCALES + 8, "d", -0.01), False),
    Case("22c-scale-1e-300.las", _patched(megaplot, SCALES + 16, "d", 1e-300), False),
    Case("22d-bounds-swapped.las", lambda p: patch(megaplot(p), MAX_X, "dd", *reversed(_read(p, MAX_X, "dd"))), False),
    # Other classic breakages.
    Case("vlr-count-4g.las", _patched(megaplot, NUMBER_OF_VLRS, "I", 0xFFFFFFFF), False),
    Case("vlr-count-20000.laz", lambda p: many_vlrs(p, 20_000), False),
    Case("header-size-below-standard.las", _patched(megaplot, HEADER_SIZE, "H", 100), False),
    Case("point-data-inside-header.las", _patched(megaplot, OFFSET_TO_POINTS, "I", 10), False),
    Case("record-length-below-format.las", _patched(megaplot, RECORD_LENGTH, "H", 3), False),
    Case("point-format-99.las", _patched(megaplot, POINT_FORMAT, "B", 99), False),
    Case("version-2-0.las", _patched(megaplot, 24, "B", 2), False),
    Case("point-count-4g.las", _patched(megaplot, LEGACY_COUNT, "I", 0xFFFFFFFF), False),
    Case("bounds-nan.las", _patched(megaplot, MIN_X, "d", float("nan")), False),
    Case("offset-nan.las", _patched(megaplot, OFFSETS + 8, "d", float("nan")), False),
    Case("all-points-on-one-spot.las", identical_points, False),
    Case("return-number-above-returns.las", returns_above, False),
    Case("laz-truncated.laz", lambda p: truncated(p, 0.5), False),
    Case("las-truncated.las", lambda p: truncated(p, 0.5), False),
    Case("laz-garbled.laz", garbage_laz, False),
    Case("laz-without-laszip-record.las", _patched(megaplot, POINT_FORMAT, "B", 0x81), False),
    Case("laz-chunk-size-0.laz", lambda p: chunk_size(p, 0), False),
    Case("laz-chunk-size-2g-count-900m.laz", lambda p: laz_claiming(p, 2**31, 900_000_000), False),
    Case("laz-40-chunks-claiming-2m-points.laz", lambda p: laz_claiming(p, 50_000, 2_000_000, rechunked), False),
    Case("las-count-1000-under-points.las", lambda p: with_count(real_laz(p, "isprs/samp11.las"), 37_010), False),
    Case("las-1000-records-appended.las", records_appended, False),
    Case("laz-count-30000-under-points.laz", lambda p: with_count(real_laz(p), 107_379), False),
    Case("text-named-las.las", _text, False),
    Case("empty-file.laz", _bytes(b""), False),
    Case("signature-only.las", _bytes(b"LASF"), False),
    # A sound real file beside them: the harness must be able to pass one.
    Case("sound-real-file.laz", megaplot, True, 3000),
]


def make_all(folder: Path) -> list[tuple[Case, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    return [(case, case.make(folder / case.name)) for case in CASES]
