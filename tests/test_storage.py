"""One contract, two backends: the local folder and S3 (a real endpoint on loopback)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import boto3
import pytest
import requests

from pipelines.storage import (
    AccountArea,
    LocalStore,
    S3Store,
    StaleObject,
    StorageError,
    UnsafeKeyError,
    open_store,
    safe_name,
)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/some/prefix")


def test_put_get_roundtrip(store, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(b"\x00\x01" * 1000)
    store.put_file("accounts/a/raw/in.bin", source)
    store.put_bytes("accounts/a/reports/r.json", b"{}")
    assert store.exists("accounts/a/raw/in.bin")
    assert store.size("accounts/a/raw/in.bin") == 2000
    assert store.get_bytes("accounts/a/reports/r.json") == b"{}"
    target = tmp_path / "out" / "copy.bin"
    store.get_file("accounts/a/raw/in.bin", target)
    assert target.read_bytes() == source.read_bytes()
    assert store.sha256("accounts/a/raw/in.bin") == __import__("hashlib").sha256(source.read_bytes()).hexdigest()


def test_a_versioned_get_returns_that_version_or_refuses(store, tmp_path: Path) -> None:
    """The drop zone fetches the version it listed: a file uploaded again since is not taken for it."""
    store.put_bytes("incoming/a/f.laz", b"first upload")
    listed = store.info("incoming/a/f.laz")
    store.get_file("incoming/a/f.laz", tmp_path / "same.laz", version=listed.version)
    assert (tmp_path / "same.laz").read_bytes() == b"first upload"
    store.put_bytes("incoming/a/f.laz", b"second upload, longer")
    with pytest.raises(StaleObject, match="replaced"):
        store.get_file("incoming/a/f.laz", tmp_path / "stale.laz", version=listed.version)
    current = store.info("incoming/a/f.laz")
    store.get_file("incoming/a/f.laz", tmp_path / "new.laz", version=current.version)
    assert (tmp_path / "new.laz").read_bytes() == b"second upload, longer"


def test_list_is_prefix_scoped(store) -> None:
    for key in ["accounts/a/raw/1.las", "accounts/a/raw/2.las", "accounts/ab/raw/3.las", "accounts/b/raw/4.las"]:
        store.put_bytes(key, b"x")
    assert sorted(o.key for o in store.list("accounts/a/")) == ["accounts/a/raw/1.las", "accounts/a/raw/2.las"]
    assert sorted(o.key for o in store.list("accounts/a")) == [
        "accounts/a/raw/1.las",
        "accounts/a/raw/2.las",
        "accounts/ab/raw/3.las",
    ]
    assert list(store.list("accounts/none/")) == []


def test_copy_move_delete(store) -> None:
    store.put_bytes("accounts/a/raw/f.las", b"data")
    store.copy("accounts/a/raw/f.las", "accounts/a/tmp/f.las")
    store.move("accounts/a/tmp/f.las", "accounts/a/quarantine/f.las")
    assert not store.exists("accounts/a/tmp/f.las")
    assert store.get_bytes("accounts/a/quarantine/f.las") == b"data"
    store.delete("accounts/a/quarantine/f.las")
    store.delete("accounts/a/quarantine/f.las")  # absent is fine
    assert not store.exists("accounts/a/quarantine/f.las")
    assert [o.key for o in store.list("accounts/a/")] == ["accounts/a/raw/f.las"]


def test_missing_object_is_a_clear_error(store, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="accounts/a/raw/none.las"):
        store.get_bytes("accounts/a/raw/none.las")
    with pytest.raises(StorageError):
        store.get_file("accounts/a/raw/none.las", tmp_path / "x")
    with pytest.raises(StorageError):
        store.link("accounts/a/raw/none.las", timedelta(days=1))


def test_link_fetches_the_object(store) -> None:
    store.put_bytes("accounts/a/exports/j/out.laz", b"payload")
    link = store.link("accounts/a/exports/j/out.laz", timedelta(hours=1))
    if link.startswith("file://"):
        assert Path(link[len("file://") :]).read_bytes() == b"payload"
    else:
        assert requests.get(link, timeout=10).content == b"payload"


def test_links_use_the_public_endpoint(s3_bucket: str, s3_endpoint: str) -> None:
    """Inside compose the store is http://minio:9000; customers need links to its public name.
    (moto does not check signatures; that SigV4 signs the host is why the link client is separate.)"""
    public = s3_endpoint.replace("127.0.0.1", "localhost")
    assert public != s3_endpoint
    store = open_store(f"s3://{s3_bucket}/pf", link_endpoint=public)
    store.put_bytes("accounts/a/exports/j/out.laz", b"payload")
    link = store.link("accounts/a/exports/j/out.laz", timedelta(hours=1))
    assert link.startswith(public + "/")
    assert requests.get(link, timeout=10).content == b"payload"


def test_link_endpoint_setting_must_be_an_address() -> None:
    from pipelines.settings import Settings, SettingsError

    assert (
        Settings.from_env({"POINTFLOW_LINK_ENDPOINT": "https://files.example.com"}).link_endpoint
        == "https://files.example.com"
    )
    with pytest.raises(SettingsError, match="POINTFLOW_LINK_ENDPOINT"):
        Settings.from_env({"POINTFLOW_LINK_ENDPOINT": "files.example.com"})


@pytest.mark.parametrize("key", ["../x", "accounts/a/../b/raw/x", "/etc/passwd", "accounts//x", "accounts\\a", ""])
def test_unsafe_keys_are_refused(store, key: str) -> None:
    with pytest.raises(UnsafeKeyError):
        store.put_bytes(key, b"x")


def test_account_area_keeps_names_inside_the_account() -> None:
    area = AccountArea("acme")
    assert area.key("raw", "../../x.las") == "accounts/acme/raw/x.las"
    assert area.key("raw", "..\\..\\evil name.las") == "accounts/acme/raw/evil_name.las"
    assert area.key("exports", "job-1", "out.laz") == "accounts/acme/exports/job-1/out.laz"
    for bad in ["../other", "a/b", "", ".hidden", "x" * 65]:
        with pytest.raises(UnsafeKeyError):
            AccountArea(bad)
    with pytest.raises(UnsafeKeyError):
        area.key("elsewhere", "x")
    with pytest.raises(UnsafeKeyError):
        safe_name("..")
    assert not area.owns("accounts/acme2/raw/x.las")


def test_s3_delete_removes_every_version(s3_bucket: str, s3_endpoint: str) -> None:
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.put_bucket_versioning(Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    store = S3Store(s3_bucket)
    for payload in (b"v1", b"v2", b"v3"):
        store.put_bytes("accounts/a/raw/f.las", payload)
    store.delete("accounts/a/raw/f.las")
    left = client.list_object_versions(Bucket=s3_bucket, Prefix="accounts/a/")
    assert left.get("Versions", []) == [] and left.get("DeleteMarkers", []) == []


def test_s3_prefix_isolates_stores(s3_bucket: str) -> None:
    one, two = S3Store(s3_bucket, "one"), S3Store(s3_bucket, "two")
    one.put_bytes("accounts/a/raw/f.las", b"1")
    assert not two.exists("accounts/a/raw/f.las")
    assert [o.key for o in one.list("accounts/")] == ["accounts/a/raw/f.las"]


def test_unreachable_s3_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    store = S3Store("nowhere")
    with pytest.raises(StorageError, match="nowhere"):
        store.put_bytes("accounts/a/raw/x", b"x")


def test_open_store_rejects_unknown_schemes() -> None:
    with pytest.raises(StorageError, match="unsupported"):
        open_store("ftp://host/x")
    with pytest.raises(StorageError, match="no bucket"):
        open_store("s3:///x")


def test_local_store_survives_concurrent_writes_and_deletes_in_one_folder(tmp_path: Path) -> None:
    """Parallel tasks publish and clean up in shared folders: a delete pruning an emptied folder
    must not break a writer or another delete in it (found by the load benchmark)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(4) as pool:
        results = list(pool.map(_churn, [(tmp_path, worker) for worker in range(4)]))
    assert results == [200] * 4
    assert not (tmp_path / "accounts").exists()


