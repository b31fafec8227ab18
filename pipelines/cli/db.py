"""`pointflow db upgrade`: bring the catalog to this release's schema."""

from __future__ import annotations

import argparse

from pipelines.cli.common import open_catalog, settings_from_env


def register(commands: argparse._SubParsersAction) -> None:
    db = commands.add_parser("db", help="the catalog database: upgrade its schema")
    sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    upgrade = sub.add_parser(
        "upgrade",
        help="migrate the catalog to this release's schema",
        description=(
            "Migrate the catalog (POINTFLOW_DATABASE_URL) to this release's schema; a catalog already there is "
            "left as it is. Deployments run it once before the services start (docker/init.sh); a process that "
            "finds an older schema migrates it too, so it is never required, only sooner."
        ),
    )
    upgrade.set_defaults(handler=_upgrade)


def _upgrade(args: argparse.Namespace) -> None:
    from pipelines.catalog.db import head_revision, where

    settings = settings_from_env()
    open_catalog(settings).dispose()
    print(f"catalog {where(settings.database_url)} is at revision {head_revision()}")
