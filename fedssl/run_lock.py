"""One writer per run directory.

Two runs given one name would interleave their metrics.jsonl, and `--overwrite`
would empty a directory under a run still writing to it, which would then report
success for results that are gone. So whatever writes a run directory (`fedssl
run`, `--resume`, `--overwrite`, a `sweep --local` member, `personalize` into
RUN/personalized-MODE, a deployed Flower ServerApp) first holds its lock, from
before the directory is prepared to after its last write.

The lock is `flock(2)` on the file `LOCK` inside the directory. The kernel drops
it when the process holding it ends, however it ends (SIGKILL included), so a
killed run leaves no stale lock; the PID, host and command written into the file
only serve the refusal's message. While held, the file is never removed (emptying
the directory for `--overwrite` keeps it): another process would lock a fresh
file of the same name and both would write. It is removed when released, while
still locked; a process that locked a file just removed that way notices (the
name no longer leads to the file it locked) and locks the new one.

The lock is advisory and local: it stops a second fedssl process on the file
system, not a user's `rm`, nor a writer on a network file system whose server
does not support locks.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fedssl.errors import UserError
from fedssl.io import FIXABLE, describe
from fedssl.run_dir import LOCK

try:
    import fcntl
except ImportError:  # Windows: no flock (see `hold_run_dir`)
    fcntl = None

log = logging.getLogger(__name__)

# Descriptors of the locks this process holds. A forked child (the worker pool)
# inherits them, and with them the lock, which would outlive a killed parent for as
# long as the child lives; the child closes its copies. (Closing, not LOCK_UN: an
# unlock would release the lock for the parent as well, since both share it.)
_held: set[int] = set()


def _close_inherited() -> None:
    for fd in _held:
        os.close(fd)
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


@contextmanager
def hold_run_dir(run_dir: Path, hint: str = "choose another name=...") -> Iterator[None]:
    """Hold the exclusive lock of `run_dir` (created if need be) for the `with` block.

    A run directory this call created and that is still empty at the end is removed
    again, so a refused `--resume` leaves nothing behind.

    Args:
        run_dir: the run directory.
        hint: what else the user may do when it is in use, for the refusal's message.

    Raises:
        UserError: another process holds it (naming that process), or `run_dir`
            cannot be a folder (naming it and why).
    """
    if fcntl is None:  # say so rather than pretend
        log.warning("%s: not locked (locks need POSIX fcntl): start one run at a time in it", run_dir)
        yield
        return
    if run_dir.is_symlink():
        raise UserError(f"run directory {run_dir} is a symbolic link: fedssl only writes run directories it creates")
    created = _make_dir(run_dir)
    fd = _lock(run_dir / LOCK, hint)
    _held.add(fd)
    try:
        _write_holder(fd)
        yield
    finally:
        _release(run_dir, fd, created)


def _make_dir(run_dir: Path) -> bool:
    """Create `run_dir` (and its parents); whether it did not exist before."""
    try:
        run_dir.mkdir(parents=True)
        return True
    except FileExistsError:
        if run_dir.is_dir():
            return False
        raise UserError(f"run directory {run_dir}: a file of that name is in the way") from None
    except OSError as error:
        if error.errno not in FIXABLE:
            raise
        raise UserError(f"run directory {run_dir}: cannot create it: {describe(error)}") from None


def _lock(path: Path, hint: str) -> int:
    """An open descriptor of `path` holding its exclusive lock, or a `UserError`
    naming the process that holds it."""
    while True:
        try:
            # O_NOFOLLOW: a link planted as the lock file must not make fedssl write elsewhere
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UserError(f"{path}: the run directory's lock file is a symbolic link; remove it") from None
            if error.errno not in FIXABLE:
                raise
            why = describe(error)
            raise UserError(f"{path}: cannot create the run directory's lock file: {why}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"run directory {path.parent} is in use by {holder}; "
                            f"wait for it to end, or {hint}") from None
        if _still_named(fd, path):
            return fd
        os.close(fd)  # its holder removed it as it let go: lock the file now at `path`


def _still_named(fd: int, path: Path) -> bool:
    """Whether `path` still leads to the file open as `fd`."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
        return False


def _write_holder(fd: int) -> None:
    """Who holds the lock, for the message of the process it refuses."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if program in ("", "-c", "__main__.py"):  # python -c, an interactive session, python -m fedssl
        program = f"python {program}".strip()
    command = " ".join([program, *sys.argv[1:]])
    line = f"{os.getpid()} {socket.gethostname()} {command}"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (line[:500] + "\n").encode(), 0)
    except OSError as error:
        if error.errno not in FIXABLE:
            raise
        # a full disk: the lock holds all the same, a refusal names "another process"


def _read_holder(fd: int) -> str:
    """`process 123 (fedssl run ...)` from a lock file another process wrote; only
    what parses as that, since anyone may have written the file."""
    try:
        text = os.pread(fd, 600, 0).decode(errors="replace")
    except OSError:
        text = ""
    pid, host, command = ((text.splitlines() or [""])[0].split(" ", 2) + ["", ""])[:3]
    if not pid.isdigit():  # locked before its holder wrote its line, or written by hand
        return "another process"
    command = "".join(c if c.isprintable() else "?" for c in command)[:200]
    where = f" on host {host}" if host and host != socket.gethostname() else ""
    return f"process {pid}{where}" + (f" ({command})" if command else "")


def _release(run_dir: Path, fd: int, created: bool) -> None:
    """Remove the lock file while still holding it, the directory too if this hold
    created it and nothing else was written, then let go."""
    lock = run_dir / LOCK
    try:
        if _still_named(fd, lock):
            lock.unlink()
        if created and not any(run_dir.iterdir()):
            run_dir.rmdir()
    except OSError:
        # Cleaning up must not turn a finished run into a failure: a lock file left
        # behind is harmless (nobody holds it, the next run locks it).
        pass
    _held.discard(fd)
    os.close(fd)
