"""Per-point features for trained classifiers.

Geometry comes from neighbourhood covariances at several scales; a neighbourhood is the 3x3-cell
block around a point's cell, with cells of `base`, 2 x `base` and 4 x `base` metres (`base` from
the point density, as for the standard classifier).  Grids are aligned to absolute coordinates so
features, and therefore predictions, do not depend on how a file is tiled.

Per scale (eigenvalues l1 >= l2 >= l3 of the covariance):
  linearity (l1 - l2) / l1, planarity (l2 - l3) / l1, scattering l3 / l1, verticality 1 - |n_z|,
  residual distance of the point to the fitted plane, point height above the lowest and below the
  highest point of the neighbourhood, points per square metre, and the shares of multi-return
  points and of ground-filter points in the neighbourhood (a laser sees through canopy, not
  through roofs).
Per point: height above the ground filter's morphological surface, the ground filter's verdict,
the standard classifier's building verdict, return number, number of returns, last-return flag and
intensity (0 when the block has none).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from .base import PointBlock
from .geometry import local_planes, window_sums
from .grid import Grid
from .ground import GroundModel, ground_model
from .standard import StandardParams, building_mask

SCALES: tuple[int, ...] = (1, 2, 4)
_PER_SCALE = ("linearity", "planarity", "scattering", "verticality", "plane_distance",
              "above_min", "below_max", "density", "multi_return_share", "ground_share")
_PER_POINT = ("height", "ground_filter", "rule_building", "return_number", "number_of_returns",
              "last_return", "intensity")
FEATURE_NAMES: tuple[str, ...] = _PER_POINT + tuple(
    f"{name}_{scale}" for scale in SCALES for name in _PER_SCALE)


def base_cell(model: GroundModel) -> float:
    """Smallest neighbourhood cell: about one point per cell, a power of two in [0.25, 2] m."""
    return float(np.clip(2.0 ** np.round(np.log2(model.spacing)), 0.25, 2.0))


def point_features(block: PointBlock) -> np.ndarray:
    """Feature matrix (len(block), len(FEATURE_NAMES)) of float32, columns as FEATURE_NAMES."""
    n = len(block)
    out = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float32)
    if n == 0:
        return out
    params = StandardParams()
    # Heights from the morphological surface: it stays below low scrub, where the refined surface
    # may ride on it, and the model learns better from them (measured on the IGN block).
    model = ground_model(block, params.ground)
    model = dataclasses.replace(model, height=model.provisional_height)
    out[:, 0] = model.height
    out[:, 1] = model.is_ground
    # The rule-based roof detector as one input: the model learns where to overrule it.
    out[:, 2] = building_mask(block, model, params)
    if block.return_number is not None and block.number_of_returns is not None:
        out[:, 3] = block.return_number
        out[:, 4] = block.number_of_returns
        out[:, 5] = block.return_number >= block.number_of_returns
    else:
        out[:, 3:6] = 1.0
    if block.intensity is not None:
        out[:, 6] = block.intensity
    base = base_cell(model)
    column = len(_PER_POINT)
    for scale in SCALES:
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
    multi = (np.zeros(len(block)) if block.number_of_returns is None
             else (block.number_of_returns > 1).astype(np.float64))
    n_multi, n_ground = window_sums(grid, flat, [multi, model.is_ground.astype(np.float64)])
    count = np.maximum(planes.count[flat], 1.0)
    small, middle, large = (planes.eigenvalues[i, flat] for i in range(3))
    valid = np.isfinite(large) & (large > 0)
    safe = np.where(valid, large, 1.0)
    normal, mean = planes.normal[:, flat], planes.mean[:, flat]
    distance = np.abs(normal[0] * (x - mean[0]) + normal[1] * (y - mean[1])
                      + normal[2] * (z - mean[2]))
    low = grid.cell_min(flat, z)
    low[np.isnan(low)] = np.inf  # empty cells must not win the neighbourhood minimum
    high = grid.cell_max(flat, z)
    high[np.isnan(high)] = -np.inf
    lowest = ndimage.minimum_filter(low, size=3, mode="nearest").ravel()[flat]
    highest = ndimage.maximum_filter(high, size=3, mode="nearest").ravel()[flat]
    return np.stack([
        np.where(valid, (large - middle) / safe, 0.0),
        np.where(valid, (middle - small) / safe, 0.0),
        np.where(valid, small / safe, 0.0),
        np.where(valid, 1.0 - np.abs(normal[2]), 0.0),
        np.where(valid, distance, 0.0),
        z - lowest,
        highest - z,
        planes.count[flat] / (9.0 * cell * cell),
        n_multi[flat] / count,
        n_ground[flat] / count,
    ], axis=1)
