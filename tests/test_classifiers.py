"""Classifier tests on real labelled LiDAR (../shared/data) plus synthetic degenerate blocks:
built-in classifiers, and the trainable per-account core."""

from __future__ import annotations

import dataclasses
import itertools
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from pipelines.classifiers import (
    BUILTIN_CLASSIFIERS,
    Classifier,
    PointBlock,
    describe_classifier,
    get_classifier,
)
from pipelines.classifiers.features import FEATURE_NAMES, DyadicCells, _shapes, _window_columns, point_features
from pipelines.classifiers.fitting import train
from pipelines.classifiers.forest import ROWS, Forest
from pipelines.classifiers.geometry import box_sum
from pipelines.classifiers.grid import Grid
from pipelines.classifiers.standard import StandardClassifier
from pipelines.classifiers.trained import (
    EARLY_STAGES,
    EARLY_TOLERANCE,
    FORMAT,
    STAGE_TREES,
    STANDARD_COLUMN,
    Seal,
    TrainedClassifier,
    TrainedModel,
    choose_cascade,
    choose_pruning,
    lead,
)
from pipelines.errors import InvalidValue

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ASPRS_OUTPUTS = {1, 2, 3, 4, 5, 6, 7, 9, 18}
SEAL = Seal(b"k", "acme", "model-1")


def load(relative: str) -> tuple[PointBlock, np.ndarray]:
    laspy = pytest.importorskip("laspy")
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"test data {path} not available")
    las = laspy.read(path)
    block = PointBlock(
        x=np.asarray(las.x, dtype=np.float64),
        y=np.asarray(las.y, dtype=np.float64),
        z=np.asarray(las.z, dtype=np.float64),
        intensity=np.asarray(las.intensity),
        return_number=np.asarray(las.return_number, dtype=np.uint8),
        number_of_returns=np.asarray(las.number_of_returns, dtype=np.uint8),
    )
    return block, np.asarray(las.classification)


def shifted(block: PointBlock, dx: float, dy: float) -> PointBlock:
    return PointBlock(
        block.x + dx, block.y + dy, block.z, block.intensity, block.return_number, block.number_of_returns
    )


def f1(reference: np.ndarray, predicted: np.ndarray) -> float:
    tp = np.count_nonzero(reference & predicted)
    return 2 * tp / max(np.count_nonzero(reference) + np.count_nonzero(predicted), 1)


@pytest.fixture(scope="module")
def ign() -> tuple[PointBlock, np.ndarray]:
    """The IGN block cropped to its southern half (houses, gardens, trees)."""
    block, labels = load("ign_st_barth_100m.laz")
    keep = np.flatnonzero(block.y < block.y.min() + 50.0)
    return block.take(keep), labels[keep]


# Total error of a useless filter (all ground) is 43 % on samp11 and 22 % on samp51; SMRF-class
# filters reach about 9 % and 2 %.
@pytest.mark.parametrize(("sample", "max_total_error"), [("samp11", 0.12), ("samp51", 0.05)])
def test_ground_isprs_total_error(sample: str, max_total_error: float) -> None:
    block, labels = load(f"isprs/{sample}.las")
    classes = get_classifier("ground").classify(block)
    assert set(np.unique(classes)) <= {1, 2}
    total_error = np.mean((classes == 2) != (labels == 2))
    assert total_error < max_total_error


def test_ground_rejects_low_outliers() -> None:
    block, _ = load("isprs/samp51.las")
    rng = np.random.default_rng(7)
    pick = rng.choice(len(block), 50, replace=False)
    z = block.z.copy()
    z[pick] -= rng.uniform(10.0, 30.0, pick.size)
    noisy = PointBlock(block.x, block.y, z)
    ground = get_classifier("ground").classify(noisy)
    # On steep slopes a point 10 m down can still sit on the terrain below; allow a few.
    assert np.mean(ground[pick] == 1) >= 0.94
    standard = get_classifier("standard").classify(noisy)
    assert np.mean(standard[pick] == 7) >= 0.9


def test_standard_ign_scores(ign: tuple[PointBlock, np.ndarray]) -> None:
    block, labels = ign
    classes = get_classifier("standard").classify(block)
    scored = labels != 1  # the producer's unclassified points
    ref, ours = labels[scored], classes[scored]
    assert f1(ref == 2, ours == 2) > 0.93
    assert f1(ref == 6, ours == 6) > 0.85
    assert f1(ref == 5, np.isin(ours, (3, 4, 5))) > 0.8


def test_standard_is_deterministic_and_order_independent(ign: tuple[PointBlock, np.ndarray]) -> None:
    block, _ = ign
    classifier = get_classifier("standard")
    first = classifier.classify(block)
    np.testing.assert_array_equal(first, classifier.classify(block))
    order = np.random.default_rng(3).permutation(len(block))
    permuted = classifier.classify(block.take(order))
    # Sums in another order can differ in the last bit; allow a handful of borderline flips.
    assert np.mean(permuted == first[order]) > 0.999


@pytest.mark.parametrize("name", BUILTIN_CLASSIFIERS)
def test_shift_to_large_coordinates_keeps_results(name: str, ign: tuple[PointBlock, np.ndarray]) -> None:
    block, _ = ign
    classifier = get_classifier(name)
    base = classifier.classify(block)
    # Multiples of 1024 m keep every power-of-two grid aligned the same way.
    for dx, dy in ((512 * 1024.0, 4864 * 1024.0), (9765 * 1024.0, 9765 * 1024.0)):
        moved = classifier.classify(shifted(block, dx, dy))
        assert np.mean(moved == base) > 0.999


@pytest.mark.parametrize("name", BUILTIN_CLASSIFIERS)
def test_tiles_with_buffer_agree_with_untiled_run(name: str) -> None:
    block, _ = load("lidr_topography.laz")
    classifier = get_classifier(name)
    whole = classifier.classify(block)
    tile, buffer = 100.0, 20.0
    tiled = np.zeros_like(whole)
    col = np.floor(block.x / tile)
    row = np.floor(block.y / tile)
    for c in np.unique(col):
        for r in np.unique(row):
            core = (col == c) & (row == r)
            x0, y0 = c * tile, r * tile
            near = np.flatnonzero(
                (block.x >= x0 - buffer)
                & (block.x < x0 + tile + buffer)
                & (block.y >= y0 - buffer)
                & (block.y < y0 + tile + buffer)
            )
            if not core.any():
                continue
            classes = classifier.classify(block.take(near))
            inner = core[near]
            tiled[near[inner]] = classes[inner]
    assert np.mean(tiled == whole) >= 0.995


