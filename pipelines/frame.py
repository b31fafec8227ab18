"""A file's coordinate frame as the previews and the export manifest name it: "Easting [m]",
"x [ftUS, assumed]", "RGF93 v1 / Lambert-93 (EPSG:2154); ..."."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.units import CoordinateUnits, coordinate_units

SYMBOLS = {"metre": "m", "foot": "ft", "US survey foot": "ftUS", "degree": "°"}


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
            what = "an unreadable CRS" if self.units and self.units.unreadable_crs else "no CRS"
            return f"{what} in the file: " + (self.units.describe() if self.units else "coordinates as stored")
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
