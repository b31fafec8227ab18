"""Per-point features for trained classifiers.

Neighbourhood features come at several scales; a neighbourhood is the 3x3-cell block around a
point's cell, with cells of `base`, 2 x `base` and 4 x `base` metres (`base` from the point density,
as for the standard classifier).  Grids are aligned to absolute coordinates so features, and
therefore predictions, do not depend on how a file is tiled.

Per scale, from per-cell sums and extremes: point height above the lowest and below the highest
point of the neighbourhood, points per square metre, and the shares of multi-return points and of
ground-filter points in the neighbourhood (a laser sees through canopy, not through roofs).
At the coarsest scale only (`SHAPE_SCALES`), the shape of the neighbourhood from its covariance
(eigenvalues l1 >= l2 >= l3): linearity (l1 - l2) / l1, planarity (l2 - l3) / l1, scattering l3 / l1,
verticality 1 - |n_z| and the point's distance to the fitted plane. The covariance and its
eigenvalues per cell were most of the features' cost (at the finest scale almost every point has a
cell of its own), and the models hardly used them: LightGBM's split gain of the ten models of
`python -m benchmarks.custom` (features version 3, shapes at every scale; mean share of a model's
total gain) gave each of the 15 shape
columns 0.3 % to 1.0 % of the total, all 15 together 9 %, while the height above the lowest point at
the finest scale alone took 15 % and the multi-return and ground shares 0.5 % to 4.6 % each; of the
three scales, the coarsest was the most used (3.3 % against 3.1 % and 2.3 %) and the cheapest. Shapes
at that scale only took Saint-Barthelemy's features from 1.49 to 1.01 us per point (standard's whole
run 0.56 to 0.61; `python -m benchmarks.custom_profile`).

Per point: height above the refined bare-earth surface (the standard classifier's) and above the
morphological surface, the ground filter's ground and low-noise verdicts, the standard classifier's
class (a custom model starts from what standard knows and learns where the customer's labels differ),
return number, number of returns, last-return flag and intensity (0 when the block has none).
Context of the standard classes: the shares of points the standard classifier calls building and
vegetation in the 3x3 cells of 1, 2, 4 and 8 m around the point, and the distance to the nearest
building point. Walls, eaves and trees leaning over roofs are where standard errs, and a point's
surroundings tell them apart where its own shape does not (IGN Saint-Barthelemy, one half learnt and
the other scored, with plain LightGBM defaults: macro F1 0.937 without them, 0.951 with them;
standard 0.950).

One ground model serves the standard classes and every feature: it is most of the cost, and
computing it once keeps a custom model's prediction close to the standard classifier's speed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from pipelines.compiled import compiled
from pipelines.errors import InvalidValue

from . import kernels
from .base import BUILDING, HIGH_VEGETATION, LOW_VEGETATION, PointBlock
from .geometry import box_sum, local_planes
from .grid import Grid
from .ground import GroundModel, ground_model
from .standard import StandardParams, standard_classes

SCALES: tuple[int, ...] = (1, 2, 4)
# Shapes (a covariance and its eigenvalues per cell: most of a scale's cost) only at the coarsest
# scale, the cheapest and the one the models used most. See the module docstring.
SHAPE_SCALES: tuple[int, ...] = (4,)
_RASTER = ("above_min", "below_max", "density", "multi_return_share", "ground_share")
_SHAPE = ("linearity", "planarity", "scattering", "verticality", "plane_distance")
_PER_POINT = (
    "height",
    "surface_height",
    "ground_filter",
    "low_noise",
    "standard_class",
    "return_number",
    "number_of_returns",
    "last_return",
    "intensity",
)
CONTEXT_CELLS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)  # metres
_CONTEXT = tuple(f"{name}_share_{cell:g}m" for cell in CONTEXT_CELLS for name in ("building", "vegetation")) + (
    "building_distance",
)
# Far enough for any eave or wall, and within the tile buffer (20 m by default), so that a tile
# sees every building that decides a distance and tiled runs agree with untiled ones.
BUILDING_DISTANCE_MAX = 15.0


def scale_names(scale: int) -> tuple[str, ...]:
    return _RASTER + (_SHAPE if scale in SHAPE_SCALES else ())


FEATURE_NAMES: tuple[str, ...] = (
    _PER_POINT + tuple(f"{name}_{scale}" for scale in SCALES for name in scale_names(scale)) + _CONTEXT
)
# Columns holding codes, not quantities: split by value, never by order.
CATEGORICAL: tuple[int, ...] = (FEATURE_NAMES.index("standard_class"),)


def base_cell(model: GroundModel) -> float:
    """Smallest neighbourhood cell: about one point per cell, a power of two in [0.25, 2] m."""
    return float(np.clip(2.0 ** np.round(np.log2(model.spacing)), 0.25, 2.0))


def point_features(block: PointBlock) -> np.ndarray:
    """Feature matrix (len(block), len(FEATURE_NAMES)) of float32, columns as FEATURE_NAMES,
    column-major."""
    n = len(block)
    # Filled column by column, so built column-major: a column of a row-major matrix is a strided
    # write touching one cache line per point (IGN Saint-Barthelemy: 2.80 -> 1.98 us per point of
    # CPU, `python -m benchmarks.custom_profile`). The trees read whole rows: `Forest.scores` copies
    # them row-major a block at a time; LightGBM's training reads a column-major matrix as it is.
    out = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float32, order="F")
    if n == 0:
        return out
    params = StandardParams()
    model = ground_model(block, params.ground)
    out[:, 0] = model.height
    out[:, 1] = model.provisional_height
    out[:, 2] = model.is_ground
    out[:, 3] = model.below
    standard = standard_classes(block, model, params)
    out[:, 4] = standard
    if block.return_number is not None and block.number_of_returns is not None:
        out[:, 5] = block.return_number
        out[:, 6] = block.number_of_returns
        out[:, 7] = block.return_number >= block.number_of_returns
    else:
        out[:, 5:8] = 1.0
    if block.intensity is not None:
        out[:, 8] = block.intensity
    # Neighbourhood shapes from heights above the morphological surface: it stays below low
    # scrub, where the refined surface may ride on it (measured on the IGN block).
    model = dataclasses.replace(model, height=model.provisional_height)
    base = base_cell(model)
    cells = DyadicCells(block, min(base, CONTEXT_CELLS[0]))
    column = len(_PER_POINT)
    width = sum(len(scale_names(scale)) for scale in SCALES)
    _scale_features(block, model, cells, base, out[:, column : column + width])
    _context_features(block, standard, cells, out[:, column + width :])
    return out


class DyadicCells:
    """Every neighbourhood grid of the features at once: cells of `finest` x 2**k metres.

    All the features' cells (`base_cell` x `SCALES`, `CONTEXT_CELLS`) are powers of two aligned to
    absolute coordinates, so a cell of 2c is exactly four cells of c: a point's column at 2c is its
    column at c halved (floor(floor(x / c) / 2) = floor(x / 2c), and x / c is exact for a power of
    two), and a coarse cell's count, sum of 0/1 weights, lowest or highest height is that of its
    four finer cells (integers and extremes: exact). So points are binned once, at the finest
    cell, and every coarser raster is reduced from the finer one, cells being fewer than points:
    the same grids (`Grid.covering`) and the same bits as binning the points at every cell size.
    """

    def __init__(self, block: PointBlock, finest: float) -> None:
        self.finest = Grid.covering(block.x, block.y, finest)
        col, row = self.finest.cols_rows(block.x, block.y)
        # Absolute columns and rows: an arithmetic shift is floor division, also left of zero.
        self.col = col + self.finest.i0
        self.row = row + self.finest.j0

    def level(self, cell: float) -> int:
        level = round(np.log2(cell / self.finest.cell))
        if level < 0 or self.finest.cell * 2.0**level != cell:
            raise InvalidValue(f"cell {cell} m is not the finest cell {self.finest.cell} m times a power of two")
        return level

    def grid(self, cell: float) -> Grid:
        level, finest = self.level(cell), self.finest
        i0, j0 = finest.i0 >> level, finest.j0 >> level
        nx = ((finest.i0 + finest.nx - 1) >> level) - i0 + 1
        ny = ((finest.j0 + finest.ny - 1) >> level) - j0 + 1
        return Grid(i0, j0, finest.cell * 2.0**level, nx, ny)

    def flat(self, cell: float) -> np.ndarray:
        """Each point's cell index in `grid(cell)`, as `Grid.flat_index` gives it."""
        level, grid = self.level(cell), self.grid(cell)
        # One compiled pass: four NumPy passes over the points cost 0.017 us per point (7 grids).
        return _coarser_cells(self.col, self.row, level, grid.i0, grid.j0, grid.nx)

    def rasters(
        self, flat: np.ndarray, weights: np.ndarray | None, cells: list[float], reduce: np.ufunc = np.add
    ) -> dict[float, np.ndarray]:
        """Per-cell rasters (ny, nx) of one layer at each of `cells` (sorted), binned at the first
        with `flat` (that cell's `flat`): sums of `weights` (None: counts) with `np.add`, lowest
        or highest weight (inf / -inf where empty) with `np.minimum` / `np.maximum`."""
        grid = self.grid(cells[0])
        size = grid.nx * grid.ny
        if reduce is np.add:
            raster = np.asarray(np.bincount(flat, weights, minlength=size), dtype=np.float64)
        else:
            raster = np.full(size, np.inf if reduce is np.minimum else -np.inf)
            reduce.at(raster, flat, weights)
        raster = raster.reshape(grid.shape)
        out = {cells[0]: raster}
        empty = 0.0 if reduce is np.add else raster.dtype.type(np.inf if reduce is np.minimum else -np.inf)
        for level in range(self.level(cells[0]) + 1, self.level(cells[-1]) + 1):
            coarse = self.grid(self.finest.cell * 2.0**level)
            # Pad the finer raster to whole pairs of cells: its first cell may be an odd one.
            top, left = grid.j0 - 2 * coarse.j0, grid.i0 - 2 * coarse.i0
            padded = np.pad(
                raster,
                ((top, 2 * coarse.ny - grid.ny - top), (left, 2 * coarse.nx - grid.nx - left)),
                constant_values=empty,
            )
            pairs = reduce(padded[0::2], padded[1::2])
            raster = reduce(pairs[:, 0::2], pairs[:, 1::2])
            grid = coarse
            if coarse.cell in cells:
                out[coarse.cell] = raster
        return out


