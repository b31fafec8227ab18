"""Validation of LAS/LAZ content: the gate's refusals and Great Expectations' warnings, in one report.

A file is read whole when small and as evenly spread windows when large; the report says which.
Errors, which quarantine the file, are the gate's (`pipelines.gate`: structure, header values,
unreadable or inconsistent points), the same checks `pointflow classify` and training apply.
Warnings come from the Great Expectations suites kept as files in `expectations/` and travel on
into the manifest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.customer_text import render_page
from pipelines.gate import NotPointCloudError, count_problem, point_problems
from pipelines.lasio import LasInfo, decoding, read_info, read_sample, unreadable_points

log = logging.getLogger(__name__)

SUITES_DIR = Path(__file__).resolve().parents[1] / "expectations"
FULL_READ_MAX_POINTS = 2_000_000
FULL_READ_BLOCK_POINTS = 100_000
SAMPLE_WINDOWS = 20
SAMPLE_WINDOW_POINTS = 50_000
VALID_CLASSES = list(range(0, 19)) + list(range(64, 256))


@dataclass(frozen=True)
class Finding:
    suite: str
    check: str
    severity: str
    explain: str
    detail: str


@dataclass
class ValidationReport:
    file_name: str
    ok: bool
    mode: str  # "full" (every point), "sample" (windows) or "none" (not a point cloud)
    points_checked: int
    header: dict[str, Any] | None
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def reason(self) -> str:
        """One line for logs, CLI errors and notices."""
        if self.ok:
            return "valid" + (f" with {len(self.warnings)} warning(s)" if self.warnings else "")
        return "; ".join(f.explain for f in self.errors)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reason": self.reason}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, default=str).encode()

    def to_html(self) -> bytes:
        return render_page("validation_report.html.j2", report=self).encode()


@cache
def _suite_definition(name: str) -> dict[str, Any]:
    return json.loads((SUITES_DIR / f"{name}.json").read_text())


class _Validator:
    """An ephemeral Great Expectations context with one pandas batch definition."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig
        from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

        self._gx = gx
        self._configuration = ExpectationConfiguration
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.batches = (
            self.context.data_sources.add_pandas("pointflow")
            .add_dataframe_asset("frame")
            .add_batch_definition_whole_dataframe("whole")
        )

    def run(self, suite_name: str, frame: pd.DataFrame, parameters: dict[str, Any] | None = None) -> list[Finding]:
        definition = _suite_definition(suite_name)
        expectations = [self._configuration(**e).to_domain_obj() for e in definition["expectations"]]
        suite = self._gx.ExpectationSuite(name=definition["name"], expectations=expectations)
        batch = self.batches.get_batch(batch_parameters={"dataframe": frame})
        result = batch.validate(suite, expectation_parameters=parameters or {})
        findings = []
        for outcome in result.results:
            if outcome.success:
                continue
            config = outcome.expectation_config
            findings.append(
                Finding(
                    suite=suite_name,
                    check=f"{config.type}({', '.join(f'{k}={v}' for k, v in config.kwargs.items() if k != 'batch_id' and k != 'value_set')})",
                    severity=config.meta.get("severity", "error"),
                    explain=config.meta.get("explain", config.type),
                    detail=_describe(outcome.result),
                )
            )
        return findings


def _describe(result: dict[str, Any]) -> str:
    if result.get("element_count") == 1:
        return ""  # a fact of the header (one row): what was found is the finding itself
    if "unexpected_count" in result:
        sample = ", ".join(str(v) for v in (result.get("partial_unexpected_list") or [])[:5])
        return f"{result['unexpected_count']} of {result.get('element_count', '?')} values unexpected (e.g. {sample})"
    if "observed_value" in result:
        return f"observed {result['observed_value']}"
    return ""


@cache
def _validator() -> _Validator:
    return _Validator()


