"""Per-point features for trained classifiers.

Geometry comes from neighbourhood covariances at several scales; a neighbourhood is the 3x3-cell
block around a point's cell, with cells of `base`, 2 x `base` and 4 x `base` metres (`base` from
the point density, as for the standard classifier).  Grids are aligned to absolute coordinates so
features, and therefore predictions, do not depend on how a file is tiled.

Per scale (eigenvalues l1 >= l2 >= l3 of the covariance):
  linearity (l1 - l2) / l1, planarity (l2 - l3) / l1, scattering l3 / l1, verticality 1 - |n_z|,
  residual distance of the point to the fitted plane, point height above the lowest and below the
  highest point of the neighbourhood, and points per square metre.
Per point: height above the bare earth (SMRF-style filter), the ground filter's verdict, return
number, number of returns, last-return flag and intensity (0 when the block has none).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .base import PointBlock
from .geometry import local_planes
from .grid import Grid
from .ground import GroundModel, GroundParams, ground_model

SCALES: tuple[int, ...] = (1, 2, 4)
_PER_SCALE = ("linearity", "planarity", "scattering", "verticality", "plane_distance",
              "above_min", "below_max", "density")
_PER_POINT = ("height", "ground_filter", "return_number", "number_of_returns", "last_return",
              "intensity")
FEATURE_NAMES: tuple[str, ...] = _PER_POINT + tuple(
    f"{name}_{scale}" for scale in SCALES for name in _PER_SCALE)


def base_cell(model: GroundModel) -> float:
    """Smallest neighbourhood cell: about one point per cell, a power of two in [0.25, 2] m."""
    return float(np.clip(2.0 ** np.round(np.log2(model.spacing)), 0.25, 2.0))


def point_features(block: PointBlock, model: GroundModel | None = None,
                   scales: Sequence[int] = SCALES) -> np.ndarray:
    """Feature matrix (len(block), len(FEATURE_NAMES)) of float32, columns as FEATURE_NAMES."""
    n = len(block)
    out = np.zeros((n, len(_PER_POINT) + len(_PER_SCALE) * len(scales)), dtype=np.float32)
    if n == 0:
        return out
    model = model or ground_model(block, GroundParams())
    out[:, 0] = model.height
    out[:, 1] = model.is_ground
    if block.return_number is not None and block.number_of_returns is not None:
        out[:, 2] = block.return_number
        out[:, 3] = block.number_of_returns
        out[:, 4] = block.return_number >= block.number_of_returns
    else:
        out[:, 2:5] = 1.0
    if block.intensity is not None:
        out[:, 5] = block.intensity
    base = base_cell(model)
    column = len(_PER_POINT)
    for scale in scales:
        out[:, column:column + len(_PER_SCALE)] = _scale_features(block, model, base * scale)
        column += len(_PER_SCALE)
    return out


def _scale_features(block: PointBlock, model: GroundModel, cell: float) -> np.ndarray:
    grid = Grid.covering(block.x, block.y, cell)
    flat = grid.flat_index(block.x, block.y)
    # Local coordinates keep second moments precise; heights make z independent of elevation.
    x = block.x - grid.x0
    y = block.y - grid.y0
    z = model.height
    planes = local_planes(grid, flat, x, y, z, min_points=3)
    small, middle, large = (planes.eigenvalues[i, flat] for i in range(3))
    valid = np.isfinite(large) & (large > 0)
    safe = np.where(valid, large, 1.0)
    normal, mean = planes.normal[:, flat], planes.mean[:, flat]
    distance = np.abs(normal[0] * (x - mean[0]) + normal[1] * (y - mean[1])
                      + normal[2] * (z - mean[2]))
    empty_low = np.where(np.isfinite(low := grid.cell_min(flat, z)), low, np.inf)
    empty_high = np.where(np.isfinite(high := grid.cell_max(flat, z)), high, -np.inf)
    lowest = ndimage.minimum_filter(empty_low, size=3, mode="nearest").ravel()[flat]
    highest = ndimage.maximum_filter(empty_high, size=3, mode="nearest").ravel()[flat]
    features = np.stack([
        np.where(valid, (large - middle) / safe, 0.0),
        np.where(valid, (middle - small) / safe, 0.0),
        np.where(valid, small / safe, 0.0),
        np.where(valid, 1.0 - np.abs(normal[2]), 0.0),
        np.where(valid, distance, 0.0),
        z - lowest,
        highest - z,
        planes.count[flat] / (9.0 * cell * cell),
    ], axis=1)
    return features
