"""The labelled airborne LiDAR in ../shared/data, grouped by source, with its scoring rules.

A *source* is one producer's data (one sensor family, one labelling convention): the unit of
leave-one-source-out evaluation.  Scoring rules are those of ../shared/data/README.md: points of
class 0, 7, 9, 18 and 64 and above are left out everywhere, and the Saint-Barthelemy file's
class 1 (points its producer left unclassified) too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import laspy
import numpy as np

from pipelines.classifiers import PointBlock
from pipelines.lasio import point_block

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GROUND = 2
UNSCORED = (0, 7, 9, 18)

# file (relative to the data folder) -> source
FILES: dict[str, str] = {
    "isprs/samp11.las": "ISPRS",
    "isprs/samp21.las": "ISPRS",
    "isprs/samp31.las": "ISPRS",
    "isprs/samp51.las": "ISPRS",
    "isprs/samp61.las": "ISPRS",
    "ign_st_barth_100m.laz": "IGN",
    "corpus/IGN_bat_grenoble.laz": "IGN",
    "corpus/IGN_crop1_rural.laz": "IGN",
    "corpus/IGN_crop2_rural_wood_water.laz": "IGN",
    "corpus/IGN_flatfield_strip.laz": "IGN",
    "corpus/IGN_montpellier_6tiles.laz": "IGN",
    "corpus/IGN_pont_bridge.laz": "IGN",
    "corpus/AHN3_delft_3dfier.laz": "AHN3",
    "corpus/AHN3_amsterdam_2386_9702.laz": "AHN3",
    "corpus/AHN3_amsterdam_2397_9705.laz": "AHN3",
    "corpus/NEON_OSBS_006.laz": "NEON",
    "corpus/NEON_OSBS_405000_3276300_pyfor.laz": "NEON",
    "corpus/USGS_NM_4_6_crop_ftUS.las": "USGS",
    "lidr_megaplot.laz": "lidR",
    "lidr_topography.laz": "lidR",
}


@dataclass(frozen=True)
class Labelled:
    name: str
    source: str
    block: PointBlock  # coordinates in metres
    labels: np.ndarray
    unit: str

    @property
    def scored(self) -> np.ndarray:
        """Points whose labels count (see the module docstring)."""
        keep = ~np.isin(self.labels, UNSCORED) & (self.labels < 64)
        if self.name == "ign_st_barth_100m":
            keep &= self.labels != 1
        return keep

    @property
    def in_corpus(self) -> bool:
        return self.name.startswith(("AHN3", "IGN_", "NEON", "USGS"))


def load(data: Path, relative: str, source: str) -> Labelled:
    from pipelines.units import coordinate_units

    las = laspy.read(data / relative)
    units = coordinate_units(las.header)
    return Labelled(
        Path(relative).stem, source, point_block(las, units), np.asarray(las.classification, dtype=np.uint8), units.name
    )


def load_all(data: Path = DEFAULT_DATA) -> list[Labelled]:
    return [load(data, relative, source) for relative, source in FILES.items() if (data / relative).exists()]
