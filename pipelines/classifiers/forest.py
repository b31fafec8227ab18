"""A custom model's trees walked by compiled code, with its early decisions, point by point.

The trees are read from the booster's own text model (`Booster.model_to_string`, the format the
model file stores): per node its feature, threshold, decision type and children, per leaf its
value, and the bitsets of categorical splits. `Forest.scores` walks them as LightGBM's predictor
does (tree.h: `NumericalDecision`, `CategoricalDecision`; a feature within 1e-35 of zero is zero,
as LightGBM's dense rows drop it) and sums each class's trees in LightGBM's order, stage by stage
from zero, so the raw scores are LightGBM's to the bit (tests/test_classifiers.py compares them).

Why not LightGBM's predict: it costs about 22 ns per tree and point whatever the tree's depth, plus
about 0.1 us per point and call, and the early decisions call it once per stage on a gathered copy
of the walking points' rows. Here one pass takes each point through its stages, its row of
features staying in the cache while the trees (a few hundred KB) stay in the next one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from pipelines.compiled import compiled
from pipelines.errors import InvalidValue

# LightGBM's kZeroThreshold (a float): features within it of zero are zero to its predictor.
ZERO = float(np.float32(1e-35))
# Rows of a column-major matrix copied row-major at a time (1.2 MB of 38 float32 features): the copy
# reads each column's run of rows in order and the block stays in the core's cache while the trees
# walk it, where one transposing copy of a tile's whole matrix (1.4 M points, 211 MB) strode
# through memory and took as much memory again, fresh pages each tile.
ROWS = 8192


@dataclass(frozen=True)
class Forest:
    """Every tree of a multiclass booster as flat arrays; tree t adds to class t % classes."""

    classes: int
    rounds: int
    columns: int  # features the trees read (LightGBM's max_feature_idx + 1)
    first_node: np.ndarray  # (trees + 1,) each tree's nodes are first_node[t]:first_node[t + 1]
    first_leaf: np.ndarray  # (trees + 1,)
    feature: np.ndarray  # per node
    threshold: np.ndarray
    decision: np.ndarray  # LightGBM's decision_type: 1 categorical, 2 default left, 4 * missing type
    left: np.ndarray  # child node in the tree, or ~leaf
    right: np.ndarray
    bits_from: np.ndarray  # per node, categorical: where its bitset starts in `bits`
    bits_size: np.ndarray  # and how many 32-bit words it has
    bits: np.ndarray  # uint32
    leaf_value: np.ndarray

    @cached_property
    def plain(self) -> np.ndarray:
        """Per node: a numerical split without missing values whose threshold is not within LightGBM's
        zero threshold, decided on the float32 feature against `threshold32` (the same side)."""
        return ((self.decision & 13) == 0) & ((self.threshold < -ZERO) | (self.threshold >= ZERO))

    @cached_property
    def threshold32(self) -> np.ndarray:
        """The largest float32 at most each threshold: a float32 value v is at most the threshold
        exactly when it is at most this one, so the walker compares without converting v."""
        below = self.threshold.astype(np.float32)
        over = below.astype(np.float64) > self.threshold
        below[over] = np.nextafter(below[over], np.float32(-np.inf))
        return below

    @classmethod
    def from_model_string(cls, text: str) -> Forest:
        header, _, rest = text.partition("\nTree=")
        head = _fields(header)
        classes = int(head["num_tree_per_iteration"])
        trees = [_fields(chunk) for chunk in ("Tree=" + rest).split("\nend of trees")[0].split("\nTree=")]
        nodes, leaves, words = [0], [0], 0
        arrays: dict[str, list[np.ndarray]] = {
            name: [] for name in ("feature", "threshold", "decision", "left", "right", "from", "size", "bits", "leaf")
        }
        for tree in trees:
            if tree.get("is_linear", "0") != "0":
                raise InvalidValue("linear trees are not supported")
            leaf = _numbers(tree["leaf_value"], np.float64)
            inner = int(tree["num_leaves"]) - 1
            if inner:
                decision = _numbers(tree["decision_type"], np.int64).astype(np.uint8)
                threshold = _numbers(tree["threshold"], np.float64)
                arrays["feature"].append(_numbers(tree["split_feature"], np.int32))
                arrays["threshold"].append(threshold)
                arrays["decision"].append(decision)
                arrays["left"].append(_numbers(tree["left_child"], np.int32))
                arrays["right"].append(_numbers(tree["right_child"], np.int32))
                start, size = np.zeros(inner, np.int32), np.zeros(inner, np.int32)
                if int(tree.get("num_cat", "0")):
                    bounds = _numbers(tree["cat_boundaries"], np.int32)
                    bits = _numbers(tree["cat_threshold"], np.int64).astype(np.uint32)
                    categorical = (decision & 1).astype(bool)
                    index = threshold[categorical].astype(np.int32)
                    start[categorical] = words + bounds[index]
                    size[categorical] = bounds[index + 1] - bounds[index]
                    arrays["bits"].append(bits)
                    words += bits.size
                arrays["from"].append(start)
                arrays["size"].append(size)
            arrays["leaf"].append(leaf)
            nodes.append(nodes[-1] + inner)
            leaves.append(leaves[-1] + leaf.size)
        if len(trees) % classes:
            raise InvalidValue("a model's trees are not whole rounds")

        def joined(name: str, dtype: type) -> np.ndarray:
            return np.concatenate(arrays[name]).astype(dtype) if arrays[name] else np.empty(0, dtype)

        return cls(
            classes=classes,
            rounds=len(trees) // classes,
            columns=int(head["max_feature_idx"]) + 1,
            first_node=np.asarray(nodes, np.int64),
            first_leaf=np.asarray(leaves, np.int64),
            feature=joined("feature", np.int32),
            threshold=joined("threshold", np.float64),
            decision=joined("decision", np.uint8),
            left=joined("left", np.int32),
            right=joined("right", np.int32),
            bits_from=joined("from", np.int32),
            bits_size=joined("size", np.int32),
            bits=joined("bits", np.uint32),
            leaf_value=joined("leaf", np.float64),
        )

    def scores(
        self,
        features: np.ndarray,
        scores: np.ndarray,
        cascade: list[tuple[int, float]],
        prune: Sequence[float] = (),
    ) -> None:
        """Add the trees' raw scores to `scores` (points, classes), the head start, in place: each
        stage (rounds, margin) of `cascade` sums its rounds' trees from zero and adds them, and a
        point whose best class then leads the next by more than the margin stops; the others walk
        on, each stage's `prune` (if given) dropping their classes further behind the best than it:
        a dropped class walks no more trees and keeps its score. As `TrainedModel.scores` did with
        LightGBM's predict (and `trained.choose_pruning` does with it)."""
        if features.ndim != 2 or features.shape[1] < self.columns or scores.shape != (len(features), self.classes):
            raise InvalidValue(f"the trees read {self.columns} features into {self.classes} scores per point")
        rounds = np.asarray([r for r, _ in cascade] + [self.rounds], dtype=np.int64)
        margins = np.asarray([m for _, m in cascade] + [np.inf])
        if len(prune) not in (0, len(cascade)):
            raise InvalidValue("a class pruning gap per early decision, or none")
        gaps = np.asarray([*prune] + [np.inf] * (len(cascade) + 1 - len(prune)), dtype=np.float64)
        if features.flags.c_contiguous and features.dtype == np.float32:
            self._walk_rows(features, scores, rounds, margins, gaps)
            return
        block = np.empty((min(ROWS, len(features)), features.shape[1]), dtype=np.float32)
        for start in range(0, len(features), ROWS):
            rows = features[start : start + ROWS]
            np.copyto(block[: len(rows)], rows, casting="unsafe")
            self._walk_rows(block[: len(rows)], scores[start : start + len(rows)], rounds, margins, gaps)

    def _walk_rows(
        self, features: np.ndarray, scores: np.ndarray, rounds: np.ndarray, margins: np.ndarray, gaps: np.ndarray
    ) -> None:
        _walk(
            features,
            scores,
            rounds,
            margins,
            gaps,
            self.classes,
            self.first_node,
            self.first_leaf,
            self.feature,
            self.plain,
            self.threshold32,
            self.threshold,
            self.decision,
            self.left,
            self.right,
            self.bits_from,
            self.bits_size,
            self.bits,
            self.leaf_value,
        )


