"""COPC 1.0 output: a LAZ 1.4 file whose variable-size chunks are the nodes of an octree.

Web viewers and GIS tools stream COPC by reading the hierarchy and fetching only the nodes they
need. The one writer on PyPI that needs no system PDAL (copclib 2.6) leaves the info VLR's GPS
time range at zero and adds the draft's `extents` VLR, so this is our own, over lazrs.

How the octree is built, with memory bounded by `BIN_LIMIT` points whatever the file size:

1. scan: stream the input, convert each chunk to point format 6, 7 or 8 (COPC allows no other),
   and append the raw records to the file of their *bin*, an octree node deep enough that an
   airborne survey puts about `BIN_TARGET` points in each.
2. per bin: one point (a random one, the same every run) in each of the GRID x GRID x GRID
   voxels of every ancestor node, from the root down, belongs to that ancestor (appended to the
   ancestor's file); then the bin's own subtree is built the same way, node by node, until a
   node holds at most `LEAF_POINTS` points. A bin with more than `BIN_LIMIT` points is split
   into its eight children first.
3. the ancestors' files, one node each, are written last; then the chunk table, the hierarchy
   (one page) and the final header.

Every point is written exactly once, inside the bounds of its node; the same input gives the
same bytes. Each node is one LAZ chunk, compressed by lazrs.
"""

from __future__ import annotations

import contextlib
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import laspy
import lazrs
import numpy as np

from pipelines.errors import InvalidValue
from pipelines.lasio import CHUNK_POINTS, append_grouped, iter_chunks
from pipelines.octree import EVLR_HEADER, Cube, Key, write_hierarchy
from pipelines.tile_io import CLASSIFIER_VLR_USER_ID, open_partial

COPC_SUFFIX = ".copc.laz"
# COPC allows point formats 6, 7 and 8 only: each input format goes to the one that keeps its
# colour and near-infrared; waveform packets (4, 5, 9, 10) have no place in COPC.
COPC_POINT_FORMAT = {0: 6, 1: 6, 2: 7, 3: 7, 4: 6, 5: 7, 6: 6, 7: 7, 8: 8, 9: 6, 10: 8}
GRID = 128  # voxels along each edge of a node: a node keeps one point per voxel (as PDAL does)
LEAF_POINTS = 100_000  # a node with at most this many points keeps them all
BIN_TARGET = 1_000_000
BIN_LIMIT = 4_000_000
MAX_DEPTH = 24
INFO_VLR_BYTES = 160
# Scan angle of formats 0-5 is whole degrees; of 6-10, units of 0.006 degrees.
SCAN_ANGLE_UNIT = 0.006

Progress = Callable[[str, int, int], None]


@dataclass
class CopcSummary:
    points: int
    nodes: int
    depth: int  # deepest level with points
    points_per_level: dict[int, int] = field(default_factory=dict)


def copc_point_format(source: laspy.PointFormat) -> laspy.PointFormat:
    target = laspy.PointFormat(COPC_POINT_FORMAT[source.id])
    for dimension in source.extra_dimensions:
        target.dimensions.append(dimension)
    return target


def _converter(
    source: laspy.PointFormat, target: laspy.PointFormat
) -> Callable[[laspy.ScaleAwarePointRecord], np.ndarray]:
    if source.id == target.id:
        return lambda chunk: chunk.array

    def convert(chunk: laspy.ScaleAwarePointRecord) -> np.ndarray:
        records = laspy.PackedPointRecord.zeros(len(chunk), target)
        records.copy_fields_from(chunk)
        if "scan_angle_rank" in source.dimension_names:
            records.scan_angle = np.clip(np.round(np.asarray(chunk.scan_angle_rank) / SCAN_ANGLE_UNIT), -30_000, 30_000)
        return records.array

    return convert


