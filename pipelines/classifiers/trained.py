"""Trainable per-account classifier: LightGBM gradient-boosted trees on `features.point_features`,
which start from what the standard classifier knows (its ground model, heights, its own classes and
their context) and learn the customer's own class scheme (any LAS codes, e.g. IGN's 17 bridge deck
or 65+).

Pure functions, no storage: `train` returns a `TrainedModel` whose `to_bytes` the caller stores
wherever it likes, and `TrainedClassifier` wraps a model in the `Classifier` protocol.

`train` also says whether the model is worth offering: on a spatially held-out part of the labels
(whole 20 m blocks) it scores the model and the standard classifier side by side on the same points,
per class. Standard's classes are first translated into the customer's scheme (each standard class
becomes the customer class most of its training points carry: AHN's "other" 1 takes standard's
vegetation 3/4/5), so that standard is credited with what it knows rather than failed for naming it
differently.

Model files are LightGBM's own text format (stable across LightGBM releases, and loading it runs no
code, unlike a pickle), compressed, behind a JSON header and an HMAC-SHA256 checked before anything
is parsed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.errors import InvalidValue, UserError

from .base import PointBlock
from .features import CATEGORICAL, FEATURE_NAMES, point_features
from .standard import StandardClassifier

if TYPE_CHECKING:
    import lightgbm

FORMAT = b"pointflow-trained-v2\n"
_OLD_FORMATS = (b"pointflow-trained-v1\n",)
FEATURES_VERSION = "4"
HOLDOUT_BLOCK = 20.0  # metres; held-out points are whole blocks, not neighbours of training points
STANDARD_COLUMN = FEATURE_NAMES.index("standard_class")
# Early decisions (`choose_cascade`): the share of each class's held-out points that each stage may
# decide otherwise than walking every tree, the most stages, and what one call to LightGBM's predict
# costs per point, in trees (about 0.1 us per point and call, 22 ns per tree and point).
EARLY_TOLERANCE = 0.01
EARLY_STAGES = 3
CALL_TREES = 5
UNKNOWN_STANDARD = "unknown"

ClassMetrics = dict[int, dict[str, float]]


def _lightgbm():
    """LightGBM, imported when a custom model is loaded or trained: every classification task
    imports this module, few use a custom model; it is the `training` extra."""
    try:
        import lightgbm
    except ModuleNotFoundError as error:
        raise UserError("custom classifiers need LightGBM: pip install 'pointflow[training]'") from error
    return lightgbm


@dataclass
class TrainedModel:
    booster: lightgbm.Booster
    classes: tuple[int, ...]  # the customer's class code of each of the booster's outputs
    feature_names: tuple[str, ...]
    features_version: str
    evaluation: dict[str, Any]  # held-out scores of this model and of standard, see `evaluate`
    n_train: int
    n_holdout: int
    params: dict = field(default_factory=dict)
    # Standard's classes in the customer's scheme, learnt on the training part, and the raw score
    # this head start is worth before any tree: the trees learn corrections to standard, so a kind of
    # object the training part lacks keeps standard's (translated) class instead of a guess.
    translation: dict[int, int] = field(default_factory=dict)
    prior: float = 0.0
    # Early decisions (see `choose_cascade`): stages (rounds, margin); after a stage's first `rounds`
    # boosting rounds, a point whose best class leads the next by more than `margin` keeps it, and
    # only the others walk on. Empty: every point walks every tree (models saved before it existed).
    cascade: list[tuple[int, float]] = field(default_factory=list)
    # The standard classifier's version the model was trained and judged against: its classes are
    # features, and "better than standard" was measured against that version. Another version still
    # feeds the model (its classes mean the same), but the verdict may no longer hold: retrain to
    # re-check. "unknown": saved before this was recorded.
    standard_version: str = UNKNOWN_STANDARD

    def head_start(self, standard: np.ndarray) -> np.ndarray:
        """Raw scores (points, classes) before the first tree: `prior` for the customer class that
        each point's standard class translates to."""
        table = np.zeros((256, len(self.classes)), dtype=np.float64)
        for code, target in self.translation.items():
            if target in self.classes:
                table[code, self.classes.index(target)] = self.prior
        return table[standard.astype(np.uint8)]

    @property
    def metrics(self) -> ClassMetrics:
        return {int(c): m for c, m in self.evaluation.get("per_class", {}).items()}

    @property
    def better_than_standard(self) -> bool:
        return bool(self.evaluation.get("better_than_standard"))

    def predict(self, block: PointBlock) -> np.ndarray:
        if len(block) == 0:
            return np.empty(0, dtype=np.uint8)
        return self.predict_features(point_features(block))

    def predict_features(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes, dtype=np.uint8)[np.argmax(self.scores(features), axis=1)]

    def scores(self, features: np.ndarray) -> np.ndarray:
        """Raw scores (points, classes), head start included; with a cascade, a point decided
        early has the scores of the rounds it walked (the same argmax, by how it was chosen)."""
        # One thread: the runner parallelises over processes, one per core; OpenMP threads on top
        # oversubscribe the cores. (LightGBM's own early stopping of prediction cannot see the head
        # start, so the cascade does it here.)
        scores = self.head_start(features[:, STANDARD_COLUMN])
        walking, done = None, 0  # None: every point, without copying the matrix
        for rounds, margin in self.cascade:
            part = features if walking is None else features[walking]
            step = self.booster.predict(
                part, raw_score=True, num_threads=1, start_iteration=done, num_iteration=rounds - done
            )
            done = rounds
            if walking is None:
                scores += step
                walking = np.flatnonzero(lead(scores) <= margin)
            else:
                scores[walking] += step
                walking = walking[lead(scores[walking]) <= margin]
            if walking.size == 0:
                return scores
        if walking is None:
            scores += self.booster.predict(features, raw_score=True, num_threads=1, start_iteration=done)
        else:
            scores[walking] += self.booster.predict(
                features[walking], raw_score=True, num_threads=1, start_iteration=done
            )
        return scores

    def to_bytes(self, key: bytes | None = None) -> bytes:
        header = {
            "classes": list(self.classes),
            "feature_names": list(self.feature_names),
            "features_version": self.features_version,
            "evaluation": self.evaluation,
            "n_train": self.n_train,
            "n_holdout": self.n_holdout,
            "params": self.params,
            "translation": {str(k): v for k, v in self.translation.items()},
            "prior": self.prior,
            "cascade": [list(stage) for stage in self.cascade],
            "standard_version": self.standard_version,
        }
        payload = zlib.compress(json.dumps(header).encode() + b"\n" + self.booster.model_to_string().encode(), 6)
        tag = hmac.new(key, payload, hashlib.sha256).digest() if key else b""
        return FORMAT + len(tag).to_bytes(1, "big") + tag + payload

    @classmethod
    def from_bytes(cls, data: bytes, key: bytes | None = None) -> TrainedModel:
        """Load a model written by `to_bytes`; with `key`, bytes altered since are refused."""
        if data.startswith(_OLD_FORMATS):
            raise InvalidValue("model was made by an earlier release of pointflow; retrain it")
        if not data.startswith(FORMAT):
            raise InvalidValue("not a pointflow trained model")
        rest = data[len(FORMAT) :]
        tag, payload = rest[1 : 1 + rest[0]], rest[1 + rest[0] :]
        if key is not None:
            expected = hmac.new(key, payload, hashlib.sha256).digest()
            if not hmac.compare_digest(tag, expected):
                raise InvalidValue("trained model signature mismatch")
        header_line, _, model_text = zlib.decompress(payload).partition(b"\n")
        header = json.loads(header_line)
        if tuple(header["feature_names"]) != FEATURE_NAMES or header["features_version"] != FEATURES_VERSION:
            raise InvalidValue("model was trained on other features; retrain it")
        return cls(
            booster=_lightgbm().Booster(model_str=model_text.decode()),
            classes=tuple(header["classes"]),
            feature_names=FEATURE_NAMES,
            features_version=FEATURES_VERSION,
            evaluation=header["evaluation"],
            n_train=header["n_train"],
            n_holdout=header["n_holdout"],
            params=header["params"],
            translation={int(k): v for k, v in header["translation"].items()},
            prior=header["prior"],
            cascade=[(int(r), float(m)) for r, m in header.get("cascade", [])],
            standard_version=str(header.get("standard_version", UNKNOWN_STANDARD)),
        )


