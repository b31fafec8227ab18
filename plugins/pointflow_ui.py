"""The pointflow page in the Airflow UI: accounts, recent jobs, usage, invoices, lifecycle queue.

A FastAPI app mounted by the api-server under /pointflow, shown in the Airflow navigation as an
external view (an iframe on the same origin, so the browser sends Airflow's `_token` cookie).

Airflow does not protect plugin apps: every route here depends on `operator`, which resolves the
user with the dependency Airflow's own routes use (`GetUserDep`: an `Authorization: Bearer` JWT,
else the `_token` cookie, validated by the configured auth manager) and then asks the auth
manager whether that user may read the custom view "pointflow" (`is_authorized_custom_view`).
With the simple auth manager every role may; with FAB or Keycloak grant read on "pointflow".
A missing or expired token gets 401, or, for a browser asking for a page, a redirect to
Airflow's login that comes back here.

One route changes something: POST /pointflow/jobs/<job id>/abort (`pipelines.abort.request_abort`,
an operator's abort, any account's job). It depends on `editor`, not `operator`: the auth manager
must allow editing ("PUT") the custom view "pointflow" (FAB: can_edit on pointflow; Keycloak: the
PUT scope on the custom resource) and changing DAG runs. The second check is what keeps the simple
auth manager's viewers out: it answers a custom view's every method as a read (any role may), while
its DAG runs need role USER or above to change. Being a change sent by a browser holding Airflow's
cookie, it also requires the CSRF_HEADER, which a page of another origin cannot add without a CORS
preflight that the api-server does not grant (see `same_origin`).

Objects are served only through `pipelines.served`, which builds each key from the named
account's own job or invoice and refuses keys outside that account's area.

One route needs no Airflow user: /pointflow/download/<token>, the customers' download links.
The token is the credential: `pipelines.downloads.open_download` checks its signature and expiry and
that the account, the export and the plan still allow the download, then it redirects to a
presigned URL of minutes (S3) or streams the file. It opens nothing else.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures inside create_app,
# whose annotations name types imported there, so they must be evaluated where they are written.
import base64
import hashlib
import json
import logging
import re
import threading
from datetime import UTC
from pathlib import Path

from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)

URL_PREFIX = "/pointflow"
RESOURCE_NAME = "pointflow"
TEMPLATES = Path(__file__).resolve().parent / "templates"
# The 3D view's script and the three.js build it uses (vendored from npm: static/vendor/three).
STATIC = Path(__file__).resolve().parent / "static"
STATIC_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".md": "text/plain; charset=utf-8",
    "": "text/plain; charset=utf-8",
}
IMPORT_MAP = json.dumps(
    {
        "imports": {
            "three": f"{URL_PREFIX}/static/vendor/three/three.module.js",
            "three/addons/": f"{URL_PREFIX}/static/vendor/three/addons/",
        }
    }
)
_IMPORT_MAP_HASH = base64.b64encode(hashlib.sha256(IMPORT_MAP.encode()).digest()).decode()
# Scripts only from here (and the one inline import map, by its hash), nothing from elsewhere;
# only Airflow's own UI may frame the page.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        f"default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'self' 'sha256-{_IMPORT_MAP_HASH}'; "
        "connect-src 'self'; frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "SAMEORIGIN",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
# Every change the page sends carries this header with the value "1". Airflow's `_token` cookie is
# SameSite=Lax: browsers keep it off cross-site POSTs, but a page on another port of this host is
# the same site and would get it sent. A form cannot set a header, and a script of another origin
# can only with a CORS preflight, which the api-server refuses unless [api]
# access_control_allow_origins trusts that origin; a constant is enough for that (no token to leak).
CSRF_HEADER = "X-Pointflow-CSRF"
# What a job id looks like (the catalog's key, 128 characters at most): anything else is refused
# before the catalog is asked, and never echoed back.
JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class _LazyApp:
    """The ASGI app, built on its first request.

    Every Airflow task process loads the plugins (for their macros); building the FastAPI app
    at import would make each task import FastAPI and Airflow's API modules, about 2 s, for a
    page only the api-server serves.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._app = None

    async def __call__(self, scope, receive, send) -> None:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = create_app()
        await self._app(scope, receive, send)


