"""The product's exception base. Every error pointflow raises on purpose is a PointflowError; those
that mean "the input or the setup is wrong" (as opposed to a bug) are UserErrors, which commands
and job records show as their message alone. This module imports nothing of pointflow, so every
module can use it."""


class PointflowError(Exception):
    """An error pointflow raises on purpose."""


class UserError(PointflowError):
    """Wrong input or setup that the user can fix; commands print the message, not a traceback."""


# Plain ValueErrors are still raised for bad arguments in places; the standard library's file
# errors are what a wrong path gives.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    ValueError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
)
