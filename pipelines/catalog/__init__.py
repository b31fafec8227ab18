"""The catalog database: schema (models), migrations (Alembic) and the queries the stages use."""

from pipelines.catalog.db import Catalog, CatalogError, CatalogUnavailable, UnknownAccountError, batches

__all__ = ["Catalog", "CatalogError", "CatalogUnavailable", "UnknownAccountError", "batches"]
