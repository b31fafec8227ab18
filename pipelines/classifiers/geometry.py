"""Local covariance geometry on a grid: the neighbourhood of a point is the block of
`window` x `window` cells around its cell (2D, unbounded in z), which is cheap to aggregate with
np.bincount + separable box filters instead of k-nearest-neighbour queries."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import kernels
from .grid import Grid


def window_counts(grid: Grid, layers: list[tuple[np.ndarray, np.ndarray | None]], window: int) -> list[np.ndarray]:
    """Per-cell sums of each weight (None: count) over the window x window cell neighbourhood, for
    (cell index, weight or None) pairs of small counts, in float32; one array per pair.

    Counts need no float64: halving the memory traffic matters on rasters of a million cells.
    """
    size = grid.nx * grid.ny
    stack = np.empty((len(layers), grid.ny, grid.nx), dtype=np.float32)
    for layer, (flat, w) in zip(stack, layers, strict=True):
        layer.ravel()[:] = np.bincount(flat, w, minlength=size)
    return list(box_sum(stack, window).reshape(len(layers), size))


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
    summed = ndimage.uniform_filter(stack, size=(1, window, window), mode="constant")
    summed *= window**2
    return summed


def symmetric_eigen(
    xx: np.ndarray, xy: np.ndarray, xz: np.ndarray, yy: np.ndarray, yz: np.ndarray, zz: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (3, n), ascending, and the unit eigenvector of the smallest one (3, n) of
    symmetric 3x3 matrices, in closed form (trigonometric method); several times faster than a
    batched np.linalg.eigh.  Isotropic or empty matrices get the normal (0, 0, 1)."""
    q = (xx + yy + zz) / 3.0
    p1 = xy * xy + xz * xz + yz * yz
    p2 = (xx - q) ** 2 + (yy - q) ** 2 + (zz - q) ** 2 + 2.0 * p1
    p = np.sqrt(p2 / 6.0)
    safe = np.where(p > 0, p, 1.0)
    b00, b11, b22 = (xx - q) / safe, (yy - q) / safe, (zz - q) / safe
    b01, b02, b12 = xy / safe, xz / safe, yz / safe
    det = b00 * (b11 * b22 - b12 * b12) - b01 * (b01 * b22 - b12 * b02) + b02 * (b01 * b12 - b11 * b02)
    phi = np.arccos(np.clip(det / 2.0, -1.0, 1.0)) / 3.0
    largest = q + 2.0 * p * np.cos(phi)
    smallest = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    middle = 3.0 * q - largest - smallest
    values = np.stack([smallest, middle, largest])

    # Eigenvector of the smallest eigenvalue: cross product of two rows of (A - l I); take the
    # pair with the largest cross product for numerical stability.
    a00, a11, a22 = xx - smallest, yy - smallest, zz - smallest
    crosses = (
        (xy * yz - xz * a11, xz * xy - a00 * yz, a00 * a11 - xy * xy),  # row0 x row1
        (xy * a22 - xz * yz, xz * xz - a00 * a22, a00 * yz - xy * xz),  # row0 x row2
        (a11 * a22 - yz * yz, yz * xz - xy * a22, xy * yz - a11 * xz),  # row1 x row2
    )
    norms = np.stack([cx * cx + cy * cy + cz * cz for cx, cy, cz in crosses])
    pick = np.argmax(norms, axis=0)
    normal = np.stack([np.choose(pick, [c[k] for c in crosses]) for k in range(3)])
    length = np.sqrt(np.take_along_axis(norms, pick[None], axis=0)[0])
    degenerate = length <= 1e-12 * np.maximum(np.abs(values).max(axis=0), 1e-300) ** 2
    normal /= np.where(degenerate, 1.0, length)
    normal[:, degenerate] = np.array([[0.0], [0.0], [1.0]])
    return values, normal


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
    # compiled, where ten bincounts and ten window sums over the whole raster took 3-4x as long.
    cells, sums = kernels.plane_sums(flat, x, y, z, grid.nx, grid.ny, min_points)
    cnt, sx, sy, sz, sxx, sxy, sxz, syy, syz, szz = sums
    mx, my, mz = sx / cnt, sy / cnt, sz / cnt
    values, normals = symmetric_eigen(
        sxx / cnt - mx * mx,
        sxy / cnt - mx * my,
        sxz / cnt - mx * mz,
        syy / cnt - my * my,
        syz / cnt - my * mz,
        szz / cnt - mz * mz,
    )
    size = grid.nx * grid.ny
    # Filled row by row: a[:, cells] = ... scatters through a strided 2-D index, several times slower.
    mean = np.zeros((3, size))
    eigenvalues = np.full((3, size), np.nan)
    normal = np.zeros((3, size))
    normal[2] = 1.0
    for k, row in enumerate((mx, my, mz)):
        mean[k, cells] = row
        eigenvalues[k, cells] = np.maximum(values[k], 0.0)
        normal[k, cells] = normals[k]
    return LocalPlanes(mean, eigenvalues, normal)
