"""A top-down class map (PNG with a legend) and per-class summaries that people can read."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipelines.lasio import iter_chunks

ASPRS_CLASS_NAMES = {
    0: "never classified", 1: "unclassified", 2: "ground", 3: "low vegetation", 4: "medium vegetation",
    5: "high vegetation", 6: "building", 7: "low noise", 9: "water", 17: "bridge deck", 18: "high noise",
}
CLASS_COLOURS = {
    0: "#bdbdbd", 1: "#9e9e9e", 2: "#a1887f", 3: "#c5e1a5", 4: "#7cb342", 5: "#2e7d32",
    6: "#e53935", 7: "#ff00ff", 9: "#1e88e5", 17: "#ffb300", 18: "#8e24aa",
}
MAX_PIXELS = 1200


def class_summary(class_counts: dict[int, int]) -> list[dict]:
    total = sum(class_counts.values()) or 1
    return [
        {"class": c, "name": ASPRS_CLASS_NAMES.get(c, "other"), "points": n, "percent": round(100 * n / total, 3)}
        for c, n in sorted(class_counts.items())
    ]


def summary_csv(rows: list[dict]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["class", "name", "points", "percent"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def summary_json(rows: list[dict]) -> bytes:
    return json.dumps(rows, indent=2).encode()


def render_class_map(path: Path, output: Path, title: str) -> Path:
    """The highest point's class per pixel, streamed chunk by chunk so memory stays bounded."""
    import laspy
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    with laspy.open(path) as reader:
        mins, maxs, count = reader.header.mins, reader.header.maxs, max(reader.header.point_count, 1)
    width, height = max(maxs[0] - mins[0], 1e-6), max(maxs[1] - mins[1], 1e-6)
    # About two points per pixel: finer leaves speckle, coarser hides roofs and trees.
    cell = max(max(width, height) / MAX_PIXELS, np.sqrt(2 * width * height / count))
    nx, ny = int(width / cell) + 1, int(height / cell) + 1
    top = np.full(nx * ny, -np.inf)
    classes = np.zeros(nx * ny, dtype=np.uint8)
    for chunk in iter_chunks(path):
        col = np.clip(((np.asarray(chunk.x) - mins[0]) / cell).astype(np.int64), 0, nx - 1)
        row = np.clip(((maxs[1] - np.asarray(chunk.y)) / cell).astype(np.int64), 0, ny - 1)
        flat, z, cls = row * nx + col, np.asarray(chunk.z), np.asarray(chunk.classification)
        # Highest point per cell wins: sort by z so the last write per cell is the top one.
        order = np.argsort(z, kind="stable")
        flat, z, cls = flat[order], z[order], cls[order]
        higher = z > top[flat]
        top[flat[higher]] = z[higher]
        classes[flat[higher]] = cls[higher]
    filled = np.isfinite(top)
    if not filled.all():
        # Small gaps between scan lines take their nearest pixel's class; large holes stay empty.
        distance, (rows, cols) = ndimage.distance_transform_edt(~filled.reshape(ny, nx), return_indices=True)
        nearest = (rows * nx + cols).ravel()
        close = (~filled) & (distance.ravel() <= 2)
        classes[close] = classes[nearest[close]]
        filled |= close
    present = sorted(int(c) for c in np.unique(classes[filled]))
    image = np.full(nx * ny, np.nan)
    lookup = np.zeros(256)
    lookup[present] = np.arange(len(present))
    image[filled] = lookup[classes[filled]]
    aspect = ny / nx
    figure, axes = plt.subplots(figsize=(8 / max(aspect, 1) + 2.5, 8 * min(aspect, 1) + 0.8), dpi=120)
    axes.imshow(image.reshape(ny, nx), cmap=ListedColormap([CLASS_COLOURS.get(c, "#000000") for c in present]), interpolation="nearest",
                vmin=-0.5, vmax=len(present) - 0.5, extent=(0, width, 0, height))
    axes.set_xlabel("metres east")
    axes.set_ylabel("metres north")
    axes.set_title(title)
    axes.legend(handles=[Patch(color=CLASS_COLOURS.get(c, "#000000"), label=f"{c} {ASPRS_CLASS_NAMES.get(c, 'other')}") for c in present],
                loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, metadata={"Software": None})
    plt.close(figure)
    return output
