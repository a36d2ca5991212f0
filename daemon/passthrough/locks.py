"""fuse_file_lock <-> the host's ``struct flock``, for OFD locks.

POSIX record locks of the guest are taken on the host as open file
description (OFD) locks, ``F_OFD_GETLK``/``F_OFD_SETLK``: classic POSIX locks
belong to a *process*, and every guest lock owner would be the daemon.  Each
guest lock owner gets its own open file description of the inode (see
:class:`~.inodes.Inode`), which gives POSIX semantics between guest owners
and real conflicts with host processes' locks of either kind.

The kernel encodes a range as ``[start, end]`` with ``end == OFFSET_MAX``
meaning "to end of file"; ``struct flock`` uses ``l_start``/``l_len`` with
``l_len == 0`` for the same.  OFD locks demand ``l_pid == 0``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..fuse.abi import OFFSET_MAX, FileLock

__all__ = ["F_RDLCK", "F_UNLCK", "F_WRLCK", "from_flock", "to_flock"]

F_RDLCK = fcntl.F_RDLCK
F_WRLCK = fcntl.F_WRLCK
F_UNLCK = fcntl.F_UNLCK

#: ``struct flock`` on x86_64 and arm64: short l_type, short l_whence, 4 bytes
#: of padding, off_t l_start, off_t l_len, pid_t l_pid, 4 bytes of padding.
_FLOCK = struct.Struct("=hhxxxxqqi4x")
assert _FLOCK.size == 32


def to_flock(lock: FileLock) -> bytes:
    """A guest lock range as a ``struct flock`` for ``F_OFD_*``; EINVAL if malformed."""
    if lock.type not in (F_RDLCK, F_WRLCK, F_UNLCK):
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    if lock.start > OFFSET_MAX or lock.end > OFFSET_MAX or lock.end < lock.start:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    length = 0 if lock.end == OFFSET_MAX else lock.end - lock.start + 1
    return _FLOCK.pack(lock.type, os.SEEK_SET, lock.start, length, 0)


def from_flock(raw: bytes, pid: int = 0) -> FileLock:
    """What ``F_OFD_GETLK`` returned, as a fuse_file_lock (``pid`` reported as given)."""
    ltype, _whence, start, length, _pid = _FLOCK.unpack(raw)
    if ltype == F_UNLCK:
        return FileLock(0, 0, F_UNLCK, 0)
    end = OFFSET_MAX if length == 0 else start + length - 1
    return FileLock(start, end, ltype, pid)
