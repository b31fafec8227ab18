"""Where one tile's classification goes: the standard classifier on a tile of the speed benchmark's
10 M point file, as a worker gets it (the 200 m tile and its 20 m ring, about 1.4 M points).

Run from the repository root:  python -m benchmarks.tile_profile [--repeats N] [--points N]

Prints the least CPU seconds (user + sys of this process) of --repeats runs of the whole
classifier, then the CPU of each of the classifier's own functions in one profiled run (cProfile,
cumulative: a function's figure includes the functions it calls), largest first. The first run is
not counted: it loads the compiled loops (or compiles them, when their cache is empty; its time is
printed). The tile is cut once from the input `benchmarks.speed` builds and kept in benchmarks/out/.
To compare two versions of the code, run this with each in turn, alternately: the machine is shared.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import laspy
import numpy as np

from benchmarks.speed import OUT, build_input
from pipelines.classifiers.base import PointBlock
from pipelines.classifiers.standard import StandardClassifier
from pipelines.lasio import iter_chunks, point_block
from pipelines.tile import TileGrid

FIELDS = ("x", "y", "z", "intensity", "return_number", "number_of_returns")


def tile_block(points: int) -> PointBlock:
    """The tile at column 1, row 1 of the benchmark input's 200 m grid, with its 20 m ring."""
    source = build_input(points)
    cached = OUT / f"{source.stem}_tile.npz"
    if not cached.exists():
        with laspy.open(source) as reader:
            header = reader.header
            grid = TileGrid.covering(tuple(header.mins), tuple(header.maxs), 200.0, 20.0)
        x0, y0 = grid.origin_x + grid.size - grid.buffer, grid.origin_y + grid.size - grid.buffer
        x1, y1 = x0 + grid.size + 2 * grid.buffer, y0 + grid.size + 2 * grid.buffer
        parts = []
        for chunk in iter_chunks(source):
            block = point_block(chunk)
            inside = (block.x >= x0) & (block.x < x1) & (block.y >= y0) & (block.y < y1)
            parts.append({name: getattr(block, name)[inside] for name in FIELDS})
        np.savez(cached, **{name: np.concatenate([part[name] for part in parts]) for name in FIELDS})
    with np.load(cached) as arrays:
        return PointBlock(**{name: arrays[name] for name in FIELDS})


def cpu() -> float:
    return time.process_time()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--points", type=int, default=10_000_000, help="the benchmark input's size")
    args = parser.parse_args(argv)
    block = tile_block(args.points)
    classifier = StandardClassifier()
    started = cpu()
    classifier.classify(block)
    print(f"tile of {len(block):,} points; first run {cpu() - started:.3f} CPU-s")
    runs = []
    for _ in range(args.repeats):
        started = cpu()
        classifier.classify(block)
        runs.append(cpu() - started)
    print(f"whole classifier: least {min(runs):.3f} CPU-s of {args.repeats} (median {np.median(runs):.3f})")
    profile = cProfile.Profile()
    profile.enable()
    classifier.classify(block)
    profile.disable()
    stats = pstats.Stats(profile).stats
    rows = [
        (cumulative, f"{name} ({path.split('pipelines/')[-1]}:{line})")
        for (path, line, name), (_, _, _, cumulative, _) in stats.items()
        if "pipelines/classifiers/" in path
    ]
    for cumulative, where in sorted(rows, reverse=True):
        if cumulative >= 0.002:
            print(f"{cumulative:8.3f}  {where}")


if __name__ == "__main__":
    main()
