"""Small LAS/LAZ files made on the spot, good and deliberately broken in real-world ways."""

from __future__ import annotations

import struct
from pathlib import Path

import laspy
import numpy as np

# Byte offsets in the public header block (identical for LAS 1.0 to 1.4).
LEGACY_POINT_COUNT = 107
SCALES, OFFSETS = 131, 155
MAX_X, MIN_X = 179, 187
POINT_COUNT_14 = 247


def write_points(
    path: Path, n: int = 2000, version: str = "1.2", point_format: int = 1, seed: int = 0, extra_bytes: bool = False
) -> Path:
    rng = np.random.default_rng(seed)
    header = laspy.LasHeader(point_format=point_format, version=version)
    header.scales = np.array([0.01, 0.01, 0.01])
    header.offsets = np.array([500000.0, 5400000.0, 0.0])
    if extra_bytes:
        header.add_extra_dim(laspy.ExtraBytesParams(name="confidence", type=np.float32))
    data = laspy.LasData(header)
    data.x = 500000 + rng.uniform(0, 50, n)
    data.y = 5400000 + rng.uniform(0, 50, n)
    data.z = 100 + rng.normal(0, 0.2, n)
    data.intensity = rng.integers(1, 1000, n).astype(np.uint16)
    data.return_number = np.ones(n, dtype=np.uint8)
    data.number_of_returns = np.ones(n, dtype=np.uint8)
    if extra_bytes:
        data.confidence = rng.uniform(0, 1, n).astype(np.float32)
    data.write(path)
    return Path(path)


def patch(path: Path, offset: int, fmt: str, value) -> Path:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack("<" + fmt, value))
    return path


def truncated(path: Path, keep_fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path
