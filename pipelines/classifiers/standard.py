"""Multi-class rule-based classifier: ground, vegetation by height, buildings, noise.

Ground and the bare-earth surface come from the SMRF-style filter in `ground.py`.  Every other
point gets its height above that surface (bilinear), then:

* low noise (7): further below the bare earth than the ground tolerance;
* high noise (18): well above ground and alone in its 3x3x3 voxel neighbourhood;
* building (6): part of a roof segment (see `buildings.py`): locally planar, impenetrable to
  the laser (few multi-returns, few ground returns underneath), large and high enough;
* vegetation 3 / 4 / 5 by height: below `low_vegetation_max`, below `medium_vegetation_max`,
  above (ASPRS-style bands; IGN uses 0.5 / 1.5 m, others 0.5 / 2 m).

Water (9) is not produced: without a calibrated intensity or a water mask, flat surfaces with
few returns are not reliably told from dark roofs or smooth ground in general data (the lidR
topography lake comes out as ground), so water surfaces stay ground.

Blocks are expected to be tile-sized (up to a few km across): rasters cover the block extent.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from .base import (
    BUILDING,
    GROUND,
    HIGH_NOISE,
    HIGH_VEGETATION,
    LOW_NOISE,
    LOW_VEGETATION,
    MEDIUM_VEGETATION,
    PointBlock,
)
from .buildings import building_mask
from .ground import GroundModel, ground_model
from .standard_params import STANDARD_VERSION, StandardParams


def isolated_high(block: PointBlock, model: GroundModel, params: StandardParams) -> np.ndarray:
    """Points high above ground with almost no neighbour in the surrounding 3x3x3 voxels."""
    result = np.zeros(len(block), dtype=bool)
    h = model.height
    if not (h >= params.noise_min_height).any():
        return result
    # Sparse data needs larger voxels to count the same neighbours.
    v = max(params.noise_voxel, 3.0 * model.spacing)
    # Voxel layers start at `low`, so a candidate lies in the third layer or above; only points
    # from the second layer up can fall in the 3x3x3 voxels around one. (The lower points, mostly
    # ground, were counted too, into voxels no candidate looks at.)
    low = params.noise_min_height - 2 * v
    near = np.flatnonzero(h >= low + v)
    # Voxels aligned to absolute multiples of v so tiles and untiled runs share them; heights
    # are capped so one absurd outlier cannot blow up the dense voxel array (anything that high
    # sits alone in the top layer and is isolated anyway).
    i = np.floor(block.x[near] / v)
    j = np.floor(block.y[near] / v)
    i = (i - i.min()).astype(np.intp) + 1
    j = (j - j.min()).astype(np.intp) + 1
    k = ((np.minimum(h[near], params.noise_max_height) - low) / v).astype(np.intp) + 1
    shape = (int(i.max()) + 2, int(j.max()) + 2, int(k.max()) + 2)
    voxel = (i * shape[1] + j) * shape[2] + k
    counts = np.bincount(voxel, minlength=shape[0] * shape[1] * shape[2]).astype(np.float32)
    neighbours = ndimage.uniform_filter(counts.reshape(shape), size=3, mode="constant") * 27
    isolated = np.rint(neighbours.ravel()[voxel]) - 1 <= params.noise_max_neighbours
    result[near[isolated & (h[near] >= params.noise_min_height)]] = True
    return result


class StandardClassifier:
    """Ground 2, vegetation 3/4/5, building 6, low noise 7, high noise 18."""

    name = "standard"
    version = STANDARD_VERSION

    def __init__(self, params: StandardParams | None = None) -> None:
        self._params = params or StandardParams()
        self.params = dataclasses.asdict(self._params)

    def classify(self, block: PointBlock) -> np.ndarray:
        if len(block) == 0:
            return np.full(0, HIGH_VEGETATION, dtype=np.uint8)
        return standard_classes(block, ground_model(block, self._params.ground), self._params)


def standard_classes(block: PointBlock, model: GroundModel, params: StandardParams) -> np.ndarray:
    """The standard classifier's classes given the block's ground model (which custom models
    compute once and share with their own features)."""
    out = np.full(len(block), HIGH_VEGETATION, dtype=np.uint8)
    h = model.height
    out[h < params.medium_vegetation_max] = MEDIUM_VEGETATION
    out[h < params.low_vegetation_max] = LOW_VEGETATION
    out[building_mask(block, model, params)] = BUILDING
    out[isolated_high(block, model, params)] = HIGH_NOISE
    out[model.is_ground] = GROUND
    out[model.below] = LOW_NOISE
    return out
