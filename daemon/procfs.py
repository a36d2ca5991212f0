"""The ``/proc/self/fd`` directory the passthrough reopens O_PATH fds through.

Outside a sandbox it is opened by path.  The namespace sandbox mounts a
fresh procfs for its pid namespace, opens ``/proc/self/fd`` there and then
pivots into the shared directory, where no ``/proc`` exists any more: it
hands the fd over with :func:`set_proc_self_fd`, and every filesystem made
later gets a duplicate of it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["in_proc_fd_dir", "open_proc_self_fd", "set_proc_self_fd", "thread_count"]

_proc_self_fd: int | None = None


def set_proc_self_fd(fd: int) -> None:
    """Adopt ``fd`` (an O_PATH fd of ``/proc/self/fd``) for the process."""
    global _proc_self_fd
    _proc_self_fd = fd


def open_proc_self_fd() -> int:
    """A new O_PATH fd of this process's ``/proc/self/fd`` directory."""
    if _proc_self_fd is not None:
        return os.dup(_proc_self_fd)
    return os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


class _ThreadCwd(threading.local):
    private = False


_thread = _ThreadCwd()
_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_CLONE_FS = 0x200


@contextmanager
def in_proc_fd_dir(proc_fd: int) -> Iterator[None]:
    """Run the body with this thread's cwd at ``proc_fd`` (``/proc/self/fd``),
    so that a relative ``"N"`` names the inode fd N is open on, with no
    ``/proc`` path (there is none inside the sandbox).  The thread first gets
    its own cwd (``unshare(CLONE_FS)``), so other threads are unaffected."""
    if not _thread.private:
        if _libc.unshare(_CLONE_FS) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"unshare(CLONE_FS): {os.strerror(code)}")
        _thread.private = True
    saved = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fchdir(proc_fd)
        yield
    finally:
        os.fchdir(saved)
        os.close(saved)


def thread_count() -> int:
    """How many threads the process has (``/proc/self/task``, found through
    the adopted fd inside the sandbox)."""
    if _proc_self_fd is None:
        return len(os.listdir("/proc/self/task"))
    fd = os.open("../task", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=_proc_self_fd)
    try:
        return len(os.listdir(fd))
    finally:
        os.close(fd)
