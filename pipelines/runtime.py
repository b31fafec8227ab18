"""What every stage, DAG and command works with: the settings, the catalog, the object store and
the mailer.

This module imports no stage, so every layer (stages, lifecycle, billing, the dashboard, the
DAGs, the CLI) may import it. The catalog is opened one way, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from pipelines.catalog import Catalog
from pipelines.notify import Mailer, reply_address
from pipelines.settings import Settings
from pipelines.storage import ObjectStore, open_store


def open_catalog(settings: Settings) -> Catalog:
    """The catalog of these settings at this release's schema: migrated on first use (a new
    embedded SQLite file, a new release's schema). A catalog already at the newest schema costs one
    query (`Catalog.migrate`), which is what every Airflow task pays."""
    catalog = Catalog(settings.database_url)
    catalog.migrate()
    return catalog


@dataclass(frozen=True)
class Runtime:
    """What every step needs, built once from the settings."""

    settings: Settings
    catalog: Catalog
    store: ObjectStore

    @cached_property
    def mailer(self) -> Mailer:
        """Customer e-mail, sent once per key, recorded in this catalog; one for the runtime's life,
        so the reply address is read once."""
        return Mailer(self.settings, self.catalog, reply_address(self.settings))

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        return cls(settings, open_catalog(settings), open_store(settings.storage_url, settings.link_endpoint))