class _RuntimeHolder:
    """The pointflow runtime of this server process, opened on first use: a catalog that is down
    must not stop the api-server from starting, only this page from rendering."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runtime = None

    def get(self):
        from pipelines.runtime import Runtime
        from pipelines.settings import Settings

        with self._lock:
            if self._runtime is None:
                self._runtime = Runtime.from_settings(Settings.from_env())
            return self._runtime


def create_app():
    from typing import Annotated
    from urllib.parse import urlencode

    from airflow.api_fastapi.app import API_ROOT_PATH, get_auth_manager
    from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import GetUserDep
    from fastapi import Depends, FastAPI, HTTPException, Request, status
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from markupsafe import Markup
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from pipelines.abort import JobAlreadyEnded, UnknownJob, request_abort
    from pipelines.catalog.models import JobState
    from pipelines.dashboard import build_dashboard
    from pipelines.downloads import open_download
    from pipelines.lifecycle.operations import AccountLocked
    from pipelines.links import DOWNLOAD_PATH, LinkRefused
    from pipelines.served import NotServed, invoice_document, job_preview
    from pipelines.usage_chart import usage_chart_svg

    def operator(user: GetUserDep) -> BaseUser:
        """The signed-in Airflow user, if the auth manager lets them read the pointflow view."""
        if not get_auth_manager().is_authorized_custom_view(method="GET", resource_name=RESOURCE_NAME, user=user):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"your Airflow role has no read access to the {RESOURCE_NAME} view"
            )
        return user

    def may_edit(user: BaseUser) -> bool:
        manager = get_auth_manager()
        return manager.is_authorized_custom_view(
            method="PUT", resource_name=RESOURCE_NAME, user=user
        ) and manager.is_authorized_dag(method="PUT", access_entity=DagAccessEntity.RUN, user=user)

    def editor(user: GetUserDep) -> BaseUser:
        """The signed-in Airflow user, if the auth manager lets them change jobs (see the module's doc)."""
        if not may_edit(user):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"your Airflow role may not change jobs: it needs edit on the {RESOURCE_NAME} view and on DAG runs",
            )
        return user

    def same_origin(request: Request) -> None:
        """Refuse a change not sent by a script of this origin (CSRF_HEADER; Sec-Fetch-Site where the
        browser sends it)."""
        sent_by = request.headers.get("sec-fetch-site", "same-origin")
        if request.headers.get(CSRF_HEADER) != "1" or sent_by != "same-origin":
            raise HTTPException(
                status.HTTP_403_FORBIDDEN, f"refused: a change must come from the pointflow page ({CSRF_HEADER})"
            )

    Operator = Annotated[BaseUser, Depends(operator)]
    Editor = Annotated[BaseUser, Depends(editor)]
    holder = _RuntimeHolder()
    app = FastAPI(title="pointflow", docs_url=None, redoc_url=None, openapi_url=None)
    templates = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    templates.filters.update(points=lambda n: f"{int(n):,}", when=_when, detail=_detail)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def login_redirect(request: Request, error: StarletteHTTPException):
        # A person opening the page is sent to Airflow's login and back; API clients get the 401.
        if (
            error.status_code == status.HTTP_401_UNAUTHORIZED
            and request.method == "GET"
            and "text/html" in request.headers.get("accept", "")
        ):
            back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(
                f"{API_ROOT_PATH}api/v2/auth/login?{urlencode({'next': back})}", status.HTTP_303_SEE_OTHER
            )
        return await http_exception_handler(request, error)

    @app.get("/", response_class=HTMLResponse)
    def page(user: Operator) -> HTMLResponse:
        dashboard = build_dashboard(holder.get())
        html = templates.get_template("pointflow_dashboard.html").render(
            d=dashboard,
            chart=Markup(usage_chart_svg(dashboard)),
            user=user.get_name(),
            may_abort=may_edit(user),
            prefix=URL_PREFIX,
            import_map=Markup(IMPORT_MAP),
        )
        return HTMLResponse(html)

    @app.get("/accounts/{account_id}/jobs/{job_id}/{name}")
    def preview(account_id: str, job_id: str, name: str, _user: Operator) -> Response:
        try:
            body, media_type = job_preview(holder.get(), account_id, job_id, name)
            return Response(body, media_type=media_type)
        except NotServed as missing:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(missing)) from None
        except AccountLocked as locked:
            raise HTTPException(status.HTTP_403_FORBIDDEN, str(locked)) from None

    @app.get("/accounts/{account_id}/invoices/{invoice_number}.{fmt}")
    def invoice(account_id: str, invoice_number: str, fmt: str, _user: Operator) -> Response:
        try:
            body, media_type = invoice_document(holder.get(), account_id, invoice_number, fmt)
        except NotServed as missing:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(missing)) from None
        disposition = "inline" if fmt == "html" else "attachment"
        return Response(
            body,
            media_type=media_type,
            headers={"Content-Disposition": f'{disposition}; filename="{invoice_number}.{fmt}"'},
        )

    @app.post("/jobs/{job_id}/abort")
    def abort(job_id: str, user: Editor, _origin: Annotated[None, Depends(same_origin)]) -> dict[str, str]:
        """An operator's abort of any account's job; asking again changes nothing."""
        if not JOB_ID.fullmatch(job_id):
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "not a job id")
        try:
            job = request_abort(holder.get(), job_id)
        except UnknownJob:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown job {job_id}") from None
        except JobAlreadyEnded as ended:
            raise HTTPException(status.HTTP_409_CONFLICT, str(ended)) from None
        log.info("job %s: abort asked for by Airflow user %s on the pointflow page", job_id, user.get_name())
        if job.state == JobState.ABORTED.value:
            message = f"job {job.job_id}: aborted, {job.points_processed:,} points metered"
        else:
            message = f"job {job.job_id}: abort requested; it stops between tiles and ends aborted"
        return {"job_id": job.job_id, "state": job.state, "message": message}

    # Every file under static/, by its path there: nothing else on disk can be named.
    static_files = {path.relative_to(STATIC).as_posix(): path for path in STATIC.rglob("*") if path.is_file()}

    @app.get("/static/{name:path}")
    def static(name: str, _user: Operator) -> Response:
        path = static_files.get(name)
        if path is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no static file {name!r}")
        return Response(path.read_bytes(), media_type=STATIC_MEDIA_TYPES.get(path.suffix, STATIC_MEDIA_TYPES[""]))

    @app.get(DOWNLOAD_PATH.removeprefix(URL_PREFIX) + "{token}")
    def download(token: str) -> Response:
        """A customer's download link: the token alone authorises this one file (no Airflow login)."""
        from datetime import datetime

        try:
            found = open_download(holder.get(), token, datetime.now(UTC))
        except LinkRefused as refused:
            return PlainTextResponse(f"{refused}\n", status_code=refused.status)
        if found.url is not None:
            return RedirectResponse(found.url, status.HTTP_303_SEE_OTHER)
        headers = {"Content-Disposition": f'attachment; filename="{found.name}"', "Content-Length": str(found.size)}
        return StreamingResponse(found.chunks, media_type=found.media_type, headers=headers)

    return app


def _when(moment) -> str:
    """A UTC instant (or its ISO text) as the page shows it; a dash for none."""
    if moment is None:
        return "–"
    if isinstance(moment, str):
        from datetime import datetime

        moment = datetime.fromisoformat(moment)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _detail(value) -> str:
    """A value of a lifecycle action's detail: instants read like the rest of the page."""
    if isinstance(value, str) and "T" in value:
        try:
            return _when(value)
        except ValueError:
            return value
    return str(value)


class PointflowPlugin(AirflowPlugin):
    name = "pointflow"
    fastapi_apps = [{"app": _LazyApp(), "url_prefix": URL_PREFIX, "name": "pointflow"}]
    external_views = [
        {
            "name": "pointflow",
            "href": URL_PREFIX + "/",
            # Shown inside the Airflow UI at /plugin/pointflow, as a top-level navigation entry.
            "url_route": "pointflow",
            "destination": "nav",
            "nav_top_level": True,
        }
    ]
