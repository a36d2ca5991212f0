"""Inode file handles (``--inode-file-handles``), as virtiofsd has them.

``name_to_handle_at(2)`` turns an fd into a *file handle*: bytes that name
the inode on its filesystem (inode number and generation, so a handle of a
deleted and reused inode is refused with ESTALE), plus the id of the mount
it was reached through.  ``open_by_handle_at(2)`` opens the inode again from
the handle and any fd on that mount; it needs CAP_DAC_READ_SEARCH (kept by
:mod:`pyvirtiofsd.daemon.capabilities`) and is in the seccomp allowlist.

So an inode the guest knows need not hold an fd all the time: the inode
table keeps the handle and an LRU of O_PATH fds under a budget, and reopens
an evicted inode when a request needs it (:class:`~.inodes.InodeTable`).
Handles are made only by the daemon from its own fds, never taken from the
guest.  The mount fds are the daemon's own: ``open_by_handle_at`` needs an
fd on the mount that is not O_PATH, so the first *directory* seen on each
mount is reopened ``O_RDONLY | O_DIRECTORY`` (through ``/proc/self/fd``,
which works inside the namespace sandbox, where no mount has a path; with
O_DIRECTORY the kernel refuses a non-directory before opening anything, so
no FIFO or device node is ever opened).  An inode on a mount with no mount
fd yet (a file bind-mounted on its own) gets no handle and keeps its fd.

Modes: ``never`` (every inode holds its O_PATH fd, the default, as
virtiofsd), ``prefer`` (handles where the filesystem makes them and the
daemon may open them, else fds), ``mandatory`` (a lookup whose handle cannot
be made fails with that error; the daemon refuses to start if it cannot
open by handle).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable

__all__ = ["MODES", "FileHandles", "HandleUnsupported", "probe"]

MODES = ("never", "prefer", "mandatory")

#: include/linux/exportfs.h MAX_HANDLE_SZ
MAX_HANDLE_SZ = 128
AT_EMPTY_PATH = 0x1000

_libc = ctypes.CDLL(None, use_errno=True)  # the process's own libc, as elsewhere
_name_to_handle_at = _libc.name_to_handle_at
_name_to_handle_at.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_int,
]
_name_to_handle_at.restype = ctypes.c_int
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int

_log = logging.getLogger("pyvirtiofsd.passthrough")
_HEADER = 8  # struct file_handle: unsigned int handle_bytes; int handle_type


class HandleUnsupported(OSError):
    """The filesystem cannot make a handle for this inode (EOPNOTSUPP/EOVERFLOW)."""


def _oserror(err: int) -> OSError:
    return OSError(err, os.strerror(err))


def name_to_handle(fd: int) -> tuple[int, bytes]:
    """(mount id, raw ``struct file_handle``) of the inode ``fd`` refers to."""
    buf = ctypes.create_string_buffer(_HEADER + MAX_HANDLE_SZ)
    ctypes.c_uint.from_buffer(buf).value = MAX_HANDLE_SZ
    mount_id = ctypes.c_int()
    if _name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH) != 0:
        err = ctypes.get_errno()
        if err in (errno.EOPNOTSUPP, errno.EOVERFLOW, errno.ENOTSUP):
            raise HandleUnsupported(err, os.strerror(err))
        raise _oserror(err)
    size = ctypes.c_uint.from_buffer(buf).value
    return mount_id.value, buf.raw[: _HEADER + size]


def open_handle(mount_fd: int, handle: bytes, flags: int = os.O_PATH) -> int:
    """``open_by_handle_at(mount_fd, handle, flags | O_CLOEXEC)``: a new fd."""
    fd: int = _open_by_handle_at(mount_fd, handle, flags | os.O_CLOEXEC)
    if fd < 0:
        raise _oserror(ctypes.get_errno())
    return fd


class FileHandles:
    """Handles of inodes, and the mount fds to open them by (one per mount id)."""

    def __init__(self, mode: str, reopen_dir: Callable[[int], int]) -> None:
        """``reopen_dir(fd)``: ``fd``'s directory opened ``O_RDONLY | O_DIRECTORY``."""
        if mode not in ("prefer", "mandatory"):
            raise ValueError(f"file handles are not used in mode {mode!r}")
        self.mode = mode
        self._reopen_dir = reopen_dir
        self._lock = threading.Lock()
        self._mounts: dict[int, int] = {}

    def make(self, fd: int, *, directory: bool) -> tuple[int, bytes] | None:
        """The handle of the inode O_PATH ``fd`` holds; None where it cannot be
        used (``prefer``: the inode keeps its fd).

        Under ``mandatory`` that raises instead.  The first directory seen on
        a mount becomes that mount's fd.
        """
        try:
            mount_id, handle = name_to_handle(fd)
            with self._lock:
                known = mount_id in self._mounts
            if not known:
                if not directory:
                    raise HandleUnsupported(errno.EOPNOTSUPP, "no directory of this mount seen yet")
                mount_fd = self._reopen_dir(fd)
                with self._lock:
                    if mount_id in self._mounts:
                        os.close(mount_fd)
                    else:
                        self._mounts[mount_id] = mount_fd
        except OSError:
            if self.mode == "mandatory":
                raise
            return None  # prefer: whatever the reason, the inode keeps its fd
        return mount_id, handle

    def open(self, mount_id: int, handle: bytes) -> int:
        """A new O_PATH fd for a handle ``make`` returned."""
        with self._lock:
            mount_fd = self._mounts.get(mount_id)
        if mount_fd is None:
            raise _oserror(errno.ESTALE)
        return open_handle(mount_fd, handle)

    def mount_fds(self) -> int:
        with self._lock:
            return len(self._mounts)

    def close(self) -> None:
        with self._lock:
            fds, self._mounts = list(self._mounts.values()), {}
        for fd in fds:
            os.close(fd)


def probe(root_fd: int, mode: str, reopen_dir: Callable[[int], int]) -> FileHandles | None:
    """The file handles to use for a share whose root is the O_PATH ``root_fd``.

    None for ``never``, and for ``prefer`` (logged) when the root's
    filesystem makes no handles or the daemon may not open by handle (no
    CAP_DAC_READ_SEARCH: EPERM); ``mandatory`` raises OSError instead.
    """
    if mode == "never":
        return None
    if mode not in MODES:
        raise ValueError(f"unknown --inode-file-handles mode {mode!r}")
    handles = FileHandles(mode, reopen_dir)
    try:
        made = handles.make(root_fd, directory=True)
        if made is None:
            raise HandleUnsupported(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        os.close(handles.open(*made))
    except OSError as exc:
        handles.close()
        if mode == "mandatory":
            raise OSError(
                exc.errno, f"--inode-file-handles mandatory: cannot open by handle: {exc.strerror}"
            ) from exc
        _log.warning(
            "--inode-file-handles %s: cannot open inodes by handle (%s); "
            "every inode keeps its fd (never)", mode, exc.strerror,
        )  # fmt: skip
        return None
    return handles
