"""The preview PNG drawn with numpy and Pillow: a map and a profile in axes with plain-number ticks
and axis labels, a title and a legend. Matplotlib drew it before, but its import and layout engine
cost more than a CPU-second of every export task (issue 14), for a picture of rectangles, dots and
text that a pixel grid does as well."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

DPI = 110  # pixels per inch: the picture's sizes below are in points (1/72 inch), as print sizes are


def px(points: float) -> int:
    return round(points * DPI / 72)


WHITE, BLACK = (255, 255, 255), (0, 0, 0)
# Under a box: the ticks, their labels and the axis label.
BELOW_AXIS = px(3.5) + px(3.5) + 2 * px(10) + px(4)
SUPERSAMPLE = 3  # the profile's dots are drawn this much finer, then averaged down: round, smooth dots


@cache
def font(points: float) -> ImageFont.FreeTypeFont:
    # DejaVu Sans as matplotlib (a dependency, for the usage chart) ships it: the typeface the
    # preview always had, found without importing matplotlib.
    package = Path(importlib.util.find_spec("matplotlib").origin).parent
    return ImageFont.truetype(str(package / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"), px(points))


@dataclass(frozen=True)
class Box:
    """A plot area in pixels and the data range it shows; y grows upwards in the data."""

    left: int
    top: int
    width: int
    height: int
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    @property
    def right(self) -> int:
        return self.left + self.width

    @property
    def bottom(self) -> int:
        return self.top + self.height

    def column(self, x):
        return self.left + (np.asarray(x, dtype=float) - self.xlim[0]) / (self.xlim[1] - self.xlim[0]) * self.width

    def row(self, y):
        return self.top + (self.ylim[1] - np.asarray(y, dtype=float)) / (self.ylim[1] - self.ylim[0]) * self.height


def nice_ticks(low: float, high: float, length: int, horizontal: bool = True) -> np.ndarray:
    """Round-number ticks (1, 2, 2.5 or 5 times a power of ten) at least 60 pixels apart (40 upwards),
    and on a horizontal axis far enough apart for their labels not to touch; on an axis too short
    for two, one."""
    span = max(high - low, 1e-12)
    power = 10 ** np.floor(np.log10(span / max(length / 60, 1)))
    candidates = []
    for step in (m * power * 10**k for k in range(3) for m in (1, 2, 2.5, 5)):
        ticks = np.arange(np.ceil(low / step - 1e-9) * step, high + step * 1e-9, step) + 0.0  # no "-0"
        room = length * step / span
        needed = (
            max((text_width(label, 10) for label in tick_labels(ticks)), default=0) + px(12)
            if horizontal
            else px(10) * 3
        )
        if len(ticks) == 1 or (len(ticks) > 1 and room >= max(needed, 60 if horizontal else 40)):
            return ticks
        candidates.append(ticks)
    return next((ticks[:1] for ticks in candidates if len(ticks)), np.array([(low + high) / 2]))


def tick_labels(ticks: np.ndarray) -> list[str]:
    """Plain numbers with thousands separators (no "+6.449e6" offset), with as many decimals as the
    tick spacing needs."""
    step = float(np.min(np.diff(ticks))) if len(ticks) > 1 else 1.0
    decimals = next((d for d in range(7) if abs(round(step, d) - step) <= 1e-9 * max(1.0, abs(step))), 6)
    return [f"{value:,.{decimals}f}" for value in ticks]


def text_width(text: str, size: float) -> int:
    return round(max(font(size).getlength(line) for line in text.split("\n")))


def left_margin(box_height: int, ylim: tuple[float, float]) -> int:
    """What a y axis needs left of its box: the label, the widest tick label and the tick."""
    labels = tick_labels(nice_ticks(*ylim, box_height, horizontal=False))
    return px(10) + px(4) + max(text_width(label, 10) for label in labels) + px(3.5) + px(3.5)


def draw_axes(canvas: Image.Image, box: Box, xlabel: str, ylabel: str) -> None:
    """Frame, outward ticks with their labels, and the axis labels (the y label turned upright)."""
    draw = ImageDraw.Draw(canvas)
    tick, gap, small = px(3.5), px(3.5), font(10)
    draw.rectangle((box.left - 1, box.top - 1, box.right, box.bottom), outline=BLACK, width=1)
    xticks = nice_ticks(*box.xlim, box.width)
    for value, label in zip(xticks, tick_labels(xticks), strict=True):
        x = round(float(box.column(value)))
        draw.line((x, box.bottom, x, box.bottom + tick), fill=BLACK)
        draw.text((x, box.bottom + tick + gap), label, font=small, fill=BLACK, anchor="mt")
    yticks = nice_ticks(*box.ylim, box.height, horizontal=False)
    widest = 0
    for value, label in zip(yticks, tick_labels(yticks), strict=True):
        y = round(float(box.row(value)))
        draw.line((box.left - 1 - tick, y, box.left - 1, y), fill=BLACK)
        draw.text((box.left - 1 - tick - gap, y), label, font=small, fill=BLACK, anchor="rm")
        widest = max(widest, text_width(label, 10))
    draw.text(
        ((box.left + box.right) / 2, box.bottom + tick + gap + px(10) + px(4)),
        xlabel,
        font=small,
        fill=BLACK,
        anchor="mt",
    )
    upright = Image.new("RGB", (text_width(ylabel, 10) + 4, px(10) + px(4)), WHITE)
    ImageDraw.Draw(upright).text((2, 0), ylabel, font=small, fill=BLACK)
    upright = upright.rotate(90, expand=True)
    canvas.paste(
        upright,
        (
            box.left - 1 - tick - gap - widest - px(4) - upright.width,
            round((box.top + box.bottom - upright.height) / 2),
        ),
    )


def dashed(draw: ImageDraw.ImageDraw, start: tuple[int, int], end: tuple[int, int]) -> None:
    """A thin dashed straight line, horizontal or vertical."""
    (x0, y0), (x1, y1) = start, end
    length = max(abs(x1 - x0), abs(y1 - y0))
    for offset in range(0, length, px(5)):
        stop = min(offset + px(3), length)
        if y0 == y1:
            draw.line((x0 + offset, y0, x0 + stop, y0), fill=BLACK)
        else:
            draw.line((x0, y0 + offset, x0, y0 + stop), fill=BLACK)


def scatter(
    canvas: Image.Image, box: Box, xs: np.ndarray, ys: np.ndarray, colours: np.ndarray, diameter: float
) -> None:
    """Round dots of `diameter` pixels, later ones over earlier ones, drawn finer and averaged down so
    their edges are smooth."""
    width, height = box.width * SUPERSAMPLE, box.height * SUPERSAMPLE
    radius = max(diameter * SUPERSAMPLE / 2, 0.5)
    reach = int(np.ceil(radius))
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    disc = dx**2 + dy**2 <= radius**2
    dx, dy = dx[disc], dy[disc]
    cols = ((box.column(xs) - box.left) * SUPERSAMPLE).astype(np.int64)[:, None] + dx
    rows = ((box.row(ys) - box.top) * SUPERSAMPLE).astype(np.int64)[:, None] + dy
    inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    rank = np.broadcast_to(np.arange(len(xs))[:, None], cols.shape)[inside]
    top = np.full(width * height, -1)
    np.maximum.at(top, (rows * width + cols)[inside], rank)  # the last dot drawn on a pixel shows
    pixels = np.full((width * height, 3), 255, dtype=np.uint8)
    pixels[top >= 0] = colours[top[top >= 0]]
    fine = Image.fromarray(pixels.reshape(height, width, 3))
    canvas.paste(fine.reduce(SUPERSAMPLE), (box.left, box.top))


def _legend_rows(entries: list[tuple[str, str]]) -> tuple[int, int]:
    """The lines of the tallest label, and the pixels from one entry's top to the next."""
    lines = max((len(label.split("\n")) for _, label in entries), default=1)
    return lines, round(lines * px(8) * 1.2 + px(8) * 0.9)