def degenerate_blocks() -> dict[str, PointBlock]:
    rng = np.random.default_rng(11)
    n = 500
    line_x = np.linspace(0.0, 100.0, n)
    return {
        "empty": PointBlock(np.empty(0), np.empty(0), np.empty(0)),
        "one point": PointBlock(np.array([600000.5]), np.array([5000000.5]), np.array([12.0])),
        "two points": PointBlock(np.array([0.0, 1.0]), np.array([0.0, 1.0]), np.array([0.0, 9.0])),
        "identical": PointBlock(np.full(n, 7.0), np.full(n, 8.0), np.full(n, 9.0)),
        "vertical line": PointBlock(np.full(n, 3.0), np.full(n, 4.0), np.linspace(0.0, 50.0, n)),
        "horizontal line": PointBlock(line_x, np.zeros(n), np.zeros(n)),
        "sloped line": PointBlock(line_x, line_x, 0.3 * line_x),
        "utm": PointBlock(
            rng.uniform(6e5, 6e5 + 50.0, n), rng.uniform(5e6, 5e6 + 50.0, n), rng.uniform(100.0, 101.0, n)
        ),
        "1e7": PointBlock(rng.uniform(1e7, 1e7 + 30.0, n), rng.uniform(1e7, 1e7 + 30.0, n), rng.normal(0.0, 0.05, n)),
        "with returns": PointBlock(
            rng.uniform(0.0, 20.0, n),
            rng.uniform(0.0, 20.0, n),
            rng.uniform(0.0, 10.0, n),
            intensity=rng.integers(0, 65535, n, dtype=np.uint16),
            return_number=np.ones(n, dtype=np.uint8),
            number_of_returns=rng.integers(1, 3, n, dtype=np.uint8),
        ),
    }


@pytest.mark.parametrize("name", BUILTIN_CLASSIFIERS)
@pytest.mark.parametrize("case", list(degenerate_blocks()))
def test_degenerate_blocks(name: str, case: str) -> None:
    block = degenerate_blocks()[case]
    classes = get_classifier(name).classify(block)
    assert classes.dtype == np.uint8
    assert classes.shape == (len(block),)
    assert set(np.unique(classes).tolist()) <= ASPRS_OUTPUTS


@pytest.mark.parametrize("name", BUILTIN_CLASSIFIERS)
def test_flat_ground_is_ground(name: str) -> None:
    rng = np.random.default_rng(5)
    n = 20000
    block = PointBlock(rng.uniform(0.0, 100.0, n), rng.uniform(0.0, 100.0, n), rng.normal(50.0, 0.03, n))
    assert np.mean(get_classifier(name).classify(block) == 2) > 0.99


def test_building_on_flat_ground() -> None:
    """A 20 m x 20 m flat roof 6 m high on flat ground is building, the ground stays ground."""
    rng = np.random.default_rng(9)
    n = 100 * 100 * 10
    x = rng.uniform(0.0, 100.0, n)
    y = rng.uniform(0.0, 100.0, n)
    roof = (np.abs(x - 50.0) < 10.0) & (np.abs(y - 50.0) < 10.0)
    z = np.where(roof, 6.0, 0.0) + rng.normal(0.0, 0.02, n)
    classes = get_classifier("standard").classify(PointBlock(x, y, z))
    inner = (np.abs(x - 50.0) < 9.0) & (np.abs(y - 50.0) < 9.0)
    assert np.mean(classes[inner] == 6) > 0.95
    assert np.mean(classes[~roof] == 2) > 0.98


def test_isolated_high_point_is_high_noise() -> None:
    rng = np.random.default_rng(4)
    n = 20000
    x = np.append(rng.uniform(0.0, 100.0, n), 50.0)
    y = np.append(rng.uniform(0.0, 100.0, n), 50.0)
    z = np.append(rng.normal(0.0, 0.03, n), 80.0)
    classes = get_classifier("standard").classify(PointBlock(x, y, z))
    assert classes[-1] == 18
    assert np.mean(classes[:-1] == 2) > 0.99


@pytest.mark.parametrize("name", BUILTIN_CLASSIFIERS)
def test_classifier_metadata(name: str) -> None:
    classifier = get_classifier(name)
    assert classifier.name == name
    assert classifier.version
    assert json.loads(json.dumps(classifier.params)) == classifier.params


def test_params_override_and_nested_ground_params() -> None:
    ground = get_classifier("ground", {"slope": 0.3})
    assert ground.params["slope"] == 0.3
    standard = get_classifier("standard", {"ground": {"max_window": 24.0}, "building_min_area": 20.0})
    assert standard.params["ground"]["max_window"] == 24.0
    assert standard.params["ground"]["slope"] == get_classifier("ground").params["slope"]
    assert standard.params["building_min_area"] == 20.0


@pytest.mark.parametrize(
    ("name", "params"),
    [("standard", None), ("ground", {"slope": 0.3}), ("standard", {"ground": {"max_window": 24.0}})],
)
def test_a_description_names_what_get_classifier_builds(name: str, params: dict | None) -> None:
    built, described = get_classifier(name, params), describe_classifier(name, params)
    assert (described.name, described.version, described.params) == (built.name, built.version, built.params)


def test_unknown_classifier_is_rejected() -> None:
    for build in (get_classifier, describe_classifier):
        with pytest.raises(ValueError, match="unknown classifier 'x'; choose one of standard, ground"):
            build("x")


@pytest.mark.parametrize(
    ("name", "params", "key"),
    [
        ("ground", {"slop": 0.2}, "slop"),
        ("standard", {"ground": {"nope": 1}}, "nope"),
        ("standard", {"building_area": 5.0}, "building_area"),
    ],
)
def test_unknown_parameter_is_rejected(name: str, params: dict, key: str) -> None:
    for build in (get_classifier, describe_classifier):
        with pytest.raises(ValueError, match=key):
            build(name, params)


# --- trainable per-account classifier (features.py, trained.py, fitting.py) ----------------------


@pytest.fixture(scope="module")
def model(ign: tuple[PointBlock, np.ndarray]) -> TrainedModel:
    block, labels = ign
    return train([block], [labels], seed=0, ignore_classes=[1], max_points=15_000, rounds=8)


def test_features_shape_and_values(ign: tuple[PointBlock, np.ndarray]) -> None:
    block, labels = ign
    features = point_features(block)
    assert features.shape == (len(block), len(FEATURE_NAMES))
    assert features.dtype == np.float32
    assert np.isfinite(features).all()
    height = features[:, FEATURE_NAMES.index("height")]
    # Roofs and trees stand above ground; ground sits on the bare earth.
    assert np.median(height[labels == 2]) < 0.2
    assert np.median(height[labels == 6]) > 2.0
    planarity = features[:, FEATURE_NAMES.index("planarity_4")]
    assert np.median(planarity[labels == 6]) > np.median(planarity[labels == 5])


def test_features_do_not_depend_on_large_coordinate_offsets(ign: tuple[PointBlock, np.ndarray]) -> None:
    block, _ = ign
    # Multiples of 1024 m keep every power-of-two grid aligned the same way.
    moved = PointBlock(
        block.x + 512 * 1024.0,
        block.y + 4864 * 1024.0,
        block.z,
        block.intensity,
        block.return_number,
        block.number_of_returns,
    )
    np.testing.assert_allclose(point_features(moved), point_features(block), atol=1e-3)


