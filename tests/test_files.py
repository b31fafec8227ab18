"""Operator commands on stored files: plain ingest refuses what is not LAS/LAZ, and
`pointflow files delete` frees plan room, audited, refused under legal hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.accounts import upsert_accounts
from pipelines.cli import main
from pipelines.lifecycle.operations import deletion_audit, place_hold, release_holds
from pipelines.runtime import Runtime
from pointflow_dev.scene import make_scene, write_scene
from tests.conftest import make_account


@pytest.fixture(scope="module")
def surveys(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("surveys")
    return [
        write_scene(make_scene(size=50, density=2, buildings=1, trees=3, seed=seed), folder / f"s{seed}.laz")
        for seed in range(4)
    ]


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plain_ingest_refuses_what_is_not_las_and_stores_nothing(
    runtime: Runtime, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    upsert_accounts(runtime.catalog, [make_account("acme", plan="free")])
    text = tmp_path / "notes.las"
    text.write_text("this is a text file named .las")
    code, _, err = cli(capsys, "ingest", str(text), "--account", "acme")
    assert code == 2 and "not a LAS/LAZ file" in err and err.count("\n") == 1
    assert json.loads(cli(capsys, "files", "list", "--account", "acme", "--json")[1]) == []
    assert list(runtime.store.list("accounts/acme/")) == []


def test_deleting_a_stored_file_frees_plan_room_is_audited_and_waits_for_a_legal_hold(
    runtime: Runtime, surveys: list[Path], capsys: pytest.CaptureFixture
) -> None:
    upsert_accounts(runtime.catalog, [make_account("acme", plan="free")])  # at most 3 files stored
    for survey in surveys[:3]:
        assert cli(capsys, "ingest", str(survey), "--account", "acme")[0] == 0
    code, _, err = cli(capsys, "ingest", str(surveys[3]), "--account", "acme")
    assert code == 2 and "stored files" in err
    key = json.loads(cli(capsys, "files", "list", "--account", "acme", "--json")[1])[0]["key"]

    place_hold(runtime.catalog, "acme", "case 42")
    code, _, err = cli(capsys, "files", "delete", key, "--account", "acme")
    assert code == 2 and "legal hold" in err
    assert runtime.store.exists(key)
    release_holds(runtime.catalog, "acme")

    code, out, _ = cli(capsys, "files", "delete", key, "--account", "acme", "--json")
    assert code == 0 and json.loads(out)["status"] == "completed"
    assert not runtime.store.exists(key)
    [audit] = deletion_audit(runtime.catalog, "acme")
    assert audit.rule == "customer_request" and audit.subject == f"file {key}" and audit.object_count == 1
    assert key not in [f["key"] for f in json.loads(cli(capsys, "files", "list", "--account", "acme", "--json")[1])]
    assert cli(capsys, "ingest", str(surveys[3]), "--account", "acme")[0] == 0  # room again
    code, _, err = cli(capsys, "files", "delete", key, "--account", "acme")
    assert code == 2 and "no stored file" in err


def test_deleting_a_stored_file_deletes_the_export_all_bundles_holding_a_copy(
    runtime: Runtime, surveys: list[Path], capsys: pytest.CaptureFixture
) -> None:
    upsert_accounts(runtime.catalog, [make_account("acme", plan="free")])
    assert cli(capsys, "ingest", str(surveys[0]), "--account", "acme")[0] == 0
    key = json.loads(cli(capsys, "files", "list", "--account", "acme", "--json")[1])[0]["key"]
    code, out, _ = cli(capsys, "accounts", "export-all", "acme", "--json")
    assert code == 0
    bundle = json.loads(out)["key"]
    assert runtime.store.exists(bundle)

    code, out, _ = cli(capsys, "files", "delete", key, "--account", "acme", "--json")
    assert code == 0 and json.loads(out)["status"] == "completed"
    # The bundle held a copy of the file: it goes in the same deletion, listed in its audit entry.
    assert not runtime.store.exists(key) and not runtime.store.exists(bundle)
    assert list(runtime.store.list("accounts/acme/exports/all-data/")) == []
    [audit] = deletion_audit(runtime.catalog, "acme")
    assert sorted(item["key"] for item in audit.objects) == sorted([key, bundle])