def _churn(args: tuple[Path, int]) -> int:
    root, worker = args
    store = LocalStore(root)
    done = 0
    for round_ in range(200):
        key = f"accounts/acme/tmp/exports/job-{worker}-{round_}/points.laz"
        store.put_bytes(key, b"x" * 10)
        assert store.get_bytes(key) == b"x" * 10
        list(store.list("accounts/acme/tmp/"))
        store.delete(key)
        done += 1
    return done


@pytest.fixture
def planted(tmp_path: Path) -> tuple[LocalStore, Path]:
    """A local store where a customer's drop zone holds symbolic links to another account's raw
    object, to a service file and to another account's folder, and a FIFO: what a customer with
    shell access to the drop-zone folder can plant there."""
    import os

    store = LocalStore(tmp_path / "objects")
    store.put_bytes("accounts/rival/raw/x.las", b"rival's points")
    store.put_bytes("service/usage_daily/2026-11.json", b"{}")
    zone = store.root / "incoming" / "acme"
    zone.mkdir(parents=True)
    os.symlink("../../accounts/rival/raw/x.las", zone / "stolen.las")
    os.symlink("../../service/usage_daily/2026-11.json", zone / "u.las")
    os.symlink("../../accounts/rival/raw", zone / "folder")
    os.mkfifo(zone / "pipe.las")
    return store, tmp_path


