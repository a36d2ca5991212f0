"""Reading a host directory in pieces, with the host's own resume cookies.

READDIR streams straight from the directory fd, as virtiofsd does:
``lseek(fd, offset)`` then one ``getdents64(2)`` into a buffer the size of
the guest's reply, and every entry carries the host's ``d_off`` as its FUSE
``off``.  ``d_off`` is the filesystem's own cookie for "continue after this
entry" (a hash on ext4, a stable index on tmpfs since 6.6), so offsets stay
valid across calls, after ``seekdir``, and while the directory changes
exactly as they would for a host process: an entry present throughout is
listed once, one created or removed meanwhile may or may not be.  Nothing
is kept between calls: memory per open directory is constant.

``getdents64`` is glibc's wrapper (2.30+), called through ctypes (which
releases the GIL).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from collections.abc import Iterator
from typing import Any, NamedTuple

__all__ = ["MAX_BUFFER", "HostDirent", "read_dirents"]

#: Largest getdents64 buffer one call uses, whatever the guest asks.
MAX_BUFFER = 1 << 16
#: Smallest one: room for any single entry (19 + NAME_MAX + NUL, rounded up).
MIN_BUFFER = 512

_OFF_MAX = (1 << 63) - 1  # loff_t
_HEAD = struct.Struct("<QqHB")  # struct linux_dirent64: d_ino, d_off, d_reclen, d_type
# glibc < 2.30 (or another libc) has no wrapper: READDIR then answers ENOSYS.
_getdents64: Any = getattr(ctypes.CDLL(None, use_errno=True), "getdents64", None)
if _getdents64 is not None:
    _getdents64.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t)
    _getdents64.restype = ctypes.c_ssize_t


class HostDirent(NamedTuple):
    """One entry as the host reported it; ``off`` resumes after it."""

    name: bytes
    ino: int
    dtype: int
    off: int


def _getdents(fd: int, size: int) -> bytes:
    if _getdents64 is None:
        raise OSError(errno.ENOSYS, "getdents64 is not available in this libc")
    buf = ctypes.create_string_buffer(size)
    n: int = _getdents64(fd, buf, size)
    if n < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return buf.raw[:n]


def read_dirents(fd: int, offset: int, size: int) -> Iterator[HostDirent]:
    """The entries of directory ``fd`` after cookie ``offset`` (0: from the start).

    One ``getdents64`` of about ``size`` bytes (at least MIN_BUFFER, at most
    MAX_BUFFER): an empty result means the end of the directory.  The
    caller holds whatever serialises users of ``fd``'s file position.
    ``DT_UNKNOWN`` is resolved with ``fstatat`` (0 if that fails).
    """
    if not 0 <= offset <= _OFF_MAX:
        raise OSError(errno.EINVAL, "directory offset out of range")
    os.lseek(fd, offset, os.SEEK_SET)
    raw = _getdents(fd, min(max(size, MIN_BUFFER), MAX_BUFFER))
    pos = 0
    while pos < len(raw):
        ino, off, reclen, dtype = _HEAD.unpack_from(raw, pos)
        end = raw.index(b"\0", pos + _HEAD.size)
        name = raw[pos + _HEAD.size : end]
        pos += reclen
        if dtype == 0:  # DT_UNKNOWN: the filesystem does not say
            try:
                dtype = stat.S_IFMT(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode) >> 12
            except OSError:
                dtype = 0
        yield HostDirent(name, ino, dtype, off)
