"""Units of a LAS file's coordinates, read from its CRS, so classifiers always work in metres.

LAS 1.0-1.3 files carry GeoTIFF keys: ProjLinearUnitsGeoKey (3076) for x and y,
VerticalUnitsGeoKey (4099) for z.  LAS 1.4 files may carry WKT instead; a compound CRS names the
vertical unit in its vertical part.  Where the vertical unit is not stated, z is taken to be in
the horizontal unit (US producers state feet for both or neither).  Without any CRS the
coordinates are taken as metres, and `assumed` says so (`unreadable_crs`: a CRS record is there but
cannot be read).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipelines.errors import InvalidValue

if TYPE_CHECKING:  # only headers' readers need laspy: the workers (tile_tasks' scaling) import this module
    import laspy

# EPSG unit codes -> (name, metres per unit)
_EPSG_UNITS: dict[int, tuple[str, float]] = {
    9001: ("metre", 1.0),
    9002: ("foot", 0.3048),
    9003: ("US survey foot", 1200.0 / 3937.0),
}
_PROJ_LINEAR_UNITS = 3076
_VERTICAL_UNITS = 4099
# Metres per unit a CRS may state: from the millimetre to the nautical mile (1,852 m), which covers
# every real linear unit (feet of all kinds, links, chains, kilometres, statute miles). A factor
# outside, zero, negative or not a number is a broken CRS: it would scale every parameter wrongly.
MIN_METRES_PER_UNIT, MAX_METRES_PER_UNIT = 0.001, 1852.0


@dataclass(frozen=True)
class CoordinateUnits:
    """Metres per coordinate unit, horizontally (x, y) and vertically (z)."""

    horizontal: float = 1.0
    vertical: float = 1.0
    name: str = "metre"  # the horizontal unit, as the CRS names it
    vertical_name: str = "metre"
    assumed: bool = True  # no CRS said so: metres by default
    # Why they are assumed: no CRS at all, or one that could not be read (a file in feet with a
    # broken CRS record is then classified as metres: the report and the previews say so).
    unreadable_crs: bool = False

    @property
    def is_metric(self) -> bool:
        return self.horizontal == 1.0 and self.vertical == 1.0

    def describe(self) -> str:
        """One line for a run's summary."""
        if self.assumed:
            why = "the file's CRS record could not be read" if self.unreadable_crs else "the file states no CRS"
            return f"metres (assumed: {why})"
        if self.name == self.vertical_name:
            return f"{self.name} (from the file's CRS)"
        return f"{self.name}, heights in {self.vertical_name} (from the file's CRS)"

    def to_dict(self) -> dict:
        return {
            "horizontal": self.name,
            "vertical": self.vertical_name,
            "metres_per_unit": [self.horizontal, self.vertical],
            "assumed": self.assumed,
        }


METRES = CoordinateUnits()


def _geokey_units(header: laspy.LasHeader) -> tuple[tuple[str, float] | None, tuple[str, float] | None]:
    directories = header.vlrs.get("GeoKeyDirectoryVlr")
    if not directories:
        return None, None
    keys = {key.id: key for key in directories[0].geo_keys}

    def unit(key_id: int) -> tuple[str, float] | None:
        key = keys.get(key_id)
        # Location 0: the value sits in the key itself (an EPSG unit code).
        if key is None or key.tiff_tag_location != 0:
            return None
        return _EPSG_UNITS.get(int(key.value_offset))

    return unit(_PROJ_LINEAR_UNITS), unit(_VERTICAL_UNITS)


def _wkt_units(header: laspy.LasHeader) -> tuple[tuple[str, float] | None, tuple[str, float] | None] | None:
    """The units the file's CRS names; None when it has a CRS record that cannot be read."""
    try:
        crs = header.parse_crs()
    except Exception:
        return None
    if crs is None:
        return None, None
    parts = crs.sub_crs_list if crs.is_compound else [crs]
    horizontal = vertical = None
    for part in parts:
        axes = part.axis_info
        if not axes:
            continue
        if part.is_vertical:
            vertical = (axes[0].unit_name, float(axes[0].unit_conversion_factor))
        elif part.is_projected:
            horizontal = (axes[0].unit_name, float(axes[0].unit_conversion_factor))
        elif horizontal is None:
            # A geographic CRS: degrees cannot be converted to metres by a factor.
            horizontal = (axes[0].unit_name, float("nan"))
    return horizontal, vertical


def coordinate_units(header: laspy.LasHeader) -> CoordinateUnits:
    """The units of the file's coordinates; metres (assumed) when the file states none.

    Raises InvalidValue for geographic coordinates (degrees), which no metre-based filter can use,
    and for a unit outside MIN_METRES_PER_UNIT to MAX_METRES_PER_UNIT metres (not a real linear unit).
    """
    horizontal, vertical = _geokey_units(header)
    from_wkt = _wkt_units(header)
    wkt_horizontal, wkt_vertical = from_wkt or (None, None)
    horizontal = horizontal or wkt_horizontal
    vertical = vertical or wkt_vertical
    if horizontal is None:
        if vertical is None:
            return METRES if from_wkt is not None else CoordinateUnits(unreadable_crs=True)
        horizontal = ("metre", 1.0)
    name, factor = horizontal
    if factor != factor:  # NaN: angular
        raise InvalidValue(
            f"the file's coordinates are geographic ({name}); reproject it to a "
            "projected CRS in metres or feet (e.g. UTM) and upload it again"
        )
    vertical_name, vertical_factor = vertical or horizontal
    for axes, unit, metres in (("x and y", name, factor), ("z", vertical_name, vertical_factor)):
        if not (math.isfinite(metres) and MIN_METRES_PER_UNIT <= metres <= MAX_METRES_PER_UNIT):
            raise InvalidValue(
                f"the file's CRS gives its {axes} coordinates the unit '{unit}' of {metres:g} m; we accept "
                f"linear units of {MIN_METRES_PER_UNIT:g} m (millimetre) to {MAX_METRES_PER_UNIT:g} m (nautical mile): "
                'correct the CRS\'s unit (UNIT["metre",1] for metres) or reproject the file, and upload it again'
            )
    return CoordinateUnits(factor, vertical_factor, name, vertical_name, assumed=False)