@compiled
def _coarser_cells(col: np.ndarray, row: np.ndarray, level: int, i0: int, j0: int, nx: int) -> np.ndarray:
    """Each point's cell on the grid of cells 2**level times as wide, from its absolute column and
    row at the finest cell (an arithmetic shift is floor division, also left of zero), as
    row * nx + column on that grid, whose first cell is (i0, j0)."""
    out = np.empty(col.size, dtype=np.intp)
    for p in range(col.size):
        out[p] = ((row[p] >> level) - j0) * nx + (col[p] >> level) - i0
    return out


def _context_features(block: PointBlock, standard: np.ndarray, cells: DyadicCells, out: np.ndarray) -> None:
    """Write the `_CONTEXT` columns into `out` (a column slice of the matrix): shares per cell,
    gathered once per point straight into the float32 columns, as for the scales."""
    building = standard == BUILDING
    vegetation = (standard >= LOW_VEGETATION) & (standard <= HIGH_VEGETATION)
    context = sorted(CONTEXT_CELLS)
    finest_flat = cells.flat(context[0])
    counts, n_building, n_vegetation = (
        cells.rasters(finest_flat, weights, context)
        for weights in (None, building.astype(np.float64), vegetation.astype(np.float64))
    )
    for index, cell in enumerate(CONTEXT_CELLS):
        flat = finest_flat if cell == context[0] else cells.flat(cell)
        count, with_building, with_vegetation = (
            box_sum(layer[cell][None], 3).ravel() for layer in (counts, n_building, n_vegetation)
        )
        count = np.maximum(count, 1.0)
        np.take((with_building / count).astype(np.float32), flat, out=out[:, 2 * index])
        np.take((with_vegetation / count).astype(np.float32), flat, out=out[:, 2 * index + 1])
    if building.any():
        finest = cells.grid(context[0])
        free = np.ones(finest.nx * finest.ny, dtype=bool)
        free[finest_flat[building]] = False
        distance = ndimage.distance_transform_edt(free.reshape(finest.shape)).ravel() * finest.cell
        np.take(np.minimum(distance, BUILDING_DISTANCE_MAX).astype(np.float32), finest_flat, out=out[:, -1])
    else:
        out[:, -1] = BUILDING_DISTANCE_MAX


