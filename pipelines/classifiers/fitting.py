"""Fitting a custom classifier to a customer's labels, and judging it: `train` returns a
`TrainedModel` whose `to_bytes` the caller stores wherever it likes (pure functions, no storage).

`train` also says whether the model is worth offering: on a spatially held-out part of the labels
(whole 20 m blocks) it scores the model and the standard classifier side by side on the same points,
per class. Standard's classes are first translated into the customer's scheme (each standard class
becomes the customer class most of its training points carry: AHN's "other" 1 takes standard's
vegetation 3/4/5), so that standard is credited with what it knows rather than failed for naming it
differently.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from pipelines.errors import InvalidValue
from pipelines.tile import MIN_TILE_POINTS, TileGrid

from .base import PointBlock
from .features import CATEGORICAL, FEATURE_NAMES, point_features
from .standard import StandardClassifier
from .trained import (
    EARLY_STAGES,
    EARLY_TOLERANCE,
    FEATURES_VERSION,
    STAGE_TREES,
    STANDARD_COLUMN,
    ClassMetrics,
    TrainedModel,
    choose_cascade,
    choose_pruning,
    load_lightgbm,
)

HOLDOUT_BLOCK = 20.0  # metres; held-out points are whole blocks, not neighbours of training points
# Training computes features tile by tile, each tile with its buffer ring, as classification does:
# a file's rasters then cover one tile at a time, so memory follows the tile and not the file's
# extent (a 4.9 km square of only 20,000 labelled points took 9.8 GB and 53 s computed whole; a
# 1 km one 0.65 GB). 1 km, where classification uses 200 m: every scene of the benchmarks is one
# training tile, so their features, and models, are those of the whole file.
TRAINING_TILE = 1_000.0
# Held-out points a class needs for its F1 to count in the verdict: the blocks are drawn at random,
# and a rare class may get a handful of them, whose F1 (0 or 1 on a few points) would decide "better
# than standard" for every class: IGN_crop1_rural's held-out blocks held 7 points of class 4 and 1 of
# class 5, and standard's 0.42 on those 7 outweighed the model's lead on the classes of thousands.
MIN_JUDGED_POINTS = 100
# Classes one model learns: LightGBM fits a tree per class and round, and a model walks them for every
# point it classifies. On the IGN west half, 5 classes fit in 2 CPU-s and trained in 5; 254 classes
# took 3 CPU-s a round and were still choosing the cascade after 4.5 CPU-minutes (65: 10 minutes on
# a loaded machine). No published scheme comes near this (ASPRS defines 19 codes).
MAX_CLASSES = 64


def per_class_metrics(reference: np.ndarray, predicted: np.ndarray) -> ClassMetrics:
    metrics: ClassMetrics = {}
    for code in np.union1d(np.unique(reference), np.unique(predicted)):
        tp = np.count_nonzero((reference == code) & (predicted == code))
        n_pred = np.count_nonzero(predicted == code)
        n_ref = np.count_nonzero(reference == code)
        metrics[int(code)] = {
            "precision": float(tp / n_pred) if n_pred else 0.0,
            "recall": float(tp / n_ref) if n_ref else 0.0,
            "f1": float(2 * tp / (n_pred + n_ref)) if n_pred + n_ref else 0.0,
            "support": float(n_ref),
        }
    return metrics


def macro_f1(metrics: ClassMetrics) -> float:
    """Mean F1 over the classes the reference holds (a class only predicted is a false positive
    of the others, already counted in their precision)."""
    scores = [m["f1"] for m in metrics.values() if m["support"] > 0]
    return float(np.mean(scores)) if scores else 0.0


def holdout_mask(x: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Points of a random `fraction` of the 20 m blocks (at least one block, never all)."""
    bx = np.floor(x / HOLDOUT_BLOCK).astype(np.int64)
    by = np.floor(y / HOLDOUT_BLOCK).astype(np.int64)
    blocks, inverse = np.unique(np.stack([bx, by]), axis=1, return_inverse=True)
    n = blocks.shape[1]
    n_held = min(max(1, int(round(fraction * n))), n - 1) if n > 1 else 0
    held = np.zeros(n, dtype=bool)
    held[rng.choice(n, n_held, replace=False)] = True
    return held[inverse.ravel()]


