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
    "ClassifierSpec",
    "GroundParams",
    "PointBlock",
    "StandardParams",
    "describe_classifier",
    "get_classifier",
]


def __getattr__(name: str) -> Any:
    # The algorithms (SciPy's ndimage among them) are imported when a classifier is built, not by
    # every module that reads points (`lasio` needs PointBlock): an Airflow task that only ingests,
    # validates or exports a file does not pay for them.
    if name in ("GroundParams", "StandardParams"):
        from . import standard_params

        return getattr(standard_params, name)
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


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """What a task needs to build a built-in classifier on a worker, and a result records of it."""

    name: str
    version: str
    params: dict[str, Any]


def describe_classifier(name: str, params: Mapping[str, Any] | None = None) -> ClassifierSpec:
    """A built-in classifier's name, version and full parameters, checked as `get_classifier`
    checks them but without importing its algorithms (SciPy, compiled loops): the process that
    scans a file and sends its tiles never classifies a point.

    Raises InvalidValue for an unknown name or parameter key.
    """
    from .standard_params import GROUND_VERSION, STANDARD_VERSION, GroundParams, StandardParams

    kinds = {"ground": (GroundParams, GROUND_VERSION), "standard": (StandardParams, STANDARD_VERSION)}
    if name not in kinds:
        raise InvalidValue(f"unknown classifier '{name}'; choose one of {', '.join(BUILTIN_CLASSIFIERS)}")
    cls, version = kinds[name]
    return ClassifierSpec(name, version, dataclasses.asdict(_build_params(cls, params or {})))


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
