"""One exception base for the product: every exception class pointflow defines derives from
PointflowError, and the errors shown to users as their message alone are UserErrors."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys

import pytest

import pipelines
from pipelines.errors import USER_ERRORS, PointflowError, UserError


def _product_modules():
    for info in pkgutil.walk_packages(pipelines.__path__, "pipelines."):
        if ".catalog.migrations" in info.name:
            continue
        yield importlib.import_module(info.name)


def test_every_exception_pointflow_defines_has_the_product_base() -> None:
    defined = {
        obj
        for module in _product_modules()
        for _, obj in inspect.getmembers(module, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == module.__name__
    }
    assert len(defined) > 30  # the walk found the product's modules
    assert sorted(c.__qualname__ for c in defined if not issubclass(c, PointflowError)) == []


def test_user_errors_are_marked_and_bugs_are_not() -> None:
    from pipelines.catalog import CatalogError
    from pipelines.notify import DeliveryError
    from pipelines.settings import SettingsError
    from pipelines.storage import StorageError

    for user_error in (CatalogError, SettingsError, StorageError):
        assert issubclass(user_error, UserError)
    assert not issubclass(DeliveryError, UserError)
    assert not isinstance(KeyError("bug"), USER_ERRORS)
    assert not isinstance(TypeError("bug"), USER_ERRORS)


def test_a_missing_extra_says_which_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.catalog import Catalog, CatalogError
    from pipelines.classifiers import trained

    monkeypatch.setitem(sys.modules, "lightgbm", None)
    with pytest.raises(UserError, match=r"pointflow\[training\]"):
        trained.load_lightgbm()
    monkeypatch.setitem(sys.modules, "psycopg2", None)
    with pytest.raises(CatalogError, match=r"pointflow\[postgres\]"):
        Catalog("postgresql://postgres@127.0.0.1:5432/test")
