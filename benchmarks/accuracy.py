"""Accuracy and speed of the built-in classifiers on real labelled LiDAR, next to CSF.

Run from the repository root:  python -m benchmarks.accuracy [--data DIR] [--no-csf]

Data: ../shared/data (see its README).  ISPRS filter-test samples (Sithole and Vosselman 2004),
IGN LiDAR HD (Saint-Barthelemy), lidR example data.  CSF is the cloth simulation filter
(Zhang et al. 2016, PyPI cloth-simulation-filter) with its out-of-the-box parameters, once with
its default bSloopSmooth=True and once with bSloopSmooth=False.

Timings are classification only (no file I/O), time.perf_counter, one core (CSF's OpenMP is
limited to one thread), best of 3 runs for pointflow and a single run for CSF (it is slower on
most files and deterministic).  The tiling table replays what the
tiled runner does (tiles with a buffer ring, core points kept) and compares with untiled runs.
The trained section fits the per-account model on the IGN block and scores held-out 10 m tiles.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import laspy
import numpy as np
from threadpoolctl import threadpool_limits

from pipelines.classifiers import PointBlock, get_classifier
from pipelines.lasio import point_block

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ISPRS = ("samp11", "samp21", "samp31", "samp51", "samp61")
GROUND_CLASS = 2
VEGETATION = (3, 4, 5)


@dataclass(frozen=True)
class Labelled:
    name: str
    block: PointBlock
    labels: np.ndarray


def load(path: Path) -> Labelled:
    las = laspy.read(path)
    return Labelled(path.stem, point_block(las), np.asarray(las.classification, dtype=np.uint8))


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence C++ progress output written straight to file descriptor 1 (CSF)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def csf_ground(slope_smooth: bool) -> Callable[[PointBlock], np.ndarray]:
    import CSF

    def classify(block: PointBlock) -> np.ndarray:
        # Local coordinates: CSF works in float and would lose precision on UTM values.
        xyz = np.column_stack([block.x - block.x.min(), block.y - block.y.min(), block.z])
        csf = CSF.CSF()
        csf.params.bSloopSmooth = slope_smooth
        csf.setPointCloud(xyz)
        ground, off_ground = CSF.VecInt(), CSF.VecInt()
        # CSF runs OpenMP threads; one thread keeps the speed comparison per core.
        with quiet_stdout(), threadpool_limits(limits=1, user_api="openmp"):
            csf.do_filtering(ground, off_ground, False)
        out = np.ones(len(block), dtype=np.uint8)
        out[np.asarray(ground, dtype=np.intp)] = GROUND_CLASS
        return out

    return classify


def timed(classify: Callable[[PointBlock], np.ndarray], block: PointBlock,
          repeats: int) -> tuple[np.ndarray, float]:
    """Classes and best wall time (s) over `repeats` runs."""
    best = np.inf
    result = np.empty(0, dtype=np.uint8)
    for _ in range(repeats):
        start = time.perf_counter()
        result = classify(block)
        best = min(best, time.perf_counter() - start)
    return result, best


@dataclass(frozen=True)
class GroundScore:
    total: float
    type1: float
    type2: float
    kappa: float
    f1: float


def ground_score(is_ground_ref: np.ndarray, is_ground: np.ndarray) -> GroundScore:
    """ISPRS measures (Sithole and Vosselman 2004) plus F1 of the ground class."""
    ref, pred = is_ground_ref, is_ground
    n = ref.size
    a = np.count_nonzero(ref & pred)  # ground kept
    b = np.count_nonzero(ref & ~pred)  # ground rejected (type I)
    c = np.count_nonzero(~ref & pred)  # object accepted (type II)
    d = n - a - b - c
    observed = (a + d) / n
    expected = ((a + b) * (a + c) + (c + d) * (b + d)) / n**2
    kappa = (observed - expected) / (1 - expected) if expected < 1 else 1.0
    return GroundScore(
        total=(b + c) / n,
        type1=b / max(a + b, 1),
        type2=c / max(c + d, 1),
        kappa=kappa,
        f1=2 * a / max(2 * a + b + c, 1),
    )


def subset(block: PointBlock, index: np.ndarray) -> PointBlock:
    def take(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[index]

    return PointBlock(block.x[index], block.y[index], block.z[index], take(block.intensity),
                      take(block.return_number), take(block.number_of_returns))


def classify_tiled(classify: Callable[[PointBlock], np.ndarray], block: PointBlock,
                   tile: float, buffer: float) -> np.ndarray:
    """What the tiled runner does: tiles on a grid of `tile` metres, each classified with a
    `buffer` ring of context, only its core points kept."""
    out = np.zeros(len(block), dtype=np.uint8)
    col, row = np.floor(block.x / tile), np.floor(block.y / tile)
    for c in np.unique(col):
        for r in np.unique(row):
            core = (col == c) & (row == r)
            if not core.any():
                continue
            x0, y0 = c * tile, r * tile
            near = np.flatnonzero((block.x >= x0 - buffer) & (block.x < x0 + tile + buffer)
                                  & (block.y >= y0 - buffer) & (block.y < y0 + tile + buffer))
            classes = classify(subset(block, near))
            inner = core[near]
            out[near[inner]] = classes[inner]
    return out


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def pct(v: float) -> str:
    return f"{100 * v:.2f}"


def scored_mask(item: Labelled) -> np.ndarray:
    """Points with trustworthy labels (see the data README)."""
    if item.name.startswith("ign"):
        return item.labels != 1
    if item.name == "lidr_topography":
        return item.labels != 9
    return np.ones(item.labels.size, dtype=bool)


def class_rows(reference: np.ndarray, predicted: np.ndarray,
               classes: list[tuple[str, int, float | None]]) -> list[list[str]]:
    rows = []
    for label, code, target in classes:
        tp = np.count_nonzero((predicted == code) & (reference == code))
        n_pred, n_ref = np.count_nonzero(predicted == code), np.count_nonzero(reference == code)
        rows.append([label, str(n_ref), str(n_pred), f"{tp / max(n_pred, 1):.3f}",
                     f"{tp / max(n_ref, 1):.3f}", f"{2 * tp / max(n_pred + n_ref, 1):.3f}",
                     "" if target is None else f">= {target:.2f}"])
    return rows


CLASS_HEADERS = ["class", "reference", "predicted", "precision", "recall", "F1", "target"]
IGN_CLASSES: list[tuple[str, int, float | None]] = [
    ("ground 2", 2, 0.95), ("vegetation 3/4/5", 5, 0.90), ("building 6", 6, 0.90),
    ("low noise 7", 7, None)]

Results = dict[tuple[str, str], tuple[np.ndarray, float]]


def report_ground(items: list[Labelled], methods: list[str], results: Results) -> None:
    print("Ground filtering (ASPRS 2 vs rest); TE total error, I ground rejected, II object "
          "accepted, in %; speed = classification only")
    rows: list[list[str]] = []
    means: dict[str, list[GroundScore]] = {m: [] for m in methods}
    for item in items:
        keep = scored_mask(item)
        for method in methods:
            classes, seconds = results[item.name, method]
            s = ground_score(item.labels[keep] == GROUND_CLASS, classes[keep] == GROUND_CLASS)
            if item.name in ISPRS:
                means[method].append(s)
            rows.append([item.name, method, str(int(keep.sum())), pct(s.total), pct(s.type1),
                         pct(s.type2), f"{s.kappa:.3f}", f"{s.f1:.3f}",
                         f"{len(item.block) / seconds / 1e6:.2f}"])
    for method, scores in means.items():
        rows.append(["ISPRS mean", method, "", *(
            pct(np.mean([getattr(s, a) for s in scores])) for a in ("total", "type1", "type2")),
            f"{np.mean([s.kappa for s in scores]):.3f}",
            f"{np.mean([s.f1 for s in scores]):.3f}", ""])
    print(table(["file", "method", "points", "TE", "I", "II", "kappa", "F1 gnd", "Mpt/s"], rows))
    print("Scored points: IGN without its class 1, topography without water (9).")

    topo = next(i for i in items if i.name == "lidr_topography")
    water = topo.labels == 9
    shares = ", ".join(f"{m} {pct(np.mean(results[topo.name, m][0][water] == GROUND_CLASS))} %"
                       for m in methods)
    print(f"\nlidr_topography water (class 9, {int(water.sum())} points) called ground: {shares}")


def report_ign(ign: Labelled, results: Results) -> None:
    classes = results[ign.name, "pointflow standard"][0]
    keep = ign.labels != 1
    ours = np.where(np.isin(classes, VEGETATION), 5, classes)[keep]
    print(f"\nIGN {ign.name} with 'standard' (vegetation = our 3/4/5 against their 5; their "
          f"class 1 left out, {int(keep.sum())} points scored)")
    print(table(CLASS_HEADERS, class_rows(ign.labels[keep], ours, IGN_CLASSES)))
    counts = np.bincount(classes, minlength=19)
    print("predicted classes (all points): " + ", ".join(
        f"{c}: {counts[c]}" for c in np.flatnonzero(counts)))


def report_tiling(items: list[Labelled], results: Results) -> None:
    print("\nTiled vs untiled agreement (% of points with the same class); tiles of 100 m "
          "(40 m for the 100 m IGN block) to stress the edges")
    buffers = (10.0, 20.0, 30.0)
    rows = []
    for item in items:
        tile = 40.0 if item.name.startswith("ign") else 100.0
        for name in ("ground", "standard"):
            classify = get_classifier(name).classify
            whole = results[item.name, f"pointflow {name}"][0]
            agreement = [np.mean(classify_tiled(classify, item.block, tile, b) == whole)
                         for b in buffers]
            rows.append([item.name, name, *(f"{100 * a:.3f}" for a in agreement)])
    print(table(["file", "classifier", *(f"buffer {b:.0f} m" for b in buffers)], rows))


def report_trained(ign: Labelled, results: Results) -> None:
    """Per-account model on the only multi-class file: held-out tiles, next to 'standard'."""
    from pipelines.classifiers.trained import TrainedClassifier, holdout_mask, train

    model = train([ign.block], [ign.labels], seed=0, ignore_classes=[1])
    classifier = TrainedClassifier(model, name="ign-demo", version="1")
    predicted, seconds = timed(classifier.classify, ign.block, 1)
    # The same tiles train() held out (same seed, same draw order).
    held = holdout_mask(ign.block, model.params["holdout"], np.random.default_rng(0))
    scored = held & (ign.labels != 1)
    standard = results[ign.name, "pointflow standard"][0]
    standard = np.where(np.isin(standard, VEGETATION), 5, standard)
    print(f"\nTrained (HistGradientBoosting on {len(model.feature_names)} features, "
          f"{model.n_train} training points) on IGN, scored on the {int(scored.sum())} points of "
          f"held-out 10 m tiles; 'standard' on the same points below it")
    rows = class_rows(ign.labels[scored], predicted[scored], IGN_CLASSES[:3])
    rows += [[f"{r[0]} (standard)", *r[1:]]
             for r in class_rows(ign.labels[scored], standard[scored], IGN_CLASSES[:3])]
    print(table(CLASS_HEADERS[:-1], [r[:-1] for r in rows]))
    print(f"trained prediction incl. features: {len(ign.block) / seconds / 1e6:.3f} Mpt/s")


def report_speed(ign: Labelled, methods: list[str], results: Results) -> None:
    print("\nSpeed on the dense IGN block (classification only, one core)")
    rows = []
    for method in methods:
        seconds = results[ign.name, method][1]
        rows.append([method, f"{len(ign.block) / seconds / 1e6:.2f}",
                     f"{seconds / len(ign.block) * 1e6:.3f}"])
    print(table(["method", "Mpt/s", "us/pt"], rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--no-csf", action="store_true", help="skip the CSF comparison")
    parser.add_argument("--no-trained", action="store_true", help="skip the trained model")
    args = parser.parse_args(argv)

    isprs = [load(args.data / "isprs" / f"{s}.las") for s in ISPRS]
    others = [load(args.data / f) for f in
              ("lidr_megaplot.laz", "lidr_topography.laz", "ign_st_barth_100m.laz")]
    ign = others[-1]
    methods: list[tuple[str, Callable[[PointBlock], np.ndarray], int]] = [
        ("pointflow ground", get_classifier("ground").classify, 3),
        ("pointflow standard", get_classifier("standard").classify, 3),
    ]
    if not args.no_csf:
        methods += [("CSF default", csf_ground(True), 1),
                    ("CSF bSloopSmooth=False", csf_ground(False), 1)]
    names = [m for m, _, _ in methods]

    results: Results = {}
    for item in isprs + others:
        for method, classify, repeats in methods:
            results[item.name, method] = timed(classify, item.block, repeats)

    report_ground(isprs + others, names, results)
    report_ign(ign, results)
    report_tiling([isprs[0], isprs[4], *others], results)
    if not args.no_trained:
        report_trained(ign, results)
    report_speed(ign, names, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
