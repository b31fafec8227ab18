"""SMRF with PDAL's default parameters: the reference peer for the ground filter.

A direct transcription of PDAL's filters.smrf (Pingel, Clarke and McBride 2013, as implemented
in PDAL 2.x): cell 1 m, slope 0.15, window 18 m, threshold 0.5 m, scalar 1.25, last and only
returns, no net cutting.  Steps: minimum-z raster of last/only returns; empty cells filled with
the mean of the 8 nearest filled cells; low-outlier mask (the inverted surface opened with a
radius-1 diamond, 5 m threshold); progressive opening with diamond structuring elements of
radius 1 .. window/cell, flagging cells that rise above the opening by more than
slope * cell * radius; object and low cells removed and refilled into the provisional DEM;
a point is ground when it lies within threshold + scalar * slope of its cell of that DEM.
Points that are neither last nor only returns are never ground.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from pipelines.classifiers import PointBlock

GROUND = 2
UNCLASSIFIED = 1
_CROSS = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class SmrfParams:
    cell: float = 1.0
    slope: float = 0.15
    window: float = 18.0
    threshold: float = 0.5
    scalar: float = 1.25


def knn_fill(raster: np.ndarray, k: int = 8) -> np.ndarray:
    """NaN cells get the mean of the k nearest non-NaN cells (cell centres, Euclidean)."""
    holes = np.isnan(raster)
    if not holes.any() or holes.all():
        return raster.copy()
    filled_rc = np.argwhere(~holes)
    tree = cKDTree(filled_rc)
    _, nearest = tree.query(np.argwhere(holes), k=min(k, len(filled_rc)))
    values = raster[~holes]
    out = raster.copy()
    out[holes] = values[nearest.reshape(len(nearest), -1)].mean(axis=1)
    return out


def _diamond_opening(surface: np.ndarray, eroded: np.ndarray, radius: int) -> np.ndarray:
    opened = eroded
    for _ in range(radius):
        opened = ndimage.grey_dilation(opened, footprint=_CROSS, mode="nearest")
    return opened


def progressive_filter(surface: np.ndarray, slope: float, window: float, cell: float) -> np.ndarray:
    """PDAL's progressiveFilter: cells flagged as object."""
    obj = np.zeros(surface.shape, dtype=bool)
    previous = surface
    eroded = surface
    for radius in range(1, int(np.ceil(window / cell)) + 1):
        eroded = ndimage.grey_erosion(eroded, footprint=_CROSS, mode="nearest")
        opened = _diamond_opening(surface, eroded, radius)
        obj |= np.abs(previous - opened) > slope * cell * radius
        previous = opened
    return obj


def smrf(block: PointBlock, params: SmrfParams = SmrfParams()) -> np.ndarray:
    """ASPRS class per point: 2 ground, 1 everything else."""
    out = np.full(len(block), UNCLASSIFIED, dtype=np.uint8)
    inlier = np.ones(len(block), dtype=bool)
    if block.return_number is not None and block.number_of_returns is not None:
        if (block.number_of_returns > 0).all() and (block.return_number > 0).all():
            inlier = block.return_number == block.number_of_returns
    index = np.flatnonzero(inlier)
    if index.size == 0:
        return out
    x, y, z = block.x[index], block.y[index], block.z[index]
    cell = params.cell
    minx, miny = x.min(), y.min()
    cols = int((x.max() - minx) / cell) + 1
    rows = int((y.max() - miny) / cell) + 1
    c = np.floor((x - minx) / cell).astype(np.intp)
    r = np.floor((y - miny) / cell).astype(np.intp)
    flat = r * cols + c
    zmin = np.full(rows * cols, np.inf)
    np.minimum.at(zmin, flat, z)
    zmin[np.isinf(zmin)] = np.nan
    zmin = knn_fill(zmin.reshape(rows, cols))

    low = progressive_filter(-zmin, 5.0, cell, cell)
    obj = progressive_filter(zmin, params.slope, params.window, cell)
    provisional = knn_fill(np.where(obj | low, np.nan, zmin))
    scaled = provisional / cell
    gy, gx = np.gradient(scaled) if min(rows, cols) > 1 else (np.zeros_like(scaled),) * 2
    threshold = params.threshold + params.scalar * np.hypot(gx, gy)
    is_ground = np.abs(provisional.ravel()[flat] - z) <= threshold.ravel()[flat]
    out[index[is_ground]] = GROUND
    return out
