"""The COPC octree: node keys, the root cube (node bounds computed exactly as COPC readers compute
them), and the hierarchy page that lists every node."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

HIERARCHY_ENTRY = struct.Struct("<iiiiQii")
EVLR_HEADER = struct.Struct("<H16sHQ32s")


@dataclass(frozen=True, order=True)
class Key:
    """An octree node: depth and its cell along x, y, z at that depth."""

    d: int
    x: int
    y: int
    z: int

    def child(self, octant: int) -> Key:
        return Key(self.d + 1, 2 * self.x + (octant >> 2), 2 * self.y + (octant >> 1 & 1), 2 * self.z + (octant & 1))

    def octants(self, cells: np.ndarray) -> np.ndarray:
        """Which child (0-7) holds each point, from the points' cells (n x 3) one level down."""
        return (cells[:, 0] - 2 * self.x) * 4 + (cells[:, 1] - 2 * self.y) * 2 + (cells[:, 2] - 2 * self.z)

    def ancestor(self, depth: int) -> Key:
        shift = self.d - depth
        return Key(depth, self.x >> shift, self.y >> shift, self.z >> shift)

    @property
    def name(self) -> str:
        return f"{self.d}-{self.x}-{self.y}-{self.z}"


@dataclass(frozen=True)
class Cube:
    """The root node's cube, as the info VLR stores it (centre, half size); node bounds are
    computed exactly as COPC readers compute them, so a point's node holds it to the last bit."""

    center: np.ndarray
    halfsize: float

    @classmethod
    def around(cls, mins, maxs, resolution: float) -> Cube:
        """The smallest cube anchored at the data's minimum that holds its maximum (copc-lib
        takes the root from the header's minimum too, so readers of either kind agree)."""
        mins, maxs = np.asarray(mins, dtype=np.float64), np.asarray(maxs, dtype=np.float64)
        center = mins + max(float(np.max(maxs - mins)) / 2, resolution)
        halfsize = float(np.max(np.maximum(center - mins, maxs - center)))
        # The centre is rounded: widen by the last bits until the readers' own arithmetic holds it all.
        while np.any(center - halfsize > mins) or np.any(center + halfsize < maxs):
            halfsize = float(np.nextafter(halfsize, np.inf))
        return cls(center, halfsize)

    @property
    def mins(self) -> np.ndarray:
        return self.center - self.halfsize

    @property
    def maxs(self) -> np.ndarray:
        return self.center + self.halfsize

    def side(self, depth: int) -> float:
        return float(self.maxs[0] - self.mins[0]) / 2**depth

    def node_mins(self, key: Key) -> np.ndarray:
        return self.mins + np.array([key.x, key.y, key.z]) * self.side(key.d)

    def cells(self, depth: int, xyz: np.ndarray) -> np.ndarray:
        """The cell (n x 3 ints) of each point at `depth`, such that mins <= point <= maxs of its node."""
        side = self.side(depth)
        cells = np.floor((xyz - self.mins) / side).astype(np.int64)
        # Rounding can put a point one cell off near a face; settle it with the readers' own formula.
        cells -= xyz < self.mins + cells * side
        cells += xyz > self.mins + (cells + 1) * side
        return np.clip(cells, 0, 2**depth - 1)


def with_ancestors(entries: list[tuple[Key, int, int, int]]) -> list[tuple[Key, int, int, int]]:
    """Entries plus empty ones for nodes without points above nodes with points: readers walk the
    hierarchy from the root and stop where a node has no entry."""
    present = {key for key, *_ in entries}
    empty: set[Key] = set()
    for key in present:
        while key.d > 0:
            key = key.ancestor(key.d - 1)
            if key not in present:
                empty.add(key)
    return sorted(entries) + [(key, 0, 0, 0) for key in sorted(empty)]


def write_hierarchy(handle, entries: list[tuple[Key, int, int, int]]) -> tuple[int, int]:
    """The hierarchy EVLR (one page) at the end of the file: where its EVLR header starts, the page's size."""
    page = b"".join(
        HIERARCHY_ENTRY.pack(key.d, key.x, key.y, key.z, offset, size, count)
        for key, offset, size, count in with_ancestors(entries)
    )
    start = handle.tell()
    handle.write(EVLR_HEADER.pack(0, b"copc", 1000, len(page), b"EPT hierarchy"))
    handle.write(page)
    return start, len(page)
