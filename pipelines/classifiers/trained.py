"""Trainable per-account classifier: LightGBM gradient-boosted trees on `features.point_features`,
which start from what the standard classifier knows (its ground model, heights, its own classes and
their context) and learn the customer's own class scheme (any LAS codes, e.g. IGN's 17 bridge deck
or 65+).

Here is the model: how it predicts, with the early decisions that let most points stop after a few
rounds, and its file; `TrainedClassifier` wraps it in the `Classifier` protocol. How a model is
fitted to labels and judged against standard is `fitting.train`.

Model files are LightGBM's own text format (stable across LightGBM releases, and loading it runs no
code, unlike a pickle), compressed, behind a JSON header and an HMAC-SHA256 checked before anything
is parsed. The HMAC binds the file to the account that owns the model and to its id (`Seal`): a
model copied into another account's area, with its catalog row, does not verify there.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.errors import InvalidValue, UserError

from .base import PointBlock
from .features import FEATURE_NAMES, point_features
from .forest import Forest

if TYPE_CHECKING:
    import lightgbm

# The first line names the file's format, and with it the signature scheme. v3: the model of v2,
# its HMAC over this line, the owning account, the model id and the payload (`Seal`). v2's HMAC
# covered the payload alone, so a v2 file verified under any account: refused until re-signed
# (`reseal`, `pointflow models re-sign`). v1 was a pickle: refused for good.
FORMAT = b"pointflow-trained-v3\n"
UNBOUND_FORMAT = b"pointflow-trained-v2\n"
_OLD_FORMATS = (b"pointflow-trained-v1\n",)
FEATURES_VERSION = "4"
STANDARD_COLUMN = FEATURE_NAMES.index("standard_class")
# Early decisions (`choose_cascade`): the share of each class's held-out points that each stage may
# decide otherwise than walking every tree, the most stages, and what a stage costs the compiled
# walker per point that reaches it, in trees (its lead: measured 0.13 to 0.96 trees, see the README's
# Benchmarks; LightGBM's predict, once called per stage, cost about 5).
EARLY_TOLERANCE = 0.01
EARLY_STAGES = 4
STAGE_TREES = 1
UNKNOWN_STANDARD = "unknown"

ClassMetrics = dict[int, dict[str, float]]


@dataclass(frozen=True)
class Seal:
    """What a model file's signature binds: the signing key, the account that owns the model (None
    for a shared model, which is no account's) and the model's id."""

    key: bytes
    account_id: str | None
    model_id: str

    def tag(self, payload: bytes) -> bytes:
        bound = json.dumps([self.account_id, self.model_id]).encode()
        return hmac.new(self.key, FORMAT + bound + b"\n" + payload, hashlib.sha256).digest()

    @property
    def owner(self) -> str:
        return f"account {self.account_id}" if self.account_id is not None else "the shared models"


def load_lightgbm():
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
    evaluation: dict[str, Any]  # held-out scores of this model and of standard, see `fitting.evaluate`
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
    # Per stage of the cascade (see `choose_pruning`): a point walking on drops the classes further
    # behind its best than this; they walk no more trees. Empty: every class walks on (models saved
    # before it existed).
    prune: list[float] = field(default_factory=list)
    # The standard classifier's version the model was trained and judged against: its classes are
    # features, and "better than standard" was measured against that version. Another version still
    # feeds the model (its classes mean the same), but the verdict may no longer hold: retrain to
    # re-check. "unknown": saved before this was recorded.
    standard_version: str = UNKNOWN_STANDARD
    _forest: Forest | None = field(default=None, init=False, repr=False, compare=False)

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
        early has the scores of the rounds it walked (the same argmax, by how it was chosen).
        The trees are walked by `forest.Forest` (compiled, one thread: the runner parallelises over
        processes), LightGBM's raw scores to the bit; LightGBM's own early stopping of prediction
        cannot see the head start, so the cascade is done there."""
        scores = self.head_start(features[:, STANDARD_COLUMN])
        self.forest.scores(features, scores, self.cascade, self.prune)
        return scores

    @property
    def forest(self) -> Forest:
        """The booster's trees as the compiled walker reads them, built on first use."""
        if self._forest is None:
            self._forest = Forest.from_model_string(self.booster.model_to_string())
        return self._forest

    def to_bytes(self, seal: Seal | None = None) -> bytes:
        """The model file; signed for `seal`'s account and model, else unsigned (a model sent to the
        workers, checked by the client that loaded it, or one whose digest is recorded)."""
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
            "prune": list(self.prune),
            "standard_version": self.standard_version,
        }
        payload = zlib.compress(json.dumps(header).encode() + b"\n" + self.booster.model_to_string().encode(), 6)
        return _signed(seal.tag(payload) if seal else b"", payload)

    @classmethod
    def from_bytes(cls, data: bytes, seal: Seal | None = None) -> TrainedModel:
        """Load a model written by `to_bytes`; with `seal`, a file altered since, or signed for
        another account or model, is refused."""
        if data.startswith(_OLD_FORMATS):
            raise InvalidValue("model was made by an earlier release of pointflow; retrain it")
        if seal is not None and data.startswith(UNBOUND_FORMAT):
            raise InvalidValue(
                f"model {seal.model_id} of {seal.owner} is signed under the old scheme, which binds neither its "
                "account nor its id: it is not loaded. An operator re-signs the models stored before the upgrade "
                "with 'pointflow models re-sign' (or retrain it)"
            )
        tag, payload = _parts(data)
        if seal is not None and not hmac.compare_digest(tag, seal.tag(payload)):
            raise InvalidValue(
                f"model {seal.model_id}'s signature does not match {seal.owner} and model {seal.model_id}: its file "
                "was altered, or signed for another account or model; it is not loaded"
            )
        header_line, _, model_text = zlib.decompress(payload).partition(b"\n")
        header = json.loads(header_line)
        if tuple(header["feature_names"]) != FEATURE_NAMES or header["features_version"] != FEATURES_VERSION:
            raise InvalidValue("model was trained on other features; retrain it")
        return cls(
            booster=load_lightgbm().Booster(model_str=model_text.decode()),
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
            prune=[float(gap) for gap in header.get("prune", [])],
            standard_version=str(header.get("standard_version", UNKNOWN_STANDARD)),
        )