def _xyz(records: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Real coordinates (n x 3), as readers compute them from the stored integers."""
    return np.stack(
        [
            records["X"] * scales[0] + offsets[0],
            records["Y"] * scales[1] + offsets[1],
            records["Z"] * scales[2] + offsets[2],
        ],
        axis=1,
    )


def _voxel_picks(xyz: np.ndarray, priority: np.ndarray, node_mins: np.ndarray, side: float) -> np.ndarray:
    """A mask of one point per occupied voxel of a node (GRID voxels per edge): the one of lowest priority."""
    voxel = np.clip(np.floor((xyz - node_mins) * (GRID / side)).astype(np.int64), 0, GRID - 1)
    ids = (voxel[:, 0] * GRID + voxel[:, 1]) * GRID + voxel[:, 2]
    lowest = np.full(GRID**3, np.inf)
    np.minimum.at(lowest, ids, priority)
    return priority == lowest[ids]


def _bin_depth(points: int) -> int:
    # Airborne surveys fill the octree about as a quadtree: four bins per level, not eight.
    depth = 0
    while points / 4**depth > BIN_TARGET and depth < MAX_DEPTH:
        depth += 1
    return depth


class _Chunks:
    """Node chunks through one LAZ compressor, in the order written; offsets come from the chunk table."""

    def __init__(self, handle, vlr: lazrs.LazVlr) -> None:
        self.handle, self.vlr = handle, vlr
        self.start = handle.tell()
        self.compressor = lazrs.LasZipCompressor(handle, vlr)
        self.compressor.reserve_offset_to_chunk_table()
        self.keys: list[Key] = []
        self.counts: list[int] = []

    def add(self, key: Key, parts: Iterator[np.ndarray]) -> None:
        count = 0
        for part in parts:
            if not len(part):
                continue
            if not count and self.keys:
                # Close the previous node's chunk here, not after each node: done() closes the last.
                self.compressor.finish_current_chunk()
            self.compressor.compress_many(part.tobytes())
            count += len(part)
        if count:
            self.keys.append(key)
            self.counts.append(count)

    def finish(self) -> list[tuple[Key, int, int, int]]:
        """(key, offset, bytes, points) of every node written."""
        self.compressor.done()
        end = self.handle.tell()
        self.handle.seek(self.start)
        table = lazrs.read_chunk_table(self.handle, self.vlr)
        self.handle.seek(end)
        offset = self.start + 8
        entries = []
        for key, count, (points, size) in zip(self.keys, self.counts, table, strict=True):
            if points != count:
                raise RuntimeError(f"COPC node {key.name}: chunk table says {points} points, {count} were written")
            entries.append((key, offset, size, count))
            offset += size
        return entries


def write_copc(source: Path, target: Path, scratch: Path, progress: Progress | None = None) -> CopcSummary:
    """Write the points of LAS/LAZ `source` as COPC 1.0 to `target`, through a temporary name."""
    source, target = Path(source), Path(target)
    scratch.mkdir(parents=True, exist_ok=True)
    with laspy.open(source) as reader:
        header = reader.header
    point_format = copc_point_format(header.point_format)
    cube = Cube.around(header.mins, header.maxs, float(max(header.scales)))
    scales, offsets = np.asarray(header.scales, dtype=np.float64), np.asarray(header.offsets, dtype=np.float64)
    dtype = point_format.dtype()
    partial, partial_handle = open_partial(target)
    try:
        with tempfile.TemporaryDirectory(prefix="copc-", dir=scratch) as work:
            bins_dir, ancestors_dir = Path(work, "bins"), Path(work, "ancestors")
            bins_dir.mkdir()
            ancestors_dir.mkdir()
            depth = _bin_depth(int(header.point_count))
            stats = _scan(source, header, point_format, cube, depth, bins_dir, progress)
            # Each node is one chunk: LAZ's variable-size chunks, as COPC requires.
            vlr = lazrs.LazVlr.new_for_compression(
                point_format.id, point_format.num_extra_bytes, use_variable_size_chunks=True
            )
            out_header = _output_header(header, point_format, vlr, stats)
            with contextlib.nullcontext(partial_handle) as handle:
                out_header.write_to(handle)
                chunks = _Chunks(handle, vlr)
                builder = _Builder(cube, scales, offsets, dtype, chunks, ancestors_dir)
                bins = sorted((_bin_key(depth, int(path.stem)), path) for path in bins_dir.iterdir())
                done = 0
                for key, path in bins:
                    done += builder.add_bin(key, path)
                    if progress:
                        progress("copc", done, stats.points)
                builder.write_ancestors()
                entries = chunks.finish()
                written = sum(count for _, _, _, count in entries)
                if written != stats.points:
                    raise RuntimeError(f"COPC writer placed {written} of {stats.points} points")
                out_header.start_of_first_evlr, page_size = write_hierarchy(handle, entries)
                out_header.number_of_evlrs = 1
                out_header.vlrs[0].record_data = _info_bytes(
                    cube, out_header.start_of_first_evlr + EVLR_HEADER.size, page_size, stats
                )
                handle.seek(0)
                out_header.write_to(handle, ensure_same_size=True)
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        partial_handle.close()  # its lock goes only now: after the rename or the unlink
    levels: dict[int, int] = {}
    for key, _, _, count in entries:
        levels[key.d] = levels.get(key.d, 0) + count
    return CopcSummary(
        points=stats.points, nodes=len(entries), depth=max(levels), points_per_level=dict(sorted(levels.items()))
    )


@dataclass
class _Stats:
    points: int = 0
    mins: np.ndarray = field(default_factory=lambda: np.full(3, np.inf))
    maxs: np.ndarray = field(default_factory=lambda: np.full(3, -np.inf))
    gps: tuple[float, float] = (np.inf, -np.inf)
    by_return: np.ndarray = field(default_factory=lambda: np.zeros(15, dtype=np.int64))


def _scan(
    source: Path,
    header: laspy.LasHeader,
    point_format: laspy.PointFormat,
    cube: Cube,
    depth: int,
    bins_dir: Path,
    progress: Progress | None,
) -> _Stats:
    convert = _converter(header.point_format, point_format)
    scales, offsets = np.asarray(header.scales, dtype=np.float64), np.asarray(header.offsets, dtype=np.float64)
    stats = _Stats()
    for chunk in iter_chunks(source, CHUNK_POINTS):
        records = convert(chunk)
        xyz = _xyz(records, scales, offsets)
        if len(records) == 0:
            continue
        low, high = xyz.min(axis=0), xyz.max(axis=0)
        if (low < cube.mins).any() or (high > cube.maxs).any():
            raise InvalidValue(
                f"{source.name}: points lie outside the bounds its header gives ({low} .. {high}); rewrite the file to fix its header"
            )
        stats.mins, stats.maxs = np.minimum(stats.mins, low), np.maximum(stats.maxs, high)
        gps = records["gps_time"]
        stats.gps = (min(stats.gps[0], float(gps.min())), max(stats.gps[1], float(gps.max())))
        stats.by_return += np.bincount(records["bit_fields"] & 0x0F, minlength=16)[1:16]
        cells = cube.cells(depth, xyz)
        side = 2**depth
        append_grouped(records, (cells[:, 0] * side + cells[:, 1]) * side + cells[:, 2], bins_dir, "bin")
        stats.points += len(records)
        if progress:
            progress("copc-scan", stats.points, int(header.point_count))
    if stats.points == 0:
        raise InvalidValue(f"{source.name} holds no points: nothing to write as COPC")
    return stats


def _bin_key(depth: int, flat: int) -> Key:
    side = 2**depth
    return Key(depth, flat // (side * side), flat // side % side, flat % side)


class _Builder:
    def __init__(
        self, cube: Cube, scales: np.ndarray, offsets: np.ndarray, dtype: np.dtype, chunks: _Chunks, ancestors_dir: Path
    ) -> None:
        self.cube, self.scales, self.offsets, self.dtype = cube, scales, offsets, dtype
        self.chunks, self.ancestors_dir = chunks, ancestors_dir

    def add_bin(self, key: Key, path: Path) -> int:
        """Place the points of one bin (its ancestors' share, then its subtree); returns how many."""
        count = path.stat().st_size // self.dtype.itemsize
        if count > BIN_LIMIT and key.d < MAX_DEPTH:
            return sum(self.add_bin(child, child_path) for child, child_path in self._split(key, path))
        if count > BIN_LIMIT:
            # Points piled on one spot, beyond any octree depth: one leaf, streamed from disk.
            self.chunks.add(key, _read_slices(path, self.dtype))
            path.unlink()
            return count
        records = np.fromfile(path, dtype=self.dtype)
        path.unlink()
        # Each voxel keeps its point of lowest random priority: a random pick, the same every run.
        # Points stay in file order (acquisition order), which LAZ compresses three times better
        # than a shuffle.
        priority = np.random.default_rng([key.d, key.x, key.y, key.z]).random(len(records))
        xyz = _xyz(records, self.scales, self.offsets)
        index = np.arange(len(records))
        for depth in range(key.d):
            ancestor = key.ancestor(depth)
            chosen = _voxel_picks(xyz[index], priority[index], self.cube.node_mins(ancestor), self.cube.side(depth))
            with open(self.ancestors_dir / ancestor.name, "ab") as handle:
                records[index[chosen]].tofile(handle)
            index = index[~chosen]
        self._subtree(key, records, xyz, priority, index)
        return count

    def _split(self, key: Key, path: Path) -> list[tuple[Key, Path]]:
        children_dir = path.with_name(f"{path.name}.children")
        children_dir.mkdir()
        for part in _read_slices(path, self.dtype):
            append_grouped(
                part,
                key.octants(self.cube.cells(key.d + 1, _xyz(part, self.scales, self.offsets))),
                children_dir,
                "bin",
            )
        path.unlink()
        return [
            (key.child(octant), children_dir / f"{octant}.bin")
            for octant in range(8)
            if (children_dir / f"{octant}.bin").exists()
        ]

    def _subtree(self, key: Key, records: np.ndarray, xyz: np.ndarray, priority: np.ndarray, index: np.ndarray) -> None:
        """Nodes from `key` down; index arrays stay ascending, so every node is in file order."""
        pending = [(key, index)]
        while pending:
            node, index = pending.pop()
            if len(index) <= LEAF_POINTS or node.d >= MAX_DEPTH:
                self.chunks.add(node, iter([records[index]]))
                continue
            chosen = _voxel_picks(xyz[index], priority[index], self.cube.node_mins(node), self.cube.side(node.d))
            self.chunks.add(node, iter([records[index[chosen]]]))
            rest = index[~chosen]
            octants = node.octants(self.cube.cells(node.d + 1, xyz[rest]))
            for octant in range(7, -1, -1):
                members = rest[octants == octant]
                if len(members):
                    pending.append((node.child(octant), members))

    def write_ancestors(self) -> None:
        for path in sorted(self.ancestors_dir.iterdir()):
            self.chunks.add(Key(*map(int, path.name.split("-"))), _read_slices(path, self.dtype))


def _read_slices(path: Path, dtype: np.dtype) -> Iterator[np.ndarray]:
    with open(path, "rb") as handle:
        while len(part := np.fromfile(handle, dtype=dtype, count=CHUNK_POINTS)):
            yield part


def _info_bytes(cube: Cube, hierarchy_offset: int, hierarchy_size: int, stats: _Stats) -> bytes:
    gps_min, gps_max = stats.gps
    data = struct.pack(
        "<5d2Q2d",
        *cube.center,
        cube.halfsize,
        2 * cube.halfsize / GRID,
        hierarchy_offset,
        hierarchy_size,
        gps_min,
        gps_max,
    )
    return data + bytes(INFO_VLR_BYTES - len(data))


def _output_header(
    source: laspy.LasHeader, point_format: laspy.PointFormat, vlr: lazrs.LazVlr, stats: _Stats
) -> laspy.LasHeader:
    from pipelines import __version__

    header = laspy.LasHeader(version="1.4", point_format=point_format)
    header.scales, header.offsets = source.scales, source.offsets
    header.mins, header.maxs = stats.mins, stats.maxs
    header.point_count = stats.points
    header.number_of_points_by_return = stats.by_return
    header.system_identifier = source.system_identifier
    # A classified source names its classifier (pipelines.tile_io.classified_header): kept.
    stamped = source.generating_software.startswith("pointflow ")
    header.generating_software = source.generating_software if stamped else f"pointflow {__version__}"
    header.creation_date = source.creation_date
    header.file_source_id = source.file_source_id
    header.uuid = source.uuid
    crs = _crs(source)
    if crs is not None:
        header.add_crs(crs)
    # The info VLR must come first (at byte 375); its hierarchy fields are filled in at the end.
    # (Setting the list re-appends the extra bytes VLR of the point format.)
    crs_vlrs = [v for v in header.vlrs if isinstance(v, laspy.vlrs.known.WktCoordinateSystemVlr)]
    placeholder = _info_bytes(Cube(np.zeros(3), 1.0), 0, 0, stats)
    header.vlrs = [
        laspy.VLR("copc", 1, "COPC info", placeholder),
        laspy.vlrs.known.LasZipVlr(vlr.record_data()),
        *crs_vlrs,
        *(v for v in source.vlrs if v.user_id == CLASSIFIER_VLR_USER_ID),
    ]
    header.are_points_compressed = True
    header.global_encoding.wkt = True
    return header


def _crs(header: laspy.LasHeader):
    try:
        return header.parse_crs()
    except Exception:
        # An unreadable CRS record is left out rather than failing the export (the input check reports it).
        return None
