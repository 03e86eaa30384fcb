"""Files written atomically: readers (and resumed runs) see the old file or the
new one, never half of one, whenever the process dies.

The file system's refusals a user can fix (a full disk, a read-only or foreign
folder, a file where a folder should be, a name too long) become a `UserError`
naming the path; any other `OSError` keeps its traceback."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from fedssl.errors import UserError

# errno -> what a user reads; these are never fedssl's bug
FIXABLE = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "a file is in the way",
    errno.EISDIR: "it is a folder",
    errno.ENAMETOOLONG: "name too long for the file system",
}


def fixable_os_error(error: BaseException | None) -> OSError | None:
    """The `OSError` a user can fix behind `error`, if any. Its context is searched
    too: torch.save reports a failed write as a RuntimeError raised while handling it."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in FIXABLE:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def describe(error: OSError) -> str:
    """`disk full (No space left on device)`: the reason in words, then the system's."""
    return f"{FIXABLE[error.errno]} ({error.strerror})"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Let `write` fill a temporary file beside `path`, sync it, then rename it onto `path`.

    Raises:
        UserError: the file system refused (see `FIXABLE`); `path` is as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        _raise_if_fixable(error, path)
        raise
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        _raise_if_fixable(error, path)
        raise


def _raise_if_fixable(error: BaseException, path: Path) -> None:
    cause = fixable_os_error(error)
    if cause is not None:
        raise UserError(f"{path}: cannot write it: {describe(cause)}; any earlier {path.name} is unchanged") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda file: file.write(text.encode()))


def ensure_dir(path: Path, key: str) -> Path:
    """Create the folder `path` (and its parents) if need be, or raise a `UserError`
    naming `key` (the recipe key or flag that gave it) and why it cannot be one."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if error.errno not in FIXABLE:
            raise
        why = "it is a file, not a folder" if path.is_file() else describe(error)
        raise UserError(f"{key}: cannot use {path} as a folder: {why}") from None
    return path


def check_dir_target(path: Path, key: str) -> None:
    """Refuse, naming `key`, a folder `path` that cannot be made because it, or the
    nearest part of it that exists, is a file (checked before long work, which would
    otherwise fail only at its end)."""
    existing = next(p for p in (path, *path.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise UserError(f"{key}: cannot use {path} as a folder: {existing} is a file")
