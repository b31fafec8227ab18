"""The exception types that mean "the input or the setup is wrong", as opposed to a bug."""

from pipelines.catalog import CatalogError
from pipelines.settings import ClusterStartError, SettingsError
from pipelines.storage import StorageError


class UserError(Exception):
    """Wrong input or setup that the user can fix; commands print the message, not a traceback."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    CatalogError,
    SettingsError,
    ClusterStartError,
    StorageError,
    UserError,
    ValueError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
)
