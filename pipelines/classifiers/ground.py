"""Bare-earth filter in the SMRF family (Pingel, Clarke and McBride 2013).

Steps, all on rasters except the first and last:

1. Minimum-elevation raster of the last returns (earlier returns of a pulse cannot be ground)
   at a cell size derived from the point density: SMRF's 1 m, 2 m for sparse data.
2. Low-outlier removal: a cell whose minimum lies far below the 3rd-lowest cell of its 5x5
   neighbourhood is an isolated pit (multipath, birds under the sensor...) and is dropped, so it
   cannot drag the terrain down.
3. Gaps are inpainted and a progressive morphological opening with growing square windows flags
   cells that rise above the opened surface by more than slope * window radius.
4. The unflagged minimum cells are inpainted again into a provisional bare-earth surface.
5. A point is ground when it is a last return and lies within
   elevation_threshold + elevation_scaler * local slope of that surface (bilinear), above or
   below.  Points further below are low noise for the standard classifier.

Every raster operation is shift-invariant and grids are aligned to absolute coordinates, so a tile
processed with a buffer ring gives the same answer as an untiled run away from the buffer edge.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .base import GROUND, UNCLASSIFIED, PointBlock
from .grid import Grid, fill_holes, opening, slope_magnitude


@dataclass(frozen=True)
class GroundParams:
    """Parameters of the ground filter; the defaults are meant for all airborne data.

    cell_size: raster cell in metres; 0 means derive it from the point density: the mean point
        spacing rounded to a power of two, clamped to [min_cell, max_cell].
    max_window: largest opening window radius in metres; must exceed half the width of the
        largest building so its roof is removed.
    slope: terrain slope (rise over run) tolerated by the opening before a cell counts as object.
    elevation_threshold: metres a point may deviate from the bare-earth surface on flat terrain.
    elevation_scaler: extra tolerance per unit of local surface slope (steep terrain is
        interpolated less precisely).
    low_outlier_threshold: metres below its neighbourhood that makes a cell minimum an outlier.
    """

    cell_size: float = 0.0
    min_cell: float = 1.0
    max_cell: float = 2.0
    max_window: float = 18.0
    slope: float = 0.15
    elevation_threshold: float = 0.5
    elevation_scaler: float = 1.25
    low_outlier_threshold: float = 1.0


@dataclass(frozen=True)
class GroundModel:
    """Result of the ground filter: per-point ground flag plus the bare-earth surface."""

    spacing: float  # estimated mean point spacing (m)
    grid: Grid
    surface: np.ndarray  # bare-earth elevation per cell (cell-centred), complete
    slope: np.ndarray  # |grad| of the surface per cell
    flat: np.ndarray  # cell index per point
    height: np.ndarray  # height above the bare-earth surface per point (negative below)
    is_ground: np.ndarray  # bool per point
    below: np.ndarray  # bool per point: further below the surface than the tolerance


def point_spacing(x: np.ndarray, y: np.ndarray) -> float:
    """Mean point spacing (m) estimated from the median count of occupied 8 m cells.

    The median ignores the partly covered cells at block edges and gaps such as water.
    """
    coarse = Grid.covering(x, y, 8.0)
    counts = np.bincount(coarse.flat_index(x, y))
    density = float(np.median(counts[counts > 0])) / 64.0
    return 1.0 / np.sqrt(density)


def choose_cell(spacing: float, params: GroundParams) -> float:
    if params.cell_size > 0:
        return params.cell_size
    # Powers of two keep neighbouring tiles with slightly different density on the same grid.
    cell = 2.0 ** np.round(np.log2(spacing))
    return float(np.clip(cell, params.min_cell, params.max_cell))


def remove_low_outliers(zmin: np.ndarray, threshold: float) -> np.ndarray:
    """NaN out cells far below the 3rd-lowest value of their 5x5 neighbourhood."""
    # Empty cells and the outside of the raster count as +inf: edge replication would copy the
    # outlier itself into its own neighbourhood.
    padded = np.pad(np.where(np.isfinite(zmin), zmin, np.inf), 2, constant_values=np.inf)
    reference = np.empty_like(zmin)
    rows = 256  # bounds the 25x temporary of the sliding window
    for start in range(0, zmin.shape[0], rows):
        window = sliding_window_view(padded[start:start + rows + 4], (5, 5))
        block = window.reshape(window.shape[0], window.shape[1], 25)
        # np.partition is several times faster than ndimage.rank_filter here.
        reference[start:start + rows] = np.partition(block, 2, axis=-1)[..., 2]
    outlier = np.isfinite(reference) & (zmin < reference - threshold)
    return np.where(outlier, np.nan, zmin)


def progressive_opening(surface: np.ndarray, cell: float, params: GroundParams) -> np.ndarray:
    """Cells flagged as object by the SMRF progressive opening."""
    is_object = np.zeros(surface.shape, dtype=bool)
    previous = surface
    max_radius = max(1, int(np.ceil(params.max_window / cell)))
    for radius in range(1, max_radius + 1):
        opened = opening(previous, radius)
        is_object |= (previous - opened) > params.slope * radius * cell
        previous = opened
    return is_object


def last_returns(block: PointBlock) -> np.ndarray | None:
    """Points that are the last return of their pulse, or None without return numbers.

    The laser went on past any earlier return, so only last returns can be ground.
    """
    if block.return_number is None or block.number_of_returns is None:
        return None
    return block.return_number >= block.number_of_returns


def ground_model(block: PointBlock, params: GroundParams) -> GroundModel:
    """Run the filter on a non-empty block."""
    x, y, z = block.x, block.y, block.z
    spacing = point_spacing(x, y)
    cell = choose_cell(spacing, params)
    grid = Grid.covering(x, y, cell)
    flat = grid.flat_index(x, y)
    last = last_returns(block)
    if last is not None and not last.any():
        last = None  # broken return numbering: better use every point than none
    if last is None:
        zmin = grid.cell_min(flat, z)
    else:
        zmin = grid.cell_min(flat[last], z[last])
    zmin = remove_low_outliers(zmin, params.low_outlier_threshold)
    is_object = progressive_opening(fill_holes(zmin), cell, params)
    surface = fill_holes(np.where(is_object, np.nan, zmin))
    slope = slope_magnitude(surface, cell)

    dz = z - grid.sample(surface, x, y)
    tolerance = params.elevation_threshold + params.elevation_scaler * slope.ravel()[flat]
    is_ground = np.abs(dz) <= tolerance
    if last is not None:
        is_ground &= last
    return GroundModel(spacing, grid, surface, slope, flat, dz, is_ground, dz < -tolerance)


class GroundClassifier:
    """ASPRS 2 (ground) versus 1 (everything else)."""

    name = "ground"
    version = "1.0.0"

    def __init__(self, params: GroundParams | None = None) -> None:
        self._params = params or GroundParams()
        self.params = dataclasses.asdict(self._params)

    def classify(self, block: PointBlock) -> np.ndarray:
        out = np.full(len(block), UNCLASSIFIED, dtype=np.uint8)
        if len(block) == 0:
            return out
        model = ground_model(block, self._params)
        out[model.is_ground] = GROUND
        return out
