"""The standard classifier's buildings: roof segments found from locally planar, laser-opaque
points, from the last returns of split pulses, then grown to their walls, eaves and roof edges."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipelines.compiled import compiled

from . import filters, kernels
from .base import PointBlock
from .geometry import LocalPlanes, local_planes, window_counts
from .grid import Grid, close_and_fill, within_reach
from .ground import GroundModel
from .standard_params import StandardParams


def feature_cell(model: GroundModel, params: StandardParams) -> float:
    """Cell whose 3x3 neighbourhood holds about `neighbourhood_points` points, power of two."""
    cell = 2.0 ** np.round(np.log2(model.spacing * np.sqrt(params.neighbourhood_points / 9.0)))
    return float(np.clip(cell, params.min_feature_cell, params.max_feature_cell))


def roof_planes(
    grid: Grid, flat: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray, params: StandardParams
) -> tuple[LocalPlanes, np.ndarray, np.ndarray]:
    """The points' local plane per 3x3-cell neighbourhood, which cells are planar, and which points
    lie on their cell's plane: the roof test of the votes and of the last-return pass."""
    # Four points: three always fit a plane exactly.
    planes = local_planes(grid, flat, x, y, z, min_points=4)
    # A plane has one small and two large spreads; a wire or a trunk has two small ones.
    planar_cell = (planes.eigenvalues[0] < params.plane_tolerance**2) & (
        planes.eigenvalues[1] > (0.25 * grid.cell) ** 2
    )
    distance = kernels.plane_distances(planes.normal, planes.mean, flat, x, y, z)
    return planes, planar_cell, planar_cell[flat] & (distance <= 2.0 * params.plane_tolerance)


def building_mask(block: PointBlock, model: GroundModel, params: StandardParams) -> np.ndarray:
    """Points of buildings, found as roof segments.

    1. Points at least `building_min_height` above ground are fitted with a plane per 3x3-cell
       neighbourhood; a point is on-plane when the fit is good (residual below
       `plane_tolerance`, not a line) and the point is within 2 tolerances of it.
    2. A cell is roof-like when, within `vote_radius`, enough raised points are on-plane, few
       are multi-return and few ground returns lie underneath.  Votes over an area beat
       per-point tests: tree crowns are planar only by accident, roofs almost everywhere.
    3. Roof-like cells holding a single-return or on-plane point are closed and hole-filled
       (chimneys, skylights, rough patches), then segments smaller than `building_min_area` or
       lower on average than `building_min_mean_height` (hedges, shrubs, cars) are dropped, unless
       planar (`kept_segments`).
    4. Every raised point in a segment or within `building_edge_margin` of it (eaves, gutters,
       walls) is building, except margin points high above the roof beside them, and so are the
       points beyond that lie on a roof's plane extended (`roof_extension`) or on walls and lower
       roofs beside it (`walls_and_eaves`).
    5. Roofs the votes miss because many of their pulses split (trees over or beside them) are
       found from the last returns alone (`roofs_from_last_returns`).
    """
    result = np.zeros(len(block), dtype=bool)
    raised = np.flatnonzero(~model.is_ground & (model.height >= params.low_vegetation_max))
    if raised.size < 3:
        return result
    grid = Grid.covering(block.x, block.y, feature_cell(model, params))
    flat_raised = grid.flat_index(block.x[raised], block.y[raised])
    high = np.flatnonzero(model.height[raised] >= params.building_min_height)
    flat = flat_raised[high]
    # Local coordinates keep the second moments accurate for large UTM values.
    x = block.x[raised[high]] - grid.x0
    y = block.y[raised[high]] - grid.y0
    z = model.height[raised[high]]
    planes, planar_cell, on_plane = roof_planes(grid, flat, x, y, z, params)

    window = 2 * max(1, int(round(params.vote_radius / grid.cell))) + 1
    if block.number_of_returns is not None:
        multi = block.number_of_returns[raised] > 1
    else:
        multi = np.zeros(raised.size, dtype=bool)
    ground = np.flatnonzero(model.is_ground)
    votes, voters, n_multi, n_raised, n_ground = window_counts(
        grid,
        [
            (flat, on_plane.astype(np.float32)),
            (flat, None),
            (flat_raised, multi.astype(np.float32)),
            (flat_raised, None),
            (grid.flat_index(block.x[ground], block.y[ground]), None),
        ],
        window,
    )
    roof = (
        (votes >= params.min_planar_fraction * np.maximum(voters, 1))
        & (n_multi <= params.max_multi_return_fraction * n_raised)
        & (n_ground <= params.max_ground_fraction * (n_ground + n_raised))
    )
    candidate = roof[flat_raised] & ~multi
    candidate[high[on_plane]] |= roof[flat[on_plane]]

    mask = np.zeros(grid.shape, dtype=bool)
    mask.ravel()[flat_raised[candidate]] = True
    mask = close_and_fill(mask)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    segment = labels.ravel()[flat_raised]
    keep = kept_segments(
        labels, count, segment, model.height[raised], segment[high][on_plane], segment[high], grid.cell, params
    )
    buildings = keep[labels]
    in_segment = buildings.ravel()[flat_raised]
    margin = int(round(params.building_edge_margin / grid.cell))
    if margin > 0:
        buildings = filters.maximum_filter(buildings, 2 * margin + 1)
        # The highest roof point within the margin of each cell: eaves and walls are no higher.
        z_raised = model.height[raised]
        top = np.full(grid.nx * grid.ny, -np.inf)
        kernels.maximum_at(top, flat_raised[in_segment], z_raised[in_segment])
        top = filters.maximum_filter(top.reshape(grid.shape), 2 * margin + 1).ravel()
        # Beside hole-filled segment cells only (no roof point within the margin): no cut.
        top[np.isneginf(top)] = np.inf
        in_margin = buildings.ravel()[flat_raised] & (
            in_segment | (z_raised <= top[flat_raised] + params.margin_above_roof)
        )
    else:
        in_margin = in_segment
    result[raised[in_margin]] = True
    result[raised[high[roof_extension(grid, planes, planar_cell & keep[labels].ravel(), flat, x, y, z, params)]]] = True
    result[raised[walls_and_eaves(model, grid, planes, raised, flat_raised, result[raised], params)]] = True
    if params.last_return_cell_factor > 0:
        result |= roofs_from_last_returns(block, model, grid.cell * params.last_return_cell_factor, result, params)
    if params.continuation_tolerance > 0:
        result[raised[roof_continuation(block, model, grid, raised, flat_raised, result[raised], params)]] = True
    return result