def _scale_features(block: PointBlock, model: GroundModel, cells: DyadicCells, base: float, out: np.ndarray) -> None:
    """Write every scale's columns (`scale_names` of each of `SCALES`, in turn) into `out` (a
    column slice of the matrix)."""
    z = model.height
    sizes = [base * scale for scale in SCALES]
    flats = {cell: cells.flat(cell) for cell in sizes}
    multi = None if block.number_of_returns is None else (block.number_of_returns > 1).astype(np.float64)
    first = flats[sizes[0]]
    counts = cells.rasters(first, None, sizes)
    n_multi = cells.rasters(first, multi, sizes) if multi is not None else None
    n_ground = cells.rasters(first, model.is_ground.astype(np.float64), sizes)
    lows = cells.rasters(first, z, sizes, np.minimum)
    highs = cells.rasters(first, z, sizes, np.maximum)
    column = 0
    none = np.empty(0)
    for scale, cell in zip(SCALES, sizes, strict=True):
        width = len(scale_names(scale))
        flat, grid = flats[cell], cells.grid(cell)
        _window_columns(
            flat,
            grid.nx,
            grid.ny,
            z,
            counts[cell].ravel(),
            none if n_multi is None else n_multi[cell].ravel(),
            n_ground[cell].ravel(),
            lows[cell].ravel(),
            highs[cell].ravel(),
            9.0 * cell * cell,
            *(out[:, column + k] for k in range(5)),
        )
        if scale in SHAPE_SCALES:
            _shapes(block, z, grid, flat, out[:, column + 5 : column + width])
        column += width


