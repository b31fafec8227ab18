"""Choosing the standard classifier's building parameters by leave-one-source-out.

Run from the repository root:  python -m benchmarks.building [--data DIR]

Only two sources label buildings (IGN, AHN3), so each is held out in turn and the candidate is
chosen on the other.  A candidate is a set of values of the building rules that standard 2.2.0
and later added (GRID); the reference is the same classifier with those rules switched off
(standard 2.1.0's behaviour).  A candidate is eligible only if no file of the tuning sources loses more than
MAX_LOSS building F1 against the reference (a rule that helps two files and costs another is a
loss on data we do not have); among the eligible, the one with the highest mean over sources of
the mean building F1 of their files wins.  The shipped defaults are the candidate chosen on both.
Scoring rules: ../shared/data/README.md (benchmarks.labelled).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from pathlib import Path

import numpy as np

from benchmarks.labelled import DEFAULT_DATA, Labelled, load_all
from pipelines.classifiers.ground import GroundParams, ground_model
from pipelines.classifiers.standard import StandardParams, standard_classes

BUILDING = 6
MAX_LOSS = 0.005
GRID: dict[str, tuple[float, ...]] = {
    "margin_above_roof": (math.inf, 1.0, 2.0, 3.0),
    "planar_segment_fraction": (0.8, 0.9),
    "planar_min_area": (5.0, 8.0, 10.0),
    "planar_min_mean_height": (2.0, 2.5),
    "last_return_cell_factor": (0.0, 2.0),
    "last_return_under_crown": (0.5, math.inf),
    "last_return_growth": (0.0, 1.0, 2.0),
    "last_return_growth_under_crown": (0.0, 0.5),
    "continuation_tolerance": (0.0, 0.2),
    "continuation_radius": (0.5, 1.0),
}
# The rules switched off: no margin cut, the planar floors equal to the plain ones, no last-return
# pass (standard 2.3.0's roofs among split pulses), no smaller floor under crowns (2.4.0) and no
# growth of those roofs along their planes (2.5.0; which segments grow is then moot), no roof
# continuation (2.6.0).
REFERENCE = {
    "margin_above_roof": math.inf,
    "planar_segment_fraction": 0.8,
    "planar_min_area": 10.0,
    "planar_min_mean_height": 2.5,
    "last_return_cell_factor": 0.0,
    "last_return_under_crown": math.inf,
    "last_return_growth": 0.0,
    "last_return_growth_under_crown": 0.0,
    "continuation_tolerance": 0.0,
    "continuation_radius": 0.5,
}
# A rule switched off makes the parameters of what it feeds moot: (rule, off value, moot parameters).
MOOT = (
    (
        "last_return_cell_factor",
        0.0,
        ("last_return_under_crown", "last_return_growth", "last_return_growth_under_crown"),
    ),
    ("last_return_growth", 0.0, ("last_return_growth_under_crown",)),
    ("continuation_tolerance", 0.0, ("continuation_radius",)),
)


def candidates() -> list[dict[str, float]]:
    """Every combination of GRID's values, once per distinct classifier: where a rule is off, its
    moot parameters take REFERENCE's values (the same outputs, scored once)."""
    names = list(GRID)
    result: list[dict[str, float]] = []
    for values in itertools.product(*(GRID[n] for n in names)):
        candidate = dict(zip(names, values, strict=True))
        for rule, off, moot in MOOT:
            if candidate[rule] == off:
                candidate.update({name: REFERENCE[name] for name in moot})
        if candidate not in result:
            result.append(candidate)
    return result


def building_f1(item: Labelled, classes: np.ndarray) -> float:
    keep = item.scored
    ref, ours = item.labels[keep] == BUILDING, classes[keep] == BUILDING
    return 2 * np.count_nonzero(ref & ours) / max(np.count_nonzero(ref) + np.count_nonzero(ours), 1)


def f1_table(items: list[Labelled], grid: list[dict[str, float]]) -> np.ndarray:
    """Building F1 (files x candidates); one ground model per file."""
    table = np.empty((len(items), len(grid)))
    for i, item in enumerate(items):
        model = ground_model(item.block, GroundParams())
        for j, values in enumerate(grid):
            params = dataclasses.replace(StandardParams(), **values)
            table[i, j] = building_f1(item, standard_classes(item.block, model, params))
    return table


def choose(table: np.ndarray, sources: list[str], tuning: set[str], reference: int) -> int:
    """The eligible candidate (column) with the best mean over `tuning` sources of their files'
    mean F1; eligible: no file of those sources below the reference column by more than MAX_LOSS
    (the reference itself always is)."""
    rows = [i for i, s in enumerate(sources) if s in tuning]
    eligible = np.all(table[rows] >= table[rows, reference][:, None] - MAX_LOSS, axis=0)
    per_source = [table[[i for i in rows if sources[i] == s]].mean(axis=0) for s in sorted(tuning)]
    score = np.where(eligible, np.mean(per_source, axis=0), -np.inf)
    return int(np.argmax(score))


def describe(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in values.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (default: ../shared/data)"
    )
    args = parser.parse_args(argv)
    items = [i for i in load_all(args.data) if np.any(i.labels[i.scored] == BUILDING)]
    if not items:
        parser.error(f"no file with building labels under {args.data}")
    grid = candidates()
    reference = grid.index(REFERENCE)
    table = f1_table(items, grid)
    sources = [i.source for i in items]
    every = sorted(set(sources))
    for held in every:
        j = choose(table, sources, set(every) - {held}, reference)
        print(f"without {held}: {describe(grid[j])}")
        for i, item in enumerate(items):
            if item.source == held:
                print(f"  {item.name:28s} building F1 {table[i, j]:.4f} (rules off {table[i, reference]:.4f})")
    j = choose(table, sources, set(every), reference)
    shipped = {name: getattr(StandardParams(), name) for name in GRID}
    same = "= the shipped defaults" if grid[j] == shipped else "DIFFERS from the shipped defaults"
    print(f"all sources: {describe(grid[j])} ({same})")
    for i, item in enumerate(items):
        print(f"  {item.name:28s} building F1 {table[i, j]:.4f} (rules off {table[i, reference]:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
