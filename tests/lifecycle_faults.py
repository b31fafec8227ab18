"""Runs one `pointflow` command with a fault at a chosen point of a deletion, as the race and crash
tests of the data lifecycle need it: `python -m tests.lifecycle_faults FAULT ARGS...`.

- `pause:READY:GO`: once the deletion's inventory is taken, create the file READY and wait until
  the file GO exists (at most 60 s) before going on: another command can act meanwhile.
- `kill:N`: the process SIGKILLs itself as it is about to delete the N-th object (a real kill:
  nothing of the command's own clean-up runs).

Nothing is imitated: the command runs as `pointflow` would, on the real catalog and store.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def pause_after_inventory(ready: Path, go: Path) -> None:
    from pipelines.lifecycle import deletion

    plan_deletion = deletion.plan_deletion

    def paused(*args, **kwargs):
        plan = plan_deletion(*args, **kwargs)
        ready.touch()
        deadline = time.monotonic() + 60
        while not go.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return plan

    deletion.plan_deletion = paused


def kill_on_delete(n: int) -> None:
    from pipelines.storage.local import LocalStore

    delete = LocalStore.delete
    calls = 0

    def dying(store, key):
        nonlocal calls
        calls += 1
        if calls == n:
            os.kill(os.getpid(), signal.SIGKILL)
        delete(store, key)

    LocalStore.delete = dying


def main(argv: list[str]) -> int:
    fault, *args = argv
    kind, _, spec = fault.partition(":")
    if kind == "pause":
        ready, go = spec.split(":")
        pause_after_inventory(Path(ready), Path(go))
    elif kind == "kill":
        kill_on_delete(int(spec))
    else:
        raise SystemExit(f"unknown fault {fault!r}")
    from pipelines.cli import main as pointflow

    return pointflow(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
