"""Choosing the ground filter's parameters by leave-one-source-out.

The candidates are GroundParams that differ in a few parameters.  For each source in turn, the
candidate with the lowest error on all the *other* sources is chosen and scored on the held-out
source: those held-out figures say how the filter does on a producer it has never seen.  The
error of a set of sources is the mean over sources of the mean total error of their files, so a
source with many files counts no more than one with a single file.  The shipped defaults are the
candidate chosen on all sources.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from benchmarks.labelled import GROUND, Labelled
from pipelines.classifiers.ground import GroundParams, decide, fit_surface

# Parameters of the decision rule only (cheap: no refit); see GroundParams.
GRID: dict[str, tuple[float, ...]] = {
    "ground_above": (0.1, 0.15, 0.2),
    "ground_above_per_spacing": (0.1, 0.2, 0.3),
}


def candidates(base: GroundParams | None = None) -> list[GroundParams]:
    base = base or GroundParams()
    names = list(GRID)
    return [
        dataclasses.replace(base, **dict(zip(names, values, strict=True)))
        for values in itertools.product(*(GRID[n] for n in names))
    ]


def total_error(item: Labelled, is_ground: np.ndarray) -> float:
    keep = item.scored
    return float(np.mean(is_ground[keep] != (item.labels[keep] == GROUND)))


def error_table(items: list[Labelled], params: list[GroundParams]) -> np.ndarray:
    """Total error (files x candidates); one surface fit per file, the candidates' rules on it."""
    structure = params[0]
    if any(dataclasses.replace(p, **{name: getattr(structure, name) for name in GRID}) != structure for p in params):
        raise ValueError("candidates may differ only in the decision rule's parameters (GRID)")
    fits = [fit_surface(item.block, structure) for item in items]
    table = np.empty((len(items), len(params)))
    for j, p in enumerate(params):
        for i, (item, fit) in enumerate(zip(items, fits, strict=True)):
            table[i, j] = total_error(item, decide(fit, p)[0])
    return table


def source_error(items: list[Labelled], table: np.ndarray, sources: Iterable[str]) -> np.ndarray:
    """Per candidate: mean over `sources` of the mean error of their files."""
    wanted = set(sources)
    per_source = []
    for source in sorted(wanted):
        rows = [i for i, item in enumerate(items) if item.source == source]
        per_source.append(table[rows].mean(axis=0))
    return np.mean(per_source, axis=0)


@dataclass(frozen=True)
class HeldOut:
    source: str
    chosen: GroundParams
    errors: dict[str, float]  # file -> total error with the parameters chosen without its source


def leave_one_source_out(items: list[Labelled], params: list[GroundParams]) -> tuple[list[HeldOut], GroundParams]:
    """Held-out results per source, and the candidate chosen on all sources."""
    table = error_table(items, params)
    sources = sorted({item.source for item in items})
    held = []
    for source in sources:
        best = int(np.argmin(source_error(items, table, [s for s in sources if s != source])))
        held.append(
            HeldOut(
                source,
                params[best],
                {item.name: float(table[i, best]) for i, item in enumerate(items) if item.source == source},
            )
        )
    overall = params[int(np.argmin(source_error(items, table, sources)))]
    return held, overall