@pytest.mark.parametrize("offset", [0.0, -1234.37, 600001.13])
def test_dyadic_cells_bin_as_every_grid_does(offset: float) -> None:
    # Coarse rasters are reduced from fine ones: they must be what binning the points at each cell
    # size gives, bit for bit, wherever the block's first cell falls (odd origins, left of zero).
    rng = np.random.default_rng(5)
    n = 3000
    x = np.round(rng.uniform(offset, offset + 37.3, n), 2)
    y = np.round(rng.uniform(-offset, -offset + 21.9, n), 2)
    block = PointBlock(x, y, rng.normal(0.0, 3.0, n))
    weights = (rng.random(n) < 0.3).astype(np.float64)
    cells = DyadicCells(block, 0.25)
    sizes = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
    sums = cells.rasters(cells.flat(0.25), weights, sizes)
    lows = cells.rasters(cells.flat(0.25), block.z, sizes, np.minimum)
    highs = cells.rasters(cells.flat(0.25), block.z, sizes, np.maximum)
    for cell in sizes:
        grid = Grid.covering(x, y, cell)
        flat = grid.flat_index(x, y)
        assert cells.grid(cell) == grid
        np.testing.assert_array_equal(cells.flat(cell), flat)
        np.testing.assert_array_equal(sums[cell].ravel(), np.bincount(flat, weights, minlength=grid.nx * grid.ny))
        for reduce, empty, raster in ((np.minimum, np.inf, lows), (np.maximum, -np.inf, highs)):
            expected = np.full(grid.nx * grid.ny, empty)
            reduce.at(expected, flat, block.z)
            np.testing.assert_array_equal(raster[cell].ravel(), expected)
    with pytest.raises(InvalidValue):
        cells.flat(0.75)


@pytest.mark.parametrize("multi", [True, False])
def test_window_columns_are_the_window_sums_per_cell_gathered(multi: bool) -> None:
    # The compiled windows must give what window sums and filters over every cell, gathered to the
    # points, gave (the features' bits, which trained models depend on): raster edges, empty cells.
    rng = np.random.default_rng(7)
    ny, nx, n = 9, 13, 400
    flat = rng.integers(0, nx * ny, n)
    flat[:5] = [0, nx - 1, nx * ny - 1, nx * (ny - 1), 0]
    z = rng.normal(0.0, 4.0, n)
    count = np.bincount(flat, minlength=nx * ny).astype(np.float64).reshape(ny, nx)
    n_multi = np.bincount(flat, rng.random(n) < 0.3, minlength=nx * ny).reshape(ny, nx)
    n_ground = np.bincount(flat, rng.random(n) < 0.5, minlength=nx * ny).reshape(ny, nx)
    low, high = np.full(nx * ny, np.inf), np.full(nx * ny, -np.inf)
    np.minimum.at(low, flat, z)
    np.maximum.at(high, flat, z)
    low, high = low.reshape(ny, nx), high.reshape(ny, nx)
    cell = 0.5
    windows = box_sum(count[None], 3).ravel()
    multi_sum = box_sum(n_multi[None], 3).ravel() if multi else np.zeros_like(windows)
    share = np.maximum(windows, 1.0)
    expected = np.stack(
        [
            (z - ndimage.minimum_filter(low, size=3, mode="nearest").ravel()[flat]).astype(np.float32),
            (ndimage.maximum_filter(high, size=3, mode="nearest").ravel()[flat] - z).astype(np.float32),
            (windows / (9.0 * cell * cell)).astype(np.float32)[flat],
            (multi_sum / share).astype(np.float32)[flat],
            (box_sum(n_ground[None], 3).ravel() / share).astype(np.float32)[flat],
        ],
        axis=1,
    )
    out = np.zeros((n, 5), dtype=np.float32, order="F")
    rasters = [count, n_multi if multi else np.empty(0), n_ground, low, high]
    _window_columns(flat, nx, ny, z, *(r.ravel() for r in rasters), 9.0 * cell * cell, *(out[:, k] for k in range(5)))
    assert out.tobytes(order="F") == np.asfortranarray(expected).tobytes(order="F")


