"""System calls Python's ``os`` lacks, and the per-request credential switch.

Everything here goes through ``ctypes`` to glibc, and every wrapper raises
``OSError`` with the real errno.

Credentials (:func:`caller_credentials`)
    The daemon runs as root.  An operation that creates a file or checks
    permissions runs with the caller's uid/gid from ``fuse_in_header`` as the
    thread's *filesystem* uid/gid (``setfsuid``/``setfsgid``), so the host
    kernel applies its own rules: DAC checks, sticky directories,
    ``protected_hardlinks``, setgid directories, and new files owned by the
    caller.  Changing the fsuid from 0 to non-zero also clears the
    filesystem capabilities (CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID,
    CAP_CHOWN, CAP_MKNOD, ...) from the thread's effective set, and switching
    back restores them (capabilities(7)).

    Per thread, not per process: glibc's ``setfsuid``/``setfsgid`` are plain
    system calls, unlike ``setuid``/``setgroups``, which glibc broadcasts to
    every thread (the "setxid" signal); the kernel keeps credentials per
    task.  The tests check this by reading ``/proc/thread-self/status`` from
    another thread.  ``setgroups`` therefore goes through ``syscall(2)``
    directly.

    Once per worker thread, the first time it switches, the thread drops its
    supplementary groups (raw ``setgroups(0, NULL)``): the request carries
    only the primary gid, and root's supplementary groups must not count for
    the caller (CVE-2022-0358: virtiofsd kept them, and a file created in a
    setgid directory kept a setgid bit its creator had no right to).  The
    limit this leaves: a caller's own supplementary groups are unknown, so a
    file writable only through one of them is refused on the host although
    the guest allowed it (the same limit virtiofsd had before
    FUSE_CREATE_SUPP_GROUP).

    When the daemon is not root (euid != 0) nothing is switched: files are
    created as the daemon's user and permission checks are the daemon's.

Umask
    FUSE_DONT_MASK is not negotiated, so the guest kernel has already applied
    the caller's umask to the mode it sends.  The host must not mask again:
    each worker thread unshares its ``fs_struct`` (``unshare(CLONE_FS)``,
    allowed in a threaded process) so that ``umask(0)`` around a creation
    affects that thread only.

Killing setuid/setgid (:func:`without_fsetid`)
    The host kernel clears S_ISUID/S_ISGID (and ``security.capability``) on
    write and truncate only when the writer lacks CAP_FSETID.  The daemon has
    it, so when the guest asks for the kill (HANDLE_KILLPRIV_V2:
    FUSE_WRITE_KILL_SUIDGID, FATTR_KILL_SUIDGID, FUSE_OPEN_KILL_SUIDGID) the
    thread drops CAP_FSETID from its effective set for the one system call
    (``capset`` is per thread) and the host's own rules do the rest, exactly
    as on a local filesystem (S_ISGID only goes when group-execute is set).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .. import capabilities

__all__ = [
    "AT_EMPTY_PATH",
    "UTIME_NOW",
    "UTIME_OMIT",
    "caller_credentials",
    "current_fs_ids",
    "fallocate",
    "fchownat",
    "renameat2",
    "switching_enabled",
    "syncfs",
    "utimensat",
    "without_fsetid",
]

logger = logging.getLogger("pyvirtiofsd.passthrough")

_libc = ctypes.CDLL(None, use_errno=True)

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
_CLONE_FS = 0x200
_CAP_FSETID = capabilities.CAP_NAMES["fsetid"]
#: ``__NR_setgroups`` (the raw, per-thread system call).
_SYS_SETGROUPS = {"x86_64": 116, "aarch64": 159}.get(platform.machine())
_NO_ID = 0xFFFF_FFFF  # (uid_t)-1: "leave unchanged" / an invalid id


def _check(ret: int) -> int:
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return ret


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syncfs.argtypes = [ctypes.c_int]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
_libc.futimens.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.fchownat.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint32,
    ctypes.c_uint32,
    ctypes.c_int,
]
_libc.setfsuid.argtypes = [ctypes.c_uint32]
_libc.setfsgid.argtypes = [ctypes.c_uint32]
_libc.unshare.argtypes = [ctypes.c_int]


# --- plain wrappers -----------------------------------------------------------


def renameat2(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddir, old, newdir, new, flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate(fd, mode, offset, length))


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(fd))


def utimensat(
    dir_fd: int, path: bytes | None, atime: tuple[int, int], mtime: tuple[int, int], flags: int
) -> None:
    """``utimensat(2)``; each time is ``(sec, nsec)``, nsec may be UTIME_NOW/OMIT.

    ``path`` None: the file ``dir_fd`` is open on (``futimens``).
    """
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if path is None:  # glibc's utimensat refuses a NULL path; futimens is that call
        _check(_libc.futimens(dir_fd, ctypes.byref(times)))
    else:
        _check(_libc.utimensat(dir_fd, path, ctypes.byref(times), flags))


def fchownat(dir_fd: int, path: bytes, uid: int, gid: int, flags: int) -> None:
    """``fchownat(2)``; -1 leaves an id unchanged."""
    _check(_libc.fchownat(dir_fd, path, uid & _NO_ID, gid & _NO_ID, flags))


# --- credentials ----------------------------------------------------------------


def switching_enabled() -> bool:
    """Credentials are switched only when the daemon runs as root."""
    return os.geteuid() == 0


def current_fs_ids() -> tuple[int, int]:
    """This thread's (fsuid, fsgid); an invalid id changes nothing and returns the current."""
    return _libc.setfsuid(_NO_ID) & _NO_ID, _libc.setfsgid(_NO_ID) & _NO_ID


