"""The partial files of writes in progress, so that an interrupt arriving on any line can remove them.

Writers put their bytes in `path.partial` and rename it into place when it is complete. An interrupt
can land where no `try` covers the partial file yet (a constructor's first lines, or between the
constructor and the `with` that would call `__exit__`); each writer names its partial file here before
creating it, and the command line removes whatever is still named when Ctrl-C ends a command.
"""
from __future__ import annotations

import os

_OPEN: set[str] = set()  # partial files that may exist and are not renamed into place yet
_DONE: list[str] = []  # destinations completed (renamed into place) since reset()


def begin(partial: str) -> None:
    """Before creating `partial`."""
    _OPEN.add(partial)


def end(partial: str, dest: str | None = None) -> None:
    """After `partial` was removed, or renamed to `dest`."""
    _OPEN.discard(partial)
    if dest is not None:
        _DONE.append(dest)


def discard(partial: str) -> None:
    """Remove `partial` if it exists (a write that failed or was given up), and stop naming it."""
    if os.path.exists(partial):
        os.remove(partial)
    end(partial)


def remove_open() -> None:
    """Remove every partial file still named (a writer thread may still hold one open: the name goes)."""
    for p in list(_OPEN):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass
        except OSError:  # nothing better to do with it while exiting; the next write over it replaces it
            continue
        _OPEN.discard(p)


def completed() -> list[str]:
    return list(_DONE)


def reset() -> None:
    _OPEN.clear()
    _DONE.clear()