def roof_continuation(
    block: PointBlock,
    model: GroundModel,
    grid: Grid,
    raised: np.ndarray,
    flat_raised: np.ndarray,
    building: np.ndarray,
    params: StandardParams,
) -> np.ndarray:
    """Raised last returns among building points (at least 3 within `continuation_radius`, a square
    of cells) whose height is within `continuation_tolerance` of those points' mean height: the pulse
    ended on a surface at the roof's height beside the roof.

    Where a roof's neighbourhood mixes with crowns or its edge splits the footprint, neither the
    plane fits nor the votes hold, yet its last returns continue the roof's height; a crown's last
    returns beside a roof mostly reach the ground, and a crown's top is seldom at the eaves' height.
    """
    if not building.any() or block.return_number is None or block.number_of_returns is None:
        return np.zeros(raised.size, dtype=bool)
    z = model.height[raised]
    window = 2 * max(1, int(round(params.continuation_radius / grid.cell))) + 1
    heights, count = window_counts(
        grid, [(flat_raised[building], z[building].astype(np.float32)), (flat_raised[building], None)], window
    )
    last = block.return_number[raised] >= block.number_of_returns[raised]
    result = ~building & last & (count[flat_raised] >= 3)
    cells = flat_raised[result]
    result[result] = np.abs(z[result] - heights[cells] / count[cells]) <= params.continuation_tolerance
    return result