def standard_translation(standard: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """Each standard class -> the customer class most of its points carry; a standard class absent
    from these points -> the customer's most common class."""
    fallback = int(np.bincount(labels).argmax()) if labels.size else 0
    table = dict.fromkeys(range(256), fallback)
    pairs, counts = np.unique(standard.astype(np.int64) * 256 + labels, return_counts=True)
    best: dict[int, int] = {}
    for pair, count in zip(pairs.tolist(), counts.tolist(), strict=True):
        code = pair // 256
        if count > best.get(code, 0):
            best[code] = count
            table[code] = pair % 256
    return table


def translate(standard: np.ndarray, table: dict[int, int]) -> np.ndarray:
    lookup = np.array([table[c] for c in range(256)], dtype=np.uint8)
    return lookup[standard.astype(np.uint8)]


def evaluate(reference: np.ndarray, custom: np.ndarray, standard: np.ndarray) -> dict[str, Any]:
    """Per-class precision / recall / F1 / support of the custom model and of (translated) standard
    on the same held-out points, and the verdict: macro F1 over the classes with at least
    MIN_JUDGED_POINTS held-out points (every class is reported; with none that large, the model is
    not offered)."""
    mine, theirs = per_class_metrics(reference, custom), per_class_metrics(reference, standard)
    judged = [c for c, m in sorted(mine.items()) if m["support"] >= MIN_JUDGED_POINTS]
    macro, standard_macro = (macro_f1({c: metrics[c] for c in judged}) for metrics in (mine, theirs))
    codes = np.union1d(np.union1d(reference, custom), standard)
    return {
        "per_class": {str(c): m for c, m in sorted(mine.items())},
        "standard_per_class": {str(c): m for c, m in sorted(theirs.items())},
        # Which labels each classifier took for which class: what the F1 figures do not say.
        "confusion": {
            "classes": [int(c) for c in codes],
            "custom": confusion(reference, custom, codes),
            "standard": confusion(reference, standard, codes),
        },
        "judged_classes": judged,
        "min_judged_points": MIN_JUDGED_POINTS,
        "macro_f1": macro,
        "standard_macro_f1": standard_macro,
        "better_than_standard": bool(judged) and macro > standard_macro,
    }


def confusion(reference: np.ndarray, predicted: np.ndarray, codes: np.ndarray) -> list[list[int]]:
    """Points per (label, predicted class), rows and columns in the order of `codes` (sorted, holding
    every code of both)."""
    k = len(codes)
    cells = np.searchsorted(codes, reference).astype(np.int64) * k + np.searchsorted(codes, predicted)
    return np.bincount(cells, minlength=k * k).reshape(k, k).tolist()


def tiled_features(block: PointBlock, buffer: float) -> tuple[np.ndarray, np.ndarray]:
    """`point_features` of each point computed on its TRAINING_TILE tile and that tile's `buffer`
    ring, and which points have them: those of a tile too sparse to model (MIN_TILE_POINTS, ring
    included), which classification leaves unclassified, have none (their rows are zero)."""
    if not len(block):
        return point_features(block), np.zeros(0, dtype=bool)
    grid = TileGrid.covering(
        (float(block.x.min()), float(block.y.min())),
        (float(block.x.max()), float(block.y.max())),
        TRAINING_TILE,
        buffer,
    )
    if grid.count == 1:
        enough = len(block) >= MIN_TILE_POINTS
        return (point_features(block) if enough else _no_features(len(block))), np.full(len(block), enough)
    owner, context = grid.partition(block.x, block.y)
    ring = np.concatenate([index for index, _ in context] or [np.zeros(0, dtype=np.int64)])
    ring_tile = np.concatenate([tiles for _, tiles in context] or [np.zeros(0, dtype=np.int64)])
    by_ring_tile = np.argsort(ring_tile, kind="stable")
    ring, ring_tile = ring[by_ring_tile], ring_tile[by_ring_tile]
    by_owner = np.argsort(owner, kind="stable")
    tiles, starts = np.unique(owner[by_owner], return_index=True)
    out, modelled = _no_features(len(block)), np.zeros(len(block), dtype=bool)
    for tile, start, end in zip(tiles, starts, [*starts[1:], len(block)], strict=True):
        own = by_owner[start:end]
        around = ring[np.searchsorted(ring_tile, tile) : np.searchsorted(ring_tile, tile, side="right")]
        if own.size + around.size < MIN_TILE_POINTS:
            continue
        out[own] = point_features(block.take(np.concatenate([own, around])))[: own.size]
        modelled[own] = True
    return out, modelled


def _no_features(n: int) -> np.ndarray:
    return np.zeros((n, len(FEATURE_NAMES)), dtype=np.float32)


def train(
    blocks: Sequence[PointBlock],
    labels: Sequence[np.ndarray],
    seed: int = 0,
    *,
    ignore_classes: Collection[int] = (),
    holdout: float = 0.25,
    max_points: int = 300_000,
    rounds: int = 40,
    learning_rate: float = 0.15,
    leaves: int = 31,
    min_leaf: int = 100,
    l2: float = 10.0,
    balance: float = 0.25,
    prior: float = 3.0,
    tile_buffer: float = 20.0,
    progress: Callable[[str, int, int], None] | None = None,
) -> TrainedModel:
    """Fit a classifier to labelled blocks and score it, and standard, on held-out blocks.

    ignore_classes: reference classes left out of training and scoring (e.g. "unclassified").
    tile_buffer: the ring of context around each training tile (`tiled_features`), as
        POINTFLOW_TILE_BUFFER gives classification's tiles.
    holdout: share of 20 m blocks kept out of training for the reported scores and the decision
        whether the model beats standard (random points would sit next to training points and
        flatter the scores). The offered model is the one scored, not a refit on everything.
    max_points: training points are subsampled to at most this many (training time).
    rounds, learning_rate, leaves, min_leaf: boosting rounds, shrinkage, leaves per tree, fewest
        points per leaf; few rounds with a larger rate keep prediction fast (every round adds one
        tree per class to walk for every point), and large leaves keep trees from learning single
        buildings of the training part.
    l2: LightGBM's lambda_l2: a leaf's value is its points' gradient sum over their hessian sum plus
        l2, so a leaf of few points (a kind of object the training part holds little of) moves a
        point away from standard's answer less. Four training seeds per scene, `python -m
        benchmarks.custom`'s halves, macro F1 on the other half averaged over the seeds: 0 -> 10
        raised 7 of 10 scenes (Delft +0.014, flat field +0.016, Amsterdam 2386 +0.006, whose worst
        seed went from 0.896 to 0.930 against standard's 0.965) and lowered 3 by at most 0.004
        (crop1, Grenoble, Amsterdam 2397); 3 and 30 did less well, and leaving each scene out in
        turn, the other nine pick 10 every time.
    prior: head start (raw score) of the class standard's class translates to. The trees learn
        corrections to standard, so objects the training part lacks keep standard's answer: the
        AHN3 Amsterdam 2386 scene's training half holds no tall trees, which the customer calls
        "other" (1); without a head start the model calls the other half's trees buildings (macro
        F1 0.871 there against standard's 0.954), with 3.0 it gets 0.961 (measured with
        `python -m benchmarks.custom`).
    balance: points of a class weigh (its share of the training points) ** -balance: macro F1
        counts every class alike, and a rare class (trees in a street scene, water) would otherwise
        hardly move the trees; full weights (1) make the common classes' borders sloppy
        (Saint-Barthelemy, other half: 0.9532 with none, 0.9526 with 0.25, 0.9493 with 0.5;
        Amsterdam 2386: 0.935, 0.967, 0.961).
    """
    if len(blocks) != len(labels) or not blocks:
        raise ValueError("need the same, non-zero number of blocks and label arrays")
    if any(len(label) != len(block) for block, label in zip(blocks, labels, strict=True)):
        raise ValueError("labels must have one entry per point")
    learned = set().union(*(np.unique(label).tolist() for label in labels)) - set(ignore_classes)
    if len(learned) > MAX_CLASSES:
        raise InvalidValue(
            f"the labels hold {len(learned)} classes besides those left out, more than the {MAX_CLASSES} one model "
            "learns: merge classes, or leave some out (pointflow train --ignore-class, the DAG's ignore_classes)"
        )
    report = progress or (lambda stage, done, total: None)
    rng = np.random.default_rng(seed)
    features, targets, held = [], [], []
    points, done, modelled_points = sum(len(block) for block in blocks), 0, 0
    report("features", done, points)
    for block, label in zip(blocks, labels, strict=True):
        block_features, modelled = tiled_features(block, tile_buffer)
        keep = ~np.isin(label, list(ignore_classes)) & modelled
        features.append(block_features[keep])
        targets.append(np.asarray(label)[keep].astype(np.uint8))
        held.append(holdout_mask(block.x, block.y, holdout, rng)[keep])
        done, modelled_points = done + len(block), modelled_points + int(np.count_nonzero(modelled))
        report("features", done, points)
    if not modelled_points:
        raise InvalidValue(
            f"the labelled points are too sparse to learn from: no {TRAINING_TILE:,.0f} m tile holds {MIN_TILE_POINTS} "
            "of them with its ring (classification leaves such points unclassified)"
        )
    x, y, is_held = np.concatenate(features), np.concatenate(targets), np.concatenate(held)
    train_index = np.flatnonzero(~is_held)
    if train_index.size == 0 or not is_held.any():
        raise InvalidValue(
            f"the labelled points must cover more than one {HOLDOUT_BLOCK:g} m block with their classes: "
            "part of them is held out to score the model against standard"
        )
    if train_index.size > max_points:
        train_index = np.sort(rng.choice(train_index, max_points, replace=False))
    classes = np.unique(y[train_index])
    if classes.size < 2:
        raise InvalidValue(f"the training part holds only class {classes.tolist()}: a classifier needs at least two")
    encode = np.zeros(256, dtype=np.int32)
    encode[classes] = np.arange(classes.size)
    params = {
        "seed": seed,
        "ignore_classes": sorted(int(c) for c in ignore_classes),
        "holdout": holdout,
        "holdout_block": HOLDOUT_BLOCK,
        "max_points": max_points,
        "rounds": rounds,
        "learning_rate": learning_rate,
        "leaves": leaves,
        "min_leaf": min_leaf,
        "l2": l2,
        "balance": balance,
    }
    share = np.bincount(encode[y[train_index]], minlength=classes.size) / train_index.size
    weight = (share**-balance)[encode[y[train_index]]]
    lightgbm = load_lightgbm()
    report("fit", 0, rounds)

    standard_train = x[train_index, STANDARD_COLUMN].astype(np.uint8)
    table = standard_translation(standard_train, y[train_index])
    model = TrainedModel(
        booster=None,
        classes=tuple(int(c) for c in classes),
        feature_names=FEATURE_NAMES,
        features_version=FEATURES_VERSION,
        evaluation={},
        n_train=int(train_index.size),
        n_holdout=int(np.count_nonzero(is_held)),
        params={**params, "prior": prior, "library": f"lightgbm {lightgbm.__version__}"},
        translation={int(k): table[int(k)] for k in np.unique(standard_train)},
        prior=prior,
        standard_version=StandardClassifier.version,
    )
    model.booster = lightgbm.train(
        {
            "objective": "multiclass",
            "num_class": int(classes.size),
            "learning_rate": learning_rate,
            "num_leaves": leaves,
            "min_data_in_leaf": min_leaf,
            "lambda_l2": l2,
            "num_threads": 1,
            "seed": seed,
            "deterministic": True,
            "verbosity": -1,
        },
        lightgbm.Dataset(
            x[train_index],
            encode[y[train_index]],
            weight=weight / weight.mean(),
            init_score=model.head_start(standard_train),
            feature_name=list(FEATURE_NAMES),
            categorical_feature=list(CATEGORICAL),
            free_raw_data=True,
        ),
        num_boost_round=rounds,
        callbacks=[lambda env: report("fit", env.iteration + 1, env.end_iteration)],
    )
    held_index = np.flatnonzero(is_held)
    held = x[held_index]
    start = model.head_start(held[:, STANDARD_COLUMN])
    model.cascade = choose_cascade(model.booster, held, start)
    model.params["cascade"] = [list(stage) for stage in model.cascade]
    model.prune = choose_pruning(model.booster, held, start, model.cascade)
    model.params["prune"] = model.prune
    # How the stages were chosen, so that a model's early decisions can be told apart and redone.
    model.params["early_tolerance"] = EARLY_TOLERANCE
    model.params["early_stages"] = EARLY_STAGES
    model.params["early_stage_trees"] = STAGE_TREES
    standard = translate(held[:, STANDARD_COLUMN], table)
    model.evaluation = {
        **evaluate(y[held_index], model.predict_features(held), standard),
        "standard_translation": {str(k): v for k, v in model.translation.items()},
        "standard_version": model.standard_version,
    }
    return model
