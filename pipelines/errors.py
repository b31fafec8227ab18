"""The product's exception base. Every error pointflow raises on purpose is a PointflowError; those
that mean "the input or the setup is wrong" (as opposed to a bug) are UserErrors, which commands
and job records show as their message alone. This module imports nothing of pointflow, so every
module can use it."""


class PointflowError(Exception):
    """An error pointflow raises on purpose."""


class UserError(PointflowError):
    """Wrong input or setup that the user can fix; commands print the message, not a traceback."""


class InvalidValue(UserError, ValueError):
    """A value given to pointflow (an argument, a field of an imported row, a file's header) that it
    cannot use. Also a ValueError: the callers that check a value before using it catch that."""


# The standard library's file errors are what a wrong path gives. A plain ValueError is not here:
# one pointflow did not raise as an InvalidValue is a bug, shown with its type (and a traceback).
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
)
