"""One run per run directory: a lock file that a second run on the same --out cannot take.

The lock is ``DIR/.lock``, created with O_EXCL (atomic on local and NFSv3+ file systems) and
holding the owner's pid and host. A lock left by a killed run on this host (its pid is gone)
is taken over, so ``--resume`` after ``kill -9`` works; a lock of another host is never
guessed stale. In a multi-process launch only rank 0 takes it.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kd.errors import KDError

LOCK = ".lock"


def _owner(path: Path) -> tuple[int, str] | None:
    try:
        pid, host = path.read_text().split(maxsplit=1)
        return int(pid), host.strip()
    except (OSError, ValueError):
        return None


def _stale(path: Path) -> bool:
    """True when the lock's owner was a process of this host that no longer exists."""
    owner = _owner(path)
    if owner is None or owner[1] != socket.gethostname():
        return False
    try:
        os.kill(owner[0], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@contextmanager
def run_lock(run_dir: str | Path, rank: int = 0) -> Iterator[None]:
    """Hold ``run_dir``'s lock while the block runs (rank 0 only); a second holder gets a one-line KDError."""
    if rank != 0:
        yield
        return
    p = Path(run_dir)
    p.mkdir(parents=True, exist_ok=True)
    path = p / LOCK
    for attempt in (0, 1):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if attempt == 0 and _stale(path):
                path.unlink(missing_ok=True)
                continue
            owner = _owner(path)
            who = f"pid {owner[0]} on {owner[1]}" if owner else "another process"
            raise KDError(f"{p} is in use by another run ({who}); wait for it or choose another --out "
                          f"(if no run uses it, delete {path})") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {socket.gethostname()}\n")
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
