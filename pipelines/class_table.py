"""What each ASPRS class is called and coloured in the previews and the dashboard, and the
per-class table (CSV, JSON) every export carries."""

from __future__ import annotations

import csv
import io
import json

import numpy as np

ASPRS_CLASS_NAMES = {
    0: "never classified",
    1: "unclassified",
    2: "ground",
    3: "low vegetation",
    4: "medium vegetation",
    5: "high vegetation",
    6: "building",
    7: "low noise",
    9: "water",
    17: "bridge deck",
    18: "high noise",
}
CLASS_COLOURS = {
    0: "#bdbdbd",
    1: "#9e9e9e",
    2: "#a1887f",
    3: "#c5e1a5",
    4: "#7cb342",
    5: "#2e7d32",
    6: "#e53935",
    7: "#ff00ff",
    9: "#1e88e5",
    17: "#ffb300",
    18: "#8e24aa",
}
OTHER_COLOUR = "#000000"


def class_summary(class_counts: dict[int, int], classifier: tuple[str, str] | None = None) -> list[dict]:
    """One row per class; with `classifier` (name, version), every row also names what classified
    the points (`classifier`, `classifier_version`: columns a reader of the table may ignore)."""
    total = sum(class_counts.values()) or 1
    made_by = {"classifier": classifier[0], "classifier_version": classifier[1]} if classifier else {}
    return [
        {"class": c, "name": ASPRS_CLASS_NAMES.get(c, "other"), "points": n, "percent": round(100 * n / total, 3)}
        | made_by
        for c, n in sorted(class_counts.items())
    ]


def summary_csv(rows: list[dict]) -> bytes:
    """The class table; shares always with three decimals, so the column lines up in any tool."""
    buffer = io.StringIO()
    fields = ["class", "name", "points", "percent"]
    if rows and "classifier" in rows[0]:
        fields += ["classifier", "classifier_version"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "percent": f"{row['percent']:.3f}"} for row in rows)
    return buffer.getvalue().encode()


def summary_json(rows: list[dict]) -> bytes:
    return json.dumps(rows, indent=2).encode()


def colour_of(cls: int) -> str:
    return CLASS_COLOURS.get(cls, OTHER_COLOUR)


def class_rgb(classes: np.ndarray) -> np.ndarray:
    """n x 3 uint8 colours of class codes."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:] = [int(OTHER_COLOUR[i : i + 2], 16) for i in (1, 3, 5)]
    for cls, colour in CLASS_COLOURS.items():
        table[cls] = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    return table[classes]
