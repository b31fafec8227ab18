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

# Parameters and versions import no algorithm (SciPy, compiled loops): only building a classifier
# does, so a module that reads points (`lasio` needs PointBlock) or only names a classifier (the
# command that scans a file and sends its tiles) does not pay for them.
from .standard_params import GROUND_VERSION, STANDARD_VERSION, GroundParams, StandardParams

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


_BUILTIN: dict[str, tuple[type, str]] = {
    "standard": (StandardParams, STANDARD_VERSION),
    "ground": (GroundParams, GROUND_VERSION),
}
BUILTIN_CLASSIFIERS: tuple[str, ...] = tuple(_BUILTIN)


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


def _checked_params(name: str, params: Mapping[str, Any] | None) -> Any:
    """A built-in classifier's parameters dataclass, its defaults overridden by `params`."""
    if name not in _BUILTIN:
        raise InvalidValue(f"unknown classifier '{name}'; choose one of {', '.join(BUILTIN_CLASSIFIERS)}")
    return _build_params(_BUILTIN[name][0], params or {})


def describe_classifier(name: str, params: Mapping[str, Any] | None = None) -> ClassifierSpec:
    """A built-in classifier's name, version and full parameters, checked as `get_classifier`
    checks them but without importing its algorithms: the process that scans a file and sends its
    tiles never classifies a point.

    Raises InvalidValue for an unknown name or parameter key.
    """
    checked = _checked_params(name, params)
    return ClassifierSpec(name, _BUILTIN[name][1], dataclasses.asdict(checked))


def get_classifier(name: str, params: Mapping[str, Any] | None = None) -> Classifier:
    """A built-in classifier by name, with `params` overriding its defaults.

    Raises InvalidValue for an unknown name or parameter key.
    """
    checked = _checked_params(name, params)
    if name == "ground":
        from .ground import GroundClassifier

        return GroundClassifier(checked)
    from .standard import StandardClassifier

    return StandardClassifier(checked)
