"""The drop zone: files put in incoming/<account>/ become one job each, on the local store and on S3
(moto server), with the sensing DAG run for real (dag.test) while a CLI sweep runs beside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import date
from email import message_from_bytes, policy
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipelines.accounts import upsert_accounts
from pipelines.catalog.models import IntakeClaim, Job, UsageEvent, utcnow
from pipelines.intake import SETTLE, sweep
from pipelines.lifecycle.operations import terminate_account
from pipelines.notify import outbox_messages
from pipelines.runtime import Runtime
from pipelines.settings import Settings
from pipelines.storage import LocalStore
from pointflow_dev.scene import make_scene, write_scene
from tests.conftest import make_account

DAG_ID = "pointflow_intake"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small scenes with different bytes (the same bytes twice would be stored once)."""
    folder = tmp_path_factory.mktemp("drops")
    return [
        write_scene(make_scene(size=80, density=4, buildings=1, trees=6, seed=seed), folder / f"survey-{seed}.laz")
        for seed in (1, 2, 3)
    ]


def drop(runtime: Runtime, key: str, path: Path) -> None:
    """Put a file in a drop zone as an upload that finished a while ago."""
    runtime.store.put_file(key, path)
    if isinstance(runtime.store, LocalStore):
        past = time.time() - 2 * SETTLE.total_seconds()
        os.utime(runtime.store.local_path(key), (past, past))


def seed(runtime: Runtime, scenes: list[Path], tmp_path: Path) -> None:
    upsert_accounts(runtime.catalog, [make_account("acme"), make_account("beta"), make_account("gone")])
    terminate_account(runtime.catalog, "gone", effective=date(2026, 1, 31))
    broken = tmp_path / "broken.las"
    broken.write_text("this is a text file named .las")
    drop(runtime, "incoming/acme/north.laz", scenes[0])
    drop(runtime, "incoming/acme/south.laz", scenes[1])
    drop(runtime, "incoming/acme/broken.las", broken)
    drop(runtime, "incoming/beta/site.laz", scenes[2])
    drop(runtime, "incoming/gone/late.laz", scenes[0])


