"""Local covariance geometry on a grid: the neighbourhood of a point is the block of
`window` x `window` cells around its cell (2D, unbounded in z), which is cheap to aggregate with
np.bincount + separable box filters instead of k-nearest-neighbour queries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from .grid import Grid


def window_counts(grid: Grid, layers: list[tuple[np.ndarray, np.ndarray | None]], window: int) -> list[np.ndarray]:
    """Per-cell sums of each weight (None: count) over the window x window cell neighbourhood, for
    (cell index, weight or None) pairs of small counts, in float32; one array per pair.

    Counts need no float64: halving the memory traffic matters on rasters of a million cells.
    """
    stack = np.zeros((len(layers), grid.ny, grid.nx), dtype=np.float32)
    none = np.empty(0, dtype=np.float32)
    for layer, (flat, w) in zip(stack, layers, strict=True):
        kernels.add_counts(layer.ravel(), flat, none if w is None else w)
    return list(box_sum(stack, window).reshape(len(layers), grid.nx * grid.ny))


def box_sum(stack: np.ndarray, window: int) -> np.ndarray:
    """Sum over window x window cells (zero outside) of each layer of a (k, ny, nx) stack."""
    if window == 3:
        # Shift-and-add, one layer at a time to keep temporaries small, each sum written where it
        # goes (no copies: this pass is memory-bound). The additions and their order are those of
        # rows = l[i] + l[i-1] + l[i+1], then rows[j] + rows[j-1] + rows[j+1]: the same bits.
        out = np.empty_like(stack)
        rows = np.empty_like(stack[0])
        for layer, summed in zip(stack, out, strict=True):
            rows[0] = layer[0]
            np.add(layer[1:], layer[:-1], out=rows[1:])
            rows[:-1] += layer[1:]
            summed[:, 0] = rows[:, 0]
            np.add(rows[:, 1:], rows[:, :-1], out=summed[:, 1:])
            summed[:, :-1] += rows[:, 1:]
        return out
    # SciPy's uniform_filter, compiled (its running sums, the same bits: the classes were tuned on them).
    summed = kernels.uniform_box(stack, window)
    summed *= window**2
    return summed


@dataclass(frozen=True)
class LocalPlanes:
    """Covariance of the points in each cell's neighbourhood, for cells with enough points.

    Arrays are indexed by cell (flattened grid); empty cells and cells with fewer than
    `min_points` points in their neighbourhood have NaN eigenvalues and the normal (0, 0, 1).
    """

    mean: np.ndarray  # (3, cells) centroid, local coordinates
    eigenvalues: np.ndarray  # (3, cells) ascending variances
    normal: np.ndarray  # (3, cells) unit normal of the best-fit plane


def local_planes(
    grid: Grid, flat: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, min_points: int = 3
) -> LocalPlanes:
    """Neighbourhood covariance (3x3 cells) per occupied cell.  x, y, z should be local (small)
    coordinates so the raw second moments keep their precision."""
    # Only cells holding points need a plane (nothing else is ever looked up): their window sums,
    # compiled: ten bincounts and ten window sums over the whole raster took 1.4x as long.
    cells, sums = kernels.plane_sums(flat, x, y, z, grid.nx, grid.ny, min_points)
    # Eigenvalues and normal by the trigonometric method (closed form, several times faster than a
    # batched np.linalg.eigh), compiled but for the arccos and cosines: NumPy's (SIMD) and numba's
    # differ in the last bit.
    means, cov, start = kernels.eigen_start(sums)
    phi = np.arccos(start[2]) / 3.0
    size = grid.nx * grid.ny
    mean = np.zeros((3, size))
    eigenvalues = np.full((3, size), np.nan)
    normal = np.zeros((3, size))
    normal[2] = 1.0
    kernels.eigen_finish(
        cells, means, cov, start, np.cos(phi), np.cos(phi + 2.0 * np.pi / 3.0), mean, eigenvalues, normal
    )
    return LocalPlanes(mean, eigenvalues, normal)
