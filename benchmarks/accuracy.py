"""Accuracy of the built-in classifiers on every labelled file in ../shared/data, per file and
per source, next to SMRF (PDAL's defaults) and CSF run on the same points.

Run from the repository root:  python -m benchmarks.accuracy [--data DIR] [--no-csf] [--quick]

The headline is leave-one-source-out (see benchmarks.tuning): for each source (ISPRS, IGN, AHN3,
NEON, USGS, lidR), pointflow's parameters are chosen on the other sources only, then scored on
it.  The "defaults" column is the shipped parameter set, chosen on all sources: it has seen the
file it reports, so it is shown for reference only.  Scoring rules: ../shared/data/README.md.
Timings are classification only (no file I/O), one core.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.labelled import DEFAULT_DATA, GROUND, Labelled, load_all
from benchmarks.peers import PEERS
from benchmarks.tuning import candidates, leave_one_source_out
from pipelines.classifiers import PointBlock, get_classifier
from pipelines.classifiers.ground import GroundParams

VEGETATION = (3, 4, 5)


@dataclass(frozen=True)
class GroundScore:
    total: float
    type1: float
    type2: float
    kappa: float


def ground_score(reference: np.ndarray, predicted: np.ndarray) -> GroundScore:
    """ISPRS measures (Sithole and Vosselman 2004) of boolean ground masks."""
    n = reference.size
    a = np.count_nonzero(reference & predicted)  # ground kept
    b = np.count_nonzero(reference & ~predicted)  # ground rejected (type I)
    c = np.count_nonzero(~reference & predicted)  # object accepted (type II)
    d = n - a - b - c
    observed = (a + d) / n
    expected = ((a + b) * (a + c) + (c + d) * (b + d)) / n**2
    kappa = (observed - expected) / (1 - expected) if expected < 1 else 1.0
    return GroundScore((b + c) / n, b / max(a + b, 1), c / max(c + d, 1), kappa)


def timed(classify: Callable[[PointBlock], np.ndarray], block: PointBlock) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    with threadpool_limits(limits=1):
        result = classify(block)
    return result, time.perf_counter() - start


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def pct(v: float) -> str:
    return f"{100 * v:.2f}"


def score(item: Labelled, classes: np.ndarray) -> GroundScore:
    keep = item.scored
    return ground_score(item.labels[keep] == GROUND, classes[keep] == GROUND)


def report_ground(
    items: list[Labelled],
    peers: list[str],
    held_out: dict[str, float],
    results: dict[tuple[str, str], tuple[np.ndarray, float]],
) -> None:
    print("Ground (ASPRS 2 vs the rest): total error in %, each file's points scored as its README says.")
    print("pointflow LOSO: parameters chosen without the file's source (the headline); defaults: the shipped set.")
    headers = [
        "file",
        "source",
        "points",
        "pointflow LOSO",
        "defaults",
        *peers,
        "best peer",
        "I",
        "II",
        "kappa",
        "Mpt/s",
    ]
    rows, per_source = [], {}
    for item in items:
        ours = score(item, results[item.name, "pointflow"][0])
        others = [score(item, results[item.name, p][0]).total for p in peers]
        loso = held_out[item.name]
        seconds = results[item.name, "pointflow"][1]
        rows.append(
            [
                item.name,
                item.source,
                f"{int(item.scored.sum()):,}",
                pct(loso),
                pct(ours.total),
                *map(pct, others),
                pct(min(others)),
                pct(ours.type1),
                pct(ours.type2),
                f"{ours.kappa:.3f}",
                f"{len(item.block) / seconds / 1e6:.2f}",
            ]
        )
        per_source.setdefault(item.source, []).append([loso, ours.total, *others])
    print(table(headers, rows))

    print("\nPer source (mean of the files' total errors, %) and the headline groups")
    groups = {f"{s} ({len(v)})": v for s, v in per_source.items()}
    corpus = [
        [
            held_out[i.name],
            score(i, results[i.name, "pointflow"][0]).total,
            *(score(i, results[i.name, p][0]).total for p in peers),
        ]
        for i in items
        if i.in_corpus
    ]
    if corpus:
        groups[f"corpus/ ({len(corpus)})"] = corpus
    srows = [[name, "", *(pct(v) for v in np.mean(values, axis=0))] for name, values in groups.items()]
    print(table(["source", "", "pointflow LOSO", "defaults", *peers], srows))

    corpus_items = [i for i in items if i.in_corpus]
    if corpus_items:
        best_peer = {i.name: min(score(i, results[i.name, p][0]).total for p in peers) for i in corpus_items}
        wins = sum(held_out[i.name] < best_peer[i.name] for i in corpus_items)
        worst = max(held_out[i.name] - best_peer[i.name] for i in corpus_items)
        print(
            f"\ncorpus/: pointflow (LOSO) better than both peers on {wins} of {len(corpus_items)} scenes; "
            f"largest deficit to the better peer {100 * worst:+.2f} points"
        )


def class_f1(reference: np.ndarray, predicted: np.ndarray) -> tuple[float, float, float]:
    tp = np.count_nonzero(reference & predicted)
    n_pred, n_ref = np.count_nonzero(predicted), np.count_nonzero(reference)
    return tp / max(n_pred, 1), tp / max(n_ref, 1), 2 * tp / max(n_pred + n_ref, 1)


def report_classes(items: list[Labelled], results: dict[tuple[str, str], tuple[np.ndarray, float]]) -> None:
    print(
        "\n'standard' per class on the multi-class scenes: F1 (precision / recall); vegetation is our 3/4/5 "
        "against theirs; '-' where the scene has no such label"
    )
    rows = []
    for item in items:
        if not item.name.lower().startswith(("ign", "ahn3")):
            continue
        keep = item.scored
        ref, ours = item.labels[keep], results[item.name, "standard"][0][keep]
        cells = []
        for ref_mask, our_mask in (
            (ref == 2, ours == 2),
            (ref == 6, ours == 6),
            (np.isin(ref, VEGETATION), np.isin(ours, VEGETATION)),
        ):
            if not ref_mask.any():
                cells.append("-")
                continue
            p, r, f = class_f1(ref_mask, our_mask)
            cells.append(f"{f:.3f} ({p:.2f}/{r:.2f})")
        rows.append([item.name, item.source, *cells])
    print(table(["file", "source", "ground 2", "building 6", "vegetation 3-5"], rows))


def rule(p: GroundParams) -> str:
    return f"{p.ground_above:.2f} + {p.ground_above_per_spacing:.2f} x spacing + {p.ground_above_per_slope:.2f} x slope"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=__import__("pathlib").Path,
        default=DEFAULT_DATA,
        help="the shared data folder (default: ../shared/data)",
    )
    parser.add_argument("--no-csf", action="store_true", help="skip CSF (the slowest peer)")
    args = parser.parse_args(argv)

    items = load_all(args.data)
    if not items:
        parser.error(f"no labelled files under {args.data}")
    peers = [name for name in PEERS if not (args.no_csf and name == "CSF")]
    methods: dict[str, Callable[[PointBlock], np.ndarray]] = {
        "pointflow": get_classifier("ground").classify,
        "standard": get_classifier("standard").classify,
        **{name: PEERS[name] for name in peers},
    }
    results = {(item.name, name): timed(classify, item.block) for item in items for name, classify in methods.items()}

    held, chosen = leave_one_source_out(items, candidates())
    held_out = {name: error for h in held for name, error in h.errors.items()}
    report_ground(items, peers, held_out, results)
    print("\nGround tolerance above the surface chosen per held-out source (m):")
    for h in held:
        print(f"  without {h.source:6s} {rule(h.chosen)}")
    same = "= the shipped defaults" if chosen == GroundParams() else "DIFFERS from the shipped defaults"
    print(f"  all sources    {rule(chosen)} ({same})")
    report_classes(items, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