def test_shape_columns_are_each_neighbourhoods_principal_axes() -> None:
    # Each point's 3x3-cell neighbourhood fitted by eigh of its covariance, point by point: the
    # compiled sums and closed-form eigenvalues must give the same shapes and plane distances.
    rng = np.random.default_rng(11)
    n = 600
    x, y = rng.uniform(0.0, 9.7, n), rng.uniform(0.0, 6.3, n)
    z = 0.4 * x - 0.2 * y + rng.normal(0.0, 0.05, n) + np.where(x > 5.0, rng.uniform(0.0, 3.0, n), 0.0)
    z[:4] = 7.0  # four lone points far above their neighbours: planes that do not fit
    block = PointBlock(x, y, z)
    grid = Grid.covering(x, y, 1.0)
    flat = grid.flat_index(x, y)
    out = np.zeros((n, 5), dtype=np.float32, order="F")
    _shapes(block, z, grid, flat, out)
    col, row = flat % grid.nx, flat // grid.nx
    for p in rng.choice(n, 60, replace=False):
        near = (np.abs(col - col[p]) <= 1) & (np.abs(row - row[p]) <= 1)
        points = np.stack([x[near], y[near], z[near]])
        values, vectors = np.linalg.eigh(np.cov(points, bias=True))
        small, middle, large = values
        normal = vectors[:, 0]
        expected = [
            (large - middle) / large,
            (middle - small) / large,
            small / large,
            1.0 - abs(normal[2]),
            abs(np.dot(normal, [x[p], y[p], z[p]] - points.mean(axis=1))),
        ]
        np.testing.assert_allclose(out[p], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n", [0, 1, 5])
def test_features_on_tiny_blocks(n: int) -> None:
    block = PointBlock(np.full(n, 3.0), np.full(n, 4.0), np.arange(n, dtype=np.float64))
    features = point_features(block)
    assert features.shape == (n, len(FEATURE_NAMES))
    assert np.isfinite(features).all()


def test_training_reports_holdout_metrics(model: TrainedModel) -> None:
    assert 1 not in model.classes
    assert {2, 5, 6} <= set(model.classes)
    assert model.n_train > 0 and model.n_holdout > 0
    for scores in model.metrics.values():
        assert set(scores) == {"precision", "recall", "f1", "support"}
        assert all(0.0 <= scores[k] <= 1.0 for k in ("precision", "recall", "f1"))
    assert model.metrics[2]["f1"] > 0.9
    assert model.metrics[6]["f1"] > 0.6


def test_training_is_deterministic(ign: tuple[PointBlock, np.ndarray], model: TrainedModel) -> None:
    block, labels = ign
    again = train([block], [labels], seed=0, ignore_classes=[1], max_points=15_000, rounds=8)
    np.testing.assert_array_equal(again.predict(block), model.predict(block))
    assert again.metrics == model.metrics


def test_round_trip_and_signature(ign: tuple[PointBlock, np.ndarray], model: TrainedModel) -> None:
    block, _ = ign
    expected = model.predict(block)
    plain = TrainedModel.from_bytes(model.to_bytes())
    np.testing.assert_array_equal(plain.predict(block), expected)
    seal = Seal(b"secret", "acme", "model-1")
    signed = model.to_bytes(seal)
    np.testing.assert_array_equal(TrainedModel.from_bytes(signed, seal).predict(block), expected)
    with pytest.raises(ValueError, match="signature"):
        TrainedModel.from_bytes(signed, Seal(b"other", "acme", "model-1"))
    tampered = bytearray(signed)
    tampered[-10] ^= 0xFF
    with pytest.raises(ValueError, match="signature"):
        TrainedModel.from_bytes(bytes(tampered), seal)
    with pytest.raises(ValueError, match="not a pointflow"):
        TrainedModel.from_bytes(b"garbage")


@pytest.fixture(scope="module")
def walked(ign: tuple[PointBlock, np.ndarray], model: TrainedModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The IGN block's features, the model's head start on them and its classes walking every tree."""
    features = point_features(ign[0])
    start = model.head_start(features[:, STANDARD_COLUMN])
    return features, start, dataclasses.replace(model, cascade=[], prune=[]).predict_features(features)


def test_the_cascade_changes_at_most_its_tolerance_on_the_points_it_was_chosen_on(
    walked: tuple[np.ndarray, np.ndarray, np.ndarray], model: TrainedModel
) -> None:
    features, start, every_tree = walked
    # Without a tolerance, no point of those it was chosen on is decided otherwise.
    strict = choose_cascade(model.booster, features, start, tolerance=0.0, max_stages=1)
    ((rounds, margin),) = strict
    assert 0 < rounds < model.booster.current_iteration()
    np.testing.assert_array_equal(
        dataclasses.replace(model, cascade=strict, prune=[]).predict_features(features), every_tree
    )
    # A smaller margin decides points the remaining trees would have changed (else the margin
    # chosen was not the least that changes nothing).
    looser = dataclasses.replace(model, cascade=[(rounds, margin * 0.5)], prune=[])
    assert (looser.predict_features(features) != every_tree).any()
    # With one, each stage decides at most that share of each class's points otherwise.
    stages = choose_cascade(model.booster, features, start, tolerance=0.01, max_stages=3)
    assert 1 <= len(stages) <= 3
    assert [r for r, _ in stages] == sorted({r for r, _ in stages})
    changed = dataclasses.replace(model, cascade=stages, prune=[]).predict_features(features) != every_tree
    for code in np.unique(every_tree):
        of_class = every_tree == code
        assert np.count_nonzero(changed & of_class) <= int(0.01 * np.count_nonzero(of_class)) * len(stages)


def test_dropped_classes_change_at_most_their_tolerance_on_the_points_they_were_chosen_on(
    walked: tuple[np.ndarray, np.ndarray, np.ndarray], model: TrainedModel
) -> None:
    features, start, every_tree = walked
    stages = choose_cascade(model.booster, features, start, tolerance=0.0, max_stages=2)
    assert len(stages) == 2
    # Without a tolerance no point's class is dropped: the same classes as walking every tree.
    strict = choose_pruning(model.booster, features, start, stages, tolerance=0.0)
    assert len(strict) == len(stages) and strict[0] > 0
    pruned = dataclasses.replace(model, cascade=stages, prune=strict)
    np.testing.assert_array_equal(pruned.predict_features(features), every_tree)
    # ... and they drop classes, so walk fewer trees: some points' scores are not every class's.
    unpruned = dataclasses.replace(model, cascade=stages, prune=[])
    assert (pruned.scores(features) != unpruned.scores(features)).any()
    # Smaller gaps drop the class some points end with (else the gap chosen was not the least).
    smaller = dataclasses.replace(model, cascade=stages, prune=[gap * 0.5 for gap in strict])
    assert (smaller.predict_features(features) != every_tree).any()
    # With a tolerance, each stage drops at most that share of each class's points' own class.
    loose = choose_pruning(model.booster, features, start, stages, tolerance=0.01)
    assert all(a <= b for a, b in zip(loose, strict, strict=True))
    changed = dataclasses.replace(model, cascade=stages, prune=loose).predict_features(features) != every_tree
    for code in np.unique(every_tree):
        of_class = every_tree == code
        assert np.count_nonzero(changed & of_class) <= int(0.01 * np.count_nonzero(of_class)) * len(stages)
    with pytest.raises(InvalidValue, match="pruning gap"):
        dataclasses.replace(model, cascade=stages, prune=strict[:1]).scores(features)


def test_the_cascade_is_the_cheapest_plan_of_its_stages(
    ign: tuple[PointBlock, np.ndarray], model: TrainedModel
) -> None:
    """Every plan of up to two stages, walked with LightGBM's scores and margins as the docstring of
    `choose_cascade` defines them: the chosen one costs the least trees of its size, and its size is
    the fewest stages within a tenth of what more would save."""
    block, _ = ign
    features = point_features(block)
    start = model.head_start(features[:, STANDARD_COLUMN])
    booster = model.booster
    total, per_round = booster.current_iteration(), booster.num_trees() // booster.current_iteration()
    after = [start.copy()]
    for rounds in range(total):
        after.append(after[-1] + booster.predict(features, raw_score=True, start_iteration=rounds, num_iteration=1))
    full = after[-1].argmax(1)
    allowed = (0.01 * np.bincount(full)).astype(int)

    def cost(stages: tuple[int, ...]) -> tuple[float, list[tuple[int, float]]]:
        walking, done, trees, plan = np.ones(len(features), dtype=bool), 0, 0.0, []
        for rounds in stages:
            trees += walking.sum() * (per_round * (rounds - done) + STAGE_TREES)
            ahead, wrong = lead(after[rounds]), walking & (after[rounds].argmax(1) != full)
            margin = 0.0
            for code in np.unique(full[wrong]):
                leads = np.sort(ahead[wrong & (full == code)])[::-1]
                if allowed[code] < leads.size:
                    margin = max(margin, float(leads[allowed[code]]))
            walking &= ahead <= margin
            done = rounds
            plan.append((rounds, margin))
        return (trees + walking.sum() * per_round * (total - done)) / len(features), plan

    best = [min(cost(stages)[0] for stages in itertools.combinations(range(1, total), size)) for size in (0, 1, 2)]
    size = 0
    for more in (1, 2):
        if best[more] < 0.9 * best[size]:
            size = more
    chosen = choose_cascade(booster, features, start, max_stages=2)
    assert len(chosen) == size
    spent, plan = cost(tuple(rounds for rounds, _ in chosen))
    assert spent == pytest.approx(best[size], rel=1e-12)
    np.testing.assert_allclose(np.array(plan), np.array(chosen), rtol=1e-12)


def lightgbm_scores(model: TrainedModel, features: np.ndarray) -> np.ndarray:
    """The scores as LightGBM's predict gave them before the compiled walker: stage by stage on the
    points still walking, each of their classes further behind the best than the stage's pruning
    gap (if any) left with its score, and a point with one class left stopped."""
    scores = model.head_start(features[:, STANDARD_COLUMN])
    alive = np.ones(scores.shape, dtype=bool)
    walking, done = np.arange(len(features)), 0
    gaps = model.prune or [np.inf] * len(model.cascade)
    for (rounds, margin), gap in zip(
        [*model.cascade, (model.booster.current_iteration(), np.inf)], [*gaps, np.inf], strict=True
    ):
        if walking.size == 0:
            break
        scores[walking] += alive[walking] * model.booster.predict(
            features[walking], raw_score=True, num_threads=1, start_iteration=done, num_iteration=rounds - done
        )
        walking, done = walking[lead(scores[walking]) <= margin], rounds
        alive[walking] &= scores[walking].max(axis=1, keepdims=True) - scores[walking] <= gap
        walking = walking[alive[walking].sum(axis=1) > 1]
    return scores


def test_the_compiled_trees_give_lightgbms_scores_on_real_points(
    ign: tuple[PointBlock, np.ndarray], model: TrainedModel
) -> None:
    block, _ = ign
    features = point_features(block)
    # Every tree: the raw scores are LightGBM's (the walker adds in LightGBM's order: the same bits).
    every_tree = dataclasses.replace(model, cascade=[], prune=[])
    expected = lightgbm_scores(every_tree, features)
    np.testing.assert_allclose(every_tree.scores(features), expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(every_tree.predict_features(features), np.asarray(model.classes)[expected.argmax(1)])
    # With the early decisions, also a stopped point's scores, so the same classes.
    assert model.cascade
    expected = lightgbm_scores(model, features)
    np.testing.assert_allclose(model.scores(features), expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(model.predict_features(features), np.asarray(model.classes)[expected.argmax(1)])
    # The features come column-major, walked a block of rows at a time (the last one partial): the
    # same scores as the whole matrix copied row-major at once.
    assert features.flags.f_contiguous and len(features) % ROWS
    np.testing.assert_array_equal(model.scores(np.ascontiguousarray(features)), model.scores(features))
    # A loaded model walks the trees of the file it was loaded from.
    loaded = TrainedModel.from_bytes(model.to_bytes())
    np.testing.assert_array_equal(loaded.scores(features), model.scores(features))
    with pytest.raises(InvalidValue, match="features"):
        model.forest.scores(features[:, :10], model.head_start(features[:, STANDARD_COLUMN]), model.cascade)


@pytest.mark.parametrize("zero_as_missing", [False, True])
def test_the_compiled_trees_decide_categories_missing_values_and_zeros_as_lightgbm(zero_as_missing: bool) -> None:
    lightgbm = pytest.importorskip("lightgbm")
    rng = np.random.default_rng(3)
    n = 4000
    x = rng.normal(size=(n, 4)).astype(np.float32)
    x[:, 3] = rng.integers(0, 40, n)  # a category, codes beyond one 32-bit word of the bitset
    x[rng.random(n) < 0.1, 0] = np.nan  # missing values: splits with a default side
    x[rng.random(n) < 0.2, 1] = 0.0
    y = ((x[:, 1] > 0) + (x[:, 3] % 3 == 0) + np.nan_to_num(x[:, 0] > 0.5)).astype(int)
    booster = lightgbm.train(
        {
            "objective": "multiclass",
            "num_class": 3,
            "num_leaves": 15,
            "min_data_in_leaf": 5,
            "zero_as_missing": zero_as_missing,
            "verbose": -1,
        },
        lightgbm.Dataset(x, y, categorical_feature=[3]),
        num_boost_round=6,
    )
    forest = Forest.from_model_string(booster.model_to_string())
    assert (forest.decision & 1).any(), "a categorical split"
    # Splits with a default side: for NaN, or for zero and NaN alike (zero_as_missing).
    assert ((forest.decision >> 2) & 3 == (1 if zero_as_missing else 2)).any()
    # Splits at minus the zero threshold, where the float32 comparison would differ, are decided in double.
    assert zero_as_missing or (((forest.decision & 13) == 0) & ~forest.plain).any()
    probe = rng.normal(size=(n, 4)).astype(np.float32)
    probe[:, 3] = rng.integers(-2, 70, n)  # negative and unseen codes go right
    probe[rng.random(n) < 0.1, 0] = np.nan
    probe[rng.random(n) < 0.1, 3] = np.nan
    tiny = rng.random(n) < 0.2
    # At and within LightGBM's zero threshold, which is itself a threshold of some splits.
    probe[tiny, 1] = rng.choice(np.float32([0.0, -0.0, 1e-36, -1e-36, -1e-35, 1e-35, 1e-30]), np.count_nonzero(tiny))
    probe[:50, 2] = np.float32(-1e-36)  # within LightGBM's zero threshold: zero to its predictor
    scores = np.zeros((n, 3))
    forest.scores(probe, scores, [])
    np.testing.assert_allclose(scores, booster.predict(probe, raw_score=True, num_threads=1), rtol=0, atol=1e-12)


def test_the_cascade_is_kept_in_the_signed_file_and_older_files_walk_every_tree(
    ign: tuple[PointBlock, np.ndarray], model: TrainedModel
) -> None:
    block, _ = ign
    assert model.cascade, "training chooses early decisions on its held-out blocks"
    assert (model.params["early_tolerance"], model.params["early_stages"]) == (EARLY_TOLERANCE, EARLY_STAGES)
    assert TrainedModel.from_bytes(model.to_bytes(SEAL), SEAL).cascade == model.cascade
    assert model.prune and len(model.prune) == len(model.cascade)
    assert TrainedModel.from_bytes(model.to_bytes(SEAL), SEAL).prune == model.prune
    # A file written before classes were dropped: its header has no "prune"; every class walks on.
    data = dataclasses.replace(model, prune=[]).to_bytes()
    header, _, text = zlib.decompress(data[len(FORMAT) + 1 :]).partition(b"\n")
    older = json.loads(header)
    del older["prune"]
    loaded = TrainedModel.from_bytes(FORMAT + b"\x00" + zlib.compress(json.dumps(older).encode() + b"\n" + text))
    assert (loaded.cascade, loaded.prune) == (model.cascade, [])
    np.testing.assert_array_equal(
        loaded.scores(point_features(block)), dataclasses.replace(model, prune=[]).scores(point_features(block))
    )
    # A file written before the cascade existed: its header has no "cascade".
    data = dataclasses.replace(model, cascade=[], prune=[]).to_bytes()
    header, _, text = zlib.decompress(data[len(FORMAT) + 1 :]).partition(b"\n")
    older = json.loads(header)
    del older["cascade"]
    payload = zlib.compress(json.dumps(older).encode() + b"\n" + text)
    loaded = TrainedModel.from_bytes(FORMAT + b"\x00" + payload)
    assert loaded.cascade == []
    np.testing.assert_array_equal(
        loaded.predict(block), dataclasses.replace(model, cascade=[], prune=[]).predict(block)
    )


def test_trained_classifier_protocol(ign: tuple[PointBlock, np.ndarray], model: TrainedModel) -> None:
    block, labels = ign
    classifier = TrainedClassifier(model, name="acme-2024", version="3")
    assert isinstance(classifier, Classifier)
    assert (classifier.name, classifier.version) == ("acme-2024", "3")
    classes = classifier.classify(block)
    assert classes.dtype == np.uint8 and classes.shape == (len(block),)
    scored = labels != 1
    assert np.mean(classes[scored] == labels[scored]) > 0.8
    empty = PointBlock(np.empty(0), np.empty(0), np.empty(0))
    assert classifier.classify(empty).shape == (0,)


def test_train_rejects_bad_input(ign: tuple[PointBlock, np.ndarray]) -> None:
    block, labels = ign
    with pytest.raises(ValueError):
        train([block], [labels[:-1]])
    with pytest.raises(ValueError):
        train([], [])


def ground_errors(block: PointBlock, labels: np.ndarray, scored: np.ndarray) -> tuple[float, float]:
    """(total error, share of non-ground points called ground) of the ground filter."""
    ground = get_classifier("ground").classify(block) == 2
    reference = labels == 2
    return (float(np.mean(ground[scored] != reference[scored])), float(np.mean(ground[scored & ~reference])))


def relief(block: PointBlock, dz: np.ndarray) -> PointBlock:
    return PointBlock(block.x, block.y, block.z + dz, block.intensity, block.return_number, block.number_of_returns)


# Measured on this block: total error 1.0 % flat; 1.6 / 3.2 / 7.6 % at 20 / 35 / 50 degrees (SMRF with
# PDAL's defaults: 4.7 / 12.4 / 24.6 % on the whole file at 20 / 35 / 50 degrees).
@pytest.mark.parametrize(
    ("degrees", "extra_error", "buildings_as_ground"), [(20, 0.01, 0.02), (35, 0.03, 0.06), (50, 0.08, 0.15)]
)
def test_steep_terrain_stays_ground_and_buildings_stay_objects(
    degrees: int, extra_error: float, buildings_as_ground: float, ign: tuple[PointBlock, np.ndarray]
) -> None:
    """The same houses and gardens on a hillside: the terrain tilted, everything on it too."""
    block, labels = ign
    scored = labels != 1
    flat_error, _ = ground_errors(block, labels, scored)
    tilted = relief(block, np.tan(np.radians(degrees)) * (block.x - block.x.min()))
    error, _ = ground_errors(tilted, labels, scored)
    assert error < flat_error + extra_error
    classes = get_classifier("ground").classify(tilted)
    assert np.mean(classes[labels == 6] == 2) < buildings_as_ground


def test_terraces_either_side_of_a_cliff_are_ground(ign: tuple[PointBlock, np.ndarray]) -> None:
    block, labels = ign
    scored = labels != 1
    flat_error, _ = ground_errors(block, labels, scored)
    step = relief(block, 15.0 * (block.x > np.median(block.x)))
    error, objects_as_ground = ground_errors(step, labels, scored)
    assert error < flat_error + 0.015
    assert objects_as_ground < 0.015


def test_refinement_rejects_low_vegetation_the_first_guess_accepts() -> None:
    """IGN labels grass and shrubs a few centimetres above the ground as low vegetation (3): the
    refined surface and its tight tolerance turn most of what the morphological first guess
    accepts back into objects, without losing ground."""
    from pipelines.classifiers.ground import GroundParams, fit_surface, ground_model

    block, labels = load("corpus/IGN_crop2_rural_wood_water.laz")
    keep = np.flatnonzero((block.x < block.x.min() + 30) & (labels != 9) & (labels < 64))
    block, labels = block.take(keep), labels[keep]
    params = GroundParams()
    first_guess = fit_surface(block, params).first_guess
    refined = ground_model(block, params).is_ground
    low_vegetation = labels == 3
    ground = labels == 2
    assert np.mean(refined[low_vegetation]) < 0.5 * np.mean(first_guess[low_vegetation])
    assert np.mean(refined[ground]) > 0.97


def test_walls_and_lower_roofs_beside_a_roof_are_building() -> None:
    """AHN3 labels facades and lower roof parts building; they fail the roof votes (multi-returns,
    ground in view) but lie flat beside a roof. Trees beside the houses of Grenoble do not."""
    amsterdam, labels = load("corpus/AHN3_amsterdam_2386_9702.laz")
    classes = get_classifier("standard").classify(amsterdam)
    without = get_classifier("standard", {"wall_reach": 0.0}).classify(amsterdam)
    assert f1(labels == 6, classes == 6) > 0.93
    assert f1(labels == 6, classes == 6) > f1(labels == 6, without == 6) + 0.05

    grenoble, labels = load("corpus/IGN_bat_grenoble.laz")
    classes = get_classifier("standard").classify(grenoble)
    called_building = classes == 6
    assert np.mean(labels[called_building] == 6) > 0.85  # precision: trees stay vegetation


def _reference_brute_force(zmin: np.ndarray, row: int, col: int, size: int) -> list[float]:
    """The two references of a cell: the 3rd-lowest of its size x size window, and the 2nd-lowest
    of the minima of the eight blocks around the block centred on it (outside: +inf)."""
    block = 2 * (size // 4) + 1
    half = size // 2 + 2 * block
    padded = np.pad(np.nan_to_num(zmin, nan=np.inf), half, constant_values=np.inf)
    r, c = row + half, col + half
    window = padded[r - size // 2 : r + size // 2 + 1, c - size // 2 : c + size // 2 + 1]
    minima = [
        padded[
            r + dr * block - block // 2 : r + dr * block + block // 2 + 1,
            c + dc * block - block // 2 : c + dc * block + block // 2 + 1,
        ].min()
        for dr in (-1, 0, 1)
        for dc in (-1, 0, 1)
        if dr or dc
    ]
    return [float(np.sort(window, axis=None)[2]), float(np.sort(minima)[1])]


@pytest.mark.parametrize(("size", "empty", "rounds"), [(5, 0.0, 1), (5, 0.6, 3), (11, 0.95, 3)])
def test_low_outliers_are_cells_far_below_their_neighbourhood(size: int, empty: float, rounds: int) -> None:
    """Below the 3rd-lowest of the window, or the 2nd-lowest minimum of the ring of blocks
    around the cell's own block, round after round on what the previous rounds left."""
    from pipelines.classifiers.ground import remove_low_outliers

    rng = np.random.default_rng(size)
    zmin = rng.normal(0.0, 1.0, (40, 33))
    zmin[rng.random(zmin.shape) < empty] = np.nan
    # Pits in clusters of two to four cells, which hide each other from the window's test.
    for row, col in rng.integers(3, 30, (6, 2)):
        zmin[row : row + 2, col : col + rng.integers(1, 3)] = -6.0
    expected = zmin.copy()
    for _ in range(rounds):
        found = [
            (row, col)
            for row, col in zip(*np.nonzero(np.isfinite(expected)), strict=True)
            if any(
                np.isfinite(reference) and expected[row, col] < reference - 1.0
                for reference in _reference_brute_force(expected, row, col, size)
            )
        ]
        for row, col in found:
            expected[row, col] = np.nan
    np.testing.assert_array_equal(remove_low_outliers(zmin, 1.0, size, rounds), expected)


@pytest.mark.parametrize(("share", "cluster"), [(0.005, 1), (0.005, 4), (0.002, 10)])
def test_frequent_and_clustered_low_noise_leaves_the_ground_as_it_was(
    ign: tuple[PointBlock, np.ndarray], share: float, cluster: int
) -> None:
    """Low points 2-20 m down, scattered or in clusters of a few points (a pulse's multipath):
    left in, each pit drags the opened terrain down over the whole window (the IGN crop with 10-point
    clusters went from 0.8 % to 14.5 % total error)."""
    from benchmarks.low_noise import Noise, with_low_noise

    block, labels = ign
    noisy = with_low_noise(block, Noise(share, cluster))
    ground = get_classifier("ground")
    scored = labels != 1
    clean = np.mean((ground.classify(block)[scored] == 2) != (labels[scored] == 2))
    classes = ground.classify(noisy)
    with_noise = np.mean((classes[: len(block)][scored] == 2) != (labels[scored] == 2))
    assert with_noise < clean + 0.005
    # A point 2 m below a steep slope can lie on the terrain further down: allow a few.
    assert np.mean(classes[len(block) :] == 2) < 0.1


def test_tree_crowns_above_the_eaves_are_not_building() -> None:
    """Grenoble's trees overhang the roofs: the crown points within the edge margin of a roof but
    more than 2 m above it are vegetation, the eaves and walls below stay building."""
    grenoble, labels = load("corpus/IGN_bat_grenoble.laz")
    classes = get_classifier("standard").classify(grenoble)
    whole_margin = get_classifier("standard", {"margin_above_roof": 1000.0}).classify(grenoble)
    dropped = (whole_margin == 6) & (classes != 6)
    assert np.count_nonzero(dropped) > 500
    assert np.mean(labels[dropped] == 5) > 0.95
    assert f1(labels == 6, classes == 6) > f1(labels == 6, whole_margin == 6) + 0.01


def test_planar_roof_smaller_than_the_area_floor_is_building() -> None:
    """A Grenoble annex whose roof passes the votes on only 6.7 m^2 (below the 10 m^2 floor that
    keeps crowns out) is building: nearly all its points lie on a plane."""
    block, labels = load("corpus/IGN_bat_grenoble.laz")
    keep = np.flatnonzero((block.x < block.x.min() + 25) & (block.y < block.y.min() + 20))
    block, labels = block.take(keep), labels[keep]
    annex = (block.x < block.x.min() + 9) & (block.y < block.y.min() + 3.5) & (labels == 6)
    classes = get_classifier("standard").classify(block)
    # The last-return pass finds about half of this annex on its own: off, to test the area rule.
    area_floor_only = get_classifier("standard", {"planar_min_area": 10.0, "last_return_cell_factor": 0.0}).classify(
        block
    )
    assert np.count_nonzero(annex) > 300
    assert np.mean(classes[annex] == 6) > 0.8
    assert np.mean(area_floor_only[annex] == 6) < 0.2


def flatfield_shed_crop() -> tuple[PointBlock, np.ndarray]:
    """50 m around the building points of the IGN flat-field strip (its shed and the structure
    under trees beside it), with their labels."""
    block, labels = load("corpus/IGN_flatfield_strip.laz")
    shed = labels == 6
    cx, cy = block.x[shed].mean(), block.y[shed].mean()
    keep = np.flatnonzero((np.abs(block.x - cx) < 25) & (np.abs(block.y - cy) < 25))
    return block.take(keep), labels[keep]


def amsterdam_split_pulse_roof_crop() -> tuple[PointBlock, np.ndarray]:
    """20 m around the low roof among split pulses at the west edge of AHN3 Amsterdam 2386, with
    its labels."""
    block, labels = load("corpus/AHN3_amsterdam_2386_9702.laz")
    x0, y0 = block.x.min(), block.y.min()
    keep = np.flatnonzero((block.x < x0 + 20) & (np.abs(block.y - y0 - 33.7) < 10))
    return block.take(keep), labels[keep]


def building_a_rule_adds(block: PointBlock, params: dict, rule_off: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standard's classes with `params`, its classes with `rule_off` on top of them, and the points
    that are building only with the rule."""
    classes = get_classifier("standard", params).classify(block)
    without = get_classifier("standard", {**params, **rule_off}).classify(block)
    return classes, without, (classes == 6) & (without != 6)


def test_low_planar_shed_is_building() -> None:
    """The 2.3 m shed of the IGN flat-field strip is lower on average than the 2.5 m that keeps
    hedges out, but planar: building.  Its crop holds nothing else called building."""
    block, labels = flatfield_shed_crop()
    classes = get_classifier("standard").classify(block)
    height_floor_only = get_classifier("standard", {"planar_min_mean_height": 2.5}).classify(block)
    assert f1(labels == 6, classes == 6) > 0.7
    assert np.mean(labels[classes == 6] == 6) > 0.85
    assert not np.any(height_floor_only == 6)


def test_a_roof_among_split_pulses_is_building_from_its_last_returns() -> None:
    """A low roof at the west edge of Amsterdam 2386 (2.7 m, about 12 m^2) lies where half the
    pulses split (trees, edges): the roof votes' multi-return test fails there.  The last returns
    alone lie on a plane with no ground among them, so the last-return pass makes them building,
    and only points its producer labels building."""
    block, labels = amsterdam_split_pulse_roof_crop()
    classes, without, added = building_a_rule_adds(block, {}, {"last_return_cell_factor": 0.0})
    assert np.count_nonzero(added) > 50
    assert np.all(labels[added] == 6)
    assert f1(labels == 6, classes == 6) > f1(labels == 6, without == 6) + 0.005


def test_a_small_roof_seen_through_a_crown_is_building() -> None:
    """Beside the flat-field shed a second structure (under 10 m^2 of planar last-return cells) lies
    under trees: most of its points end multi-return pulses.  Seen through the crown it passes the
    smaller floor; a segment of single echoes that small (a trimmed hedge) would not."""
    block, labels = flatfield_shed_crop()
    # The segments themselves: their growth along their planes is tested below.
    classes, open_only, added = building_a_rule_adds(
        block, {"last_return_growth": 0.0}, {"last_return_under_crown": 2.0}
    )
    assert np.count_nonzero(added) > 60
    assert np.mean(labels[added] == 6) > 0.9
    assert f1(labels == 6, classes == 6) > f1(labels == 6, open_only == 6) + 0.05


# The growth's tests without the roof continuation, which takes in some of the same points.
NO_CONTINUATION = {"continuation_tolerance": 0.0}


def test_a_roof_under_trees_is_grown_along_its_plane_from_its_last_returns() -> None:
    """The flat-field structure under trees is a pitched roof: its planar last-return segments
    hold only part of it (the cells over the ridge and the edges are not planar, or see ground
    beside them).  Its other last returns lie on the plane of the nearest segment cell, extended:
    they are building, and the crown above them stays vegetation."""
    block, labels = flatfield_shed_crop()
    classes, segments_only, added = building_a_rule_adds(block, NO_CONTINUATION, {"last_return_growth": 0.0})
    assert np.count_nonzero(added) > 80
    assert np.mean(labels[added] == 6) > 0.75
    assert np.all(block.return_number[added] == block.number_of_returns[added])
    assert f1(labels == 6, classes == 6) > 0.9 > f1(labels == 6, segments_only == 6) + 0.05


def test_a_low_roof_among_split_pulses_is_grown_to_its_edges() -> None:
    """Amsterdam 2386's low roof among split pulses (see above): the last returns around its
    segments that lie on their planes are the rest of that roof, all labelled building."""
    block, labels = amsterdam_split_pulse_roof_crop()
    classes, segments_only, added = building_a_rule_adds(block, NO_CONTINUATION, {"last_return_growth": 0.0})
    assert np.count_nonzero(added) > 50
    assert np.all(labels[added] == 6)
    assert f1(labels == 6, classes == 6) > f1(labels == 6, segments_only == 6) + 0.005


def test_an_open_last_return_segment_is_not_grown() -> None:
    """On Saint-Barthelemy's east edge a ramp 2-3 m above the ground model (labelled ground and
    unclassified) is an open last-return segment: grown along its plane it takes in 250 more of the
    ramp's points.  With a growth share of 0.5 only segments seen through a crown grow, and it stays
    as it was."""
    block, labels = load("ign_st_barth_100m.laz")
    keep = np.flatnonzero((block.x >= block.x.min() + 50) & (block.y < block.y.min() + 50))
    block, labels = block.take(keep), labels[keep]
    classes = get_classifier("standard", {**NO_CONTINUATION, "last_return_growth_under_crown": 0.5}).classify(block)
    every_segment = get_classifier("standard", {**NO_CONTINUATION, "last_return_growth_under_crown": 0.0}).classify(
        block
    )
    no_growth = get_classifier("standard", {**NO_CONTINUATION, "last_return_growth": 0.0}).classify(block)
    grown = (every_segment == 6) & (classes != 6)
    assert np.count_nonzero(grown) > 200
    assert not np.any(labels[grown] == 6)
    assert np.count_nonzero(labels[grown] == 2) > 50
    np.testing.assert_array_equal(classes, no_growth)


def test_last_returns_at_the_height_of_the_roof_beside_them_are_building() -> None:
    """The flat-field shed's edges: where its neighbourhoods mix with the crown, neither the plane
    fits nor the votes hold, yet last returns there lie at the height of the roof points around
    them (within 0.2 m of their mean, 0.5 m around): they continue the roof."""
    block, labels = flatfield_shed_crop()
    classes, without, added = building_a_rule_adds(block, {}, {"continuation_tolerance": 0.0})
    assert np.count_nonzero(added) >= 15
    assert np.mean(labels[added] == 6) > 0.8
    assert np.all(block.return_number[added] == block.number_of_returns[added])
    assert f1(labels == 6, classes == 6) > f1(labels == 6, without == 6) + 0.01


def test_the_roof_continues_on_another_source_too() -> None:
    """Amsterdam 2397's south-west: about 100 last returns at the height of the roofs beside them,
    all but one labelled building."""
    block, labels = load("corpus/AHN3_amsterdam_2397_9705.laz")
    keep = np.flatnonzero((block.x < block.x.min() + 60) & (block.y < block.y.min() + 20))
    block, labels = block.take(keep), labels[keep]
    classes, without, added = building_a_rule_adds(block, {}, {"continuation_tolerance": 0.0})
    assert np.count_nonzero(added) > 80
    assert np.mean(labels[added] == 6) > 0.98
    assert f1(labels == 6, classes == 6) > f1(labels == 6, without == 6) + 0.003


def test_the_standard_version_is_kept_in_the_signed_file_and_another_one_still_predicts(
    ign: tuple[PointBlock, np.ndarray], model: TrainedModel
) -> None:
    block, _ = ign
    assert model.standard_version == StandardClassifier.version
    assert model.evaluation["standard_version"] == StandardClassifier.version
    loaded = TrainedModel.from_bytes(model.to_bytes(SEAL), SEAL)
    assert loaded.standard_version == StandardClassifier.version
    assert TrainedClassifier(loaded, name="m", version="1").params["standard_version"] == StandardClassifier.version
    expected = model.predict(block)
    # Trained against another release of standard: it still loads and predicts the same way.
    other = TrainedModel.from_bytes(dataclasses.replace(model, standard_version="1.0.0").to_bytes(SEAL), SEAL)
    assert other.standard_version == "1.0.0"
    np.testing.assert_array_equal(other.predict(block), expected)
    # A file written before the version was recorded: its header has no "standard_version".
    header, _, text = zlib.decompress(model.to_bytes()[len(FORMAT) + 1 :]).partition(b"\n")
    older = json.loads(header)
    del older["standard_version"]
    loaded = TrainedModel.from_bytes(FORMAT + b"\x00" + zlib.compress(json.dumps(older).encode() + b"\n" + text))
    assert loaded.standard_version == "unknown"
    np.testing.assert_array_equal(loaded.predict(block), expected)


def test_a_model_of_other_features_is_refused_with_retrain(model: TrainedModel) -> None:
    with pytest.raises(ValueError, match="retrain it"):
        TrainedModel.from_bytes(dataclasses.replace(model, features_version="3").to_bytes())
    with pytest.raises(ValueError, match="retrain it"):
        TrainedModel.from_bytes(dataclasses.replace(model, feature_names=model.feature_names[:-1]).to_bytes())
