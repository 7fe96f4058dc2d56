"""A small file a user names (a prompts list, a yaml), read without blocking and within a bound."""
from __future__ import annotations

import os
import stat

from ..errors import SdportError


def read_regular(path: str, limit: int, what: str = "a file") -> bytes:
    """At most `limit + 1` bytes of the regular file `path` (one more than allowed: the caller says
    what "too large" means). A FIFO or a device would block or never end: refused, as are a missing
    file, a directory and an unreadable one, each in one line."""
    try:
        with open(path, "rb", opener=lambda p, fl: os.open(p, fl | os.O_NONBLOCK)) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise SdportError(f"{path}: not a regular file (a pipe, socket or device)")
            return f.read(limit + 1)
    except FileNotFoundError:
        raise SdportError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SdportError(f"{path}: a directory, expected {what}") from None
    except OSError as e:
        raise SdportError(f"{path}: cannot read it ({e.strerror})") from None
