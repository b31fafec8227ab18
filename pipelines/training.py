"""Customer-trained classifiers: train from labelled LAS/LAZ, store in the account's area, apply
only to that account's data; and shared models, built only from the labels of accounts whose plan
lets their data train them.

A model is stored (offered) only when it beats the standard classifier on the customer's held-out
labels; otherwise training raises `NotBetterThanStandard` with both sets of figures. Every stored
model carries an HMAC-SHA256 made with POINTFLOW_MODEL_KEY (or a key generated once in
POINTFLOW_HOME) over its bytes, its account and its id, and is refused if the bytes were changed or
it was moved to another account or id. Models signed before the signature bound the account are
re-signed once, at the upgrade, by `reseal_models`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import laspy
import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipelines.accounts import get_account
from pipelines.billing.pricebook import load_pricebook
from pipelines.catalog import CatalogError
from pipelines.catalog.models import Job, Plan, TrainedModelRecord, utcnow
from pipelines.classifiers import BUILTIN_CLASSIFIERS, PointBlock
from pipelines.classifiers.fitting import train
from pipelines.classifiers.trained import (
    UNBOUND_FORMAT,
    UNKNOWN_STANDARD,
    Seal,
    TrainedClassifier,
    TrainedModel,
    reseal,
)
from pipelines.customer_text import render_mail
from pipelines.errors import InvalidValue, UserError
from pipelines.keys import kept_secret
from pipelines.lasio import LasInfo, iter_checked, point_block, read_info
from pipelines.lifecycle.deletion import REQUEST_RULE, account_lock, active_hold, execute_deletion, plan_deletion
from pipelines.lifecycle.models import DeletionAudit
from pipelines.lifecycle.operations import (
    LifecycleError,
    ensure_active,
    export_bundles,
    open_job,
    refuse_under_hold,
)
from pipelines.notify import DeliveryError, Message
from pipelines.settings import Settings
from pipelines.sources import check_source, local_copy
from pipelines.storage import AccountArea, file_sha256
from pipelines.units import coordinate_units

log = logging.getLogger(__name__)

MODEL_SUFFIX = ".pfmodel"
# A training records its model seconds after storing it: a model object older than this that no
# row names was left by a training killed in between.
UNRECORDED_AGE = timedelta(hours=1)


class ModelNotFound(CatalogError):
    """No such model for this account; another account's model is reported the same way."""


class NotBetterThanStandard(UserError, ValueError):
    """The trained model does not beat the standard classifier on the held-out labels: nothing is
    stored, and `evaluation` holds both models' figures for the customer."""

    def __init__(self, evaluation: dict[str, Any]) -> None:
        self.evaluation = evaluation
        if not evaluation["judged_classes"]:
            super().__init__(
                f"no class has {evaluation['min_judged_points']} points in the held-out part of your labels "
                f"({evaluation['held_out_points']:,} points), too few to judge the model against standard: no "
                f"model is offered; label a larger area"
            )
            return
        super().__init__(
            f"the trained model is not better than standard on your held-out labels (macro F1 "
            f"{evaluation['macro_f1']:.3f} against standard's {evaluation['standard_macro_f1']:.3f} on "
            f"{evaluation['held_out_points']:,} points): no model is offered; keep using standard, or "
            f"label more or other data"
        )


class SharingRefused(UserError, ValueError):
    """An account whose plan does not let its data train the shared models."""


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    account_id: str
    version: int
    key: str
    sha256: str
    evaluation: dict[str, Any]
    training_files: list[dict[str, Any]]
    created_at: datetime
    deleted_at: datetime | None = None

    @property
    def standard_version(self) -> str:
        """The standard classifier's version the model was judged against ("unknown" for models
        stored before it was recorded)."""
        return str(self.evaluation.get("standard_version", UNKNOWN_STANDARD))

    def to_public(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "created_at": self.created_at.isoformat(),
            "deleted_at": self.deleted_at.isoformat() if self.deleted_at else None,
            "standard_version": self.standard_version,
        }


def signing_key(settings: Settings) -> bytes:
    return (settings.model_key or kept_secret(settings.home / "model-signing.key")).encode()


def model_seal(settings: Settings, account_id: str | None, model_id: str) -> Seal:
    """What signs, and verifies, the file of `account_id`'s model `model_id` (None: a shared model)."""
    return Seal(signing_key(settings), account_id, model_id)


