"""Progress bars for long CLI work (on a terminal; silent when output is piped or in CI)."""

from __future__ import annotations

from tqdm import tqdm

_UNITS = {
    "scan": ("reading", "pts"),
    "classify": ("classifying", "tile"),
    "write": ("writing", "tile"),
    "copc-scan": ("reading for COPC", "pts"),
    "copc": ("writing COPC", "pts"),
    "labels": ("reading labels", "file"),
    "features": ("features", "pts"),
    "fit": ("training", "round"),
}


class ProgressBars:
    """A `progress(stage, done, total)` callback showing one bar per stage."""

    def __init__(self) -> None:
        self._bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self._bars.get(stage)
        if bar is None:
            label, unit = _UNITS.get(stage, (stage, "it"))
            bar = self._bars[stage] = tqdm(
                total=total, desc=label, unit=unit, unit_scale=unit == "pts", disable=None, leave=False
            )
        bar.update(done - bar.n)

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *exc) -> None:
        for bar in self._bars.values():
            bar.close()
