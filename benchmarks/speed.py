"""End-to-end speed and peak memory: LAZ in -> classified LAZ out, with 1 and 2 Dask workers, next to CSF;
then the COPC export of the classified file, read back and checked with laspy's COPC reader.

Run from the repository root:  python -m benchmarks.speed [--points N] [--workers 1,2] [--no-csf]

The input is built once (cached in benchmarks/out/) by laying copies of the IGN Saint-Barthelemy
sample side by side with offsets until it holds at least N points (default 10 million). Times are
wall clock for pointflow.classify.classify_file, which reads, tiles, classifies on a local Dask
cluster and writes; the cluster's start-up is reported separately. Peak memory is the largest sum
of resident memory of this process and all its children (scheduler, nannies, workers), sampled
every 0.1 s. CSF (cloth-simulation-filter, defaults) runs on the same file with the same laspy
reading and writing, in one process: it has no tiling of its own.

The COPC export (pipelines.copc.write_copc, in this process) is timed from the classified LAZ to
the .copc.laz. The check that follows streams both files: every point present once with its
class (an order-free fingerprint of each point's coordinates, class and GPS time), and laspy's
CopcReader answering a level query per level and a bounds query over the middle of the data with
exactly the points (and classes) the classified file has there.
"""

from __future__ import annotations

import argparse
import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import laspy
import numpy as np
import psutil

from pipelines.classify import classify_file, dask_client
from pipelines.copc import CopcSummary, write_copc
from pipelines.lasio import iter_chunks
from pipelines.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "benchmarks" / "out"


