"""Runs one `pointflow` command with a real SIGKILL at a chosen point of a job, as the crash tests
of metering and export need it: `python -m tests.job_faults FAULT ARGS...`.

- `kill:after-export`: the process SIGKILLs itself as soon as the export step has returned (the
  export and its manifest are published, the job is `exported`), before anything else runs.
- `kill:before-manifest`: the process SIGKILLs itself as it is about to write an export's
  manifest (every artefact is staged under tmp/exports/ and copied into exports/, no manifest).

Nothing is imitated: the command runs as `pointflow` would, on the real catalog and store, and
nothing of the command's own clean-up runs after the kill.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_export() -> None:
    from pipelines import jobs

    export_step = jobs.export_step

    def dying(*args, **kwargs):
        export_step(*args, **kwargs)
        _die()

    jobs.export_step = dying


def kill_before_manifest() -> None:
    from pipelines.storage.local import LocalStore

    put_bytes = LocalStore.put_bytes

    def dying(store, key, *args, **kwargs):
        if key.endswith("/manifest.json") and "/exports/" in key:
            _die()
        return put_bytes(store, key, *args, **kwargs)

    LocalStore.put_bytes = dying


FAULTS = {"kill:after-export": kill_after_export, "kill:before-manifest": kill_before_manifest}


def main(argv: list[str]) -> int:
    fault, *args = argv
    if fault not in FAULTS:
        raise SystemExit(f"unknown fault {fault!r}")
    FAULTS[fault]()
    from pipelines.cli import main as pointflow

    return pointflow(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