def legend_height(entries: list[tuple[str, str]]) -> int:
    return px(9) + px(9) + len(entries) * _legend_rows(entries)[1]


def legend(canvas: Image.Image, left: int, top: int, title: str, entries: list[tuple[str, str]]) -> None:
    """A title over colour swatches ("#rrggbb"), each with its (two-line) label."""
    draw = ImageDraw.Draw(canvas)
    label_font, swatch = font(8), (px(16), px(5.6))
    lines, pitch = _legend_rows(entries)
    widest = max((text_width(label, 8) for _, label in entries), default=0)
    draw.text((left + (swatch[0] + px(6.4) + widest) / 2, top), title, font=font(9), fill=BLACK, anchor="mt")
    y = top + px(9) + px(9)
    for colour, label in entries:
        middle = y + lines * px(8) * 1.2 / 2
        draw.rectangle(
            (left, round(middle - swatch[1] / 2), left + swatch[0], round(middle + swatch[1] / 2)), fill=colour
        )
        draw.multiline_text((left + swatch[0] + px(6.4), y), label, font=label_font, fill=BLACK, spacing=px(1.6))
        y += pitch


def save_png(canvas: Image.Image, output: Path, software: str | None = None) -> None:
    metadata = PngInfo()
    if software:
        metadata.add_text("Software", software)  # PNG's own keyword, shown by image viewers' properties
    output.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(output, format="PNG", optimize=False, pnginfo=metadata)
