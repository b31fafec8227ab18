"""The compiled raster filters (pipelines/classifiers/filters.py) give the same bits as the SciPy calls
they replaced, with the modes those calls used: on real rasters (the IGN block's lowest and highest
points per cell, a sparse ISPRS sample), on values with ties and infinities, on masks, and on
rasters smaller than the window; `fill_holes` and `opening` as they were written with SciPy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipelines.classifiers import filters
from pipelines.classifiers.base import PointBlock
from pipelines.classifiers.grid import Grid, fill_holes, opening
from tests.test_classifiers import load
from tests.test_kernels import masks, same

SIZES = [1, 3, 5, 9, 13, 37]


@pytest.fixture(scope="module", params=["ign_st_barth_100m.laz", "isprs/samp51.las"])
def points(request) -> PointBlock:
    block, _ = load(request.param)
    return block


def lowest_and_highest(block: PointBlock, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """The lowest z per cell (+inf where empty), and the highest rounded to 0.1 m (ties; -inf where
    empty): the rasters the ground filter and the building mask filter."""
    grid = Grid.covering(block.x, block.y, cell)
    flat = grid.flat_index(block.x, block.y)
    lowest = np.full(grid.nx * grid.ny, np.inf)
    np.minimum.at(lowest, flat, block.z)
    highest = np.full(grid.nx * grid.ny, -np.inf)
    np.maximum.at(highest, flat, np.round(block.z - block.z.min(), 1))
    return lowest.reshape(grid.shape), highest.reshape(grid.shape)


@pytest.mark.parametrize("cell", [0.25, 1.0])
@pytest.mark.parametrize("size", SIZES)
def test_minimum_and_maximum_filters_are_scipys(points: PointBlock, cell: float, size: int) -> None:
    lowest, highest = lowest_and_highest(points, cell)
    # opening (nearest), _ring_of_blocks (constant +inf) and walls_and_eaves (reflect, SciPy's default).
    for mode in ("nearest", "reflect", "mirror"):
        assert same(filters.minimum_filter(lowest, size), ndimage.minimum_filter(lowest, size=size, mode=mode))
        assert same(filters.maximum_filter(highest, size), ndimage.maximum_filter(highest, size=size, mode=mode))
    assert same(
        filters.minimum_filter(lowest, size), ndimage.minimum_filter(lowest, size=size, mode="constant", cval=np.inf)
    )
    # building_mask's highest roof point within the margin (constant -inf).
    assert same(
        filters.maximum_filter(highest, size),
        ndimage.maximum_filter(highest, size=size, mode="constant", cval=-np.inf),
    )
    # A surface without empty cells, as the opening gets it.
    filled = np.where(np.isfinite(lowest), lowest, np.nanmax(np.where(np.isfinite(lowest), lowest, np.nan)))
    assert same(filters.maximum_filter(filled, size), ndimage.maximum_filter(filled, size=size, mode="nearest"))


@pytest.mark.parametrize("size", SIZES)
def test_maximum_filter_of_masks_is_scipys(size: int) -> None:
    """building_mask's margin and remove_low_outliers' reach: masks, the outside False."""
    for mask in masks():
        assert same(filters.maximum_filter(mask, size), ndimage.maximum_filter(mask, size=size, mode="constant"))


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (3, 4), (10, 2)])
def test_filters_of_rasters_smaller_than_the_window(shape: tuple[int, int]) -> None:
    values = np.random.default_rng(5).integers(0, 4, shape).astype(np.float64)
    for size in (3, 9, 21):
        assert same(filters.minimum_filter(values, size), ndimage.minimum_filter(values, size=size, mode="nearest"))
        assert same(filters.maximum_filter(values, size), ndimage.maximum_filter(values, size=size, mode="nearest"))
        mask = values > 2
        assert same(filters.maximum_filter(mask, size), ndimage.maximum_filter(mask, size=size, mode="constant"))


def lattices() -> list[np.ndarray]:
    """Masks whose cells are often equally near two or more True cells: where the choice shows."""
    out = []
    for shape, rows, cols in [((40, 41), 4, 3), ((33, 30), 5, 5), ((25, 60), 2, 7)]:
        mask = np.zeros(shape, dtype=bool)
        mask[1::rows, ::cols] = True
        out.append(mask)
    diagonal = np.zeros((30, 30), dtype=bool)
    diagonal[np.arange(0, 30, 3), np.arange(0, 30, 3)[::-1]] = True
    return [*out, diagonal]


def test_nearest_feature_is_distance_transform_edts(points: PointBlock) -> None:
    grid = Grid.covering(points.x, points.y, 0.5)
    occupied = np.zeros(grid.nx * grid.ny, dtype=bool)
    occupied[grid.flat_index(points.x, points.y)[:: max(1, len(points) // 2000)]] = True
    rng = np.random.default_rng(7)
    found = [occupied.reshape(grid.shape), *lattices(), *(m for m in masks() if m.any())]
    found += [rng.uniform(size=(rng.integers(1, 50), rng.integers(1, 50))) < 0.05 for _ in range(50)]
    for mask in found:
        if not mask.any():
            mask[0, -1] = True
        rows, cols = filters.nearest_feature(mask)
        expected = ndimage.distance_transform_edt(~mask, return_distances=False, return_indices=True)
        assert same(rows, expected[0]) and same(cols, expected[1])


def scipy_fill_holes(raster: np.ndarray) -> np.ndarray:
    """grid.fill_holes as it was, with SciPy's transform."""
    valid = np.isfinite(raster)
    if valid.all():
        return raster.copy()
    if not valid.any():
        return np.zeros_like(raster)
    distance, nearest = ndimage.distance_transform_edt(~valid, return_indices=True)
    filled = raster[tuple(nearest)]
    out = filled.copy()
    todo = ~valid
    size = 3
    largest = 2 * max(raster.shape) + 1
    while todo.any():
        take = todo & (2.0 * distance <= size) if size < largest else todo
        if take.any():
            out[take] = ndimage.uniform_filter(filled, size, mode="nearest")[take]
            todo &= ~take
        size = 2 * size - 1
    return out


def scipy_opening(raster: np.ndarray, radius: int) -> np.ndarray:
    """grid.opening as it was, with SciPy's filters."""
    size = 2 * radius + 1
    eroded = ndimage.minimum_filter(raster, size=size, mode="nearest")
    if min(raster.shape) < 2:
        return ndimage.maximum_filter(eroded, size=size, mode="nearest")
    pad = min(radius, min(raster.shape) - 1)
    continued = np.pad(eroded, pad, mode="reflect", reflect_type="odd")
    dilated = ndimage.maximum_filter(continued, size=size, mode="nearest")
    return dilated[pad : pad + raster.shape[0], pad : pad + raster.shape[1]]


@pytest.mark.parametrize("cell", [1.0, 4.0])
def test_fill_holes_and_opening_are_as_they_were(points: PointBlock, cell: float) -> None:
    lowest, _ = lowest_and_highest(points, cell)
    zmin = np.where(np.isfinite(lowest), lowest, np.nan)
    zmin[5:9, 3:20] = np.nan  # a gap wider than the data's own
    surface = fill_holes(zmin)
    assert same(surface, scipy_fill_holes(zmin))
    for radius in (1, 2, 5, 18):
        assert same(opening(surface, radius), scipy_opening(surface, radius))
    for thin in (surface[:1], surface[:, :1], surface[:2, :5]):
        assert same(opening(thin, 3), scipy_opening(thin, 3))
