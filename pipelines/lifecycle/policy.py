"""The lifecycle policy: per-plan periods read from YAML (default `pipelines/data/lifecycle.yaml`).

No period is a constant in code: a change of terms is a reviewed edit of the policy file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipelines.billing.periods import add_months
from pipelines.errors import UserError


class PolicyError(UserError, ValueError):
    """The policy file cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class PlanPolicy:
    """One plan's lifecycle periods (see the comments in lifecycle.yaml for each field)."""

    inactivity_notice_after_months: int | None = None
    closure_after_notice_months: int = 2
    reminder_days_before_closure: tuple[int, ...] = (30, 7)
    grace_months: int = 1
    overdue_service_stop_days: int = 30
    overdue_notice_days: int = 5
    export_link_days: int = 7


@dataclass(frozen=True)
class LifecyclePolicy:
    defaults: PlanPolicy
    plans: Mapping[str, PlanPolicy]
    source: str
    sha256: str
    # Years usage records are kept (see lifecycle.yaml); None: kept for ever.
    usage_retention_years: int | None = None

    def usage_kept_since(self, as_of: datetime) -> datetime | None:
        """The oldest moment whose usage records are kept at `as_of`: older ones are deleted by the
        nightly run, and refused by a usage import (one deleted would be billed again); None: all kept."""
        years = self.usage_retention_years
        return None if years is None else add_months(as_of, -12 * years)

    def for_plan(self, plan: str) -> PlanPolicy:
        return self.plans.get(plan, self.defaults)


_FIELDS = {f.name for f in fields(PlanPolicy)}


def load_policy(path: Path | None = None) -> LifecyclePolicy:
    """Read and check a policy file; `None` means the default shipped with pointflow."""
    shipped = resources.files("pipelines").joinpath("data/lifecycle.yaml").read_text(encoding="utf-8")
    default = parse_policy(shipped, "default lifecycle policy")
    if path is None:
        return default
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"lifecycle policy {path} does not exist") from None
    return parse_policy(text, str(path), default.usage_retention_years)


def parse_policy(text: str, source: str, usage_retention_years: int | None = None) -> LifecyclePolicy:
    """`usage_retention_years` applies when the text does not name it (a file written before it existed)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PolicyError(f"{source}: not valid YAML: {error}") from None
    if not isinstance(data, dict) or set(data) - {"defaults", "plans", "usage_retention_years"}:
        raise PolicyError(f"{source}: expected a mapping with 'defaults', 'plans' and 'usage_retention_years'")
    retention = data.get("usage_retention_years", usage_retention_years)
    if retention is not None and not _whole(retention, 1):
        raise PolicyError(
            f"{source}: usage_retention_years must be a number of years >= 1, or null to keep usage records for ever"
        )
    defaults = _plan(source, "defaults", data.get("defaults") or {}, PlanPolicy())
    plans_data = data.get("plans") or {}
    if not isinstance(plans_data, dict):
        raise PolicyError(f"{source}: 'plans' must map plan names to fields")
    plans = {str(name): _plan(source, f"plans.{name}", spec or {}, defaults) for name, spec in plans_data.items()}
    return LifecyclePolicy(defaults, plans, source, hashlib.sha256(text.encode("utf-8")).hexdigest(), retention)


def _plan(source: str, where: str, spec: Any, base: PlanPolicy) -> PlanPolicy:
    if not isinstance(spec, dict):
        raise PolicyError(f"{source}: {where} must be a mapping of fields")
    unknown = sorted(set(spec) - _FIELDS)
    if unknown:
        raise PolicyError(
            f"{source}: {where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_FIELDS))})"
        )
    values: dict[str, Any] = {}
    for name, value in spec.items():
        if name == "reminder_days_before_closure":
            if not isinstance(value, list) or not value or not all(_whole(v, 1) for v in value):
                raise PolicyError(f"{source}: {where}.{name} must be a non-empty list of days >= 1, e.g. [30, 7]")
            values[name] = tuple(sorted(set(value), reverse=True))
        elif name == "inactivity_notice_after_months":
            if value is not None and not _whole(value, 1):
                raise PolicyError(
                    f"{source}: {where}.{name} must be a number of months >= 1, or null to turn the rule off"
                )
            values[name] = value
        else:
            minimum = 1 if name in ("closure_after_notice_months", "export_link_days") else 0
            if not _whole(value, minimum):
                raise PolicyError(f"{source}: {where}.{name} must be a whole number >= {minimum}, got {value!r}")
            values[name] = value
    policy = replace(base, **values)
    # A reminder must fall inside the notice period, otherwise "at least one reminder before the
    # closure" cannot hold and the closure would be postponed for ever.
    if (
        policy.inactivity_notice_after_months is not None
        and max(policy.reminder_days_before_closure) >= 28 * policy.closure_after_notice_months
    ):
        raise PolicyError(
            f"{source}: {where}: reminders must come after the notice, i.e. less than {28 * policy.closure_after_notice_months} days before closure"
        )
    if policy.overdue_notice_days > policy.overdue_service_stop_days:
        raise PolicyError(f"{source}: {where}: overdue_notice_days exceeds overdue_service_stop_days")
    return policy


def _whole(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum
