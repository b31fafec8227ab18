"""Data lifecycle: inactivity notices, terminations, locks, grace-period deletion, API result
retention, usage and job record retention, trial ends, overdue notices, killed deletions finished; legal
holds, export of all data, deletion on request.

- `policy`: the per-plan periods (YAML, `pipelines/data/lifecycle.yaml` by default)
- `rules`: `run_lifecycle(runtime, as_of, dry_run) -> list[Action]`, what the nightly DAG runs
- `account_state`: what the rules read of an account, and how they record, send and delete
- `operations`: holds, termination, export-all, delete-on-request, `is_locked`
- `deletion`: inventory (every version), audit entry, delete, list again
- `retention`: usage records past `usage_retention_years`, and the job rows holding the same facts;
  their audited deletion
- `notices`: the e-mails and their delivery records
- `sweeps`: jobs whose run was killed or lost are closed; ready e-mails the runs could not send go out
- `models`: the catalog tables
"""

from pipelines.lifecycle.account_state import ACTIONS, Action
from pipelines.lifecycle.operations import (
    LifecycleError,
    delete_account_data,
    export_all,
    is_locked,
    place_hold,
    release_holds,
    terminate_account,
)
from pipelines.lifecycle.policy import (
    LifecyclePolicy,
    PolicyError,
    load_policy,
)
from pipelines.lifecycle.rules import LifecycleRunError, run_lifecycle

__all__ = [
    "ACTIONS",
    "Action",
    "LifecycleError",
    "LifecyclePolicy",
    "LifecycleRunError",
    "PolicyError",
    "delete_account_data",
    "export_all",
    "is_locked",
    "load_policy",
    "place_hold",
    "release_holds",
    "run_lifecycle",
    "terminate_account",
]
