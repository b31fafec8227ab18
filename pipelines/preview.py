"""Previews people can read: a class map and a profile (one PNG) and a thinned 3D sample (PLY),
gathered chunk by chunk from one read of the file, so memory stays bounded. What the classes are
called and coloured is pipelines.class_table; how the axes are named, pipelines.frame."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.class_table import ASPRS_CLASS_NAMES, class_rgb, colour_of
from pipelines.frame import CoordinateFrame, coordinate_frame
from pipelines.lasio import iter_chunks

MAX_PIXELS = 1200
PROFILE_POINTS = 150_000  # points drawn in the profile, at most
SAMPLE_POINTS = 200_000  # points in the 3D sample, about


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


# Offsets of the pixels at most 2 pixels away, nearest first.
NEAR_FIRST = sorted(
    ((dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if 0 < dy * dy + dx * dx <= 4),
    key=lambda offset: offset[0] ** 2 + offset[1] ** 2,
)


def _fill_gaps(classes: np.ndarray, filled: np.ndarray, nx: int, ny: int) -> np.ndarray:
    """Small gaps between scan lines take their nearest pixel's class; large holes stay empty.
    Changes `classes` in place and returns the pixels that now show a class."""
    if filled.all():
        return filled
    grid, known = classes.reshape(ny, nx), filled.reshape(ny, nx)
    padded_classes, padded_known = np.pad(grid, 2), np.pad(known, 2)
    taken = known.copy()
    for dy, dx in NEAR_FIRST:
        neighbour = (slice(2 + dy, 2 + dy + ny), slice(2 + dx, 2 + dx + nx))
        take = ~taken & padded_known[neighbour]
        grid[take] = padded_classes[neighbour][take]
        taken |= take
    return taken.ravel()


class _ClassMap:
    """The class map (highest point's class per pixel), the profile's points and the class counts,
    gathered chunk by chunk."""

    def __init__(self, header) -> None:
        self.mins, self.maxs, count = header.mins, header.maxs, max(header.point_count, 1)
        width, height = max(self.maxs[0] - self.mins[0], 1e-6), max(self.maxs[1] - self.mins[1], 1e-6)
        # About two points per pixel: finer leaves speckle, coarser hides roofs and trees.
        self.cell = max(max(width, height) / MAX_PIXELS, np.sqrt(2 * width * height / count))
        self.nx, self.ny = int(width / self.cell) + 1, int(height / self.cell) + 1
        self.top = np.full(self.nx * self.ny, -np.inf)
        self.classes = np.zeros(self.nx * self.ny, dtype=np.uint8)
        self.counts = np.zeros(256, dtype=np.int64)
        self.profile = Profile.through(self.mins, self.maxs, count)
        self.section: list[np.ndarray] = []
        self.kept = 0

    def add(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, cls: np.ndarray) -> None:
        mins, maxs, cell, nx, ny = self.mins, self.maxs, self.cell, self.nx, self.ny
        self.counts += np.bincount(cls, minlength=256)
        col = np.clip(((x - mins[0]) / cell).astype(np.int64), 0, nx - 1)
        row = np.clip(((maxs[1] - y) / cell).astype(np.int64), 0, ny - 1)
        # Highest point per cell wins: sort by z so the last write per cell is the top one.
        order = np.argsort(z, kind="stable")
        flat, zs, cs = (row * nx + col)[order], z[order], cls[order]
        higher = zs > self.top[flat]
        self.top[flat[higher]] = zs[higher]
        self.classes[flat[higher]] = cs[higher]
        band = self.profile.select(x, y)
        self.section.append(np.stack([(x if self.profile.along == 0 else y)[band], z[band], cls[band]], axis=1))
        self.kept += int(band.sum())
        if self.kept > 2 * PROFILE_POINTS:
            # Denser than the header's bounds let us expect: halve what is kept so far.
            self.section = [np.concatenate(self.section)[::2]]
            self.kept = len(self.section[0])

    def draw(self, output: Path, title: str, frame: CoordinateFrame, classified_by: str | None) -> None:
        filled = _fill_gaps(self.classes, np.isfinite(self.top), self.nx, self.ny)
        points = np.concatenate(self.section) if self.section else np.zeros((0, 3))
        if len(points) > PROFILE_POINTS:
            points = points[:: int(np.ceil(len(points) / PROFILE_POINTS))]
        _draw(
            output,
            title,
            frame,
            (self.mins, self.maxs, self.cell, self.nx, self.ny),
            self.classes,
            filled,
            self.profile,
            points,
            {int(c): int(self.counts[c]) for c in np.flatnonzero(self.counts)},
            classified_by,
        )


class _Sample:
    """A thinned sample of the points (x, y, z from the data's minimum corner, the class colour,
    the class), gathered chunk by chunk."""

    DTYPE = np.dtype(
        [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"), ("class", "u1")]
    )

    def __init__(self, header, points: int) -> None:
        self.origin, self.total = np.floor(header.mins), header.point_count
        self.keep = min(1.0, points / max(header.point_count, 1))
        self.rng = np.random.default_rng(0)
        self.parts: list[np.ndarray] = []

    def add(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, cls: np.ndarray) -> None:
        chosen = self.rng.random(len(cls)) < self.keep
        part = np.zeros(int(chosen.sum()), dtype=self.DTYPE)
        for axis, (name, values) in enumerate((("x", x), ("y", y), ("z", z))):
            part[name] = values[chosen] - self.origin[axis]
        part["class"] = cls[chosen]
        rgb = class_rgb(part["class"])
        part["red"], part["green"], part["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        self.parts.append(part)

    def write(self, output: Path, frame: CoordinateFrame, classified_by: str | None) -> None:
        vertices = np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=self.DTYPE)
        origin = self.origin
        lines = [
            "ply",
            "format binary_little_endian 1.0",
            f"comment pointflow: {len(vertices):,} of {self.total:,} points, coloured by ASPRS class",
            f"comment origin {origin[0]:.3f} {origin[1]:.3f} {origin[2]:.3f} (add to x y z for the file's coordinates)",
            f"comment crs {frame.describe()}",
            *([f"comment classified by {classified_by}"] if classified_by else []),
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


def write_previews(
    path: Path,
    png: Path | None,
    ply: Path | None,
    title: str = "",
    sample_points: int = SAMPLE_POINTS,
    classified_by: str | None = None,
) -> CoordinateFrame:
    """The class map with its profile and legend (PNG, `png`) and the thinned 3D sample (binary PLY,
    `ply`, for the 3D view and any viewer that opens PLY), from one read of the file: decoding the
    points is most of the work. `classified_by` ("pointflow standard 2.6.0") is written into both,
    so a preview passed on alone still says what made its classes. Returns the file's coordinate
    frame."""
    import laspy

    with laspy.open(path) as reader:
        header = reader.header
    frame = coordinate_frame(header)
    class_map = _ClassMap(header) if png is not None else None
    sample = _Sample(header, sample_points) if ply is not None else None
    for chunk in iter_chunks(path):
        columns = np.asarray(chunk.x), np.asarray(chunk.y), np.asarray(chunk.z), np.asarray(chunk.classification)
        for gatherer in (class_map, sample):
            if gatherer is not None:
                gatherer.add(*columns)
    if class_map is not None:
        class_map.draw(png, title, frame, classified_by)
    if sample is not None:
        sample.write(ply, frame, classified_by)
    return frame


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
    classified_by: str | None,
) -> None:
    from PIL import Image, ImageDraw

    from pipelines.preview_image import (
        BELOW_AXIS,
        BLACK,
        DPI,
        WHITE,
        Box,
        dashed,
        draw_axes,
        font,
        left_margin,
        legend,
        legend_height,
        px,
        save_png,
        scatter,
    )

    mins, maxs, cell, nx, ny = grid
    margin, width = px(6), px((7.5 + 3.6) * 72)
    map_width, map_height = px(7.5 * 72), px(float(np.clip(7.5 * ny / nx, 3.0, 8.0)) * 72)
    heading = f"{title}{f' (classified by {classified_by})' if classified_by else ''}\n{units.describe()}"
    map_top = margin + 2 * round(px(10) * 1.2) + px(20)
    extent = ((mins[0], mins[0] + nx * cell), (maxs[1] - ny * cell, maxs[1]))
    # One scale for both map axes (metres are metres), as large as the map's space allows.
    map_left = margin + left_margin(map_height, extent[1])
    scale = min((map_width - map_left) / nx, map_height / ny)
    plan_width, plan_height = max(round(nx * scale), 1), max(round(ny * scale), 1)
    total = sum(counts.values()) or 1
    entries = [
        (
            colour_of(c),
            f"{c} {ASPRS_CLASS_NAMES.get(c, 'other')}\n{n:,} point{'s' if n != 1 else ''} ({_share(n, total)})",
        )
        for c, n in counts.items()
    ]
    # The map's row: at least 3 inches (a thin strip's map gets room for its axis label) and the legend's height.
    row_height = max(plan_height, px(3 * 72), legend_height(entries))
    plan = Box(map_left, map_top + (row_height - plan_height) // 2, plan_width, plan_height, *extent)

    order = np.argsort(points[:, 2], kind="stable")  # ground first, so vegetation and roofs draw over it
    zs = points[order, 1]
    low, high = (float(zs.min()), float(zs.max())) if len(zs) else (0.0, 1.0)
    pad = 0.05 * (high - low) if high > low else 0.5  # a little air above and below, as a plot has
    side_top = max(map_top + row_height, plan.bottom + BELOW_AXIS) + px(16) + round(px(9) * 1.2) + px(6)
    side_height = px(2.6 * 72) - px(40)
    side_left = margin + left_margin(side_height, (low - pad, high + pad))
    side = Box(
        side_left,
        side_top,
        width - margin - px(24) - side_left,  # room for half the last tick label
        side_height,
        # Points that all share one position along the profile still get an axis one unit long.
        (
            mins[profile.along],
            maxs[profile.along] if maxs[profile.along] > mins[profile.along] else mins[profile.along] + 1,
        ),
        (low - pad, high + pad),
    )
    canvas = Image.new("RGB", (width, side.bottom + BELOW_AXIS + margin), WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((margin, margin), heading, font=font(10), fill=BLACK, spacing=round(px(10) * 0.2))

    image = class_rgb(classes)
    image[~filled] = 255  # no point there: white, as the paper
    canvas.paste(
        Image.fromarray(image.reshape(ny, nx, 3)).resize((plan.width, plan.height), Image.Resampling.NEAREST),
        (plan.left, plan.top),
    )
    draw_axes(canvas, plan, units.label(0), units.label(1))
    band = (profile.centre - profile.half_width, profile.centre + profile.half_width)
    for edge in band:
        if profile.along == 0:
            row = int(np.clip(round(float(plan.row(edge))), plan.top, plan.bottom - 1))
            dashed(draw, (plan.left, row), (plan.right, row))
        else:
            column = int(np.clip(round(float(plan.column(edge))), plan.left, plan.right - 1))
            dashed(draw, (column, plan.top), (column, plan.bottom))

    # Sparse sections get bigger dots (0.6 to 1.6 points across), so a few hundred points still read as a line.
    dot = float(np.clip(100 / np.sqrt(max(len(points), 1)), 0.6, 1.6))
    scatter(canvas, side, points[order, 0], zs, class_rgb(points[order, 2].astype(np.uint8)), dot * DPI / 72)
    draw_axes(canvas, side, units.label(profile.along), units.label(2))
    across = units.axes[1 - profile.along]
    exaggeration = ((side.xlim[1] - side.xlim[0]) / side.width) / ((side.ylim[1] - side.ylim[0]) / side.height)
    vertical = f", vertical scale ×{exaggeration:.1f}" if exaggeration > 1.2 else ""
    draw.text(
        (side.left, side.top - px(6)),
        f"Profile along the longer side, through {across.lower()} {profile.centre:,.1f} "
        f"(band ±{profile.half_width:.2f}, {len(points):,} points; dashed on the map{vertical})",
        font=font(9),
        fill=BLACK,
        anchor="ld",
    )

    legend(canvas, map_width + px(24), map_top, f"{total:,} points", entries)
    save_png(canvas, output, classified_by)


def _share(points: int, total: int) -> str:
    percent = 100 * points / total
    return f"{percent:.1f} %" if percent >= 0.1 else "< 0.1 %"