class _ThreadState(threading.local):
    """Once-per-thread set-up: own fs_struct (umask), no supplementary groups."""

    def __init__(self) -> None:
        self.private_umask = False
        self.groups_dropped = False
        self.ready = False


_thread = _ThreadState()
_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message, *args)


def _thread_setup(root: bool) -> None:
    if _thread.ready:
        return
    _thread.ready = True
    if _libc.unshare(_CLONE_FS) == 0:
        _thread.private_umask = True
    else:
        code = ctypes.get_errno()
        _warn_once("unshare", "unshare(CLONE_FS): %s; new files get the host umask too", code)
    if root:
        if _SYS_SETGROUPS is None:
            _warn_once("setgroups", "no setgroups syscall number for %s", platform.machine())
        elif (
            _libc.syscall(ctypes.c_long(_SYS_SETGROUPS), ctypes.c_long(0), ctypes.c_void_p(None))
            == 0
        ):
            _thread.groups_dropped = True
        else:
            code = ctypes.get_errno()
            _warn_once("setgroups", "setgroups(0) failed: %s", os.strerror(code))


def _set_fs_id(setter: str, value: int) -> int:
    fn = getattr(_libc, setter)
    previous: int = fn(value) & _NO_ID
    if fn(_NO_ID) & _NO_ID != value:
        raise OSError(errno.EPERM, f"{setter}({value}) did not take effect")
    return previous


@contextmanager
def caller_credentials(uid: int, gid: int, *, creating: bool = False) -> Iterator[None]:
    """Run the body as fsuid ``uid``/fsgid ``gid`` (root only) and, if
    ``creating``, with umask 0 for this thread."""
    root = switching_enabled()
    _thread_setup(root)
    switch = root and (uid, gid) != current_fs_ids()
    old_gid = old_uid = -1
    old_umask: int | None = None
    try:
        if switch:
            old_gid = _set_fs_id("setfsgid", gid)
            old_uid = _set_fs_id("setfsuid", uid)
        if creating and _thread.private_umask:
            old_umask = os.umask(0)
        yield
    finally:
        if old_umask is not None:
            os.umask(old_umask)
        if old_uid >= 0:
            _set_fs_id("setfsuid", old_uid)
        if old_gid >= 0:
            _set_fs_id("setfsgid", old_gid)


@contextmanager
def without_fsetid() -> Iterator[None]:
    """Drop CAP_FSETID from this thread's effective set for the body."""
    bit = 1 << _CAP_FSETID
    effective = capabilities.current()[0]
    if not effective & bit:
        yield
        return
    capabilities.set_effective(effective & ~bit)
    try:
        yield
    finally:
        capabilities.set_effective(capabilities.current()[0] | bit)
