"""The ground filters pointflow is compared with, run on the same points: SMRF with PDAL's
defaults (benchmarks.smrf) and CSF, the cloth simulation filter (Zhang et al. 2016, PyPI
cloth-simulation-filter) with its out-of-the-box parameters (cloth resolution 1 m, rigidness 3,
slope smoothing on, class threshold 0.5 m)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.smrf import smrf
from pipelines.classifiers import PointBlock

GROUND = 2


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


def csf(block: PointBlock) -> np.ndarray:
    import CSF

    # Local coordinates: CSF works in float and would lose precision on projected values.
    xyz = np.column_stack([block.x - block.x.min(), block.y - block.y.min(), block.z])
    cloth = CSF.CSF()
    cloth.setPointCloud(xyz)
    ground, off_ground = CSF.VecInt(), CSF.VecInt()
    # CSF runs OpenMP threads; one thread keeps the speed comparison per core.
    with quiet_stdout(), threadpool_limits(limits=1, user_api="openmp"):
        cloth.do_filtering(ground, off_ground, False)
    out = np.ones(len(block), dtype=np.uint8)
    out[np.asarray(ground, dtype=np.intp)] = GROUND
    return out


PEERS: dict[str, Callable[[PointBlock], np.ndarray]] = {"SMRF": smrf, "CSF": csf}
