"""The built-in classifiers' parameters and versions, one frozen set: the classifiers (`standard.py`,
`ground.py`), the building rules (`buildings.py`), custom models' features and the benchmarks that
tune them read them. No algorithm is imported here, so a command can check a classifier's name and
parameters, and name its version, without loading SciPy: only the workers that classify need it."""

from __future__ import annotations

from dataclasses import dataclass, field

STANDARD_VERSION = "2.6.0"
GROUND_VERSION = "2.1.0"


@dataclass(frozen=True)
class GroundParams:
    """Parameters of the ground filter; the defaults are meant for all airborne data.

    cell_size: raster cell in metres (SMRF's 1 m); neighbourhoods that must hold a few points
        (outlier test, surface fit) grow with the point spacing instead.
    max_window: largest opening window radius in metres; must exceed half the width of the
        largest building so its roof is removed.
    slope: terrain slope (rise over run) tolerated by the opening before a cell counts as object.
    elevation_threshold: metres a point may deviate from the provisional surface on flat terrain
        to be a first-guess ground point, and lie below the refined surface as ground.
    elevation_scaler: extra tolerance per unit of local surface slope (steep terrain is
        interpolated less precisely).
    low_outlier_threshold: metres below its neighbourhood that makes a cell minimum an outlier.
    low_outlier_rounds: at most this many rounds of the outlier test.
    fit_iterations: rounds of the reweighted surface fit.
    fit_softness: metres above the fitted plane at which a point's weight falls to 1/e.
    ground_above: metres a ground point may lie above the refined surface on flat terrain ...
    ground_above_per_spacing: ... plus this much per metre of point spacing ...
    ground_above_per_slope: ... plus this much per unit of slope.
    """

    cell_size: float = 1.0
    max_window: float = 18.0
    slope: float = 0.15
    elevation_threshold: float = 0.5
    elevation_scaler: float = 1.25
    low_outlier_threshold: float = 1.0
    low_outlier_rounds: int = 5
    fit_iterations: int = 3
    fit_points_per_cell: float = 12.0
    fit_softness: float = 0.15
    ground_above: float = 0.1
    ground_above_per_spacing: float = 0.1
    ground_above_per_slope: float = 0.5


@dataclass(frozen=True)
class StandardParams:
    """Parameters of the standard classifier (heights in metres, areas in square metres).

    ground: parameters of the bare-earth filter.
    low_vegetation_max / medium_vegetation_max: height bands of classes 3 / 4; above is 5.
    building_min_height: roof planes are fitted to points at least this high above ground.
    plane_tolerance: RMS residual of a roof neighbourhood plane, and half the largest distance of
        an on-plane point from it.
    min_planar_fraction: share of on-plane points needed within vote_radius of a roof point.
    vote_radius: radius (m) of the neighbourhood for the roof votes and return statistics.
    max_multi_return_fraction: a roof neighbourhood has at most this share of multi-return points
        (the laser penetrates canopy, not roofs); ignored without return numbers.
    max_ground_fraction: a roof neighbourhood has at most this share of ground returns (nothing
        is seen through a roof, ground is seen through trees).
    building_min_area: smaller segments are left to vegetation, unless planar (below).
    building_min_mean_height: lower segments (hedges, shrubs, cars) are left to vegetation, unless
        planar (below).
    planar_segment_fraction: a segment is planar when at least this share of its points at least
        `building_min_height` high lie on a local plane (roofs almost all; crowns and hedge tops,
        which pass the votes only in patches, rarely).
    planar_min_area / planar_min_mean_height: a planar segment needs only this area (when as high
        as `building_min_mean_height`) or only this mean height (when as large as
        `building_min_area`): small annexes and low sheds.
    building_edge_margin: raised points this close to a roof segment (eaves, walls) are building,
        unless more than `margin_above_roof` above the highest roof point within that distance
        (a tree crown overhanging the eaves).
    roof_growth: raised points up to this far beyond a roof segment that lie on its plane (within
        roof_growth_tolerance) are building.
    wall_reach, wall_max_scatter: see `walls_and_eaves`.
    last_return_cell_factor, last_return_max_ground_fraction, last_return_segment_fraction,
    last_return_under_crown, last_return_growth, last_return_growth_under_crown: roofs among split
        pulses, see `roofs_from_last_returns` (a factor of 0 switches the pass off, an under-crown
        share above 1 the smaller segments, a growth of 0 the growth along their planes, a growth
        share of 0 grows every segment).
    continuation_tolerance, continuation_radius: raised last returns among building points (within
        the radius) within this height of their mean are building, see `roof_continuation` (a
        tolerance of 0 switches it off).
    neighbourhood_points: expected number of points in the 3x3-cell neighbourhood of the plane
        fit; sets the feature cell from the point density (power of two, clamped to
        [min_feature_cell, max_feature_cell]).
    noise_min_height: only points this high above ground can be high noise.
    noise_voxel: smallest voxel edge for the isolation test of high noise (the edge is at least
        3 point spacings).
    noise_max_neighbours: a point with at most this many other points in its 3x3x3 voxel
        neighbourhood is isolated.
    noise_max_height: heights are capped here for the voxel grid (bounds its memory).
    """

    ground: GroundParams = field(default_factory=GroundParams)
    low_vegetation_max: float = 0.5
    medium_vegetation_max: float = 2.0
    building_min_height: float = 2.0
    plane_tolerance: float = 0.1
    building_min_area: float = 10.0
    building_min_mean_height: float = 2.5
    planar_segment_fraction: float = 0.8
    planar_min_area: float = 5.0
    planar_min_mean_height: float = 2.0
    building_edge_margin: float = 1.0
    margin_above_roof: float = 2.0
    max_multi_return_fraction: float = 0.3
    max_ground_fraction: float = 0.2
    min_planar_fraction: float = 0.35
    vote_radius: float = 1.0
    neighbourhood_points: float = 9.0
    min_feature_cell: float = 0.25
    max_feature_cell: float = 4.0
    noise_min_height: float = 5.0
    noise_voxel: float = 3.0
    noise_max_neighbours: int = 1
    noise_max_height: float = 300.0
    roof_growth: float = 2.0
    roof_growth_tolerance: float = 0.3
    wall_reach: float = 1.5
    wall_max_scatter: float = 0.005
    last_return_cell_factor: float = 2.0
    last_return_max_ground_fraction: float = 0.4
    last_return_segment_fraction: float = 0.6
    last_return_under_crown: float = 0.5
    last_return_growth: float = 2.0
    last_return_growth_under_crown: float = 0.0
    continuation_tolerance: float = 0.2
    continuation_radius: float = 1.0
