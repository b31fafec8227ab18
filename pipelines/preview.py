"""Previews people can read: a class map and a profile (one PNG), a thinned 3D sample (PLY), and
per-class summaries. Every one is streamed chunk by chunk, so memory stays bounded."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from pipelines.lasio import iter_chunks
from pipelines.units import CoordinateUnits, coordinate_units

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
SYMBOLS = {"metre": "m", "foot": "ft", "US survey foot": "ftUS", "degree": "°"}
MAX_PIXELS = 1200
PROFILE_POINTS = 150_000  # points drawn in the profile, at most
SAMPLE_POINTS = 200_000  # points in the 3D sample, about


@dataclass(frozen=True)
class CoordinateFrame:
    """How the previews and the manifest name a file's coordinates: its CRS, the axes it names,
    and their units as pipelines.units (the one place that reads units) gives them."""

    crs: str | None  # e.g. "RGF93 v1 / Lambert-93"; None when the file has none
    epsg: int | None
    units: CoordinateUnits | None  # None: geographic coordinates (degrees)
    axes: tuple[str, str] = ("x", "y")

    def to_dict(self) -> dict:
        units = (
            self.units.to_dict()
            if self.units
            else {"horizontal": "degree", "vertical": None, "metres_per_unit": None, "assumed": False}
        )
        return {"crs": self.crs, "epsg": self.epsg, **units, "axes": list(self.axes)}

    def label(self, axis: int) -> str:
        """An axis label: "Easting [m]", "Elevation [ftUS]", "x [m, assumed]"."""
        name = self.axes[axis] if axis < 2 else "Elevation"
        if self.units is None:
            return f"{name} [°]" if axis < 2 else f"{name}"
        unit = SYMBOLS.get(self.units.name if axis < 2 else self.units.vertical_name, self.units.name)
        return f"{name} [{unit}, assumed]" if self.units.assumed else f"{name} [{unit}]"

    def describe(self) -> str:
        if self.crs is None:
            return "no CRS in the file: " + (self.units.describe() if self.units else "coordinates as stored")
        code = f" (EPSG:{self.epsg})" if self.epsg else ""
        return f"{self.crs}{code}; " + (self.units.describe() if self.units else "geographic coordinates (degrees)")


def coordinate_frame(header) -> CoordinateFrame:
    try:
        crs = header.parse_crs()
    except Exception:
        # An unreadable CRS record reads as none: the input check reports it.
        crs = None
    try:
        units = coordinate_units(header)
    except ValueError:
        units = None  # geographic
    if crs is None:
        return CoordinateFrame(None, None, units)
    horizontal = next((p for p in (crs.sub_crs_list or [crs]) if not p.is_vertical), crs)
    axes = horizontal.axis_info
    # Geographic CRSs list latitude first; the map's x is the longitude.
    names = (axes[1].name, axes[0].name) if horizontal.is_geographic else (axes[0].name, axes[1].name)
    return CoordinateFrame(crs.name, crs.to_epsg(), units, names)


def file_frame(path: Path) -> CoordinateFrame:
    import laspy

    with laspy.open(path) as reader:
        return coordinate_frame(reader.header)


def class_summary(class_counts: dict[int, int]) -> list[dict]:
    total = sum(class_counts.values()) or 1
    return [
        {"class": c, "name": ASPRS_CLASS_NAMES.get(c, "other"), "points": n, "percent": round(100 * n / total, 3)}
        for c, n in sorted(class_counts.items())
    ]


def summary_csv(rows: list[dict]) -> bytes:
    """The class table; shares always with three decimals, so the column lines up in any tool."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["class", "name", "points", "percent"], lineterminator="\n")
    writer.writeheader()
    writer.writerows({**row, "percent": f"{row['percent']:.3f}"} for row in rows)
    return buffer.getvalue().encode()


def summary_json(rows: list[dict]) -> bytes:
    return json.dumps(rows, indent=2).encode()


def colour_of(cls: int) -> str:
    return CLASS_COLOURS.get(cls, OTHER_COLOUR)


