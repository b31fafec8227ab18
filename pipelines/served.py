"""The only objects the operators' page serves: a job's previews and an invoice's published documents,
each built from the named account's own records and refused unless the key lies in that account's area."""

from __future__ import annotations

from pipelines.billing.delivery import DOCUMENT_FORMATS, document_keys
from pipelines.billing.invoicing import invoice_view
from pipelines.billing.models import Invoice
from pipelines.billing.pricebook import load_pricebook
from pipelines.catalog.models import Job
from pipelines.errors import PointflowError
from pipelines.export import SAMPLE_NAME, export_prefix, read_manifest
from pipelines.lifecycle.operations import ensure_active
from pipelines.runtime import Runtime
from pipelines.storage import AccountArea, UnsafeKeyError, check_account_id

PREVIEW_MEDIA_TYPES = {"preview.png": "image/png", SAMPLE_NAME: "application/x-ply"}
DOCUMENT_MEDIA_TYPES = {
    "html": "text/html; charset=utf-8",
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "pdf": "application/pdf",
    "xml": "application/xml",
}


class NotServed(PointflowError, LookupError):
    """No such object for this account (or not one the page may serve); the message says which."""


def job_preview(runtime: Runtime, account_id: str, job_id: str, name: str) -> tuple[bytes, str]:
    """A preview (the class map, or the 3D sample) of the account's own published export of `job_id`, and its media type."""
    _check_account(account_id)
    if name not in PREVIEW_MEDIA_TYPES:
        raise NotServed(f"a job's previews are {', '.join(PREVIEW_MEDIA_TYPES)}, not {name!r}")
    with runtime.catalog.session() as session:
        job = session.get(Job, job_id)
        owner = None if job is None else job.account_id
    if owner != account_id:
        raise NotServed(f"account {account_id} has no job {job_id!r}")
    ensure_active(runtime.catalog, account_id, pricebook=load_pricebook(runtime.settings.pricebook_path))
    prefix = export_prefix(account_id, job_id)
    manifest = read_manifest(runtime.store, prefix)
    key = next((a["key"] for a in (manifest or {}).get("artifacts", []) if a.get("name") == name), None)
    # The manifest is data: a key it names is served only if it lies in this job's own export.
    if key is None or not AccountArea(account_id).owns(key) or not key.startswith(prefix):
        raise NotServed(f"job {job_id} of account {account_id} has no published {name}")
    return runtime.store.get_bytes(key), PREVIEW_MEDIA_TYPES[name]


def invoice_document(runtime: Runtime, account_id: str, invoice_number: str, fmt: str) -> tuple[bytes, str]:
    """One published document (html, csv, json; pdf and xml e-invoice) of the account's own invoice, and its media type."""
    _check_account(account_id)
    if fmt not in DOCUMENT_FORMATS:
        raise NotServed(f"invoice documents are {', '.join(DOCUMENT_FORMATS)}, not {fmt!r}")
    with runtime.catalog.session() as session:
        invoice = session.get(Invoice, invoice_number)
        view = None if invoice is None else invoice_view(invoice)
    if view is None or view.account_id != account_id:
        raise NotServed(f"account {account_id} has no invoice {invoice_number!r}")
    key = document_keys(view)[fmt]
    if not AccountArea(account_id).owns(key) or not runtime.store.exists(key):
        raise NotServed(f"invoice {invoice_number} has no published {fmt} document")
    return runtime.store.get_bytes(key), DOCUMENT_MEDIA_TYPES[fmt]


def _check_account(account_id: str) -> None:
    try:
        check_account_id(account_id)
    except UnsafeKeyError as error:
        raise NotServed(str(error)) from None
