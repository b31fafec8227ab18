"""Bare-earth filter: a morphological first guess (SMRF family, Pingel, Clarke and McBride 2013)
refined by a robust local surface fit.

1. Minimum-elevation raster of the last returns (earlier returns of a pulse cannot be ground)
   at a cell size derived from the point density: 1 m, 2 m for sparse data.
2. Low-outlier removal: a cell whose minimum lies far below the 3rd-lowest cell of its 5x5
   neighbourhood is an isolated pit (multipath, birds under the sensor...) and is dropped.
3. Gaps are inpainted and a progressive morphological opening with growing square windows flags
   cells that rise above the opened surface by more than slope * window radius.  Beyond the
   raster's edge the eroded surface is continued by point reflection, so terrain that rises
   towards the edge of a file is not cut off as if it were an object.
4. The unflagged minimum cells are inpainted into a provisional bare-earth surface; points within
   elevation_threshold + elevation_scaler * slope of it (bilinear) are the first ground guess.
5. Refinement: around every cell a plane is fitted to the first-guess ground points of its 3x3
   neighbourhood, as a correction to the provisional surface, by iteratively reweighted least
   squares with asymmetric weights (points above the plane count less each round: terrain is
   the lower envelope, low vegetation and cars sit on top of it).  A point is ground when it is
   a last return and lies at most ground_above above the refined surface (a tolerance that grows
   with the point spacing, since sparser data interpolate the terrain less precisely, and with
   slope), and not further below than the first guess's tolerance.  Points further below are
   low noise for the standard classifier.

Every raster operation is shift-invariant and grids are aligned to absolute coordinates, so a tile
processed with a buffer ring gives the same answer as an untiled run away from the buffer edge.
Coordinates are metres (see pipelines.units).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .base import GROUND, UNCLASSIFIED, PointBlock
from .geometry import window_sums
from .grid import Grid, fill_holes, opening, slope_magnitude


@dataclass(frozen=True)
class GroundParams:
    """Parameters of the ground filter; the defaults are meant for all airborne data.

    cell_size: raster cell in metres; 0 means derive it from the point density: the mean point
        spacing rounded to a power of two, clamped to [min_cell, max_cell].
    max_window: largest opening window radius in metres; must exceed half the width of the
        largest building so its roof is removed.
    slope: terrain slope (rise over run) tolerated by the opening before a cell counts as object.
    elevation_threshold: metres a point may deviate from the provisional surface on flat terrain
        to be a first-guess ground point, and lie below the refined surface as ground.
    elevation_scaler: extra tolerance per unit of local surface slope (steep terrain is
        interpolated less precisely).
    low_outlier_threshold: metres below its neighbourhood that makes a cell minimum an outlier.
    fit_iterations: rounds of the reweighted surface fit.
    fit_softness: metres above the fitted plane at which a point's weight falls to 1/e.
    ground_above: metres a ground point may lie above the refined surface on flat terrain ...
    ground_above_per_spacing: ... plus this much per metre of point spacing ...
    ground_above_per_slope: ... plus this much per unit of slope.
    """

    cell_size: float = 0.0
    min_cell: float = 1.0
    max_cell: float = 2.0
    max_window: float = 18.0
    slope: float = 0.15
    elevation_threshold: float = 0.5
    elevation_scaler: float = 1.25
    low_outlier_threshold: float = 1.0
    fit_iterations: int = 3
    fit_points_per_cell: float = 12.0
    fit_softness: float = 0.15
    ground_above: float = 0.1
    ground_above_per_spacing: float = 0.1
    ground_above_per_slope: float = 0.5


@dataclass(frozen=True)
class GroundModel:
    """Result of the ground filter, per point."""

    spacing: float  # estimated mean point spacing (m)
    height: np.ndarray  # height above the refined bare-earth surface (negative below)
    is_ground: np.ndarray  # bool
    below: np.ndarray  # bool: further below the surface than the tolerance (low noise)
    provisional_height: np.ndarray  # above the morphological surface, which stays below low scrub


@dataclass(frozen=True)
class SurfaceFit:
    """What the decision rule needs, per point: the refinement's residual and the local slope
    (apart from the rule, so the benchmark can tune the rule without refitting), and the
    morphological first guess that supported the refinement."""

    spacing: float
    last: np.ndarray | None  # last-return flag, None without return numbers
    residual: np.ndarray  # height above the refined surface
    slope: np.ndarray
    first_guess: np.ndarray  # bool
    provisional: np.ndarray  # height above the provisional (morphological) surface


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
    """Points that are the last return of their pulse, or None without usable return numbers.

    The laser went on past any earlier return, so only last returns can be ground.
    """
    if block.return_number is None or block.number_of_returns is None:
        return None
    last = block.return_number >= block.number_of_returns
    # Broken return numbering: better use every point than none.
    return last if last.any() else None


def thinned(block: PointBlock, cell: float, spacing: float, per_cell: float) -> np.ndarray | bool:
    """About `per_cell` points of every cell of dense data (True: all points of sparse data).

    A point is kept by a hash of its own position, so a tile and an untiled run keep the same
    points whatever the order or extent of the block."""
    step = int((cell / spacing) ** 2 // per_cell)
    if step <= 1:
        return True
    key = (np.floor(block.x * 1000.0).astype(np.int64) * 73856093) ^ (np.floor(block.y * 1000.0).astype(np.int64) * 19349663)
    return (key % step) == 0


def refine(block: PointBlock, grid: Grid, flat: np.ndarray, height: np.ndarray,
           support: np.ndarray, spacing: float, params: GroundParams) -> np.ndarray:
    """Height of every point above the refined surface: the provisional one plus a plane fitted,
    per cell, to the supporting points of its 3x3-cell neighbourhood (see the module docstring).
    Cells without support keep the provisional surface."""
    index = np.flatnonzero(support & thinned(block, grid.cell, spacing, params.fit_points_per_cell))
    if index.size == 0:
        return height
    # Local coordinates keep the second moments accurate for large projected values.
    x = block.x - grid.x0
    y = block.y - grid.y0
    cells, xs, ys, hs = flat[index], x[index], y[index], height[index]
    xx, xy, yy, xh, yh = xs * xs, xs * ys, ys * ys, xs * hs, ys * hs
    weight = np.ones(index.size)
    # A weak pull of the slopes towards zero keeps the fit defined where the support is a line.
    damping = 1e-2 * grid.cell**2
    for _ in range(params.fit_iterations):
        n, sx, sy, sh, sxx, sxy, syy, sxh, syh = window_sums(
            grid, cells, [weight, weight * xs, weight * ys, weight * hs, weight * xx, weight * xy,
                          weight * yy, weight * xh, weight * yh])
        count = np.maximum(n, 1e-12)
        mx, my, mh = sx / count, sy / count, sh / count
        cxx = sxx / count - mx * mx + damping
        cyy = syy / count - my * my + damping
        cxy = sxy / count - mx * my
        cxh = sxh / count - mx * mh
        cyh = syh / count - my * mh
        det = cxx * cyy - cxy * cxy
        gx = (cxh * cyy - cyh * cxy) / det
        gy = (cyh * cxx - cxh * cxy) / det
        # The plane of each cell as intercept + gx * x + gy * y: three lookups per point.
        intercept = mh - gx * mx - gy * my
        above = hs - (intercept[cells] + gx[cells] * xs + gy[cells] * ys)
        weight = np.exp(-np.square(np.maximum(above, 0.0) * (1.0 / params.fit_softness)))
    fitted = n[flat] > 1e-9
    correction = intercept[flat] + gx[flat] * x + gy[flat] * y
    return np.where(fitted, height - correction, height)


def fit_surface(block: PointBlock, params: GroundParams) -> SurfaceFit:
    """Steps 1-5 of the module docstring up to the decision, on a non-empty block."""
    x, y, z = block.x, block.y, block.z
    spacing = point_spacing(x, y)
    cell = choose_cell(spacing, params)
    grid = Grid.covering(x, y, cell)
    flat = grid.flat_index(x, y)
    last = last_returns(block)
    if last is None:
        zmin = grid.cell_min(flat, z)
    else:
        zmin = grid.cell_min(flat[last], z[last])
    zmin = remove_low_outliers(zmin, params.low_outlier_threshold)
    is_object = progressive_opening(fill_holes(zmin), cell, params)
    surface = fill_holes(np.where(is_object, np.nan, zmin))
    slope = slope_magnitude(surface, cell).ravel()[flat]

    height = z - grid.sample(surface, x, y)
    first_guess = np.abs(height) <= params.elevation_threshold + params.elevation_scaler * slope
    if last is not None:
        first_guess &= last
    residual = refine(block, grid, flat, height, first_guess, spacing, params)
    return SurfaceFit(spacing, last, residual, slope, first_guess, height)


def decide(fit: SurfaceFit, params: GroundParams) -> tuple[np.ndarray, np.ndarray]:
    """(is_ground, below) per point from a surface fit."""
    above = (params.ground_above + params.ground_above_per_spacing * fit.spacing
             + params.ground_above_per_slope * fit.slope)
    below = params.elevation_threshold + params.elevation_scaler * fit.slope
    is_ground = (fit.residual <= above) & (fit.residual >= -below)
    if fit.last is not None:
        is_ground &= fit.last
    return is_ground, fit.residual < -below


def ground_model(block: PointBlock, params: GroundParams) -> GroundModel:
    """Run the filter on a non-empty block."""
    fit = fit_surface(block, params)
    is_ground, below = decide(fit, params)
    return GroundModel(fit.spacing, fit.residual, is_ground, below, fit.provisional)


class GroundClassifier:
    """ASPRS 2 (ground) versus 1 (everything else)."""

    name = "ground"
    version = "2.0.0"

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