def _rgb(classes: np.ndarray) -> np.ndarray:
    """n x 3 uint8 colours of class codes."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:] = [int(OTHER_COLOUR[i : i + 2], 16) for i in (1, 3, 5)]
    for cls, colour in CLASS_COLOURS.items():
        table[cls] = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    return table[classes]


@dataclass(frozen=True)
class Profile:
    """A vertical section through the middle of the data, along its longer side."""

    along: int  # 0: along x, 1: along y
    centre: float  # where it crosses the other axis
    half_width: float  # of the band of points drawn

    @classmethod
    def through(cls, mins, maxs, points: int) -> Profile:
        along = 0 if maxs[0] - mins[0] >= maxs[1] - mins[1] else 1
        across = maxs[1 - along] - mins[1 - along]
        # As wide as gives about PROFILE_POINTS points, but a thin slice: a 25th of the data at most.
        width = min(across * min(1.0, PROFILE_POINTS / max(points, 1)), across / 25)
        return cls(along, (mins[1 - along] + maxs[1 - along]) / 2, max(width, 1e-9) / 2)

    def select(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.abs((y if self.along == 0 else x) - self.centre) <= self.half_width


def render_preview(path: Path, output: Path, title: str) -> Path:
    """Class map (highest point's class per pixel, real coordinates, CRS) above a profile, with a
    legend that counts every class's points."""
    import laspy

    with laspy.open(path) as reader:
        header = reader.header
    units = coordinate_frame(header)
    mins, maxs, count = header.mins, header.maxs, max(header.point_count, 1)
    width, height = max(maxs[0] - mins[0], 1e-6), max(maxs[1] - mins[1], 1e-6)
    # About two points per pixel: finer leaves speckle, coarser hides roofs and trees.
    cell = max(max(width, height) / MAX_PIXELS, np.sqrt(2 * width * height / count))
    nx, ny = int(width / cell) + 1, int(height / cell) + 1
    top = np.full(nx * ny, -np.inf)
    classes = np.zeros(nx * ny, dtype=np.uint8)
    counts = np.zeros(256, dtype=np.int64)
    profile = Profile.through(mins, maxs, count)
    section: list[np.ndarray] = []
    kept = 0
    for chunk in iter_chunks(path):
        x, y, z, cls = np.asarray(chunk.x), np.asarray(chunk.y), np.asarray(chunk.z), np.asarray(chunk.classification)
        counts += np.bincount(cls, minlength=256)
        col = np.clip(((x - mins[0]) / cell).astype(np.int64), 0, nx - 1)
        row = np.clip(((maxs[1] - y) / cell).astype(np.int64), 0, ny - 1)
        # Highest point per cell wins: sort by z so the last write per cell is the top one.
        order = np.argsort(z, kind="stable")
        flat, zs, cs = (row * nx + col)[order], z[order], cls[order]
        higher = zs > top[flat]
        top[flat[higher]] = zs[higher]
        classes[flat[higher]] = cs[higher]
        band = profile.select(x, y)
        section.append(np.stack([(x if profile.along == 0 else y)[band], z[band], cls[band]], axis=1))
        kept += int(band.sum())
        if kept > 2 * PROFILE_POINTS:
            # Denser than the header's bounds let us expect: halve what is kept so far.
            section = [np.concatenate(section)[::2]]
            kept = len(section[0])
    filled = np.isfinite(top)
    if not filled.all():
        # Small gaps between scan lines take their nearest pixel's class; large holes stay empty.
        distance, (rows, cols) = ndimage.distance_transform_edt(~filled.reshape(ny, nx), return_indices=True)
        nearest = (rows * nx + cols).ravel()
        close = (~filled) & (distance.ravel() <= 2)
        classes[close] = classes[nearest[close]]
        filled |= close
    points = np.concatenate(section) if section else np.zeros((0, 3))
    if len(points) > PROFILE_POINTS:
        points = points[:: int(np.ceil(len(points) / PROFILE_POINTS))]
    present = [int(c) for c in np.flatnonzero(counts)]
    _draw(
        output,
        title,
        units,
        (mins, maxs, cell, nx, ny),
        classes,
        filled,
        profile,
        points,
        {c: int(counts[c]) for c in present},
    )
    return output


def _draw(
    output: Path,
    title: str,
    units: CoordinateFrame,
    grid,
    classes: np.ndarray,
    filled: np.ndarray,
    profile: Profile,
    points: np.ndarray,
    counts: dict[int, int],
) -> None:
    # The figure and its Agg canvas directly: pyplot's import (half a CPU-second, a third of an export
    # task) brings its backend machinery and global figure registry, which a file written once needs not.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    mins, maxs, cell, nx, ny = grid
    shown = sorted(int(c) for c in np.unique(classes[filled]))
    lookup = np.zeros(256)
    lookup[shown] = np.arange(len(shown))
    image = np.full(nx * ny, np.nan)
    image[filled] = lookup[classes[filled]]

    map_width = 7.5
    map_height = float(np.clip(map_width * ny / nx, 3.0, 8.0))
    figure = Figure(figsize=(map_width + 3.6, map_height + 3.4), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    grid_spec = figure.add_gridspec(2, 2, width_ratios=[map_width, 3.6], height_ratios=[map_height, 2.6])
    plan, side, legend = (
        figure.add_subplot(grid_spec[0, 0]),
        figure.add_subplot(grid_spec[1, :]),
        figure.add_subplot(grid_spec[0, 1]),
    )

    plan.imshow(
        image.reshape(ny, nx),
        cmap=ListedColormap([colour_of(c) for c in shown] or ["#ffffff"]),
        interpolation="nearest",
        vmin=-0.5,
        vmax=max(len(shown), 1) - 0.5,
        extent=(mins[0], mins[0] + nx * cell, maxs[1] - ny * cell, maxs[1]),
    )
    plan.set_xlabel(units.label(0))
    plan.set_ylabel(units.label(1))
    figure.suptitle(f"{title}\n{units.describe()}", x=0.01, ha="left", fontsize=10)
    band = (profile.centre - profile.half_width, profile.centre + profile.half_width)
    span = plan.axhspan if profile.along == 0 else plan.axvspan
    span(*band, facecolor="none", edgecolor="black", linewidth=0.8, linestyle="--")

    order = np.argsort(points[:, 2], kind="stable")  # ground first, so vegetation and roofs draw over it
    # Sparse sections get bigger dots, so a few hundred points still read as a line.
    size = float(np.clip(40_000 / max(len(points), 1), 1.5, 10))
    side.scatter(
        points[order, 0],
        points[order, 1],
        c=_rgb(points[order, 2].astype(np.uint8)) / 255,
        s=size,
        marker=".",
        linewidths=0,
        rasterized=True,
    )
    side.set_xlim(mins[profile.along], maxs[profile.along])
    side.set_xlabel(units.label(profile.along))
    side.set_ylabel(units.label(2))
    for axes in (plan, side):
        for axis in (axes.xaxis, axes.yaxis):
            axis.set_major_formatter(_plain_ticks(axis))
    across = units.axes[1 - profile.along]
    figure.draw_without_rendering()  # lays the axes out, to measure the profile, without rasterising
    box = side.get_window_extent()
    low, high = side.get_ylim()
    exaggeration = ((maxs[profile.along] - mins[profile.along]) / box.width) / ((high - low) / box.height)
    vertical = f", vertical scale ×{exaggeration:.1f}" if exaggeration > 1.2 else ""
    side.set_title(
        f"Profile along the longer side, through {across.lower()} {profile.centre:,.1f} "
        f"(band ±{profile.half_width:.2f}, {len(points):,} points; dashed on the map{vertical})",
        fontsize=9,
        loc="left",
    )

    total = sum(counts.values()) or 1
    legend.axis("off")
    legend.legend(
        handles=[
            Patch(
                color=colour_of(c),
                label=f"{c} {ASPRS_CLASS_NAMES.get(c, 'other')}\n{n:,} point{'s' if n != 1 else ''} ({_share(n, total)})",
            )
            for c, n in counts.items()
        ],
        loc="upper left",
        fontsize=8,
        title=f"{total:,} points",
        title_fontsize=9,
        frameon=False,
        labelspacing=0.9,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, metadata={"Software": None})


def _share(points: int, total: int) -> str:
    percent = 100 * points / total
    return f"{percent:.1f} %" if percent >= 0.1 else "< 0.1 %"


def _plain_ticks(axis):
    """Tick labels as plain numbers with thousands separators (no "+6.449e6" offset), with as
    many decimals as the tick spacing needs."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _position) -> str:
        ticks = axis.get_majorticklocs()
        step = float(np.min(np.diff(ticks))) if len(ticks) > 1 else 1.0
        decimals = next((d for d in range(7) if abs(round(step, d) - step) <= 1e-9 * max(1.0, abs(step))), 6)
        return f"{value:,.{decimals}f}"

    return FuncFormatter(label)


def write_sample_ply(path: Path, output: Path, points: int = SAMPLE_POINTS) -> Path:
    """A thinned sample of the points as binary PLY (x, y, z from the data's minimum corner, the
    class colour, the class), for the 3D view and for any viewer that opens PLY."""
    import laspy

    with laspy.open(path) as reader:
        header = reader.header
    origin = np.floor(header.mins)
    keep = min(1.0, points / max(header.point_count, 1))
    rng = np.random.default_rng(0)
    parts = []
    for chunk in iter_chunks(path):
        chosen = rng.random(len(chunk)) < keep
        part = np.zeros(
            int(chosen.sum()),
            dtype=[
                ("x", "<f4"),
                ("y", "<f4"),
                ("z", "<f4"),
                ("red", "u1"),
                ("green", "u1"),
                ("blue", "u1"),
                ("class", "u1"),
            ],
        )
        for axis, name in enumerate(("x", "y", "z")):
            part[name] = np.asarray(chunk[name])[chosen] - origin[axis]
        cls = np.asarray(chunk.classification)[chosen]
        rgb = _rgb(cls)
        part["red"], part["green"], part["blue"], part["class"] = rgb[:, 0], rgb[:, 1], rgb[:, 2], cls
        parts.append(part)
    vertices = np.concatenate(parts)
    units = coordinate_frame(header)
    lines = [
        "ply",
        "format binary_little_endian 1.0",
        f"comment pointflow: {len(vertices):,} of {header.point_count:,} points, coloured by ASPRS class",
        f"comment origin {origin[0]:.3f} {origin[1]:.3f} {origin[2]:.3f} (add to x y z for the file's coordinates)",
        f"comment crs {units.describe()}",
        f"element vertex {len(vertices)}",
        "property float x",
        "property float y",
        "property float z",
        "property uchar red",
        "property uchar green",
        "property uchar blue",
        "property uchar class",
        "end_header",
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "wb") as handle:
        handle.write(("\n".join(lines) + "\n").encode("ascii", "replace"))
        vertices.tofile(handle)
    return output
