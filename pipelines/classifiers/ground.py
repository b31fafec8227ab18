"""Bare-earth filter: a morphological first guess (SMRF family, Pingel, Clarke and McBride 2013)
refined by a robust local surface fit.

1. Minimum-elevation raster of the last returns (earlier returns of a pulse cannot be ground)
   with 1 m cells, as SMRF: with coarser cells for sparse data, the band that the opening cuts
   off a narrow ridge (a dike, a road embankment) widens with the cell.
2. Low-outlier removal: a cell whose minimum lies far below the 3rd-lowest cell of its
   neighbourhood (5x5 points, at least 5x5 cells), or of a wider ring around it, is a pit
   (multipath, birds under the sensor...) and is dropped; repeated a few rounds, since where low
   noise is frequent a pit's neighbourhood holds other pits that hide it until they are gone.
3. Gaps are inpainted and a progressive morphological opening with growing square windows flags
   cells that rise above the opened surface by more than slope * window radius.  Beyond the
   raster's edge the eroded surface is continued by point reflection, so terrain that rises
   towards the edge of a file is not cut off as if it were an object.
4. The unflagged minimum cells are inpainted into a provisional bare-earth surface; points within
   elevation_threshold + elevation_scaler * slope of it (bilinear) are the first ground guess.
5. Refinement: around every cell a plane is fitted to the first-guess ground points of its
   neighbourhood (3x3 points, at least 3x3 cells), as a correction to the provisional surface, by iteratively reweighted least
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

from pipelines.compiled import compiled

from . import filters, kernels
from .base import GROUND, UNCLASSIFIED, PointBlock
from .geometry import box_sum
from .grid import Grid, fill_holes, opening, slope_magnitude
from .standard_params import GROUND_VERSION, GroundParams


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


def neighbourhood(spacing: float, cell: float, points: float) -> int:
    """Cells across a square neighbourhood holding about `points` x `points` points (odd, at
    least 2 * points - 1 cells: dense data keep the cell's own resolution)."""
    return 2 * int(round((points - 1) / 2 * max(1.0, spacing / cell))) + 1


def remove_low_outliers(zmin: np.ndarray, threshold: float, size: int = 5, rounds: int = 1) -> np.ndarray:
    """NaN out cells far below their neighbourhood, for up to `rounds` rounds (each compares with
    what the previous ones left).

    A cell is an outlier when it lies more than `threshold` below the 3rd-lowest value of its
    size x size neighbourhood, or below the 2nd-lowest of the minima of the eight blocks around
    the block centred on it (`_ring_of_blocks`, blocks about half as wide): low points often come in clusters (a pulse's
    multipath, several pulses through one window pane) that fill a few adjacent cells and hide
    each other from the first test.  Left in, the opening spreads each pit over the whole window
    and drags the terrain down wherever such clusters are closer than its largest window.
    """
    out = zmin.copy()
    cells = np.flatnonzero(np.isfinite(out))
    block = 2 * (size // 4) + 1
    reach = max(size // 2, block + block // 2)
    for _ in range(rounds):
        values = out.ravel()[cells]
        # Where fewer cells hold points than a test needs (inf), there is nothing to compare with.
        outlier = np.zeros(cells.size, dtype=bool)
        for reference in (_third_lowest(out, cells, size), _ring_of_blocks(out, cells, block)):
            outlier |= np.isfinite(reference) & (values < reference - threshold)
        if not outlier.any():
            break
        removed = np.zeros(out.size, dtype=bool)
        removed[cells[outlier]] = True
        out.ravel()[removed] = np.nan
        # Only cells that saw a removed one can change their verdict in the next round.
        near = filters.maximum_filter(removed.reshape(out.shape), 2 * reach + 1).ravel()
        cells = np.flatnonzero(near & np.isfinite(out.ravel()))
    return out


def _third_lowest(zmin: np.ndarray, cells: np.ndarray, size: int) -> np.ndarray:
    """Per cell of `cells`, the 3rd-lowest value of its size x size window (inf where fewer than
    three cells hold points)."""
    # Empty cells and the outside of the raster count as +inf: edge replication would copy the
    # outlier itself into its own neighbourhood.
    half = size // 2
    padded = np.pad(np.where(np.isfinite(zmin), zmin, np.inf), half, constant_values=np.inf)
    width = padded.shape[1]
    offsets = (np.arange(size)[:, None] * width + np.arange(size)[None, :]).ravel()
    rows, cols = np.divmod(cells, zmin.shape[1])
    corner = rows * width + cols  # the window's first cell in the padded raster
    values = padded.ravel()
    reference = np.empty(cells.size)
    step = max(1, 2**20 // size**2)  # bounds the size**2-fold temporary
    for start in range(0, cells.size, step):
        window = values[corner[start : start + step, None] + offsets[None, :]]
        # np.partition is several times faster than ndimage.rank_filter here.
        reference[start : start + step] = np.partition(window, 2, axis=-1)[:, 2]
    return reference


def _ring_of_blocks(zmin: np.ndarray, cells: np.ndarray, block: int) -> np.ndarray:
    """Per cell of `cells`, the 2nd-lowest of the minima of the eight block x block blocks around
    the block centred on it: a cluster of pits within that centre block is compared with the
    terrain around it, whatever fills the centre.  The 2nd-lowest, since a street or a ditch
    through the cell may show in only two of the eight blocks."""
    # Padded before filtering: a block centred outside the raster still holds the cells inside.
    padded = filters.minimum_filter(
        np.pad(np.where(np.isfinite(zmin), zmin, np.inf), block, constant_values=np.inf), block
    )
    width = padded.shape[1]
    rows, cols = np.divmod(cells, zmin.shape[1])
    centre = (rows + block) * width + cols + block
    around = [dr * block * width + dc * block for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]
    ring = padded.ravel()[centre[:, None] + np.array(around)[None, :]]
    return np.partition(ring, 1, axis=-1)[:, 1]


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


def thinned(x: np.ndarray, y: np.ndarray, cell: float, spacing: float, per_cell: float) -> np.ndarray | bool:
    """Which of the points at `x`, `y` to keep: about `per_cell` of every cell of dense data (True:
    all points of sparse data).

    A point is kept by a hash of its own position, so a tile and an untiled run keep the same
    points whatever the order or extent of the block."""
    step = int((cell / spacing) ** 2 // per_cell)
    if step <= 1:
        return True
    key = (np.floor(x * 1000.0).astype(np.int64) * 73856093) ^ (np.floor(y * 1000.0).astype(np.int64) * 19349663)
    return (key % step) == 0


def refine(
    block: PointBlock,
    grid: Grid,
    flat: np.ndarray,
    height: np.ndarray,
    support: np.ndarray,
    spacing: float,
    params: GroundParams,
) -> np.ndarray:
    """Height of every point above the refined surface: the provisional one plus a plane fitted,
    per cell, to the supporting points of its neighbourhood of about 3x3 points, at least 3x3
    cells (see the module docstring).  Cells without support keep the provisional surface."""
    # The hash only of the supporting points (a fraction of the block): the same points are kept.
    index = np.flatnonzero(support)
    keep = thinned(block.x[index], block.y[index], grid.cell, spacing, params.fit_points_per_cell)
    if keep is not True:
        index = index[keep]
    if index.size == 0:
        return height
    # Local coordinates (x - x0, y - y0) keep the second moments accurate for large projected
    # values. Each point pass is compiled (the same arithmetic, see `kernels`); exp stays NumPy's.
    x0, y0, size = grid.x0, grid.y0, grid.nx * grid.ny
    weight = np.empty(0)
    window = neighbourhood(spacing, grid.cell, 3)
    # A weak pull of the slopes towards zero keeps the fit defined where the support is a line.
    damping = 1e-2 * grid.cell**2
    for round_ in range(params.fit_iterations):
        # The first round weighs every point 1 (an empty weight): the plain sums.
        sums = kernels.moment_sums(index, flat, block.x, block.y, height, x0, y0, weight, size)
        n, sx, sy, sh, sxx, sxy, syy, sxh, syh = box_sum(sums.reshape(9, grid.ny, grid.nx), window).reshape(9, size)
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
        if round_ == params.fit_iterations - 1:
            break  # the last round's planes are the result: no weights for a round that never comes
        exponent = kernels.weight_exponents(
            index, flat, block.x, block.y, height, x0, y0, intercept, gx, gy, 1.0 / params.fit_softness
        )
        weight = np.exp(exponent, out=exponent)
    return kernels.plane_corrected(flat, block.x, block.y, height, x0, y0, n, intercept, gx, gy)


def fit_surface(block: PointBlock, params: GroundParams) -> SurfaceFit:
    """Steps 1-5 of the module docstring up to the decision, on a non-empty block."""
    x, y, z = block.x, block.y, block.z
    spacing = point_spacing(x, y)
    cell = params.cell_size
    grid = Grid.covering(x, y, cell)
    flat = grid.flat_index(x, y)
    last = last_returns(block)
    if last is None:
        zmin = grid.cell_min(flat, z)
    else:
        zmin = grid.cell_min(flat[last], z[last])
    # A 5x5-point neighbourhood: in sparse data a 5x5-cell one holds too few cells for its
    # 3rd-lowest to stand for the terrain, and sound ground on slopes was taken for pits.
    zmin = remove_low_outliers(
        zmin, params.low_outlier_threshold, neighbourhood(spacing, cell, 5), params.low_outlier_rounds
    )
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
    return _decided(
        fit.residual,
        fit.slope,
        np.ones(0, dtype=bool) if fit.last is None else fit.last,
        params.ground_above + params.ground_above_per_spacing * fit.spacing,
        params.ground_above_per_slope,
        params.elevation_threshold,
        params.elevation_scaler,
    )


@compiled
def _decided(residual, slope, last, above_flat, above_per_slope, below_flat, below_per_slope):
    """decide's tests in one pass over the points, where NumPy made six, each a new array: at most
    `above_flat + above_per_slope * slope` above the surface, at most `below_flat + below_per_slope *
    slope` below it, a last return (`last` empty: every point can be). The same float operations in
    the same order, so the same verdicts (tests/test_point_loops.py)."""
    is_ground = np.empty(residual.size, np.bool_)
    below = np.empty(residual.size, np.bool_)
    for point in range(residual.size):
        lowest = -(below_flat + below_per_slope * slope[point])
        is_ground[point] = (
            residual[point] <= above_flat + above_per_slope * slope[point]
            and residual[point] >= lowest
            and (last.size == 0 or last[point])
        )
        below[point] = residual[point] < lowest
    return is_ground, below


def ground_model(block: PointBlock, params: GroundParams) -> GroundModel:
    """Run the filter on a non-empty block."""
    fit = fit_surface(block, params)
    is_ground, below = decide(fit, params)
    return GroundModel(fit.spacing, fit.residual, is_ground, below, fit.provisional)


class GroundClassifier:
    """ASPRS 2 (ground) versus 1 (everything else)."""

    name = "ground"
    version = GROUND_VERSION

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