@pytest.fixture(params=["local", "s3"])
def store_runtime(request: pytest.FixtureRequest, home: Path, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    if request.param == "s3":
        monkeypatch.setenv("POINTFLOW_STORAGE_URL", f"s3://{request.getfixturevalue('s3_bucket')}/svc")
    runtime = Runtime.from_settings(Settings.from_env())
    yield runtime
    runtime.catalog.dispose()


def test_each_dropped_file_is_one_job_under_overlapping_sweeps(
    store_runtime: Runtime, scenes: list[Path], tmp_path: Path, load_test_dag
) -> None:
    runtime = store_runtime
    seed(runtime, scenes, tmp_path)
    dag = load_test_dag(DAG_ID)
    cli = subprocess.Popen(
        [str(Path(sys.executable).with_name("pointflow")), "intake", "run", "--run", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    runs = [dag.test(), dag.test()]
    out, err = cli.communicate(timeout=600)
    report = json.loads(out)
    # 1 only when a job it ran did not export: the broken file, if this sweep took it.
    not_exported = [job["state"] for job in report["jobs"] if job["state"] != "exported"]
    assert cli.returncode == (1 if not_exported or report["errors"] else 0), err
    assert not_exported in ([], ["quarantined"]), report

    with runtime.catalog.session() as session:
        states = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        claims = dict(session.execute(select(IntakeClaim.state, func.count()).group_by(IntakeClaim.state)).all())
        usage = sorted(session.execute(select(UsageEvent.account_id, UsageEvent.status)).all())
        quarantined = session.scalars(select(Job).where(Job.state == "quarantined")).one()
    assert states == {"exported": 3, "quarantined": 1}, [str(r.state) for r in runs]
    assert claims == {"registered": 4, "refused": 1}
    assert usage == [("acme", "failed"), ("acme", "succeeded"), ("acme", "succeeded"), ("beta", "succeeded")]
    assert "not a LAS/LAZ file" in quarantined.error
    # Only the refused file is left where it was dropped.
    assert [o.key for o in runtime.store.list("incoming/")] == ["incoming/gone/late.laz"]
    assert [o.key for o in runtime.store.list("accounts/gone/")] == []
    mails = [message_from_bytes(p.read_bytes(), policy=policy.default) for p in outbox_messages(runtime.settings)]
    kinds = sorted((m["To"], m["Subject"]) for m in mails)
    assert kinds.count(("ops@acme.example", "pointflow: broken.las could not be processed")) == 1
    assert kinds.count(("ops@gone.example", "pointflow: late.laz was not accepted")) == 1
    assert sum("is ready" in subject for _, subject in kinds) == 3
    # A sweep later finds nothing new: the refused version stays refused, nothing is registered twice.
    again = sweep(runtime, owner="later")
    assert again.outcomes == [] and again.job_ids == [] and again.errors == {}


def test_a_file_replaced_while_it_is_registered_is_taken_once_in_its_new_version(
    store_runtime: Runtime, scenes: list[Path]
) -> None:
    from pipelines.catalog.models import StoredFile, utcnow
    from pipelines.intake import _claim, _register
    from pipelines.storage import file_sha256

    runtime = store_runtime
    upsert_accounts(runtime.catalog, [make_account("acme")])
    drop(runtime, "incoming/acme/north.laz", scenes[0])
    listed = next(runtime.store.list("incoming/"))
    drop(runtime, "incoming/acme/north.laz", scenes[1])  # uploaded again after the sweep listed it
    outcome = _register(runtime, listed, "acme", "north.laz", _claim(runtime, listed, "acme", "run-1", utcnow()))
    assert outcome.outcome == "superseded"
    with runtime.catalog.session() as session:
        assert session.scalars(select(Job.state)).all() == ["failed"]
        assert session.scalars(select(UsageEvent.status)).all() == ["failed"]  # metered once, billed nothing
        assert session.scalars(select(StoredFile)).all() == []

    later = sweep(runtime, owner="run-2")
    assert [o.outcome for o in later.outcomes] == ["registered"]
    with runtime.catalog.session() as session:
        assert session.scalars(select(StoredFile.sha256)).all() == [file_sha256(scenes[1])]
    assert list(runtime.store.list("incoming/")) == []
    assert sweep(runtime, owner="run-3").outcomes == []
    assert outbox_messages(runtime.settings) == []  # the customer replaced the file: nothing to tell


def test_a_sweep_that_died_is_resumed_by_its_retry_at_once_and_by_others_after_the_lease(
    runtime: Runtime, scenes: list[Path]
) -> None:
    from datetime import timedelta

    from pipelines.catalog.models import utcnow
    from pipelines.intake import LEASE, _claim

    upsert_accounts(runtime.catalog, [make_account("acme")])
    drop(runtime, "incoming/acme/north.laz", scenes[0])
    drop(runtime, "incoming/acme/south.laz", scenes[1])
    north, south = sorted(runtime.store.list("incoming/"), key=lambda o: o.key)
    # run-1 and run-2 each claim a file and die before registering it.
    north_job = _claim(runtime, north, "acme", "run-1", utcnow())
    south_job = _claim(runtime, south, "acme", "run-2", utcnow())
    assert sweep(runtime, owner="run-3").job_ids == []  # fresh claims of other sweeps are left alone
    assert sweep(runtime, owner="run-1").job_ids == [north_job]  # a retry resumes its own at once
    assert sweep(runtime, owner="run-3", now=utcnow() + LEASE + timedelta(minutes=1)).job_ids == [
        south_job
    ]  # others after the lease
    with runtime.catalog.session() as session:
        assert session.scalar(select(func.count()).select_from(Job)) == 2
    assert list(runtime.store.list("incoming/")) == []

    drop(runtime, "incoming/acme/north.laz", scenes[2])  # a new version under the same name: a new job
    later = sweep(runtime, owner="run-4")
    assert [o.outcome for o in later.outcomes] == ["registered"] and later.job_ids not in ([north_job], [south_job])


def test_a_registered_file_left_in_the_drop_zone_is_removed_not_registered_again(
    runtime: Runtime, scenes: list[Path]
) -> None:
    upsert_accounts(runtime.catalog, [make_account("acme")])
    drop(runtime, "incoming/acme/north.laz", scenes[0])
    info = next(runtime.store.list("incoming/"))
    real_delete = runtime.store.delete
    runtime.store.delete = lambda key: None  # the sweep stops before the object is removed
    try:
        assert len(sweep(runtime, owner="run-1").job_ids) == 1
    finally:
        runtime.store.delete = real_delete
    assert next(runtime.store.list("incoming/")).version == info.version
    again = sweep(runtime, owner="run-2")
    assert again.outcomes == [] and again.job_ids == []
    assert list(runtime.store.list("incoming/")) == []


def test_files_that_are_not_customers_uploads_are_left_alone(runtime: Runtime, scenes: list[Path]) -> None:
    upsert_accounts(runtime.catalog, [make_account("acme")])
    runtime.store.put_file("incoming/acme/.upload-in-progress.laz", scenes[0])  # a temporary name
    runtime.store.put_file("incoming/acme/fresh.laz", scenes[0])  # written just now: may be incomplete
    runtime.store.put_file("incoming/stray.laz", scenes[0])  # no account folder
    assert sweep(runtime, owner="run-1").outcomes == []
    assert len(list(runtime.store.list("incoming/"))) == 3


def test_links_in_a_drop_zone_are_skipped_and_their_targets_left_alone(
    runtime: Runtime, scenes: list[Path], tmp_path: Path
) -> None:
    """A customer who can write the local drop-zone folder plants links to another account's raw
    object and to a service file: the sweep reports them, takes nothing and deletes nothing."""
    from pipelines.catalog.models import utcnow
    from pipelines.lifecycle.deletion import account_deletion_plan, execute_deletion

    upsert_accounts(runtime.catalog, [make_account("acme"), make_account("rival")])
    runtime.store.put_file("accounts/rival/raw/x.laz", scenes[0])
    runtime.store.put_bytes("service/usage_daily/2026-11.json", b'{"rows": []}')
    zone = runtime.store.root / "incoming" / "acme"
    zone.mkdir(parents=True)
    os.symlink("../../accounts/rival/raw/x.laz", zone / "stolen.laz")
    os.symlink("../../service/usage_daily/2026-11.json", zone / "u.las")
    os.mkfifo(zone / "pipe.las")
    hard = zone / "hard.laz"
    os.link(runtime.store.root / "accounts/rival/raw/x.laz", hard)
    past = time.time() - 2 * SETTLE.total_seconds()
    for name in ("stolen.laz", "u.las", "hard.laz"):
        os.utime(zone / name, (past, past), follow_symlinks=False)
    drop(runtime, "incoming/acme/north.laz", scenes[1])

    result = sweep(runtime, owner="run-1")
    by_key = {o.key: o for o in result.outcomes}
    assert by_key["incoming/acme/north.laz"].outcome == "registered"
    for name in ("stolen.laz", "u.las", "pipe.las", "hard.laz"):
        skipped = by_key[f"incoming/acme/{name}"]
        assert skipped.outcome == "skipped" and skipped.job_id is None, skipped
        assert "not taken" in skipped.reason
    assert "symbolic link" in by_key["incoming/acme/stolen.laz"].reason
    assert "hard link" in by_key["incoming/acme/hard.laz"].reason
    assert result.errors == {} and len(result.job_ids) == 1
    # Nothing of rival's or the service's was copied, moved or deleted.
    assert runtime.store.exists("accounts/rival/raw/x.laz") and runtime.store.exists("service/usage_daily/2026-11.json")
    assert [o.key for o in runtime.store.list("accounts/acme/quarantine/")] == []
    with runtime.catalog.session() as session:
        assert session.scalars(select(Job.account_id)).all() == ["acme"]
        assert session.scalar(select(func.count()).select_from(IntakeClaim)) == 1
    assert (zone / "stolen.laz").is_symlink() and (zone / "u.las").is_symlink()

    # Deleting acme's data (its drop zone included) leaves rival's object and the service file.
    plan = account_deletion_plan(runtime.store, runtime.settings.scratch_dir, "acme")
    execute_deletion(runtime.catalog, runtime.store, plan, "acme", "test", "acme", utcnow())
    assert runtime.store.get_bytes("service/usage_daily/2026-11.json") == b'{"rows": []}'
    assert runtime.store.size("accounts/rival/raw/x.laz") == scenes[0].stat().st_size


class CountingStore:
    """The runtime's real store, with every byte handed out by a download counted (no mock: each
    call goes to the store)."""

    def __init__(self, store) -> None:
        self.store, self.downloaded = store, 0

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def get_file(self, key: str, path: Path, *args, **kwargs) -> None:
        try:
            self.store.get_file(key, path, *args, **kwargs)
        finally:
            self.downloaded += Path(path).stat().st_size if Path(path).exists() else 0

    def read_chunks(self, key: str, size: int = 1 << 20):
        for chunk in self.store.read_chunks(key, size):
            self.downloaded += len(chunk)
            yield chunk


def test_a_file_over_the_size_limit_is_refused_on_its_listed_size_before_any_download(
    store_runtime: Runtime, scenes: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.intake import _claim, _register

    limit = scenes[0].stat().st_size - 1
    monkeypatch.setenv("POINTFLOW_MAX_FILE_BYTES", str(limit))
    from dataclasses import replace

    plain = Runtime.from_settings(Settings.from_env())
    counting = CountingStore(plain.store)
    runtime = replace(plain, store=counting)
    upsert_accounts(runtime.catalog, [make_account("acme")])
    drop(runtime, "incoming/acme/north.laz", scenes[0])
    listed = next(counting.store.list("incoming/"))
    outcome = _register(runtime, listed, "acme", "north.laz", _claim(runtime, listed, "acme", "run-1", utcnow()))
    assert outcome.outcome == "refused" and "maximum file size" in outcome.reason, outcome
    assert f"{limit:,} bytes" in outcome.reason
    assert counting.downloaded == 0
    scratch = runtime.settings.scratch_dir
    assert not scratch.exists() or [p for p in scratch.rglob("*") if p.is_file()] == []
    assert [o.key for o in runtime.store.list("incoming/")] == ["incoming/acme/north.laz"]  # left where it was
    mails = [message_from_bytes(p.read_bytes(), policy=policy.default) for p in outbox_messages(runtime.settings)]
    assert [m["Subject"] for m in mails] == ["pointflow: north.laz was not accepted"]
    runtime.catalog.dispose()


def test_a_download_stops_at_its_bound(store_runtime: Runtime, tmp_path: Path) -> None:
    """A file that grew after it was listed is not read past the bound (without a version: a
    version would refuse it as replaced)."""
    from pipelines.storage import ObjectTooLarge

    store = store_runtime.store
    store.put_bytes("incoming/acme/grown.las", b"x" * 5000)
    with pytest.raises(ObjectTooLarge) as raised:
        store.get_file("incoming/acme/grown.las", tmp_path / "copy.las", max_bytes=1000)
    assert raised.value.size == 5000
    assert not (tmp_path / "copy.las").exists()
    store.get_file("incoming/acme/grown.las", tmp_path / "copy.las", max_bytes=5000)
    assert (tmp_path / "copy.las").stat().st_size == 5000
