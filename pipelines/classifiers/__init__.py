"""Point-cloud classifiers: pure functions of a block of points, no I/O.

`get_classifier(name, params)` builds a built-in classifier; every classifier follows the
`Classifier` protocol and returns one ASPRS class code (uint8) per point.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pipelines.errors import InvalidValue

from .base import Classifier, PointBlock

__all__ = [
    "BUILTIN_CLASSIFIERS",
    "Classifier",
    "GroundParams",
    "PointBlock",
    "StandardParams",
    "get_classifier",
]


def __getattr__(name: str) -> Any:
    # The algorithms (SciPy's ndimage among them) are imported when a classifier is built, not by
    # every module that reads points (`lasio` needs PointBlock): an Airflow task that only ingests,
    # validates or exports a file does not pay for them.
    if name == "GroundParams":
        from .ground import GroundParams

        return GroundParams
    if name == "StandardParams":
        from .standard import StandardParams

        return StandardParams
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


BUILTIN_CLASSIFIERS: tuple[str, ...] = ("standard", "ground")


def _build_params(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    """Instantiate a params dataclass from a mapping, recursing into nested dataclasses."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise InvalidValue(
                f"unknown parameter '{prefix}{key}' for {cls.__name__}; choose among {', '.join(fields)}"
            )
        nested = fields[key].default_factory  # type: ignore[misc]
        if isinstance(value, Mapping) and dataclasses.is_dataclass(nested):
            value = _build_params(nested, value, f"{prefix}{key}.")
        kwargs[key] = value
    return cls(**kwargs)


def get_classifier(name: str, params: Mapping[str, Any] | None = None) -> Classifier:
    """A built-in classifier by name, with `params` overriding its defaults.

    Raises InvalidValue for an unknown name or parameter key.
    """
    values = params or {}
    if name == "ground":
        from .ground import GroundClassifier, GroundParams

        return GroundClassifier(_build_params(GroundParams, values))
    if name == "standard":
        from .standard import StandardClassifier, StandardParams

        return StandardClassifier(_build_params(StandardParams, values))
    raise InvalidValue(f"unknown classifier '{name}'; choose one of {', '.join(BUILTIN_CLASSIFIERS)}")
