"""Trainable per-account classifier: gradient-boosted trees on `features.point_features`.

Pure functions, no storage: `train` returns a `TrainedModel` whose `to_bytes` the caller stores
wherever it likes, and `TrainedClassifier` wraps a model in the `Classifier` protocol.

Serialisation uses pickle, which runs code on load: only load bytes this service wrote itself.
`to_bytes(key=...)` / `from_bytes(..., key=...)` add and check an HMAC-SHA256 so that bytes
altered in storage are rejected before unpickling.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from threadpoolctl import threadpool_limits

from .base import PointBlock
from .features import FEATURE_NAMES, point_features

if TYPE_CHECKING:
    from sklearn.ensemble import HistGradientBoostingClassifier

FORMAT = b"pointflow-trained-v1\n"
FEATURES_VERSION = "2"
HOLDOUT_TILE = 10.0  # metres; held-out points are whole tiles, not neighbours of training points

ClassMetrics = dict[int, dict[str, float]]


@dataclass
class TrainedModel:
    estimator: HistGradientBoostingClassifier
    classes: tuple[int, ...]
    feature_names: tuple[str, ...]
    features_version: str
    metrics: ClassMetrics  # held-out precision / recall / f1 / support per ASPRS class
    n_train: int
    n_holdout: int
    params: dict = field(default_factory=dict)

    def predict(self, block: PointBlock) -> np.ndarray:
        if len(block) == 0:
            return np.empty(0, dtype=np.uint8)
        features = point_features(block)
        # One thread: the runner parallelises over processes, one per core; OpenMP threads on
        # top of that oversubscribe the cores and slow everything down several times.
        with threadpool_limits(limits=1, user_api="openmp"):
            return self.estimator.predict(features).astype(np.uint8)

    def to_bytes(self, key: bytes | None = None) -> bytes:
        payload = pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)
        tag = hmac.new(key, payload, hashlib.sha256).digest() if key else b""
        return FORMAT + len(tag).to_bytes(1, "big") + tag + payload

    @classmethod
    def from_bytes(cls, data: bytes, key: bytes | None = None) -> TrainedModel:
        """Load a model written by `to_bytes`.  Unpickling runs code: trusted bytes only."""
        if not data.startswith(FORMAT):
            raise ValueError("not a pointflow trained model")
        rest = data[len(FORMAT):]
        tag, payload = rest[1:1 + rest[0]], rest[1 + rest[0]:]
        if key is not None:
            expected = hmac.new(key, payload, hashlib.sha256).digest()
            if not hmac.compare_digest(tag, expected):
                raise ValueError("trained model signature mismatch")
        model = pickle.loads(payload)  # noqa: S301 - trusted, optionally HMAC-checked bytes
        if not isinstance(model, cls):
            raise ValueError("payload is not a TrainedModel")
        if model.feature_names != FEATURE_NAMES or model.features_version != FEATURES_VERSION:
            raise ValueError("model was trained on other features; retrain it")
        return model


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


def holdout_mask(block: PointBlock, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Points of a random `fraction` of the 10 m tiles of a block."""
    tile_x = np.floor(block.x / HOLDOUT_TILE).astype(np.int64)
    tile_y = np.floor(block.y / HOLDOUT_TILE).astype(np.int64)
    tiles, inverse = np.unique(np.stack([tile_x, tile_y]), axis=1, return_inverse=True)
    held = rng.random(tiles.shape[1]) < fraction
    return held[inverse.ravel()]


def train(blocks: Sequence[PointBlock], labels: Sequence[np.ndarray], seed: int = 0, *,
          ignore_classes: Collection[int] = (), holdout: float = 0.2,
          max_points: int = 200_000, max_iter: int = 20,
          learning_rate: float = 0.3) -> TrainedModel:
    """Fit a classifier to labelled blocks and score it on held-out tiles.

    ignore_classes: reference classes left out of training and scoring (e.g. "unclassified").
    holdout: share of 10 m tiles kept out of training for the reported metrics (spatial
        hold-out: random points would sit next to training points and flatter the scores).
    max_points: training points are subsampled to at most this many (training time).
    max_iter, learning_rate: boosting rounds and shrinkage; few rounds with a larger rate keep
        prediction fast (every round adds one tree per class to walk for every point).
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
        held.append(holdout_mask(block, holdout, rng)[keep])
    x, y, is_held = np.concatenate(features), np.concatenate(targets), np.concatenate(held)
    train_index = np.flatnonzero(~is_held)
    if train_index.size == 0:
        raise ValueError("no training points left after the hold-out split")
    if train_index.size > max_points:
        train_index = np.sort(rng.choice(train_index, max_points, replace=False))
    # Imported here: every classification task imports this module, few of them train (saves ~1 s a task).
    from sklearn.ensemble import HistGradientBoostingClassifier

    estimator = HistGradientBoostingClassifier(max_iter=max_iter, learning_rate=learning_rate,
                                               early_stopping=False, random_state=seed)
    estimator.fit(x[train_index], y[train_index])
    held_index = np.flatnonzero(is_held)
    metrics = (per_class_metrics(y[held_index], estimator.predict(x[held_index]))
               if held_index.size else {})
    return TrainedModel(
        estimator=estimator,
        classes=tuple(int(c) for c in estimator.classes_),
        feature_names=FEATURE_NAMES,
        features_version=FEATURES_VERSION,
        metrics=metrics,
        n_train=int(train_index.size),
        n_holdout=int(held_index.size),
        params={"seed": seed, "ignore_classes": sorted(int(c) for c in ignore_classes),
                "holdout": holdout, "max_points": max_points, "max_iter": max_iter,
                "learning_rate": learning_rate},
    )


class TrainedClassifier:
    """A trained model behind the `Classifier` protocol."""

    def __init__(self, model: TrainedModel, name: str, version: str) -> None:
        self.model = model
        self.name = name
        self.version = version
        self.params = {**model.params, "classes": list(model.classes),
                       "features_version": model.features_version}

    def classify(self, block: PointBlock) -> np.ndarray:
        return self.model.predict(block)
