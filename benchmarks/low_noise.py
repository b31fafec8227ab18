"""Robustness to low noise: ground total error on real scenes with low points added, next to SMRF
(PDAL's defaults) and CSF on the same points.

Run from the repository root:  python -m benchmarks.low_noise [--data DIR] [--no-csf]

Real files carry low noise that their producers' labels leave out (multipath under glass and
water, a pulse's stray returns): pits a few metres to tens of metres below the terrain, alone or
in clusters of a few points. Each scene is scored clean and with such points added: 0.5 % of its
points alone, 0.5 % in clusters of 4, 0.2 % in clusters of 10, each cluster within about 30 cm,
2-20 m below the point it copies (a fixed seed, so runs compare). The added points are not
scored: the figure is the error on the scene's own points, as in benchmarks.accuracy.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.labelled import DEFAULT_DATA, GROUND, Labelled, load
from benchmarks.peers import PEERS
from pipelines.classifiers import PointBlock, get_classifier

SCENES = {
    "isprs/samp31.las": "ISPRS",
    "ign_st_barth_100m.laz": "IGN",
    "corpus/IGN_montpellier_6tiles.laz": "IGN",
    "corpus/AHN3_delft_3dfier.laz": "AHN3",
}


@dataclass(frozen=True)
class Noise:
    share: float  # of the scene's points
    cluster: int  # points per cluster

    @property
    def label(self) -> str:
        return "clean" if self.share == 0 else f"{100 * self.share:.1f} % in {self.cluster}s"


LEVELS = (Noise(0.0, 1), Noise(0.005, 1), Noise(0.005, 4), Noise(0.002, 10))


def with_low_noise(block: PointBlock, noise: Noise, seed: int = 3) -> PointBlock:
    """The block with low points appended after its own (single returns, like a stray pulse)."""
    if noise.share == 0:
        return block
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, len(block), max(1, int(len(block) * noise.share / noise.cluster)))
    index = np.repeat(seeds, noise.cluster)
    depth = np.repeat(rng.uniform(2.0, 20.0, seeds.size), noise.cluster)

    def extended(values: np.ndarray | None, added: np.ndarray) -> np.ndarray | None:
        return None if values is None else np.concatenate([values, added.astype(values.dtype)])

    return PointBlock(
        x=np.concatenate([block.x, block.x[index] + rng.normal(0.0, 0.3, index.size)]),
        y=np.concatenate([block.y, block.y[index] + rng.normal(0.0, 0.3, index.size)]),
        z=np.concatenate([block.z, block.z[index] - depth]),
        intensity=extended(block.intensity, np.zeros(index.size)),
        return_number=extended(block.return_number, np.ones(index.size)),
        number_of_returns=extended(block.number_of_returns, np.ones(index.size)),
    )


def total_error(item: Labelled, classes: np.ndarray) -> float:
    """Ground total error (%) on the scene's own scored points."""
    keep = item.scored
    return 100.0 * float(np.mean((classes[: len(item.block)][keep] == GROUND) != (item.labels[keep] == GROUND)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.low_noise", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (default: ../shared/data)"
    )
    parser.add_argument("--no-csf", action="store_true", help="skip CSF (the slowest peer)")
    args = parser.parse_args(argv)
    methods = {
        "pointflow": get_classifier("ground").classify,
        **{name: peer for name, peer in PEERS.items() if not (args.no_csf and name == "CSF")},
    }
    print("Ground total error in % on each scene's own points, clean and with low noise added")
    header = f"{'file':28s} {'low noise':12s} " + " ".join(f"{name:>9s}" for name in methods)
    print(header)
    print("-" * len(header))
    for relative, source in SCENES.items():
        if not (args.data / relative).exists():
            continue
        item = load(args.data, relative, source)
        for noise in LEVELS:
            block = with_low_noise(item.block, noise)
            errors = [total_error(item, classify(block)) for classify in methods.values()]
            print(f"{item.name[:28]:28s} {noise.label:12s} " + " ".join(f"{e:9.2f}" for e in errors), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