def roofs_from_last_returns(
    block: PointBlock, model: GroundModel, cell: float, building: np.ndarray, params: StandardParams
) -> np.ndarray:
    """Roof points among split pulses, found from the last returns alone.

    Where trees stand over or beside a roof, or on small low roofs whose edges split the laser
    footprint, many of the roof's pulses are multi-returns, so the roof votes of `building_mask`
    (few multi-returns) fail.  The pulses' last returns still stop on the roof: fitted alone (on
    cells `last_return_cell_factor` times the feature cell, since only some pulses reach it) they lie
    on a plane, with few ground returns among them (through a crown most last returns are
    ground: at most `last_return_max_ground_fraction`).  Segments of such cells holding at least
    `last_return_segment_fraction` on-plane last returns, as large as `building_min_area` and as high
    on average as `planar_min_mean_height`, are building, their on-plane points only: the crown
    above stays vegetation.  A segment down to `planar_min_area` passes too when at least
    `last_return_under_crown` of its last returns end multi-return pulses (a roof seen through a
    crown); trimmed hedges, also planar and small, return single echoes.  The segments' planes then
    take in the last returns up to `last_return_growth` metres beyond their planar cells that lie
    on them, extended (`roof_extension`), in segments where at least `last_return_growth_under_crown`
    of the last returns end multi-return pulses: a pitched roof under trees shows planar cells only
    on parts of its slopes (over its ridge the cells are not planar, at its edges they see ground),
    yet its other last returns lie on those planes; crown points do not.
    """
    result = np.zeros(len(block), dtype=bool)
    if block.number_of_returns is None or block.return_number is None:
        return result
    last = np.flatnonzero(
        (block.return_number >= block.number_of_returns)
        & ~model.is_ground
        & ~building
        & (model.height >= params.building_min_height)
    )
    if last.size < 4:
        return result
    grid = Grid.covering(block.x, block.y, cell)
    flat = grid.flat_index(block.x[last], block.y[last])
    x, y, z = block.x[last] - grid.x0, block.y[last] - grid.y0, model.height[last]
    planes, planar_cell, on_plane = roof_planes(grid, flat, x, y, z, params)
    window = 2 * max(1, int(round(params.vote_radius / grid.cell))) + 1
    ground = np.flatnonzero(model.is_ground)
    votes, voters, n_ground = window_counts(
        grid,
        [(flat, on_plane.astype(np.float32)), (flat, None), (grid.flat_index(block.x[ground], block.y[ground]), None)],
        window,
    )
    roof = (votes >= params.min_planar_fraction * np.maximum(voters, 1)) & (
        n_ground <= params.last_return_max_ground_fraction * (n_ground + voters)
    )
    # The window sums already join the sparse last returns into areas: no per-point mask here.
    labels, count = ndimage.label(close_and_fill(roof.reshape(grid.shape)), structure=np.ones((3, 3), dtype=bool))
    segment = labels.ravel()[flat]
    area = np.bincount(labels.ravel(), minlength=count + 1) * cell**2
    n = np.bincount(segment, minlength=count + 1)
    planar = np.bincount(segment[on_plane], minlength=count + 1) >= params.last_return_segment_fraction * np.maximum(
        n, 1
    )
    mean_height = np.bincount(segment, z, minlength=count + 1) / np.maximum(n, 1)
    # Smaller segments only when seen through a crown: trimmed hedges are planar too, but open.
    split = np.bincount(segment, block.number_of_returns[last] > 1, minlength=count + 1)
    under_crown = split >= params.last_return_under_crown * np.maximum(n, 1)
    large = (area >= params.building_min_area) | (under_crown & (area >= params.planar_min_area))
    keep = planar & large & (mean_height >= params.planar_min_mean_height)
    keep[0] = False
    result[last[keep[segment] & on_plane]] = True
    if params.last_return_growth > 0:
        # A share above 0 grows only roofs seen through a crown, whose planar cells come in patches:
        # what lies on an open segment's plane beyond it may be a ramp the ground model missed (the
        # benchmark's grid holds both; with the roof continuation, every segment was chosen).
        grow = keep & (split >= params.last_return_growth_under_crown * np.maximum(n, 1))
        grown = roof_extension(
            grid, planes, planar_cell & grow[labels].ravel(), flat, x, y, z, params, params.last_return_growth
        )
        result[last[grown]] = True
    return result


def kept_segments(
    labels: np.ndarray,
    count: int,
    segment: np.ndarray,
    height: np.ndarray,
    on_plane_segment: np.ndarray,
    high_segment: np.ndarray,
    cell: float,
    params: StandardParams,
) -> np.ndarray:
    """Per segment label (0 = none): whether it is a building.

    Large and high enough, or planar and either a little smaller or a little lower: the roof of
    an annex too small for the area test, a shed too low for the height test.  A segment's
    `segment` entries are those of its raised points, `high_segment` those of its points high
    enough for the plane fit, `on_plane_segment` those of its on-plane points.
    """
    area = np.bincount(labels.ravel(), minlength=count + 1) * cell**2
    mean_height = np.bincount(segment, height, minlength=count + 1) / np.maximum(
        np.bincount(segment, minlength=count + 1), 1
    )
    n_high = np.bincount(high_segment, minlength=count + 1)
    planar = np.bincount(on_plane_segment, minlength=count + 1) >= params.planar_segment_fraction * np.maximum(
        n_high, 1
    )
    large, high = area >= params.building_min_area, mean_height >= params.building_min_mean_height
    keep = (
        (large & high)
        | (planar & high & (area >= params.planar_min_area))
        | (planar & large & (mean_height >= params.planar_min_mean_height))
    )
    keep[0] = False
    return keep