def reseal(data: bytes, seal: Seal) -> bytes:
    """A v2 file (its HMAC over the payload alone, checked here with `seal.key`) signed again, bound
    to `seal`'s account and model; the payload is kept byte for byte. Whose the model is comes from
    the caller (the catalog, at the upgrade): the old signature cannot say."""
    tag, payload = _parts(data, UNBOUND_FORMAT)
    if not hmac.compare_digest(tag, hmac.new(seal.key, payload, hashlib.sha256).digest()):
        raise InvalidValue(f"model {seal.model_id} of {seal.owner}: its old signature does not match; not re-signed")
    return _signed(seal.tag(payload), payload)


def _signed(tag: bytes, payload: bytes) -> bytes:
    return FORMAT + len(tag).to_bytes(1, "big") + tag + payload


def _parts(data: bytes, first_line: bytes = FORMAT) -> tuple[bytes, bytes]:
    """A file's signature (empty when unsigned) and payload."""
    if not data.startswith(first_line):
        raise InvalidValue("not a pointflow trained model")
    rest = data[len(first_line) :]
    return rest[1 : 1 + rest[0]], rest[1 + rest[0] :]


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

    A stage after k rounds has a margin: the least lead such that, of each class (as walking every
    tree decides it), at most `tolerance` of its held-out points still walking are ahead by more
    while the remaining trees would change their class; a point ahead by more than the margin keeps
    its class. A plan's cost is, per point, one tree per class and round walked plus `STAGE_TREES`
    per stage it reaches (the lead it computes). Every plan of up to `max_stages` stages is tried,
    and more stages are taken only when they save a tenth of the cost of fewer.

    Why every plan: stages chosen one at a time, each as if every point left after it walked every
    remaining tree, put the first late (crop2: after 5 rounds, then 16 and 25; 45 trees per
    held-out point), where an early first stage is worth it for what the later ones then save
    (after 1, 6 and 16 rounds: 29 trees, with as many stages and the same tolerance; a fourth stage,
    25). Trying every plan of four stages takes well under a second of training.
    Why a tolerance: without one, the single held-out point with the largest lead that the remaining
    trees overturn set the margin, and one stage still left 7 % (Saint-Barthelemy) to 31 %
    (Montpellier) of the points walking every tree. Per class, because macro F1 counts a class of a
    few hundred points as much as the ground: a tolerance of 0.2 % of all points, three stages, took
    IGN_flatfield_strip from 0.665 (every tree) to 0.619 and IGN_crop1_rural from 0.782 to 0.754.
    1 % per class and up to four stages: see the README's Benchmarks (`python -m benchmarks.custom`).
    """
    total = booster.current_iteration()
    per_round = booster.num_trees() // max(total, 1)
    # Each held-out point's class and lead after 1, 2, ... rounds (row rounds - 1), summed round by round.
    scores = start.copy()
    classes = np.empty((total, len(features)), dtype=np.uint8)
    leads = np.empty((total, len(features)))
    for done in range(total):
        scores += booster.predict(features, raw_score=True, num_threads=1, start_iteration=done, num_iteration=1)
        classes[done], leads[done] = np.argmax(scores, axis=1), lead(scores)
    full = classes[-1]
    allowed = (tolerance * np.bincount(full, minlength=start.shape[1])).astype(np.int64)
    n = max(len(features), 1)

    def stage(walking: np.ndarray, rounds: int) -> tuple[float, np.ndarray]:
        """The margin after `rounds` rounds for the points `walking`, and those it leaves walking."""
        ahead, target = leads[rounds - 1, walking], full[walking]
        wrong = classes[rounds - 1, walking] != target
        margin = _tolerated(ahead[wrong], target[wrong], allowed)
        return margin, walking[ahead <= margin]

    # best[s]: the cheapest plan of exactly s stages, as (cost in trees per point, stages).
    best: list[tuple[float, list[tuple[int, float]]]] = [(float(per_round * total), [])]
    best += [(np.inf, []) for _ in range(max_stages)]

    def search(walking: np.ndarray, done: int, spent: float, plan: list[tuple[int, float]]) -> None:
        if plan and spent + walking.size / n * per_round * (total - done) < best[len(plan)][0]:
            best[len(plan)] = (spent + walking.size / n * per_round * (total - done), list(plan))
        if len(plan) == max_stages or not walking.size:
            return
        for rounds in range(done + 1, total):
            cost = spent + walking.size / n * (per_round * (rounds - done) + STAGE_TREES)
            if cost >= max(most for most, _ in best[len(plan) + 1 :]):
                continue  # every plan going on from here costs more than the best of its size
            margin, still = stage(walking, rounds)
            search(still, rounds, cost, [*plan, (rounds, margin)])

    search(np.arange(len(features)), 0, 0.0, [])
    chosen = 0
    for stages in range(1, max_stages + 1):
        if best[stages][0] < 0.9 * best[chosen][0]:
            chosen = stages
    return best[chosen][1]


def choose_pruning(
    booster: lightgbm.Booster,
    features: np.ndarray,
    start: np.ndarray,
    cascade: list[tuple[int, float]],
    tolerance: float = EARLY_TOLERANCE,
) -> list[float]:
    """Per stage of `cascade`, how far behind its best class a class of a point that walks on may be
    and still walk the remaining trees, chosen on the training part's held-out `features` as the
    stages' margins are: the least gap such that, of each class (as walking every tree decides it),
    at most `tolerance` of its held-out points walking on lose their class by it. A dropped class
    keeps its score, and the points are walked here as `forest.Forest.scores` walks them.

    Why: in a model of six classes the points still walking after a stage are mostly undecided
    between two (IGN's 3/4/5 heights, 2 and 9), yet walked all six classes' trees: on training's
    held-out blocks, trees walked per point crop2 26.9 -> 16.4, bridge 34.6 -> 19.0, Grenoble 17.4
    -> 10.1 with the same stages (`python -m benchmarks.custom`, see the README's Benchmarks).
    The gaps are chosen after the stages; up to six stages instead of four, with the gaps, walked
    a tenth fewer trees again but cost macro F1 on the other halves (crop2 0.604 -> 0.601).
    """
    every = start + booster.predict(features, raw_score=True, num_threads=1)
    full = np.argmax(every, axis=1)
    allowed = (tolerance * np.bincount(full, minlength=start.shape[1])).astype(np.int64)
    scores, alive = start.copy(), np.ones(start.shape, dtype=bool)
    walking, done, gaps = np.arange(len(features)), 0, []
    for rounds, margin in cascade:
        step = np.zeros((walking.size, start.shape[1]))
        for round_ in range(done, rounds):
            step += (
                booster.predict(
                    features[walking], raw_score=True, num_threads=1, start_iteration=round_, num_iteration=1
                ).reshape(step.shape)
                * alive[walking]
            )
        scores[walking] += step
        done = rounds
        walking = walking[lead(scores[walking]) <= margin]
        behind = scores[walking].max(axis=1, keepdims=True) - scores[walking]
        target = full[walking]
        # The gap of each point's every-tree class, where that class still walks.
        own = behind[np.arange(walking.size), target]
        kept = alive[walking, target]
        gap = _tolerated(own[kept], target[kept], allowed)
        gaps.append(gap)
        alive[walking] &= behind <= gap
        walking = walking[alive[walking].sum(axis=1) > 1]
    return gaps


def _tolerated(values: np.ndarray, codes: np.ndarray, allowed: np.ndarray) -> float:
    """The least threshold that leaves at most allowed[code] of each code's `values` above it (the
    largest of the codes' (allowed + 1)-th largest values; 0 when none has more than its allowance)."""
    threshold = 0.0
    for code in np.unique(codes):
        of_code = values[codes == code]
        if allowed[code] < of_code.size:
            k = of_code.size - 1 - allowed[code]
            threshold = max(threshold, float(np.partition(of_code, k)[k]))
    return threshold


class TrainedClassifier:
    """A trained model behind the `Classifier` protocol."""

    def __init__(self, model: TrainedModel, name: str, version: str, sha256: str | None = None) -> None:
        self.model = model
        self.name = name
        self.version = version
        self.sha256 = sha256  # of the signed file as stored (the catalog's), which outputs name
        self.params = {
            **model.params,
            "classes": list(model.classes),
            "features_version": model.features_version,
            "standard_version": model.standard_version,
            # Why it was offered, for the job's summary, manifest and e-mail: its macro F1 and
            # standard's on the customer's held-out labels.
            "held_out_macro_f1": model.evaluation.get("macro_f1"),
            "standard_held_out_macro_f1": model.evaluation.get("standard_macro_f1"),
        }

    def classify(self, block: PointBlock) -> np.ndarray:
        return self.model.predict(block)
