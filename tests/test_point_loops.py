"""The compiled point loops outside kernels.py (a tile's records scaled in tile_tasks, the building
rules' and the ground decision's tests) give the same bits as the NumPy lines they replaced, written
out here as they were, on real points."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from pipelines.classifiers import buildings, ground, kernels
from pipelines.classifiers.base import PointBlock
from pipelines.classifiers.grid import Grid
from pipelines.tile_tasks import scaling_of, tile_fields
from pipelines.units import METRES, CoordinateUnits
from tests.test_classifiers import DATA, load
from tests.test_kernels import same


@pytest.fixture(scope="module", params=["ign_st_barth_100m.laz", "isprs/samp51.las"])
def points(request) -> PointBlock:
    block, _ = load(request.param)
    return block


@pytest.mark.parametrize("relative", ["ign_st_barth_100m.laz", "isprs/samp51.las"])
@pytest.mark.parametrize("units", [METRES, CoordinateUnits(0.3048, 1200.0 / 3937.0, "foot", "US survey foot", False)])
def test_a_tiles_block_is_its_records_scaled_by_numpy(relative: str, units: CoordinateUnits) -> None:
    """Scaling.block's compiled pass over core and context gives the bits of Scaling.axis on the
    two concatenated (as the workers computed them), on read-only records (as Dask hands them over)."""
    laspy = pytest.importorskip("laspy")
    las = laspy.read(DATA / relative)
    fields = tile_fields(las.points.array, las.header.point_format.id)
    scaling = scaling_of(las.header, units)
    core, context = fields[: len(fields) // 3], fields[len(fields) // 3 :]
    context.flags.writeable = False
    block = scaling.block(core, context)
    for k, name in enumerate("xyz"):
        assert same(getattr(block, name), scaling.axis(fields, k))
    for name in ("intensity", "return_number", "number_of_returns"):
        assert same(getattr(block, name), np.ascontiguousarray(fields[name]))
    assert same(scaling.block(core).x, scaling.axis(core, 0)) and len(scaling.block(core, context[:0])) == len(core)


@pytest.mark.parametrize("with_returns", [True, False])
def test_ground_decision_is_numpys(points: PointBlock, with_returns: bool) -> None:
    """ground.decide's pass against its NumPy lines as they were, with and without last returns."""
    params = ground.GroundParams()
    block = points if with_returns else dataclasses.replace(points, return_number=None, number_of_returns=None)
    fit = ground.fit_surface(block, params)
    assert (fit.last is not None) == with_returns
    above = (
        params.ground_above + params.ground_above_per_spacing * fit.spacing + params.ground_above_per_slope * fit.slope
    )
    below = params.elevation_threshold + params.elevation_scaler * fit.slope
    is_ground = (fit.residual <= above) & (fit.residual >= -below)
    if fit.last is not None:
        is_ground &= fit.last
    found = ground.decide(fit, params)
    assert same(found[0], is_ground) and same(found[1], fit.residual < -below) and found[1].any()


@pytest.mark.parametrize("cell", [0.5, 2.0])
def test_roof_loops_are_numpys(points: PointBlock, cell: float) -> None:
    """buildings' point loops against the NumPy lines they replaced, on roof cells of many shapes
    (cells whose points' heights vary little) and reaches below, at and above whole cells."""
    grid = Grid.covering(points.x, points.y, cell)
    flat = grid.flat_index(points.x, points.y)
    roof = grid.cell_max(flat, points.z) - grid.cell_min(flat, points.z) < 0.1
    rows, cols = ndimage.distance_transform_edt(~roof, return_distances=False, return_indices=True)
    for reach in (0.5, 1.0, 1.5, np.sqrt(2.0), 2.25):
        near, nearest = buildings._near_roofs(rows.ravel(), cols.ravel(), flat, grid.nx, reach)
        nearest_row, nearest_col = rows.ravel()[flat], cols.ravel()[flat]
        row, col = np.divmod(flat, grid.nx)
        distance = np.sqrt((nearest_row - row).astype(np.float64) ** 2 + (nearest_col - col).astype(np.float64) ** 2)
        expected = np.flatnonzero(distance <= reach)
        # The same cells, as intp (NumPy's were the transform's int32).
        expected_nearest = nearest_row[expected] * grid.nx + nearest_col[expected]
        assert same(near, expected) and same(nearest, expected_nearest.astype(np.intp))
    building = roof.ravel()[flat] & (points.z > np.median(points.z))
    near = ndimage.maximum_filter(roof, size=5).ravel()
    top = np.full(grid.nx * grid.ny, -np.inf)
    kernels.maximum_at(top, flat[building], points.z[building])
    top = ndimage.maximum_filter(top.reshape(grid.shape), size=5).ravel()
    expected = ~building & near[flat] & (points.z <= top[flat] + 0.3)
    assert same(buildings._beside_roofs(building, near, top, flat, points.z, 0.3), expected) and expected.any()


@pytest.mark.parametrize("point_format", range(11))
def test_a_tiles_fields_are_laspys_values_in_every_point_format(point_format: int) -> None:
    """tile_fields unpacks the returns from their bits as laspy does, three bits each in formats 0-5
    and four in 6-10, whatever the byte's other bits (scan direction, edge of flight line) hold."""
    laspy = pytest.importorskip("laspy")
    rng = np.random.default_rng(point_format)
    n = 5_000
    points = laspy.ScaleAwarePointRecord.zeros(
        n, point_format=laspy.PointFormat(point_format), scales=np.ones(3), offsets=np.zeros(3)
    )
    points.array["bit_fields"] = rng.integers(0, 256, n, dtype=np.uint8)
    for name in ("X", "Y", "Z"):
        points.array[name] = rng.integers(-(2**31), 2**31, n, dtype=np.int32)
    points.array["intensity"] = rng.integers(0, 2**16, n, dtype=np.uint16)
    fields = tile_fields(points.array, point_format)
    for name in ("X", "Y", "Z", "intensity", "return_number", "number_of_returns"):
        assert np.array_equal(fields[name], np.asarray(points[name])), name
    assert fields["number_of_returns"].max() == (15 if point_format >= 6 else 7)
