"""File locks (fcntl): one userlens run at a time per project, and serialised registry writes.

`project_lock` guards everything that changes shared state (the DVC workspace, the registry,
the online store): the Prefect flow and the CLI verbs that mutate take it. It never waits:
a second run is refused at once with the holder's pid and start time. The lock is released
by the kernel when its holder dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from userlens.errors import UserlensError
from userlens.io import utc_now


class LockHeld(UserlensError):
    """Another userlens run holds the project lock."""


@contextmanager
def file_lock(path: Path, busy: Callable[[], Exception] | None = None) -> Iterator[int]:
    """An exclusive flock on `path` (created if needed) for the block; yields its descriptor.

    Without `busy` it waits for the lock (short critical sections); with `busy` it never waits
    and raises busy() when another process holds the lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            raise busy() from None
        yield fd
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextmanager
def project_lock(project, what: str = "userlens run") -> Iterator[None]:
    """Hold data/.userlens.lock for the block, or raise LockHeld naming the run that holds it."""
    path = project.lock_file

    def held() -> LockHeld:
        pid, started = ((path.read_text().split(maxsplit=2)) + ["?", "?"])[:2]
        return LockHeld(
            f"another userlens run (pid {pid}, started at {started}) holds the lock "
            f"{project.relative(path)}: wait for it to finish (a killed run releases the lock by itself)"
        )

    with file_lock(path, busy=held) as fd:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {utc_now()} {what}\n".encode(), 0)
        yield