def _fields(chunk: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in chunk.splitlines() if "=" in line)


def _numbers(text: str, dtype: type) -> np.ndarray:
    return np.array(text.split(), dtype=np.float64 if dtype is np.float64 else np.int64).astype(dtype)


@compiled
def _walk(
    features,
    scores,
    rounds,
    margins,
    gaps,
    classes,
    first_node,
    first_leaf,
    feature,
    plain,
    threshold32,
    threshold,
    decision,
    left,
    right,
    bits_from,
    bits_size,
    bits,
    leaf_value,
):
    step = np.empty(classes)
    alive = np.empty(classes, dtype=np.bool_)
    for p in range(features.shape[0]):
        row = features[p]
        done = 0
        alive[:] = True
        for stage in range(rounds.size):
            step[:] = 0.0
            for round_ in range(done, rounds[stage]):
                for c in range(classes):
                    if not alive[c]:
                        continue
                    # The tree's leaf for this row: tree.h's GetLeaf.
                    tree = np.uint64(round_ * classes + c)
                    base = first_node[tree]
                    node = 0 if first_node[tree + np.uint64(1)] > base else -1
                    while node >= 0:
                        k = np.uint64(base + node)  # unsigned: numba indexes it without a negative-index check
                        if plain[k]:
                            # The float32 value against the float32 threshold below: the same side. NaN is
                            # zero to LightGBM where a split has no missing values.
                            go_left = row[np.uint64(feature[k])] <= threshold32[k]
                            if not go_left and np.isnan(row[np.uint64(feature[k])]):
                                go_left = 0.0 <= threshold[k]
                            node = left[k] if go_left else right[k]
                            continue
                        # In double, within 1e-35 of zero zero, as LightGBM's dense rows give it.
                        value = np.float64(row[np.uint64(feature[k])])
                        if -ZERO <= value <= ZERO:
                            value = 0.0
                        kind = decision[k]
                        if kind & 1:
                            # CategoricalDecision: NaN and negative codes go right, else left when in the bitset.
                            go_left = False
                            if not np.isnan(value):
                                code = int(value)
                                if code >= 0:
                                    word = code >> 5
                                    if word < bits_size[k]:
                                        go_left = (bits[np.uint64(bits_from[k] + word)] >> (code & 31)) & 1 == 1
                        else:
                            # NumericalDecision.
                            missing = (kind >> 2) & 3
                            if np.isnan(value) and missing != 2:
                                value = 0.0
                            if (missing == 1 and value == 0.0) or (missing == 2 and np.isnan(value)):
                                go_left = (kind & 2) != 0
                            else:
                                go_left = value <= threshold[k]
                        node = left[k] if go_left else right[k]
                    leaf = first_leaf[tree] + ~node
                    step[c] += leaf_value[np.uint64(leaf)]
            done = rounds[stage]
            # The best score and the next (equal to it on a tie), as `trained.lead` finds them.
            best = -np.inf
            second = -np.inf
            for c in range(classes):
                scores[p, c] += step[c]
                value = scores[p, c]
                if value > best:
                    second = best
                    best = value
                elif value > second:
                    second = value
            if best - second > margins[stage]:
                break
            left_walking = 0
            for c in range(classes):
                if best - scores[p, c] > gaps[stage]:
                    alive[c] = False
                left_walking += alive[c]
            if left_walking < 2:
                break  # only its best class is left: it keeps it
