"""User-facing errors: one line that names the file, the key and what was expected.

The CLI turns every `SdportError` into that line and exit code 2; anything else is a bug and keeps
its traceback.
"""


class SdportError(Exception):
    """A user mistake or a bad input file (not a bug)."""


class BadFile(SdportError):
    """The input file is unreadable, truncated, or not what it claims to be."""


class UnsafeFile(SdportError):
    """The file asks to run code (a pickle global outside the allow-list); nothing was executed."""


class LayoutError(SdportError):
    """An HDF5 file that does not follow the sdport layout (or a newer version of it)."""


def cut(text: str, n: int = 80) -> str:
    """Quoted file content inside an error line, at most `n` characters (a file can hold megabytes)."""
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n] + "..."