def lead(scores: np.ndarray) -> np.ndarray:
    """How far each point's best score is ahead of its second best."""
    top2 = np.partition(scores, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def choose_cascade(
    booster: lightgbm.Booster,
    features: np.ndarray,
    start: np.ndarray,
    tolerance: float = EARLY_TOLERANCE,
    max_stages: int = EARLY_STAGES,
) -> list[tuple[int, float]]:
    """Early decisions that leave the fewest trees to walk on `features`, the training part's
    held-out points (the data a model is later applied to plays no part in the choice).

    Stage by stage, on the points still walking: after k rounds, the margin is the least lead such
    that, of each class (as walking every tree decides it), at most `tolerance` of its held-out
    points are ahead by more while the remaining trees would change their class; a point ahead by
    more than the margin keeps its class. The k taken costs the fewest trees: for each point still
    walking, a call (worth `CALL_TREES` trees) and one tree per class and round. Stages are added
    while one saves a tenth of what is left, up to `max_stages`.

    Why a tolerance: without one, the single held-out point with the largest lead that the remaining
    trees overturn set the margin, and one stage still left 7 % (Saint-Barthelemy) to 31 %
    (Montpellier) of the points walking every tree. Per class, because macro F1 counts a class of a
    few hundred points as much as the ground: a tolerance of 0.2 % of all points, three stages, took
    IGN_flatfield_strip from 0.665 (every tree) to 0.619 and IGN_crop1_rural from 0.782 to 0.754.
    1 % per class and three stages: see the README's Benchmarks (`python -m benchmarks.custom`).
    """
    total = booster.current_iteration()
    per_round = booster.num_trees() // max(total, 1)
    full = np.argmax(start + booster.predict(features, raw_score=True, num_threads=1), axis=1)
    allowed = (tolerance * np.bincount(full, minlength=start.shape[1])).astype(np.int64)
    stages: list[tuple[int, float]] = []
    walking, done, scores = np.arange(len(features)), 0, start.copy()
    while len(stages) < max_stages and walking.size and done < total - 1:
        share = walking.size / len(features)
        # A stage must save a tenth of walking every remaining tree in one call: else not worth its pass.
        best, best_cost = None, 0.9 * share * (CALL_TREES + per_round * (total - done))
        partial, part, target = scores[walking], features[walking], full[walking]
        for rounds in range(done + 1, total):
            partial += booster.predict(part, raw_score=True, num_threads=1, start_iteration=rounds - 1, num_iteration=1)
            ahead = lead(partial)
            # The points ahead by more than the margin keep the class they have now; of the ones
            # the full model decides otherwise, all but `allowed` of each class are not ahead by more.
            wrong = np.argmax(partial, axis=1) != target
            margin = 0.0
            for code in np.unique(target[wrong]):
                leads = np.sort(ahead[wrong & (target == code)])[::-1]
                if allowed[code] < leads.size:
                    margin = max(margin, float(leads[allowed[code]]))
            still = np.count_nonzero(ahead <= margin) / len(features)
            cost = share * (CALL_TREES + per_round * (rounds - done)) + still * (
                CALL_TREES + per_round * (total - rounds)
            )
            if cost < best_cost:
                best, best_cost, best_scores = (rounds, margin), cost, partial.copy()
        if best is None:
            break
        stages.append(best)
        rounds, margin = best
        scores[walking] = best_scores
        walking = walking[lead(best_scores) <= margin]
        done = rounds
    return stages


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
    """Per-class precision / recall / F1 / support and macro F1 of the custom model and of
    (translated) standard on the same held-out points."""
    mine, theirs = per_class_metrics(reference, custom), per_class_metrics(reference, standard)
    macro, standard_macro = macro_f1(mine), macro_f1(theirs)
    return {
        "per_class": {str(c): m for c, m in sorted(mine.items())},
        "standard_per_class": {str(c): m for c, m in sorted(theirs.items())},
        "macro_f1": macro,
        "standard_macro_f1": standard_macro,
        "better_than_standard": macro > standard_macro,
    }


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
    balance: float = 0.25,
    prior: float = 3.0,
) -> TrainedModel:
    """Fit a classifier to labelled blocks and score it, and standard, on held-out blocks.

    ignore_classes: reference classes left out of training and scoring (e.g. "unclassified").
    holdout: share of 20 m blocks kept out of training for the reported scores and the decision
        whether the model beats standard (random points would sit next to training points and
        flatter the scores). The offered model is the one scored, not a refit on everything.
    max_points: training points are subsampled to at most this many (training time).
    rounds, learning_rate, leaves, min_leaf: boosting rounds, shrinkage, leaves per tree, fewest
        points per leaf; few rounds with a larger rate keep prediction fast (every round adds one
        tree per class to walk for every point), and large leaves keep trees from learning single
        buildings of the training part.
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
    rng = np.random.default_rng(seed)
    features, targets, held = [], [], []
    for block, label in zip(blocks, labels, strict=True):
        if len(label) != len(block):
            raise ValueError("labels must have one entry per point")
        keep = ~np.isin(label, list(ignore_classes))
        features.append(point_features(block)[keep])
        targets.append(np.asarray(label)[keep].astype(np.uint8))
        held.append(holdout_mask(block.x, block.y, holdout, rng)[keep])
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
        "balance": balance,
    }
    share = np.bincount(encode[y[train_index]], minlength=classes.size) / train_index.size
    weight = (share**-balance)[encode[y[train_index]]]
    lightgbm = _lightgbm()

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
    )
    held_index = np.flatnonzero(is_held)
    model.cascade = choose_cascade(model.booster, x[held_index], model.head_start(x[held_index, STANDARD_COLUMN]))
    model.params["cascade"] = [list(stage) for stage in model.cascade]
    # How the stages were chosen, so that a model's early decisions can be told apart and redone.
    model.params["early_tolerance"] = EARLY_TOLERANCE
    model.params["early_stages"] = EARLY_STAGES
    standard = translate(x[held_index, STANDARD_COLUMN], table)
    model.evaluation = {
        **evaluate(y[held_index], model.predict_features(x[held_index]), standard),
        "standard_translation": {str(k): v for k, v in model.translation.items()},
        "standard_version": model.standard_version,
    }
    return model


class TrainedClassifier:
    """A trained model behind the `Classifier` protocol."""

    def __init__(self, model: TrainedModel, name: str, version: str) -> None:
        self.model = model
        self.name = name
        self.version = version
        self.params = {
            **model.params,
            "classes": list(model.classes),
            "features_version": model.features_version,
            "standard_version": model.standard_version,
        }

    def classify(self, block: PointBlock) -> np.ndarray:
        return self.model.predict(block)