def read_labelled(path: Path, info: LasInfo | None = None) -> tuple[PointBlock, np.ndarray]:
    """Points and their reference classes, read through the same gate as any input (`info`: the
    file's `read_info`, when the caller has read it already)."""
    info = info or read_info(path)
    with laspy.open(path) as reader:
        try:
            units = coordinate_units(reader.header)
        except ValueError as error:
            raise InvalidValue(f"{path.name}: {error}") from None
    chunks = list(iter_checked(path, info))
    data = laspy.ScaleAwarePointRecord(
        np.concatenate([c.array for c in chunks]), chunks[0].point_format, chunks[0].scales, chunks[0].offsets
    )
    return point_block(data, units), np.asarray(data.classification, dtype=np.uint8)


def _info(row: TrainedModelRecord) -> ModelInfo:
    return ModelInfo(
        row.model_id,
        row.account_id,
        row.version,
        row.key,
        row.sha256,
        row.evaluation,
        row.training_files,
        row.created_at,
        row.deleted_at,
    )


def _models_lock(account_id: str) -> str:
    """The catalog lock under which an account's models get their versions and are deleted."""
    return f"models:{account_id}"


def train_model(
    runtime,
    account_id: str,
    paths: Sequence[Path],
    ignore_classes: Sequence[int] = (0, 1),
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> ModelInfo:
    """Train on the labelled files, score it and standard on held-out blocks, and store the model
    for the account if it beats standard (else `NotBetterThanStandard`). `progress(stage, done,
    total)` hears of the files read ("labels") and of `fitting.train`'s stages."""
    get_account(runtime.catalog, account_id)
    ensure_active(runtime.catalog, account_id, pricebook=load_pricebook(runtime.settings.pricebook_path))
    if not paths:
        raise InvalidValue("give at least one labelled LAS/LAZ file")
    blocks, labels, described = _read_labelled_files(
        ((Path(p), Path(p).name) for p in paths), len(paths), runtime.settings.max_training_points, progress
    )
    labelled = set().union(*(set(d["classes"]) for d in described))
    learned = labelled - set(ignore_classes)
    if len(learned) < 2:
        raise InvalidValue(
            f"the labels hold classes {sorted(labelled)}, {len(learned)} of them besides those left out"
            f" {sorted(ignore_classes)}: a classifier needs at least two. Label points of another class,"
            " or leave fewer classes out (pointflow train --ignore-class, the DAG's ignore_classes)"
        )
    model = train(
        blocks,
        labels,
        seed=seed,
        ignore_classes=ignore_classes,
        tile_buffer=runtime.settings.tile_buffer,
        progress=progress,
    )
    evaluation = _evaluation(model)
    if not model.better_than_standard:
        raise NotBetterThanStandard(evaluation)
    model_id = "model-" + uuid.uuid4().hex[:12]
    payload = model.to_bytes(model_seal(runtime.settings, account_id, model_id))
    key = _model_key(account_id, model_id)
    _remove_unrecorded(runtime, account_id)
    try:
        runtime.store.put_bytes(key, payload)
        runtime.store.put_bytes(_evaluation_key(key), json.dumps(evaluation, indent=2).encode())
        # Under the account's lock: two trainings that finish together would both read the same
        # highest version, and the second would fail on the unique version after the first stored.
        with runtime.catalog.lock(_models_lock(account_id)), runtime.catalog.session() as session:
            # Tombstones count: a deleted model's version is never given out again.
            version = (
                session.scalar(
                    select(func.max(TrainedModelRecord.version)).where(TrainedModelRecord.account_id == account_id)
                )
                or 0
            ) + 1
            row = TrainedModelRecord(
                model_id=model_id,
                account_id=account_id,
                version=version,
                key=key,
                sha256=hashlib.sha256(payload).hexdigest(),
                evaluation=evaluation,
                training_files=described,
            )
            session.add(row)
            session.flush()
            return _info(row)
    except BaseException:
        # No row names these objects: nothing could ever use or list them.
        for stored in (key, _evaluation_key(key)):
            runtime.store.delete(stored)
        raise


# The rule of the deletion audit for model objects a killed training stored and never recorded.
UNRECORDED_MODEL_RULE = "unrecorded_model"


def _remove_unrecorded(runtime, account_id: str) -> None:
    """Delete, audited, the account's model objects that no row names and that are older than
    UNRECORDED_AGE (a training killed between storing its model and recording it); never under
    legal hold; under the account's lock, as every deletion. A training recording its model now
    is not waited for: what it stored is younger than UNRECORDED_AGE."""
    with account_lock(runtime.catalog, account_id):
        with runtime.catalog.session() as session:
            if active_hold(session, account_id) is not None:
                return
            models = session.scalars(select(TrainedModelRecord.key).where(TrainedModelRecord.account_id == account_id))
            recorded = {key for model in models for key in (model, _evaluation_key(model))}
        before = utcnow() - UNRECORDED_AGE
        keys = [
            info.key
            for info in runtime.store.list(AccountArea(account_id).prefix + "models/")
            if info.key not in recorded and info.modified is not None and info.modified < before
        ]
        if keys:
            log.warning("removing %s: stored by a training killed before recording it", ", ".join(keys))
            plan = plan_deletion(runtime.store, [], keys, [])
            execute_deletion(
                runtime.catalog, runtime.store, plan, account_id, UNRECORDED_MODEL_RULE, "models", utcnow()
            )


def _read_labelled_files(
    files: Iterable[tuple[Path, str]],
    count: int,
    most_points: int,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[list[PointBlock], list[np.ndarray], list[dict[str, Any]]]:
    """The points and labels of each of the `count` (path, name) pairs, taken one at a time (a path
    may be a download made as it is asked for), and what a model records of the file: its name,
    sha256, points and points per class. Their points together may not pass `most_points`, checked
    on each file's header before its points are read. `progress` hears of the files read ("labels")."""
    blocks, labels, described = [], [], []
    if progress:
        progress("labels", 0, count)
    read = 0
    for number, (path, name) in enumerate(files, 1):
        info = read_info(path)
        read += info.point_count
        if read > most_points:
            raise InvalidValue(
                f"the labelled files hold more than {most_points:,} points ({read:,} up to {name}), the most one "
                f"training run reads (POINTFLOW_MAX_TRAINING_POINTS: they are all in memory at once, about 0.6 KB "
                f"each with their features): train on fewer or smaller files"
            )
        block, label = read_labelled(path, info)
        blocks.append(block)
        labels.append(label)
        classes = {int(c): int(n) for c, n in zip(*np.unique(label, return_counts=True))}
        described.append({"name": name, "sha256": file_sha256(path), "points": len(block), "classes": classes})
        if progress:
            progress("labels", number, count)
    return blocks, labels, described


def _evaluation(model: TrainedModel) -> dict[str, Any]:
    """What is stored and shown of a trained model's verdict: held-out and training sizes, both
    classifiers' figures, and the parameters it was trained with."""
    return {
        "held_out_points": model.n_holdout,
        "training_points": model.n_train,
        **model.evaluation,
        "params": model.params,
    }


def _model_key(account_id: str, model_id: str) -> str:
    return AccountArea(account_id).key("models", model_id + MODEL_SUFFIX)


def _evaluation_key(model_key: str) -> str:
    return model_key.removesuffix(MODEL_SUFFIX) + ".evaluation.json"


def list_models(runtime, account_id: str, include_deleted: bool = False) -> list[ModelInfo]:
    """The account's models by version; with `include_deleted`, also the tombstones of deleted ones
    (id, version, dates and evaluation: what a job's manifest names stays traceable)."""
    get_account(runtime.catalog, account_id)
    query = select(TrainedModelRecord).where(TrainedModelRecord.account_id == account_id)
    if not include_deleted:
        query = query.where(TrainedModelRecord.deleted_at.is_(None))
    with runtime.catalog.session() as session:
        return [_info(r) for r in session.scalars(query.order_by(TrainedModelRecord.version))]


def delete_model(runtime, account_id: str, model_id: str, now: datetime | None = None) -> DeletionAudit:
    """Delete one of the account's models on the customer's request: its signed file and its
    evaluation, every version of both objects, audited like any deletion; refused under legal hold
    or while a job not yet finished classifies with it. The row stays as a tombstone without the
    training files' names, so versions only go up and the jobs that used it still say which it was."""
    get_account(runtime.catalog, account_id)
    with account_lock(runtime.catalog, account_id), runtime.catalog.lock(_models_lock(account_id)):
        refuse_under_hold(runtime.catalog, account_id)
        with runtime.catalog.session() as session:
            row = _own_model(session, account_id, model_id)
            busy = open_job(session, Job.account_id == account_id, Job.classifier == model_id)
            if busy is not None:
                raise LifecycleError(
                    f"job {busy} is still classifying with {model_id}: delete the model once it has finished"
                )
            key = row.key
        # The account's export-all bundles hold a copy of the model: they go with it.
        bundles = export_bundles(runtime.store, account_id)
        plan = plan_deletion(runtime.store, [], [key, _evaluation_key(key), *bundles], [])
        audit = execute_deletion(
            runtime.catalog, runtime.store, plan, account_id, REQUEST_RULE, f"model {model_id}", now or utcnow()
        )
        with runtime.catalog.session() as session:
            row = session.get(TrainedModelRecord, model_id)
            row.deleted_at, row.training_files = audit.as_of, []
    return audit


def _own_model(session: Session, account_id: str, model_id: str) -> TrainedModelRecord:
    """The account's model, not deleted; another account's model is reported as no model at all."""
    row = session.get(TrainedModelRecord, model_id)
    if row is None or row.account_id != account_id:
        raise ModelNotFound(
            f"no model {model_id!r} for account {account_id}: list its models with 'pointflow models list --account {account_id}'"
        )
    if row.deleted_at is not None:
        raise ModelNotFound(
            f"model {model_id} (version {row.version}) of account {account_id} was deleted on "
            f"{row.deleted_at:%Y-%m-%d %H:%M} UTC: train a new one, or use standard"
        )
    return row


def resolve_classifier(runtime, account_id: str | None, name: str) -> str | TrainedClassifier:
    """A built-in name as is, or the account's own trained model; never another account's."""
    if name in BUILTIN_CLASSIFIERS:
        return name
    if not name.startswith("model-"):
        raise InvalidValue(
            f"unknown classifier {name!r}; choose one of {', '.join(BUILTIN_CLASSIFIERS)} or a model id of your account"
        )
    if account_id is None:
        raise InvalidValue(f"{name} is a trained model: say whose data this is with --account")
    with runtime.catalog.session() as session:
        info = _info(_own_model(session, account_id, name))
    payload = runtime.store.get_bytes(info.key)
    if hashlib.sha256(payload).hexdigest() != info.sha256:
        raise ModelNotFound(f"model {name} was altered in storage; retrain it")
    # The account asking, whose model the catalog says this is, must be the one it was signed for:
    # a model moved into another account's area, with its catalog row, is refused here.
    model = TrainedModel.from_bytes(payload, model_seal(runtime.settings, account_id, info.model_id))
    return TrainedClassifier(model, name=info.model_id, version=str(info.version), sha256=info.sha256)


def train_from_sources(
    runtime,
    account_id: str,
    sources: Sequence[str],
    ignore_classes: Sequence[int] = (0, 1),
    progress: Callable[[str, int, int], None] | None = None,
) -> ModelInfo:
    """`train_model` on sources given as local paths, file:// or s3:// URIs (the CLI's files, the
    training DAG's input), each of which the account may read as a job's input (`check_source`)."""
    for source in sources:
        check_source(runtime.settings, runtime.store, account_id, source)
    with ExitStack() as stack:
        paths = [stack.enter_context(local_copy(runtime.settings, source, account_id)) for source in sources]
        return train_model(runtime, account_id, paths, ignore_classes=ignore_classes, progress=progress)


def held_out_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """Per class of the held-out labels: points, the model's F1, precision and recall, standard's F1
    on the same points, and whether the class counted in the verdict (`fitting.MIN_JUDGED_POINTS`);
    models stored before that rule counted every class."""
    theirs = evaluation.get("standard_per_class", {})
    judged = {str(c) for c in evaluation.get("judged_classes", evaluation["per_class"])}
    return [
        {
            "class": code,
            "points": int(m["support"]),
            "f1": m["f1"],
            "precision": m["precision"],
            "recall": m["recall"],
            "standard_f1": theirs.get(code, {}).get("f1", 0.0),
            "judged": code in judged,
        }
        for code, m in evaluation["per_class"].items()
        if m["support"]
    ]


def held_out_mistakes(evaluation: dict[str, Any], most: int = 3) -> list[dict[str, Any]]:
    """The model's largest disagreements with the held-out labels, largest first: the label, the
    class it gave instead, the points and their share of the label's points ([] for models stored
    before the confusion was recorded)."""
    table = evaluation.get("confusion")
    if not table:
        return []
    codes, counts = table["classes"], table["custom"]
    mistakes = [
        {"label": codes[i], "given": codes[j], "points": n, "share": n / sum(row)}
        for i, row in enumerate(counts)
        for j, n in enumerate(row)
        if i != j and n
    ]
    return sorted(mistakes, key=lambda m: (-m["points"], m["label"], m["given"]))[:most]


def train_and_tell(
    runtime, account_id: str, sources: Sequence[str], ignore_classes: Sequence[int], key: str
) -> dict[str, Any]:
    """The training DAG's task: `train_from_sources`, its outcome e-mailed to the account (the model
    offered, or why none was, with both classifiers' held-out figures; once per `key`, the DAG run)
    and returned as the run's result. A refused delivery is logged; the outcome stands."""
    try:
        model = train_from_sources(runtime, account_id, sources, ignore_classes)
    except NotBetterThanStandard as refused:
        _tell(runtime, account_id, key, refused.evaluation, refusal=str(refused))
        return {"offered": False, "evaluation": refused.evaluation}
    _tell(runtime, account_id, key, model.evaluation, model=model)
    return {"offered": True, "model_id": model.model_id, "version": model.version, "evaluation": model.evaluation}


def _tell(
    runtime,
    account_id: str,
    key: str,
    evaluation: dict[str, Any],
    model: ModelInfo | None = None,
    refusal: str | None = None,
) -> None:
    account = get_account(runtime.catalog, account_id)
    mail = render_mail(
        "mail/training_result.txt.j2",
        name=account.name,
        model=model,
        evaluation=evaluation,
        rows=held_out_rows(evaluation),
        mistakes=held_out_mistakes(evaluation),
        refusal=refusal,
    )
    try:
        runtime.mailer.send_once(Message(f"training:{key}", account_id, "training_result", account.email, mail))
    except DeliveryError as error:
        log.warning("training result for %s not sent: %s", account_id, error)


SHARED_MODELS = "service/models/"


def sharing_refusals(runtime, account_ids: Sequence[str], day: date | None = None) -> list[str]:
    """The accounts (of `account_ids`) whose labels may not train shared models on `day`: only a
    `professional_sharing` plan in force that day consents to it, and a locked account's data is
    served to nobody."""
    from pipelines.billing.history import agreed_on
    from pipelines.lifecycle import is_locked

    day = day or utcnow().date()
    pricebook = load_pricebook(runtime.settings.pricebook_path)
    refused = []
    for account_id in account_ids:
        get_account(runtime.catalog, account_id)
        if agreed_on(runtime.catalog, account_id, day).plan != Plan.PROFESSIONAL_SHARING.value or is_locked(
            runtime.catalog, account_id, pricebook=pricebook
        ):
            refused.append(account_id)
    return refused


def build_shared_model(
    runtime,
    contributions: Mapping[str, Sequence[str]],
    ignore_classes: Sequence[int] = (0, 1),
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Train a candidate for the shared standard models from several accounts' labelled files.

    Every contributing account must be on `professional_sharing` today (the plan whose customers
    consent to it): one that is not makes the whole build refused before any file is read, so no
    other customer's labels ever reach a shared model. The model and a record of who contributed
    what (files by sha256) are stored under service/models/, apart from every account's area.
    `progress` hears of the same stages as in `train_model`.
    """
    if not contributions or not any(contributions.values()):
        raise InvalidValue("give at least one labelled file of a contributing account")
    refused = sharing_refusals(runtime, list(contributions))
    if refused:
        raise SharingRefused(
            f"account(s) {', '.join(refused)} may not contribute to shared models: only accounts on the "
            f"{Plan.PROFESSIONAL_SHARING.value} plan consent to it; nothing was built"
        )
    for account_id, sources in contributions.items():
        for source in sources:
            check_source(runtime.settings, runtime.store, account_id, source)
    owners = [(account_id, source) for account_id, sources in contributions.items() for source in sources]
    with ExitStack() as stack:
        files = (
            (stack.enter_context(local_copy(runtime.settings, source, account_id)), Path(source).name)
            for account_id, source in owners
        )
        blocks, labels, described = _read_labelled_files(
            files, len(owners), runtime.settings.max_training_points, progress
        )
        model = train(
            blocks, labels, ignore_classes=ignore_classes, tile_buffer=runtime.settings.tile_buffer, progress=progress
        )
    contributed = [{"account_id": account_id, **d} for (account_id, _), d in zip(owners, described)]
    model_id = "shared-" + uuid.uuid4().hex[:12]
    record = {
        "model_id": model_id,
        "key": SHARED_MODELS + model_id + MODEL_SUFFIX,
        "created_at": utcnow().isoformat(),
        "contributions": contributed,
        "evaluation": _evaluation(model),
    }
    # The record of who contributed goes first: a shared model must never exist without it.
    record_key = SHARED_MODELS + model_id + ".json"
    try:
        runtime.store.put_bytes(record_key, json.dumps(record, indent=2).encode())
        runtime.store.put_bytes(record["key"], model.to_bytes(model_seal(runtime.settings, None, model_id)))
    except BaseException:
        for stored in (record["key"], record_key):
            runtime.store.delete(stored)
        raise
    return record


@dataclass(frozen=True)
class ResealReport:
    resealed: list[str]  # model ids (accounts' and shared) signed again, bound to their owner and id
    refused: dict[str, str]  # model id -> why it was not: it is left as it was, and is refused on load


def reseal_models(runtime) -> ResealReport:
    """The upgrade step of the models' signature: every model file still signed under the old scheme
    (v2, its bytes only) is checked against that signature and the catalog, then signed again bound
    to the account and id the catalog gives it (a shared model: to its own id, under no account).

    The old signature cannot say whose a model is, so the catalog is trusted for it, once, now: as
    every load under the old scheme trusted it. A file not where its account keeps it, or not the
    bytes the catalog recorded, is refused. Accounts' models are re-signed under the account's
    lock and its models' lock, as deletions take them: a deleted model is never written back. Run
    it again: files already re-signed are left alone (a catalog digest left behind by a run killed
    between a file's write and its record is brought up to date, the file verifying as bound)."""
    with runtime.catalog.session() as session:
        owners = sorted(
            set(session.scalars(select(TrainedModelRecord.account_id).where(TrainedModelRecord.deleted_at.is_(None))))
        )
    resealed: list[str] = []
    refused: dict[str, str] = {}
    for account_id in owners:
        with account_lock(runtime.catalog, account_id), runtime.catalog.lock(_models_lock(account_id)):
            with runtime.catalog.session() as session:
                rows = session.scalars(
                    select(TrainedModelRecord)
                    .where(TrainedModelRecord.account_id == account_id, TrainedModelRecord.deleted_at.is_(None))
                    .order_by(TrainedModelRecord.version)
                )
                for row in rows:
                    seal = model_seal(runtime.settings, account_id, row.model_id)
                    try:
                        data = _reseal_one(runtime, row.key, row.sha256, _model_key(account_id, row.model_id), seal)
                    except InvalidValue as error:
                        refused[row.model_id] = str(error)
                        continue
                    if data is not None:
                        row.sha256 = hashlib.sha256(data).hexdigest()
                        resealed.append(row.model_id)
    for info in runtime.store.list(SHARED_MODELS):
        if info.key.endswith(MODEL_SUFFIX):
            model_id = info.key[len(SHARED_MODELS) :].removesuffix(MODEL_SUFFIX)
            try:
                if _reseal_one(runtime, info.key, None, info.key, model_seal(runtime.settings, None, model_id)):
                    resealed.append(model_id)
            except InvalidValue as error:
                refused[model_id] = str(error)
    return ResealReport(resealed, refused)


def _reseal_one(runtime, key: str, digest: str | None, expected_key: str, seal: Seal) -> bytes | None:
    """Re-sign the file at `key` if it is under the old scheme; its new bytes, else None (already
    bound: checked, and its bytes returned when `digest`, the catalog's, is not theirs)."""
    if key != expected_key:
        raise InvalidValue(f"model {seal.model_id}'s file {key} is not where {seal.owner} keeps it ({expected_key})")
    data = runtime.store.get_bytes(key)
    if not data.startswith(UNBOUND_FORMAT):
        TrainedModel.from_bytes(data, seal)  # bound already, and to this owner and id
        return data if digest is not None and hashlib.sha256(data).hexdigest() != digest else None
    if digest is not None and hashlib.sha256(data).hexdigest() != digest:
        raise InvalidValue(
            f"model {seal.model_id}'s file {key} is not the one the catalog recorded (its sha256 differs)"
        )
    sealed = reseal(data, seal)
    runtime.store.put_bytes(key, sealed)
    return sealed
