"""Dask preload for the local cluster's workers (pipelines/data/dask-local.yaml): the standard
classifier run once on a small made-up block as a worker starts, in a thread of its own.

The classifiers' compiled loops (`kernels`) import numba and load their machine code from the cache
on their first call: about 0.35 CPU-seconds in a fresh process (pipelines/compiled.py). A worker is
a fresh process every run, and its first tile would wait for that; warmed up here, it happens while
the command scans the file, which leaves the second core mostly idle. The made-up block (flat ground,
a flat roof, a few split pulses) goes through every loop a tile does, with the same array types.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from .base import PointBlock
from .standard import StandardClassifier

log = logging.getLogger(__name__)


def made_up_block() -> PointBlock:
    """40 m x 40 m of points 0.3 m apart: ground, a 12 m x 12 m roof 6 m high, two returns a pulse
    along one edge of the roof (a tree over the eaves)."""
    rng = np.random.default_rng(0)
    n = 18_000
    x, y = rng.uniform(0.0, 40.0, n), rng.uniform(0.0, 40.0, n)
    roof = (np.abs(x - 20.0) < 6.0) & (np.abs(y - 20.0) < 6.0)
    z = np.where(roof, 6.0, 0.0) + rng.normal(0.0, 0.02, n)
    returns = np.where(roof & (x > 24.0), 2, 1).astype(np.uint8)
    return PointBlock(x, y, z, None, returns.copy(), returns)


def warm() -> None:
    """Load every compiled loop a tile uses (compiling them when the cache is empty)."""
    StandardClassifier().classify(made_up_block())


def _warm_quietly() -> None:
    try:
        warm()
    except Exception:  # the first tile would load them anyway: a failure here only costs time
        log.exception("warming up the compiled loops failed")


def dask_setup(worker) -> None:
    """In a thread: the worker registers with the scheduler meanwhile, as without the warm-up."""
    threading.Thread(target=_warm_quietly, name="pointflow-warm-up", daemon=True).start()
