"""Cost follows points, not extent: `pointflow classify` on sparse files spread over a continent.

Run from the repository root:  python -m benchmarks.sparse [--points 20000] [--extent-km 4000] [--runs 3]

Two inputs, made from real points (the lidR megaplot's heights and returns) by tests/hostile.py:
`spread`, every point on its own (issue 13's case: one point per tile), and `clustered`, the same
number of points in clusters of 20 (one modelled tile per cluster, so the classifier runs once per
cluster). Each run is the installed `pointflow` command in a fresh process with a fresh
POINTFLOW_HOME, as a user runs it: wall time includes start-up and, for `clustered`, the local
Dask cluster. Peak memory is the largest sum of resident memory of the command and its children.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import laspy
import numpy as np
import psutil

from tests.hostile import sparse

CONSOLE = Path(sys.executable).with_name("pointflow")


def clustered(path: Path, points: int, extent: float, size: int = 20) -> Path:
    """`sparse` with each point moved next to the first of its cluster of `size`."""
    sparse(path, points, extent)
    data = laspy.read(path)
    rng = np.random.default_rng(7)
    first = (np.arange(points) // size) * size
    data.x = np.asarray(data.x)[first] + rng.uniform(0, 10, points)
    data.y = np.asarray(data.y)[first] + rng.uniform(0, 10, points)
    data.write(path)
    return path


def run(source: Path, folder: Path) -> tuple[float, int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POINTFLOW_")} | {
        "POINTFLOW_HOME": str(folder / "home")
    }
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(CONSOLE), "classify", str(source), str(folder / "out.laz")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watched, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        total = 0
        for member in [watched, *watched.children(recursive=True)]:
            try:
                total += member.memory_info().rss
            except psutil.Error:
                continue
        peak = max(peak, total)
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    out, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"pointflow classify failed: {err}")
    return seconds, peak, out.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sparse", description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20_000, help="points in each file (default 20000)")
    parser.add_argument(
        "--extent-km", type=float, default=4000.0, help="side of the square they are spread over (default 4000)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each file (default 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = {
            "spread": sparse(folder / "spread.las", args.points, args.extent_km * 1000),
            "clustered": clustered(folder / "clustered.las", args.points, args.extent_km * 1000),
        }
        print(
            f"{args.points:,} points over {args.extent_km:,.0f} km x {args.extent_km:,.0f} km, `pointflow classify`, {args.runs} run(s) each"
        )
        for name, source in inputs.items():
            for number in range(args.runs):
                seconds, peak, summary = run(source, folder / f"{name}-{number}")
                print(f"{name:<10} run {number + 1}: {seconds:5.1f} s wall, peak {peak / 1024**3:.2f} GiB  ({summary})")


if __name__ == "__main__":
    main()