def walls_and_eaves(
    model: GroundModel,
    grid: Grid,
    planes: LocalPlanes,
    raised: np.ndarray,
    flat_raised: np.ndarray,
    building: np.ndarray,
    params: StandardParams,
) -> np.ndarray:
    """Raised points up to `wall_reach` from a building point, no higher than the roof beside
    them, whose neighbourhood is flat in one direction (a wall, a lower roof, a gutter): by
    scattering, the smallest over the largest spread of the neighbourhood's raised points, at most
    `wall_max_scatter`.  Tree crowns beside a house scatter in every direction.

    Facades and edges fail the roof votes (the laser footprint splits there, so their returns
    are multi-returns with ground in view), yet producers label them building.
    """
    if not building.any():
        return np.zeros(raised.size, dtype=bool)
    z = model.height[raised]
    occupied = np.zeros(grid.nx * grid.ny, dtype=bool)
    occupied[flat_raised[building]] = True
    near = within_reach(occupied.reshape(grid.shape), params.wall_reach, grid.cell).ravel()
    roof = np.full(grid.nx * grid.ny, -np.inf)
    kernels.maximum_at(roof, flat_raised[building], z[building])
    reach = int(np.ceil(params.wall_reach / grid.cell))
    roof_beside = filters.maximum_filter(roof.reshape(grid.shape), 2 * reach + 1).ravel()
    result = _beside_roofs(building, near, roof_beside, flat_raised, z, params.plane_tolerance)
    # The scattering only where the rest holds: a few cells, not the whole raster.
    cells = flat_raised[result]
    small, large = planes.eigenvalues[0, cells], planes.eigenvalues[2, cells]
    result[result] = np.nan_to_num(small / np.maximum(large, 1e-12), nan=1.0) <= params.wall_max_scatter
    return result


def roof_extension(
    grid: Grid,
    planes,
    roof_cells: np.ndarray,
    flat: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    z: np.ndarray,
    params: StandardParams,
    growth: float | None = None,
) -> np.ndarray:
    """Points up to `growth` metres (default `roof_growth`) beyond a roof that lie on its plane,
    extended (within `roof_growth_tolerance`).

    Near eaves and ridges the roof votes fail (the laser footprint splits between roof and
    ground, so edge returns are multi-returns with ground below), but the points still lie on the
    roof's plane; tree crowns next to a house do not, except by accident.
    """
    if not roof_cells.any():
        return np.zeros(flat.size, dtype=bool)
    # The nearest roof cell of every cell, as distance_transform_edt picks it (filters.py); its
    # distance only at the points' cells, computed as distance_transform_edt computes it for every
    # cell (the same float operations).
    rows, cols = filters.nearest_feature(roof_cells.reshape(grid.shape))
    reach = (params.roof_growth if growth is None else growth) / grid.cell
    near, nearest = _near_roofs(rows.ravel(), cols.ravel(), flat, grid.nx, reach)
    offset = kernels.plane_distances(planes.normal, planes.mean, nearest, x[near], y[near], z[near])
    result = np.zeros(flat.size, dtype=bool)
    result[near[offset <= params.roof_growth_tolerance]] = True
    return result


# The two loops below are compiled (pipelines/compiled.py) where NumPy made a pass, and an array, per
# operation over every raised point: integer differences, exact squares and one correctly rounded
# square root, comparisons: the same bits and the same verdicts (tests/test_point_loops.py).


@compiled
def _near_roofs(rows, cols, flat, nx, reach):
    """The points (indices into `flat`) whose cell is at most `reach` cells from its nearest roof
    cell (`rows`, `cols`: the distance transform's indices, flattened), and that roof cell."""
    near = np.empty(flat.size, np.intp)
    nearest = np.empty(flat.size, np.intp)
    found = 0
    for point in range(flat.size):
        cell = flat[point]
        row, col = rows[cell], cols[cell]
        d_row, d_col = np.float64(row - cell // nx), np.float64(col - cell % nx)
        if np.sqrt(d_row * d_row + d_col * d_col) <= reach:
            near[found] = point
            nearest[found] = row * nx + col
            found += 1
    return near[:found], nearest[:found]


@compiled
def _beside_roofs(building, near, roof_beside, flat, z, tolerance):
    """walls_and_eaves' first test: not building, near a building cell, at most `tolerance` above
    the highest roof beside."""
    out = np.zeros(flat.size, np.bool_)
    for point in range(flat.size):
        cell = flat[point]
        out[point] = not building[point] and near[cell] and z[point] <= roof_beside[cell] + tolerance
    return out
