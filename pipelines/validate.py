"""Validation of LAS/LAZ content with Great Expectations suites kept as files in `expectations/`.

A file is read whole when small and as evenly spread windows when large; the report says which.
Findings of severity "error" quarantine the file; "warning" findings travel on into the manifest.
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.lasio import LasInfo, NotPointCloudError, read_info, read_sample

log = logging.getLogger(__name__)

SUITES_DIR = Path(__file__).resolve().parents[1] / "expectations"
FULL_READ_MAX_POINTS = 2_000_000
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
        rows = "".join(
            f"<tr class='{f.severity}'><td>{f.severity}</td><td>{html.escape(f.explain)}</td>"
            f"<td><code>{html.escape(f.check)}</code></td><td>{html.escape(f.detail)}</td></tr>"
            for f in self.errors + self.warnings
        ) or "<tr><td colspan='4'>All checks passed.</td></tr>"
        header = "".join(
            f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))[:300]}</td></tr>" for k, v in (self.header or {}).items()
        )
        verdict = "accepted" if self.ok else "refused (quarantined)"
        what = {"full": "every point", "sample": f"a sample of {self.points_checked:,} points in evenly spread windows", "none": "no points"}[self.mode]
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>Validation of {html.escape(self.file_name)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px;text-align:left}}
table{{border-collapse:collapse}}.error td{{background:#fdd}}.warning td{{background:#ffd}}</style></head><body>
<h1>{html.escape(self.file_name)}: {verdict}</h1><p>{html.escape(self.reason)}</p><p>Checked: {what}.</p>
<h2>Findings</h2><table><tr><th>severity</th><th>what</th><th>check</th><th>detail</th></tr>{rows}</table>
<h2>Header</h2><table>{header}</table>
<p>What to do: fix the file at its source (re-export it from your processing software) and upload it again.</p>
</body></html>""".encode()


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
        self.batches = self.context.data_sources.add_pandas("pointflow").add_dataframe_asset("frame").add_batch_definition_whole_dataframe("whole")

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
    if "unexpected_count" in result:
        sample = ", ".join(str(v) for v in (result.get("partial_unexpected_list") or [])[:5])
        return f"{result['unexpected_count']} of {result.get('element_count', '?')} values unexpected (e.g. {sample})"
    if "observed_value" in result:
        return f"observed {result['observed_value']}"
    return ""


@cache
def _validator() -> _Validator:
    return _Validator()


def _header_frame(info: LasInfo, points_readable: bool, count_consistent: bool, point_mins, point_maxs) -> pd.DataFrame:
    mins, maxs = np.array(info.mins), np.array(info.maxs)
    ordered = bool(np.all(np.isfinite(mins)) and np.all(np.isfinite(maxs)) and np.all(maxs >= mins))
    tolerance = np.array(info.scales) + 1e-9
    tight = point_mins is None or bool(np.all(np.abs(point_mins - mins) <= 1.0 + tolerance) and np.all(np.abs(point_maxs - maxs) <= 1.0 + tolerance))
    return pd.DataFrame(
        [
            {
                "version": info.version,
                "point_format": info.point_format,
                "point_count": info.point_count,
                "points_readable": points_readable,
                "point_count_consistent": count_consistent,
                "min_scale": float(min(info.scales)) if all(math.isfinite(s) for s in info.scales) else -1.0,
                "offsets_finite": all(math.isfinite(o) for o in info.offsets),
                "bounds_ordered": ordered,
                "extent_area": float((maxs[0] - mins[0]) * (maxs[1] - mins[1])) if ordered else 0.0,
                "bounds_tight": tight,
                "crs_present": info.crs is not None,
            }
        ]
    )


def _read_points(path: Path, info: LasInfo):
    """Points to check, how they were chosen, and whether the count matched; raises on unreadable data."""
    import laspy

    if info.point_count <= FULL_READ_MAX_POINTS:
        with laspy.open(path, laz_backend=laspy.LazBackend.LazrsParallel) as reader:
            points = reader.read_points(info.point_count)
        return points, "full", len(points) == info.point_count
    if not info.compressed:
        expected = info.offset_to_points + info.point_count * info.point_record_length
        consistent = info.file_size >= expected
    else:
        consistent = True
    return read_sample(path, SAMPLE_WINDOWS, SAMPLE_WINDOW_POINTS), "sample", consistent


def validate_file(path: Path, display_name: str | None = None) -> ValidationReport:
    """Run both suites on a local file and return the report (nothing is moved here)."""
    path = Path(path)
    name = display_name or path.name
    try:
        info = read_info(path)
    except NotPointCloudError as error:
        finding = Finding("content", "las_signature_and_header", "error", str(error).replace(path.name, name), "checked by content, not by file name")
        return ValidationReport(name, False, "none", 0, None, errors=[finding])

    try:
        if info.point_count == 0:
            raise ValueError("no points")
        points, mode, consistent = _read_points(path, info)
        readable = True
    except Exception as error:  # noqa: BLE001 - any decoder failure means the same thing to the customer
        log.info("point data of %s unreadable: %s", name, error)
        points, mode, consistent, readable = None, "none", info.point_count == 0, info.point_count == 0

    frame = None
    point_mins = point_maxs = None
    if points is not None and len(points):
        frame = pd.DataFrame(
            {
                "x": np.asarray(points.x, dtype=np.float64),
                "y": np.asarray(points.y, dtype=np.float64),
                "z": np.asarray(points.z, dtype=np.float64),
                "return_number": np.asarray(points.return_number, dtype=np.int16),
                "number_of_returns": np.asarray(points.number_of_returns, dtype=np.int16),
                "classification": np.asarray(points.classification, dtype=np.int16),
                "intensity": np.asarray(points.intensity, dtype=np.int32),
            }
        )
        if mode == "full":
            point_mins = frame[["x", "y", "z"]].min().to_numpy()
            point_maxs = frame[["x", "y", "z"]].max().to_numpy()

    validator = _validator()
    findings = validator.run("las_header", _header_frame(info, readable, consistent, point_mins, point_maxs))
    if frame is not None:
        tolerance = [s / 2 + 1e-9 for s in info.scales]
        parameters = {
            "min_x": info.mins[0] - tolerance[0], "max_x": info.maxs[0] + tolerance[0],
            "min_y": info.mins[1] - tolerance[1], "max_y": info.maxs[1] + tolerance[1],
            "min_z": info.mins[2] - tolerance[2], "max_z": info.maxs[2] + tolerance[2],
            "valid_classes": VALID_CLASSES,
        }
        findings += validator.run("las_points", frame, parameters)
    errors = [f for f in findings if f.severity == "error"]
    warnings = [f for f in findings if f.severity != "error"]
    return ValidationReport(name, not errors, mode, 0 if frame is None else len(frame), info.to_dict(), errors, warnings)
