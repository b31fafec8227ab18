"""The exception types that mean "the input or the setup is wrong", as opposed to a bug."""

from pipelines.catalog import CatalogError
from pipelines.settings import ClusterStartError, SettingsError
from pipelines.stack import StackError
from pipelines.storage import StorageError

USER_ERRORS: tuple[type[BaseException], ...] = (
    CatalogError,
    SettingsError,
    ClusterStartError,
    StorageError,
    StackError,
    ValueError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
)
