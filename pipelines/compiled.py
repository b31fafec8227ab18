"""Compiled loops (numba): the one decorator pointflow's compiled functions use, and where their
machine code is cached.

numba compiles a function the first time a process calls it, which takes seconds; with a cache it
loads the machine code instead, in milliseconds. A Dask worker is a fresh process for every run,
so without a cache every run would compile again. numba caches next to the source file (the
package's `__pycache__`); where that is not writable (an installed package owned by another user,
as in the Docker image) the cache goes to the user's cache folder, or else to the temp folder, so a
read-only installation still compiles once, not once per process. A NUMBA_CACHE_DIR that the
environment sets is left to numba.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (made if missing): numba's own test of a cache folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def cache_folder() -> Path | None:
    """Where this process caches compiled code: where NUMBA_CACHE_DIR says, else the first writable of
    the package's own `__pycache__` folders, the user's cache folder and the temp folder; None when
    none is writable (compiled without a cache)."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    for folder in (
        PACKAGE / "__pycache__",
        user / "pointflow" / "numba",
        Path(tempfile.gettempdir()) / f"pointflow-numba-{os.getuid()}",
    ):
        if writable(folder):
            return folder
    return None


@functools.cache
def jit():
    """numba's njit as this process uses it, with the cache where `cache_folder` says. numba is
    imported here, on the first call of a compiled function, not when a module defines one: its
    0.15 CPU-s would otherwise go to every process that imports the classifiers without running
    them (the command, Airflow's validate and classify tasks)."""
    import numba

    folder = cache_folder()
    if folder is not None and folder != PACKAGE / "__pycache__" and not os.environ.get("NUMBA_CACHE_DIR"):
        # numba caches beside each source file unless told otherwise; it reads its CACHE_DIR when a
        # cached function is compiled: set before any is.
        numba.config.CACHE_DIR = str(folder)
    # No fastmath: the loops must give the same bits as the NumPy arithmetic they replace. nogil:
    # threads of one worker run compiled loops side by side.
    return functools.partial(numba.njit, cache=folder is not None, nogil=True)


class Compiled:
    """A function compiled in nopython mode (see `jit`) on its first call."""

    def __init__(self, function) -> None:
        self.function = function
        self._dispatcher = None
        functools.update_wrapper(self, function)

    @property
    def dispatcher(self):
        """numba's dispatcher of the function (its compiled versions, its cache statistics)."""
        if self._dispatcher is None:
            self._dispatcher = jit()(self.function)
        return self._dispatcher

    def __call__(self, *args):
        return self.dispatcher(*args)


def compiled(function) -> Compiled:
    """Decorator: `function`, compiled on its first call."""
    return Compiled(function)
