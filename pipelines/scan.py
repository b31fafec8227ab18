"""The scan of a tiled classification (`pipelines.classify`), and tiles sent to the workers while it
still reads the file.

A tile is complete only once the last point of the file has been read, and a LAS/LAZ file says
nothing of where its later points lie (point formats 0-5 cannot even be decoded by field). So a
tile that no chunk has touched for QUIET_CHUNKS chunks is sent on a guess that the rest of the
file lies elsewhere, which holds for files written in strips or blocks (a survey's flight lines, a
merged set of tiles). The guess is checked when the scan ends: a tile whose core and context
counts grew since it was sent is classified again with all its points, so the classes are those
of a tile sent after the scan whatever the file's order; a file whose order has no locality only
pays for the tasks it sent too early (at most `window` tiles at a time).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.lasio import CHUNK_POINTS, iter_checked
from pipelines.tile import TileGrid
from pipelines.tile_io import Progress, TileFiles
from pipelines.tile_tasks import Scaling, TileResult, tile_fields

# Chunks without a point of a tile before it is sent: two million points elsewhere. Two, not one:
# a file written in strips sends a tile's next strip a strip's length later (the 10 M point
# benchmark file's rows of survey blocks are 1.75 chunks long), and a tile sent too soon is
# classified twice. One chunk, measured against two on that file in two sessions (2026-12-01,
# alternating runs), gave no gain in wall time and more worker CPU.
QUIET_CHUNKS = 2
# Smaller tiles wait for the scan's end: they go in shared tasks (classify._batches), and are no
# more than a few tasks' work whatever their number.
EARLY_TILE_POINTS = 100_000


class EarlyTiles:
    """Tiles sent while the scan goes on: `submit(tile_ids)` sends a task of those tiles and returns
    its future, at most `window` unfinished at a time; `connect()` gives that window once the
    cluster is up (called at the first tile ready to go, so a file with none needs no cluster yet)."""

    def __init__(self, connect: Callable[[], int], submit: Callable[[list[int]], Any]) -> None:
        self.connect, self.submit = connect, submit
        self.last: dict[int, int] = {}  # tile id -> the latest chunk with a point of it
        self.core: dict[int, int] = {}
        self.context: dict[int, int] = {}
        # tile id -> (its future, or its result once taken; core and context points when sent)
        self.sent: dict[int, tuple[Any, int, int]] = {}
        self.window = 0

    def chunk(self, number: int, core: list[tuple[int, int, int]], context: list[tuple[int, int, int]]) -> None:
        """The runs (tile id, start, end) one chunk added to each kind; send the tiles it made quiet."""
        for runs, counts in ((core, self.core), (context, self.context)):
            for tile_id, start, end in runs:
                counts[tile_id] = counts.get(tile_id, 0) + end - start
                self.last[tile_id] = number
        running = 0
        for tile_id, (future, core_points, ring) in self.sent.items():
            if isinstance(future, TileResult):
                continue
            if future.status == "finished":
                # Taken and released now: Dask keeps a task's points (to rerun it) while its
                # future lives, a 200 m tile's 20 MB, for as long as the scan goes on.
                self.sent[tile_id] = (future.result()[0], core_points, ring)
                future.release()
            else:
                running += 1
        quiet = [
            t
            for t, last in self.last.items()
            if number - last >= QUIET_CHUNKS and t not in self.sent and self.core.get(t, 0) >= EARLY_TILE_POINTS
        ]
        for tile_id in sorted(quiet):
            if not self.window:
                self.window = self.connect()
            if running >= self.window:
                return
            self.sent[tile_id] = (self.submit([tile_id]), self.core[tile_id], self.context.get(tile_id, 0))
            running += 1

    def settle(self, owned: dict[int, int], context: dict[int, int]) -> tuple[dict[int, TileResult], dict[int, Any]]:
        """Once the scan is done, of the tiles sent with all their points: the results, and the
        futures of those still running; the others are dropped."""
        results, futures = {}, {}
        for tile_id, (sent, core, ring) in self.sent.items():
            complete = owned.get(tile_id) == core and context.get(tile_id, 0) == ring
            if isinstance(sent, TileResult):
                if complete:
                    results[tile_id] = sent
            elif complete:
                futures[tile_id] = sent
            else:
                sent.release()
        return results, futures


def scan(
    input_path: Path,
    info,
    scaling: Scaling,
    grid: TileGrid,
    tiles: TileFiles,
    progress: Progress | None,
    early: EarlyTiles | None = None,
) -> None:
    """Partition the input into tiles: every point once as core of its tile, and as context of
    every neighbour whose buffer ring it falls in."""
    done = 0
    for number, chunk in enumerate(iter_checked(input_path, info, CHUNK_POINTS)):
        records = chunk.array
        x, y = scaling.axis(records, 0), scaling.axis(records, 1)
        owner, context = grid.partition(x, y)
        core_runs = tiles.append({"core": records}, owner)
        context_runs = []
        if context:
            # One grouped write for all neighbours: one sort, not eight. The ring's points are
            # kept as the fields a tile's task needs, not as whole records.
            index = np.concatenate([i for i, _ in context])
            tile_ids = np.concatenate([t for _, t in context])
            context_runs = tiles.append({"context": tile_fields(records[index], info.point_format)}, tile_ids)
        done += len(records)
        if early is not None:
            early.chunk(number, core_runs, context_runs)
        if progress:
            progress("scan", done, info.point_count)
