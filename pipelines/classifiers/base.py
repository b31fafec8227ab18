"""Types shared by every classifier."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

# ASPRS LAS 1.4 class codes used by the built-in classifiers.
UNCLASSIFIED = 1
GROUND = 2
LOW_VEGETATION = 3
MEDIUM_VEGETATION = 4
HIGH_VEGETATION = 5
BUILDING = 6
LOW_NOISE = 7
WATER = 9
HIGH_NOISE = 18


@dataclass(frozen=True)
class PointBlock:
    """A block of points in a projected CRS; coordinates are already scaled to metres."""

    x: np.ndarray  # float64
    y: np.ndarray
    z: np.ndarray
    intensity: np.ndarray | None = None  # uint16
    return_number: np.ndarray | None = None  # uint8
    number_of_returns: np.ndarray | None = None  # uint8

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, index: np.ndarray) -> PointBlock:
        """The points at `index` (indices or a mask), in that order."""

        def pick(values: np.ndarray | None) -> np.ndarray | None:
            return None if values is None else values[index]

        return PointBlock(
            self.x[index],
            self.y[index],
            self.z[index],
            pick(self.intensity),
            pick(self.return_number),
            pick(self.number_of_returns),
        )


@runtime_checkable
class Classifier(Protocol):
    name: str
    version: str
    params: dict

    def classify(self, block: PointBlock) -> np.ndarray:
        """ASPRS class (uint8) per point; the result has len(block) entries."""
        ...