def _in_set(values: np.ndarray, kwargs: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    unexpected = values[~np.isin(values, np.asarray(list(kwargs["value_set"])))]
    return len(unexpected) == 0, {
        "element_count": len(values),
        "unexpected_count": len(unexpected),
        "partial_unexpected_list": unexpected[:20].tolist(),
    }


def _max_between(values: np.ndarray, kwargs: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    observed = values.max().item() if len(values) else None
    low, high = kwargs.get("min_value"), kwargs.get("max_value")
    ok = observed is not None and (low is None or observed >= low) and (high is None or observed <= high)
    return ok, {"observed_value": observed}


# The expectation types our suites use, evaluated with numpy on the column: Great Expectations
# adds nothing to a set membership or a maximum, and setting it up costs seconds of every
# validate task (a new process each). A suite with any other type goes to Great Expectations;
# tests/test_validate.py checks both give the same findings.
NUMPY_EXPECTATIONS = {"expect_column_values_to_be_in_set": _in_set, "expect_column_max_to_be_between": _max_between}


def _resolve(kwargs: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    resolved = {
        k: parameters[v["$PARAMETER"]] if isinstance(v, dict) and "$PARAMETER" in v else v for k, v in kwargs.items()
    }
    # Bounds as Great Expectations keeps them (floats), so a finding's check reads the same either way.
    return {k: float(v) if k in ("min_value", "max_value") and v is not None else v for k, v in resolved.items()}


def run_suite(suite_name: str, frame: pd.DataFrame, parameters: dict[str, Any] | None = None) -> list[Finding]:
    """The suite's failed expectations as findings: in numpy where every type is one of
    NUMPY_EXPECTATIONS, else through Great Expectations."""
    definition = _suite_definition(suite_name)
    if any(e["type"] not in NUMPY_EXPECTATIONS for e in definition["expectations"]):
        return _validator().run(suite_name, frame, parameters)
    findings = []
    for expectation in definition["expectations"]:
        kwargs = _resolve(expectation["kwargs"], parameters or {})
        ok, result = NUMPY_EXPECTATIONS[expectation["type"]](frame[kwargs["column"]].to_numpy(), kwargs)
        if ok:
            continue
        meta = expectation.get("meta", {})
        shown = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "value_set")
        findings.append(
            Finding(
                suite_name,
                f"{expectation['type']}({shown})",
                meta.get("severity", "error"),
                meta.get("explain", expectation["type"]),
                _describe(result),
            )
        )
    return findings


def _header_frame(info: LasInfo, point_mins, point_maxs) -> pd.DataFrame:
    tolerance = np.array(info.scales) + 1e-9
    tight = point_mins is None or bool(
        np.all(np.abs(point_mins - info.mins) <= 1.0 + tolerance)
        and np.all(np.abs(point_maxs - info.maxs) <= 1.0 + tolerance)
    )
    return pd.DataFrame(
        [
            {
                "bounds_tight": tight,
                "crs_present": info.crs is not None or info.crs_unreadable is not None,
                "crs_readable": info.crs_unreadable is None,
            }
        ]
    )


def _read_points(path: Path, info: LasInfo):
    """Points to check and how they were chosen; raises NotPointCloudError on unreadable data."""
    import laspy

    if info.point_count <= FULL_READ_MAX_POINTS:
        # Read in blocks: memory grows with the points the data really holds, not with the count
        # the header claims (a compressed point takes a few bits: the file's size bounds it loosely).
        with decoding(unreadable_points(path)), laspy.open(path, laz_backend=laspy.LazBackend.LazrsParallel) as reader:
            parts = [chunk.array for chunk in reader.chunk_iterator(FULL_READ_BLOCK_POINTS)]
            header = reader.header
        return laspy.ScaleAwarePointRecord(
            np.concatenate(parts), header.point_format, header.scales, header.offsets
        ), "full"
    return read_sample(path, SAMPLE_WINDOWS, SAMPLE_WINDOW_POINTS), "sample"


def _refused(error: NotPointCloudError, path: Path, name: str) -> Finding:
    return Finding(
        "gate", error.check, "error", str(error).replace(path.name, name), "checked by content, not by file name"
    )


def validate_file(path: Path, display_name: str | None = None) -> ValidationReport:
    """Run the gate and both suites on a local file and return the report (nothing is moved here)."""
    path = Path(path)
    name = display_name or path.name
    try:
        info = read_info(path)
    except NotPointCloudError as error:
        return ValidationReport(name, False, "none", 0, None, errors=[_refused(error, path, name)])
    try:
        points, mode = _read_points(path, info)
    except NotPointCloudError as error:
        return ValidationReport(name, False, "none", 0, info.to_dict(), errors=[_refused(error, path, name)])

    problems = point_problems(points, info.scales, info.offsets, info.mins, info.maxs)
    point_mins = point_maxs = None
    if mode == "full":
        problems += [p for p in [count_problem(len(points), info.point_count)] if p is not None]
        xyz = np.stack([np.asarray(points.x), np.asarray(points.y), np.asarray(points.z)])
        point_mins, point_maxs = xyz.min(axis=1), xyz.max(axis=1)
    errors = [Finding("gate", p.check, "error", p.explain, p.detail) for p in problems]
    frame = pd.DataFrame(
        {
            "classification": np.asarray(points.classification, dtype=np.int16),
            "intensity": np.asarray(points.intensity, dtype=np.int32),
        }
    )
    warnings = run_suite("las_header", _header_frame(info, point_mins, point_maxs))
    warnings += run_suite("las_points", frame, {"valid_classes": VALID_CLASSES})
    return ValidationReport(name, not errors, mode, len(points), info.to_dict(), errors, warnings)