@compiled
def _window_columns(flat, nx, ny, z, count, multi, ground, low, high, area, out0, out1, out2, out3, out4):
    """A scale's `_RASTER` columns (out0 to out4) from its per-cell rasters (flattened): points,
    multi-return points (empty: none known) and ground-filter points per cell, lowest and highest
    height (inf / -inf where empty). The same values as window sums per cell gathered to the points
    (the sums are of whole numbers, exact in any order; outside the raster counts nothing, as SciPy's
    "nearest" mode for the lowest and highest), from the same expressions.

    Each occupied cell's 3x3 window is read once, cells in raster order, then gathered to the points:
    read in the points' order instead, each point's window touched 15 scattered cache lines of the
    five rasters, which at the finest cells (about a point per cell, rasters of a million cells) cost
    twice as much (`_scale_features`, all three scales: Delft 0.14 -> 0.05 us per point, the flat
    field 0.17 -> 0.08, crop2 0.016 -> 0.015)."""
    columns = np.empty((count.size, 5))
    for row in range(ny):
        for col in range(nx):
            cell = np.uint64(row * nx + col)  # unsigned: indexed without a negative-index check
            if count[cell] == 0.0:
                continue  # no point reads it
            n = 0.0
            n_multi = 0.0
            n_ground = 0.0
            lowest = np.inf
            highest = -np.inf
            for j in range(max(row - 1, 0), min(row + 2, ny)):
                for i in range(max(col - 1, 0), min(col + 2, nx)):
                    k = np.uint64(j * nx + i)
                    n += count[k]
                    if multi.size:
                        n_multi += multi[k]
                    n_ground += ground[k]
                    lowest = min(lowest, low[k])
                    highest = max(highest, high[k])
            share = max(n, 1.0)
            columns[cell, 0] = lowest
            columns[cell, 1] = highest
            columns[cell, 2] = n / area
            columns[cell, 3] = n_multi / share
            columns[cell, 4] = n_ground / share
    for p in range(flat.size):
        cell = np.uint64(flat[p])
        out0[p] = z[p] - columns[cell, 0]
        out1[p] = columns[cell, 1] - z[p]
        out2[p] = columns[cell, 2]
        out3[p] = columns[cell, 3]
        out4[p] = columns[cell, 4]


def _shapes(block: PointBlock, z: np.ndarray, grid: Grid, flat: np.ndarray, out: np.ndarray) -> None:
    """A scale's `_SHAPE` columns: the shape of each point's neighbourhood and its distance to
    the neighbourhood's plane."""
    # Local coordinates keep second moments precise; heights make z independent of elevation.
    x = block.x - grid.x0
    y = block.y - grid.y0
    planes = local_planes(grid, flat, x, y, z, min_points=3)
    small, middle, large = planes.eigenvalues
    valid = np.isfinite(large) & (large > 0)
    safe = np.where(valid, large, 1.0)
    per_cell = np.stack(
        [
            np.where(valid, (large - middle) / safe, 0.0),
            np.where(valid, (middle - small) / safe, 0.0),
            np.where(valid, small / safe, 0.0),
            np.where(valid, 1.0 - np.abs(planes.normal[2]), 0.0),
        ]
    ).astype(np.float32)
    for row in range(4):
        np.take(per_cell[row], flat, out=out[:, row])
    distance = kernels.plane_distances(planes.normal, planes.mean, flat, x, y, z)
    distance[~valid.take(flat)] = 0.0
    out[:, 4] = distance
