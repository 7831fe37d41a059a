"""One writer per run folder, and no orphaned workers.

:class:`RunLock` holds an exclusive ``flock`` on ``<run folder>/run.lock`` for the whole run and writes its
pid there (opened without following a symbolic link). The kernel releases the lock when the process dies (even by SIGKILL), so a stale lock file never
blocks a resume, while a live holder (a second command on the same folder, or a worker of a killed sweep
still running) refuses the newcomer with one line naming its pid.

:func:`die_with_parent` asks the kernel to send SIGTERM to a worker process when the process that started
it dies (Linux ``PR_SET_PDEATHSIG``): a sweep killed with ``kill -9`` then leaves no workers behind; each
worker saves its step on the SIGTERM (:mod:`sbn_train.signals`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import signal
import stat
from pathlib import Path

LOCK = "run.lock"


class FolderBusy(RuntimeError):
    pass


class RunLock:
    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = open_lock_file(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderBusy(f"{self.path.parent} is in use by process {holder} (a run or a sweep worker "
                             f"still writing there); wait for it to end or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def open_lock_file(path: Path) -> int:
    """Open (or create) a lock file without following a symbolic link (``O_NOFOLLOW``): a link planted at
    ``run.lock`` would have the pid written into its target. A link, or anything but a regular file, there
    is a :class:`FolderBusy` error naming the path."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FolderBusy(f"{path} is a symbolic link; a run never writes through one. Remove it, or set "
                             f"hydra.run.dir=<another folder>") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FolderBusy(f"{path} is not a regular file. Remove it, or set hydra.run.dir=<another folder>")
    return fd


def die_with_parent() -> None:
    """SIGTERM to this process when its parent dies (Linux only; a no-op elsewhere). If the parent is
    already gone, the signal is sent at once."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name or not hasattr(os, "getppid"):
        return
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
