"""Synthetic airborne scenes with known labels: terrain, buildings and trees, for demos and tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import laspy
import numpy as np
import pyproj

GROUND, LOW_VEG, HIGH_VEG, BUILDING = 2, 3, 5, 6


@dataclass(frozen=True)
class Scene:
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    labels: np.ndarray  # true ASPRS class per point
    return_number: np.ndarray
    number_of_returns: np.ndarray
    intensity: np.ndarray


def terrain_height(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return 100 + 0.04 * x + 0.02 * y + 2.5 * np.sin(x / 37.0) * np.cos(y / 53.0)


def make_scene(size: float = 200.0, density: float = 8.0, buildings: int = 6, trees: int = 60, seed: int = 0) -> Scene:
    """A `size` x `size` m scene at about `density` ground points per m²."""
    rng = np.random.default_rng(seed)
    parts: list[tuple[np.ndarray, ...]] = []

    n = int(size * size * density)
    gx, gy = rng.uniform(0, size, n), rng.uniform(0, size, n)
    footprint = np.zeros(n, dtype=bool)
    boxes = []
    for _ in range(buildings):
        w, d = rng.uniform(12, 30, 2)
        bx, by = rng.uniform(10, size - 10 - w), rng.uniform(10, size - 10 - d)
        boxes.append((bx, by, w, d, rng.uniform(6, 15)))
        footprint |= (gx >= bx) & (gx <= bx + w) & (gy >= by) & (gy <= by + d)
    keep = ~footprint
    gz = terrain_height(gx[keep], gy[keep]) + rng.normal(0, 0.03, keep.sum())
    parts.append(
        (
            gx[keep],
            gy[keep],
            gz,
            np.full(keep.sum(), GROUND),
            np.ones(keep.sum()),
            np.ones(keep.sum()),
            rng.integers(800, 1500, keep.sum()),
        )
    )

    for bx, by, w, d, h in boxes:
        m = int(w * d * density)
        rx, ry = rng.uniform(bx, bx + w, m), rng.uniform(by, by + d, m)
        base = terrain_height(np.array([bx + w / 2]), np.array([by + d / 2]))[0]
        # A gable roof: height falls linearly from the ridge along the short side.
        ridge = (
            0.25 * min(w, d) * (1 - np.abs((ry - by) / d - 0.5) * 2)
            if w >= d
            else 0.25 * min(w, d) * (1 - np.abs((rx - bx) / w - 0.5) * 2)
        )
        rz = base + h + ridge + rng.normal(0, 0.03, m)
        parts.append((rx, ry, rz, np.full(m, BUILDING), np.ones(m), np.ones(m), rng.integers(1500, 3000, m)))

    for _ in range(trees):
        tx, ty = rng.uniform(0, size, 2)
        if any(bx - 3 <= tx <= bx + w + 3 and by - 3 <= ty <= by + d + 3 for bx, by, w, d, _ in boxes):
            continue
        radius, height = rng.uniform(2, 5), rng.uniform(6, 20)
        m = int(np.pi * radius**2 * density * 1.5)
        angle, r = rng.uniform(0, 2 * np.pi, m), radius * np.sqrt(rng.uniform(0, 1, m))
        cx, cy = tx + r * np.cos(angle), ty + r * np.sin(angle)
        crown = height - 0.5 * height * (r / radius) ** 2 * rng.uniform(0.3, 1.0, m)
        cz = terrain_height(cx, cy) + crown
        returns = rng.integers(1, 4, m)
        parts.append((cx, cy, cz, np.full(m, HIGH_VEG), np.ones(m), returns, rng.integers(200, 900, m)))

    shrubs = int(size * size * 0.05)
    sx, sy = rng.uniform(0, size, shrubs), rng.uniform(0, size, shrubs)
    clear = ~np.any(
        [(sx >= bx - 2) & (sx <= bx + w + 2) & (sy >= by - 2) & (sy <= by + d + 2) for bx, by, w, d, _ in boxes], axis=0
    )
    sx, sy = sx[clear], sy[clear]
    sz = terrain_height(sx, sy) + rng.uniform(0.3, 1.5, sx.size)
    parts.append(
        (
            sx,
            sy,
            sz,
            np.full(sx.size, LOW_VEG),
            np.full(sx.size, 2),
            np.full(sx.size, 2),
            rng.integers(300, 900, sx.size),
        )
    )

    columns = [np.concatenate(c) for c in zip(*parts)]
    order = rng.permutation(columns[0].size)
    x, y, z, labels, rn, nr, intensity = (c[order] for c in columns)
    rn = np.minimum(rn, nr)
    return Scene(
        x + 500_000.0,
        y + 5_400_000.0,
        z,
        labels.astype(np.uint8),
        rn.astype(np.uint8),
        nr.astype(np.uint8),
        intensity.astype(np.uint16),
    )


def write_scene(scene: Scene, path: Path, with_labels: bool = False) -> Path:
    """LAS 1.4 point format 6 in UTM 32N; classes are written only when `with_labels`."""
    header = laspy.LasHeader(point_format=6, version="1.4")
    header.scales = np.array([0.01, 0.01, 0.01])
    header.offsets = np.array([np.floor(scene.x.min()), np.floor(scene.y.min()), 0.0])
    header.add_crs(pyproj.CRS.from_epsg(32632))
    data = laspy.LasData(header)
    data.x, data.y, data.z = scene.x, scene.y, scene.z
    data.intensity = scene.intensity
    data.return_number = scene.return_number
    data.number_of_returns = scene.number_of_returns
    data.classification = scene.labels if with_labels else np.zeros(scene.x.size, dtype=np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data.write(path)
    return path
