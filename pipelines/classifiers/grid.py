"""Raster helpers shared by the classifiers.

Grids are aligned to absolute multiples of the cell size so that a tile (with its buffer) and an
untiled run build identical cells wherever they overlap; this is what lets tiled results agree
with untiled ones away from the buffer edge.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import filters, kernels


@dataclass(frozen=True)
class Grid:
    """A regular raster of square cells; column j covers [(i0 + j) * cell, (i0 + j + 1) * cell)
    in x, row i likewise in y from j0.

    A point's cell is floor(x / cell) - i0, which depends on the point alone: with power-of-two
    cells the division is exact, so points on cell borders (LAS coordinates are multiples of
    0.01 m) land in the same cell whatever the block they come in.
    """

    i0: int
    j0: int
    cell: float
    nx: int
    ny: int

    @classmethod
    def covering(cls, x: np.ndarray, y: np.ndarray, cell: float) -> Grid:
        # Same arithmetic as cols_rows (multiply by the inverse), so no point falls outside.
        inverse = 1.0 / cell
        i0 = int(np.floor(x.min() * inverse))
        j0 = int(np.floor(y.min() * inverse))
        nx = int(np.floor(x.max() * inverse)) - i0 + 1
        ny = int(np.floor(y.max() * inverse)) - j0 + 1
        return cls(i0, j0, float(cell), nx, ny)

    @property
    def x0(self) -> float:
        return self.i0 * self.cell

    @property
    def y0(self) -> float:
        return self.j0 * self.cell

    @property
    def shape(self) -> tuple[int, int]:
        return (self.ny, self.nx)

    def cols_rows(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inverse = 1.0 / self.cell
        # x * inverse - i0 >= 0 for every point of the block, so truncation is floor.
        col = (x * inverse - self.i0).astype(np.intp)
        row = (y * inverse - self.j0).astype(np.intp)
        return col, row

    def flat_index(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        # cols_rows' arithmetic in one compiled pass.
        return kernels.flat_cells(x, y, 1.0 / self.cell, self.i0, self.j0, self.nx)

    def cell_min(self, flat: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Lowest z per cell; NaN where a cell holds no point."""
        out = np.full(self.nx * self.ny, np.inf)
        kernels.minimum_at(out, flat, z)
        out[np.isinf(out)] = np.nan
        return out.reshape(self.shape)

    def cell_max(self, flat: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Highest z per cell; NaN where a cell holds no point."""
        out = np.full(self.nx * self.ny, -np.inf)
        kernels.maximum_at(out, flat, z)
        out[np.isinf(out)] = np.nan
        return out.reshape(self.shape)

    def sample(self, raster: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Bilinear interpolation of a cell-centred raster at points (edges clamp)."""
        # One cell of edge padding keeps every 2x2 stencil inside without clipping indices.
        padded = np.pad(raster, 1, mode="edge").ravel()
        return kernels.bilinear(padded, self.nx + 2, x, y, 1.0 / self.cell, self.i0 - 0.5, self.j0 - 0.5)


def fill_holes(raster: np.ndarray) -> np.ndarray:
    """Fill NaN cells: nearest valid value, then smoothed over a window about twice the distance
    to the nearest valid cell (box filters of growing size), so large gaps under buildings or
    water get a smooth surface and small gaps keep local detail.

    Every step is a shift-invariant raster filter, so a tile and an untiled run fill the same
    hole the same way (a multigrid fill would depend on the raster origin).
    """
    valid = np.isfinite(raster)
    if valid.all():
        return raster.copy()
    if not valid.any():
        return np.zeros_like(raster)
    # ndimage.distance_transform_edt(~valid, return_indices=True), compiled (filters.py): the same
    # nearest cells, their distance computed as SciPy computes it.
    rows, cols = filters.nearest_feature(valid)
    row, col = np.indices(raster.shape, dtype=np.int32)
    distance = np.sqrt(np.square((rows - row).astype(np.float64)) + np.square((cols - col).astype(np.float64)))
    filled = raster[rows, cols]
    out = filled.copy()
    todo = ~valid
    size = 3
    largest = 2 * max(raster.shape) + 1
    while todo.any():
        take = todo & (2.0 * distance <= size) if size < largest else todo
        if take.any():
            out[take] = ndimage.uniform_filter(filled, size, mode="nearest")[take]
            todo &= ~take
        size = 2 * size - 1
    return out


def slope_magnitude(surface: np.ndarray, cell: float) -> np.ndarray:
    """|grad z| (rise over run) of a raster; 0 for rasters too small for a gradient."""
    if min(surface.shape) < 2:
        return np.zeros_like(surface)
    gy, gx = np.gradient(surface, cell)
    return np.hypot(gx, gy)


def opening(raster: np.ndarray, radius: int) -> np.ndarray:
    """Grey opening with a square window of half-width `radius` (separable, O(cells)).

    The erosion sees only the raster; the dilation sees the eroded surface continued beyond the
    edge by point reflection.  Erosion has already removed what is narrower than the window, so
    the continuation is terrain: a slope rising to the edge is kept instead of being cut off
    (edge replication would flatten it), while a roof at the edge still comes out.
    """
    size = 2 * radius + 1
    # SciPy's filters with mode="nearest", compiled (filters.py).
    eroded = filters.minimum_filter(raster, size)
    if min(raster.shape) < 2:
        return filters.maximum_filter(eroded, size)
    pad = min(radius, min(raster.shape) - 1)
    continued = np.pad(eroded, pad, mode="reflect", reflect_type="odd")
    dilated = filters.maximum_filter(continued, size)
    return dilated[pad : pad + raster.shape[0], pad : pad + raster.shape[1]]


def within_reach(mask: np.ndarray, reach: float, cell: float) -> np.ndarray:
    """Cells whose centre lies at most `reach` metres from the centre of a True cell of `mask`:
    what `ndimage.distance_transform_edt(~mask) * cell <= reach` says (the same float test on each
    offset), without the transform: a row offset's half-width of the disc against each row's
    distance to its nearest True cell (`kernels.within_widths`; before, a separable maximum filter
    per rectangle of the disc took twice as long)."""
    radius = int(reach / cell) + 1
    offsets = np.arange(radius + 1)
    inside = (
        np.sqrt((offsets[:, None] * offsets[:, None] + offsets[None, :] * offsets[None, :]).astype(np.float64)) * cell
        <= reach
    )
    # Half-width of the disc at each row offset (-1: none).
    widths = np.where(inside.any(axis=1), radius - np.argmax(inside[:, ::-1], axis=1), -1)
    return kernels.within_widths(np.ascontiguousarray(mask, dtype=bool), widths.astype(np.int64))


def close_and_fill(mask: np.ndarray) -> np.ndarray:
    """Morphological closing with a 3x3 cross, then fill enclosed holes.

    Holes are the background components that do not touch the raster border; labelling them is
    much cheaper than scipy's iterative binary_fill_holes.
    """
    closed = kernels.closed_cross(np.ascontiguousarray(mask, dtype=bool))
    background, count = ndimage.label(~closed)
    touching = np.zeros(count + 1, dtype=bool)
    for edge in (background[0], background[-1], background[:, 0], background[:, -1]):
        touching[edge] = True
    touching[0] = True
    return closed | ~touching[background]