class PeakMemory:
    """Largest resident memory of this process tree seen while the block runs."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.1)

    @contextmanager
    def watch(self):
        self.peak = 0
        self._stop.clear()
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


def build_input(points: int) -> Path:
    """Copies of the IGN sample on a grid, 100 m apart, until `points` are reached."""
    source = DATA / "ign_st_barth_100m.laz"
    if not source.exists():
        raise SystemExit(f"{source} not found: the benchmark needs ../shared/data")
    base = laspy.read(source)
    copies = math.ceil(points / len(base))
    side = math.ceil(math.sqrt(copies))
    target = OUT / f"ign_tiled_{copies}x.laz"
    if target.exists():
        return target
    OUT.mkdir(parents=True, exist_ok=True)
    width = float(base.header.maxs[0] - base.header.mins[0]) + 1.0
    height = float(base.header.maxs[1] - base.header.mins[1]) + 1.0
    header = laspy.LasHeader(point_format=base.header.point_format, version=base.header.version)
    header.scales, header.offsets = base.header.scales, base.header.offsets
    partial = target.with_suffix(".partial.laz")
    with laspy.open(partial, mode="w", header=header, do_compress=True) as writer:
        for n in range(copies):
            shifted = laspy.ScaleAwarePointRecord(base.points.array.copy(), base.header.point_format, base.header.scales, base.header.offsets)
            shifted.x = np.asarray(base.x) + (n % side) * width
            shifted.y = np.asarray(base.y) + (n // side) * height
            writer.write_points(shifted)
    partial.rename(target)
    return target


@dataclass(frozen=True)
class Run:
    name: str
    points: int
    seconds: float
    startup_seconds: float
    peak_bytes: int

    def row(self) -> str:
        rate = self.points / self.seconds / 1e6
        return f"{self.name:<28} {self.points:>12,} {self.seconds:>9.1f} {rate:>9.2f} {self.startup_seconds:>9.1f} {self.peak_bytes / 2**30:>9.2f}"


def run_pointflow(source: Path, workers: int, settings: Settings, memory: PeakMemory) -> Run:
    output = OUT / f"classified_{workers}w.laz"
    with memory.watch():
        started = time.perf_counter()
        with dask_client(settings, workers) as client:
            ready = time.perf_counter()
            result = classify_file(source, output, settings, client=client)
            finished = time.perf_counter()
    print(f"  {workers} worker(s): {result.tiles} tiles, timings {result.timings}", flush=True)
    return Run(f"pointflow standard, {workers} worker(s)", result.output_points, finished - ready, ready - started, memory.peak)


def run_csf(source: Path, memory: PeakMemory) -> Run:
    import CSF

    output = OUT / "classified_csf.laz"
    with memory.watch():
        started = time.perf_counter()
        data = laspy.read(source)
        cloth = CSF.CSF()
        cloth.setPointCloud(np.vstack([data.x, data.y, data.z]).T)
        ground, other = CSF.VecInt(), CSF.VecInt()
        devnull = os.open(os.devnull, os.O_WRONLY)
        saved = os.dup(1)
        os.dup2(devnull, 1)  # CSF prints its progress straight to stdout
        try:
            cloth.do_filtering(ground, other)
        finally:
            os.dup2(saved, 1)
            os.close(devnull)
        classes = np.ones(len(data), dtype=np.uint8)
        classes[np.asarray(ground, dtype=np.int64)] = 2
        data.classification = classes
        data.write(output)
        finished = time.perf_counter()
    return Run("CSF (ground only), 1 process", len(data), finished - started, 0.0, memory.peak)


def run_copc(classified: Path, memory: PeakMemory) -> Run:
    target = classified.with_name(classified.stem + ".copc.laz")
    with memory.watch():
        started = time.perf_counter()
        summary = write_copc(classified, target, OUT / "scratch")
        finished = time.perf_counter()
    print(f"  COPC: {summary.nodes} nodes, points per level {summary.points_per_level}, {target.stat().st_size / 2**20:.0f} MiB "
          f"(the LAZ: {classified.stat().st_size / 2**20:.0f} MiB)", flush=True)
    print(f"  COPC read back: {check_copc(classified, target, summary)}", flush=True)
    return Run("COPC export of the result", summary.points, finished - started, 0.0, memory.peak)


def _fingerprint(points) -> tuple[int, np.ndarray]:
    """An order-free digest of the points (coordinates, class, GPS time) and their class counts."""
    words = [np.asarray(points[name]).astype(np.uint64) for name in ("X", "Y", "Z", "classification")]
    words.append(np.asarray(points.gps_time).view(np.uint64))
    mixed = np.zeros(len(points), dtype=np.uint64)
    for word, prime in zip(words, (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD)):
        mixed = (mixed ^ word) * np.uint64(prime)
        mixed ^= mixed >> np.uint64(29)
    return int(mixed.sum(dtype=np.uint64)), np.bincount(np.asarray(points.classification), minlength=256)


def _digest(path: Path, inside=None) -> tuple[int, np.ndarray]:
    total, classes = 0, np.zeros(256, dtype=np.int64)
    for chunk in iter_chunks(path):
        if inside is not None:
            chunk = chunk[inside(chunk)]
        digest, counts = _fingerprint(chunk)
        total, classes = (total + digest) % 2**64, classes + counts
    return total, classes


def check_copc(classified: Path, copc: Path, summary: CopcSummary) -> str:
    with laspy.open(classified) as reader:
        header = reader.header
    if _digest(classified)[0] != _digest(copc)[0]:
        raise SystemExit("COPC check failed: the points differ from the classified file's")
    with laspy.CopcReader.open(copc) as reader:
        levels = {level: len(reader.query(level=level)) for level in range(summary.depth + 1)}
        if levels != summary.points_per_level or sum(levels.values()) != header.point_count:
            raise SystemExit(f"COPC check failed: level queries found {levels}, the writer placed {summary.points_per_level}")
        # The middle fifth of the data in x and y, faces a quarter unit outside the coordinate grid.
        span = header.maxs - header.mins
        low = header.offsets + (np.round((header.mins + 0.4 * span - header.offsets) / header.scales) - 0.25) * header.scales
        high = header.offsets + (np.round((header.mins + 0.6 * span - header.offsets) / header.scales) + 0.25) * header.scales
        found = reader.query(bounds=laspy.copc.Bounds(low[:2], high[:2]))

    def inside(chunk):
        return (chunk.x >= low[0]) & (chunk.x <= high[0]) & (chunk.y >= low[1]) & (chunk.y <= high[1])

    expected = _digest(classified, inside)
    if _fingerprint(found)[0] != expected[0] or not np.array_equal(_fingerprint(found)[1], expected[1]):
        raise SystemExit("COPC check failed: the bounds query does not return the classified file's points in that box")
    return (f"all {header.point_count:,} points once with their classes; level queries {levels}; "
            f"bounds query over the middle: {len(found):,} points, all of them and only them")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=10_000_000, help="minimum points in the input (default 10,000,000)")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--no-csf", action="store_true", help="skip CSF")
    args = parser.parse_args(argv)

    source = build_input(args.points)
    settings = Settings.from_env()
    memory = PeakMemory()
    print(f"input: {source} ({laspy.open(source).header.point_count:,} points, {source.stat().st_size / 2**20:.0f} MiB)", flush=True)
    workers = [int(n) for n in args.workers.split(",")]
    runs = [run_pointflow(source, n, settings, memory) for n in workers]
    runs.append(run_copc(OUT / f"classified_{workers[0]}w.laz", memory))
    if not args.no_csf:
        runs.append(run_csf(source, memory))
    print()
    print(f"{'end to end (LAZ -> LAZ)':<28} {'points':>12} {'seconds':>9} {'Mpts/s':>9} {'startup s':>9} {'peak GiB':>9}")
    for run in runs:
        print(run.row())


if __name__ == "__main__":
    main()
