"""Where a custom model's prediction time goes, per point, against `standard`.

Run from the repository root:  python -m benchmarks.custom_profile [--scenes NAME,...] [--repeats N]

For each scene, a model is trained on one half as in `benchmarks.custom`, and then the parts of
`TrainedModel.predict` on the other half are timed separately: the ground model and standard's classes
(which `point_features` shares with `standard`), the points' cells on the features' dyadic grids,
the neighbourhood scales of the features, the context of standard's classes, and the trees
(as `predict_features` walks them, compiled: `forest.Forest`, with the model's early decisions,
and with them but no class dropped),
plus every point walking every tree, compiled and with LightGBM's predict (one thread, and its
default threads). Figures are CPU seconds of this process
(user + sys), the least of `--repeats` runs, in microseconds per point and as a multiple of the
whole `standard` classifier on the same points: the machine is shared, so wall time says little.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import numpy as np

from benchmarks.custom import cpu_seconds, halves, scored
from benchmarks.labelled import DEFAULT_DATA, load
from pipelines.classifiers import features
from pipelines.classifiers.fitting import train
from pipelines.classifiers.ground import ground_model
from pipelines.classifiers.standard import StandardClassifier, StandardParams, standard_classes

SCENES: tuple[str, ...] = ("ign_st_barth_100m.laz", "corpus/IGN_montpellier_6tiles.laz")


def least_cpu(run: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = cpu_seconds()
        run()
        best = min(best, cpu_seconds() - started)
    return best


def profile(relative: str, repeats: int) -> list[tuple[str, float]]:
    scene = load(DEFAULT_DATA, relative, "")
    block, labels = scene.block, scene.labels
    keep = scored(scene.name, labels)
    lower = halves(block, labels, keep)
    learn, test = block.take(lower), block.take(~lower)
    model = train([learn], [np.where(keep[lower], labels[lower], 0)], ignore_classes=(0,))
    params = StandardParams()
    ground = ground_model(test, params.ground)
    standard = standard_classes(test, ground, params)
    matrix = features.point_features(test)
    # As `point_features` does: shapes from heights above the morphological surface.
    shapes = dataclasses.replace(ground, height=ground.provisional_height)
    base = features.base_cell(shapes)
    cells = features.DyadicCells(test, min(base, features.CONTEXT_CELLS[0]))
    width = sum(len(features.scale_names(s)) for s in features.SCALES)
    scratch = np.zeros((len(test), width), dtype=np.float32, order="F")
    every_tree = dataclasses.replace(model, cascade=[], prune=[])
    unpruned = dataclasses.replace(model, prune=[])
    stages = ", ".join(f"{r} rounds, > {m:.2f}" for r, m in model.cascade) or "none"
    parts = [
        ("standard, whole", lambda: StandardClassifier(params).classify(test)),
        ("custom, whole (predict)", lambda: model.predict(test)),
        ("  ground model", lambda: ground_model(test, params.ground)),
        ("  standard's classes", lambda: standard_classes(test, ground, params)),
        ("  features, whole", lambda: features.point_features(test)),
        (
            f"    dyadic cells (finest {cells.finest.cell:g} m)",
            lambda: features.DyadicCells(test, min(base, features.CONTEXT_CELLS[0])),
        ),
        (
            f"    scales {features.SCALES} of {base:g} m",
            lambda: features._scale_features(test, shapes, cells, base, scratch),
        ),
        (
            "    context of standard's classes",
            lambda: features._context_features(
                test, standard, cells, np.zeros((len(test), len(features._CONTEXT)), dtype=np.float32, order="F")
            ),
        ),
        (f"  trees, early decisions {stages}", lambda: model.predict_features(matrix)),
        ("  trees, the same without dropping classes", lambda: unpruned.predict_features(matrix)),
        (f"  trees, every point all {model.booster.num_trees()}", lambda: every_tree.predict_features(matrix)),
        ("  trees, all, LightGBM's predict", lambda: model.booster.predict(matrix, raw_score=True, num_threads=1)),
        ("  trees, all, LightGBM's default threads", lambda: model.booster.predict(matrix, raw_score=True)),
    ]
    print(f"{scene.name}: {len(test):,} points classified, classes {list(model.classes)}, base cell {base:g} m")
    rows = [(name, least_cpu(run, repeats)) for name, run in parts]
    reference = rows[0][1]
    for name, seconds in rows:
        print(
            f"  {name:44s} {seconds:7.3f} s cpu  {seconds / len(test) * 1e6:6.2f} us/point  "
            f"{seconds / reference:5.2f} x standard"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", default=None, help="comma-separated scene files under the data folder")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each part; the least CPU time counts")
    args = parser.parse_args(argv)
    for relative in args.scenes.split(",") if args.scenes else SCENES:
        profile(relative, args.repeats)


if __name__ == "__main__":
    main()