def test_the_local_store_never_follows_a_symbolic_link(planted) -> None:
    store, tmp_path = planted
    assert [o.key for o in store.list("incoming/")] == []  # links, a linked folder and a FIFO are no objects
    for key in (
        "incoming/acme/stolen.las",
        "incoming/acme/u.las",
        "incoming/acme/folder/x.las",
        "incoming/acme/pipe.las",
    ):
        assert not store.exists(key)
        for read in (
            lambda key=key: store.get_file(key, tmp_path / "copy.las"),
            lambda key=key: store.get_bytes(key),
            lambda key=key: store.size(key),
            lambda key=key: b"".join(store.read_chunks(key)),
            lambda key=key: store.copy(key, "accounts/acme/raw/copy.las"),
            lambda key=key: store.local_path(key),
            lambda key=key: store.link(key, timedelta(minutes=1)),
        ):
            with pytest.raises(StorageError):
                read()
        if "folder" not in key:
            assert store.info(key) is None
    assert not (tmp_path / "copy.las").exists() and not store.exists("accounts/acme/raw/copy.las")
    with pytest.raises(StorageError):
        list(store.list("incoming/acme/folder/"))
    with pytest.raises(UnsafeKeyError):  # no write through a linked folder either
        store.put_bytes("incoming/acme/folder/planted.las", b"acme's")
    # Deleting a link's key removes at most the link itself, never what it points at.
    store.delete("incoming/acme/stolen.las")
    with pytest.raises(UnsafeKeyError):
        store.delete("incoming/acme/folder/x.las")
    assert store.get_bytes("accounts/rival/raw/x.las") == b"rival's points"
    assert store.get_bytes("service/usage_daily/2026-11.json") == b"{}"
    assert not (store.root / "incoming" / "acme" / "stolen.las").is_symlink()
    assert sorted(key for key, _ in store.irregular("incoming/")) == [
        "incoming/acme/folder",
        "incoming/acme/pipe.las",
        "incoming/acme/u.las",
    ]


def _writer_in_put_file(root: Path, key: str, source: Path):
    """A real process in the middle of `LocalStore.put_file` of a large upload: it reads `source`, a
    FIFO we keep open and fed 8 MB, so it holds a part file of those bytes until killed. Returns the
    process, the pipe and the part file."""
    import os
    import subprocess
    import sys
    import time

    os.mkfifo(source)
    code = "import sys; from pathlib import Path; from pipelines.storage import LocalStore; LocalStore(Path(sys.argv[1])).put_file(sys.argv[2], Path(sys.argv[3]))"
    process = subprocess.Popen([sys.executable, "-c", code, str(root), key, str(source)])
    pipe = open(source, "wb")  # noqa: SIM115 - kept open: the writer waits for more
    pipe.write(b"P" * (8 << 20))
    pipe.flush()
    folder = root / key.rsplit("/", 1)[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        parts = list(folder.glob(".part-*")) if folder.is_dir() else []
        if parts and parts[0].stat().st_size == 8 << 20:
            return process, pipe, parts[0]
        time.sleep(0.05)
    process.kill()
    raise AssertionError("the writer never wrote its part file")


def test_a_killed_uploads_part_file_is_swept_after_an_hour_a_live_writers_never(tmp_path: Path) -> None:
    import os
    import signal
    from datetime import UTC, datetime

    root = tmp_path / "objects"
    store = LocalStore(root)
    process, pipe, part = _writer_in_put_file(root, "accounts/acme/raw/big.las", tmp_path / "big.las")
    key = part.relative_to(root).as_posix()
    later = datetime.now(UTC) + timedelta(hours=2)
    try:
        assert [o.key for o in store.partials("accounts/acme/")] == [key]
        assert [o.key for o in store.list("accounts/acme/")] == []  # no object
        # A live writer holds its part file: not taken, however old it looks.
        assert store.sweep_partials(now=later) == [] and part.exists()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        pipe.close()
    assert part.stat().st_size == 8 << 20  # the killed writer's bytes stay...
    assert store.sweep_partials() == [] and part.exists()  # ...while recent (an hour: well above an upload)
    old = datetime.now(UTC).timestamp() - 2 * 3600
    os.utime(part, (old, old))
    assert store.sweep_partials() == [key]
    assert not part.exists() and not (root / "accounts").exists()


def test_planning_an_accounts_deletion_walks_its_local_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects, entries that are no objects and part files are all found in one walk of the folder."""
    import os

    from pipelines.lifecycle.deletion import PARTIAL_WHAT, account_deletion_plan

    store = LocalStore(tmp_path / "objects")
    store.put_bytes("accounts/acme/raw/a.laz", b"aa")
    store.put_bytes("accounts/acme/invoices/i.pdf", b"kept")
    folder = store.root / "accounts/acme/raw"
    (folder / ".part-b.laz").write_bytes(b"bbb")
    os.symlink("a.laz", folder / "c.laz")
    os.mkfifo(folder / "d.las")
    walked: list[str] = []
    walk = os.walk

    def counted_walk(top, *args, **kwargs):  # noqa: ANN001, ANN202 (os.walk's signature)
        walked.append(Path(top).relative_to(store.root).as_posix())
        return walk(top, *args, **kwargs)

    monkeypatch.setattr(os, "walk", counted_walk)
    plan = account_deletion_plan(store, tmp_path / "scratch", "acme")
    assert walked == ["accounts/acme"]
    assert [(o.key, o.bytes, o.what) for o in plan.objects] == [
        ("accounts/acme/raw/.part-b.laz", 3, PARTIAL_WHAT),
        ("accounts/acme/raw/a.laz", 2, None),
        ("accounts/acme/raw/c.laz", 0, "a symbolic link (to a.laz)"),
        ("accounts/acme/raw/d.las", 0, "not a regular file (a FIFO, socket or device)"),
    ]
