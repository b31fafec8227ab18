"""Scratch space (POINTFLOW_HOME/scratch): private work folders that a crash cannot leak.

Every work folder has a lock file beside it, held (flock) by its process for as long as it works;
the kernel drops the lock when the process dies, however it dies (SIGKILL, OOM killer, power
cut). `sweep` removes each folder whose lock nobody holds, and `work_dir` sweeps before it makes a
new folder, so the next run after a crash cleans up. The lock file also says whose points the
folder holds (account and job), so deleting an account finds its folders, alive or dead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LOCK_SUFFIX = ".lock"


@dataclass(frozen=True)
class WorkFolder:
    path: Path
    kind: str
    account_id: str | None
    job_id: str | None


@contextlib.contextmanager
def work_dir(scratch: Path, kind: str, account_id: str | None = None, job_id: str | None = None) -> Iterator[Path]:
    """A new folder under `scratch`, locked while the block runs and removed after it."""
    scratch.mkdir(parents=True, exist_ok=True)
    sweep(scratch)
    owner = {"kind": kind, "account_id": account_id, "job_id": job_id, "pid": os.getpid()}
    while True:
        name = f"{kind}-{uuid.uuid4().hex[:16]}"
        lock = scratch / (name + LOCK_SUFFIX)
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        # A sweep that opened the new lock file before we locked it has removed it: start again.
        if os.fstat(descriptor).st_nlink:
            break
        os.close(descriptor)
    try:
        os.write(descriptor, json.dumps(owner).encode())
        folder = scratch / name
        folder.mkdir()
        yield folder
    finally:
        shutil.rmtree(scratch / name, ignore_errors=True)
        lock.unlink(missing_ok=True)
        os.close(descriptor)


def _owner(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def folders(scratch: Path) -> list[WorkFolder]:
    """Every work folder under `scratch`, in use or left behind."""
    if not scratch.is_dir():
        return []
    found = []
    for lock in sorted(scratch.glob("*" + LOCK_SUFFIX)):
        owner = _owner(lock)
        found.append(
            WorkFolder(lock.with_suffix(""), owner.get("kind", ""), owner.get("account_id"), owner.get("job_id"))
        )
    return found


def sweep(scratch: Path) -> list[Path]:
    """Remove the work folders no live process holds; returns them."""
    removed = []
    for folder in (f.path for f in folders(scratch)):
        lock = folder.with_name(folder.name + LOCK_SUFFIX)
        try:
            descriptor = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            continue
        try:
            if os.fstat(descriptor).st_nlink:
                shutil.rmtree(folder, ignore_errors=True)
                lock.unlink(missing_ok=True)
                removed.append(folder)
        finally:
            os.close(descriptor)
    return removed


def account_folders(scratch: Path, account_id: str) -> list[Path]:
    """The folders holding the account's data, whether a process still works in them or not."""
    return [f.path for f in folders(scratch) if f.account_id == account_id and f.path.exists()]


def job_folders(scratch: Path, job_id: str) -> list[Path]:
    return [f.path for f in folders(scratch) if f.job_id == job_id and f.path.exists()]
