"""System calls Python's ``os`` lacks, and the per-request credential switch.

Everything here goes through ``ctypes`` to glibc, and every wrapper raises
``OSError`` with the real errno.

Credentials (the model; DESIGN.md has it opcode by opcode)
    The guest kernel mounts virtio-fs with ``default_permissions``: it has
    already checked every permission with the caller's *full* group list
    (and capabilities) before it sends a request.  The host cannot repeat
    that check -- the request carries the caller's fsuid and fsgid only, not
    the supplementary groups -- so it does not try: each operation runs with
    the identity that gives the local-filesystem *result* (owners,
    setgid inheritance, setuid/setgid/capability clearing), never a second
    permission check.

    * :func:`creator_credentials` (CREATE, MKNOD, MKDIR, SYMLINK, RENAME
      with RENAME_WHITEOUT): fsuid/fsgid are the caller's, so the host
      kernel gives the new inode the caller's owner, or the directory's
      group and (for a directory) S_ISGID in a setgid directory.  Switching
      the fsuid away from 0 clears the filesystem capabilities; the thread
      then raises CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_MKNOD again
      (``capset``, per thread) so that a directory writable only through a
      supplementary group is not refused.  CAP_FSETID stays off: a new
      non-directory asking for S_ISGID in a setgid directory keeps it only
      when its group is the caller's fsgid or one of ``groups``
      (CVE-2022-0358: root's groups, or a guess, must not count).
    * :func:`killing_credentials` (SETATTR with FATTR_KILL_SUIDGID around
      chown and truncate, OPEN with O_TRUNC and OPEN_KILL_SUIDGID): the
      daemon's own fsuid 0, fsgid the caller's, CAP_FSETID dropped, so the
      host clears setuid, setgid (by the caller's group membership) and
      ``security.capability`` as it would for that caller.
    * :func:`caller_credentials` (WRITE with WRITE_KILL_SUIDGID, in Python
      and in the C fast path): fsuid/fsgid the caller's, no capability
      raised (the file is already open; the fixup drops CAP_FSETID).
    * Everything else (SETATTR, OPEN, LINK, UNLINK, RMDIR, RENAME, xattrs)
      runs as the daemon: root with its capabilities, as the C virtiofsd
      runs SETATTR.  A chown to a supplementary group the guest allowed
      succeeds, and the host kernel's chown clears setuid/setgid as it
      does for any chown of a non-directory.

    Per thread, not per process: glibc's ``setfsuid``/``setfsgid`` are plain
    system calls, unlike ``setuid``/``setgroups``, which glibc broadcasts to
    every thread (the "setxid" signal); the kernel keeps credentials per
    task.  The tests check this by reading ``/proc/thread-self/status`` from
    another thread.  ``setgroups`` therefore goes through ``syscall(2)``
    directly.

    Once per worker thread, the first time it switches, the thread drops its
    supplementary groups (raw ``setgroups(0, NULL)``): root's supplementary
    groups must never count for a caller.  ``groups`` (the host mount knows
    them from ``/proc/<pid>/status``; a virtio guest sends at most the one
    that matters for a creation, FUSE_CREATE_SUPP_GROUP: the parent
    directory's group when the caller is in it but it is not its fsgid)
    are installed for one creation or kill and dropped again.

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
from contextlib import AbstractContextManager, contextmanager

from .. import capabilities

__all__ = [
    "AT_EMPTY_PATH",
    "UTIME_NOW",
    "UTIME_OMIT",
    "caller_credentials",
    "creator_credentials",
    "current_fs_ids",
    "fallocate",
    "fchownat",
    "killing_credentials",
    "renameat2",
    "supplementary_groups",
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
#: What a creating thread raises again after its fsuid switch cleared the
#: filesystem capabilities: the guest has checked directory write/search
#: permission (and CAP_MKNOD) with the caller's full credentials.
_CREATOR_CAPS = (
    1 << capabilities.CAP_NAMES["dac_override"]
    | 1 << capabilities.CAP_NAMES["dac_read_search"]
    | 1 << capabilities.CAP_NAMES["mknod"]
)
#: NGROUPS_MAX: the most supplementary groups a task can have.
_NGROUPS_MAX = 65536
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


def _raw_setgroups(groups: tuple[int, ...]) -> int:
    """Raw ``setgroups`` for this thread only; 0 or the errno."""
    if _SYS_SETGROUPS is None:
        return errno.ENOSYS
    array = (ctypes.c_uint32 * max(len(groups), 1))(*groups)
    ret = _libc.syscall(
        ctypes.c_long(_SYS_SETGROUPS), ctypes.c_long(len(groups)), ctypes.byref(array)
    )
    return 0 if ret == 0 else ctypes.get_errno()


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
        elif (code := _raw_setgroups(())) == 0:
            _thread.groups_dropped = True
        else:
            _warn_once("setgroups", "setgroups(0) failed: %s", os.strerror(code))


def supplementary_groups(pid: int) -> tuple[int, ...] | None:
    """The ``Groups:`` of host process ``pid`` (``/proc/<pid>/status``);
    None when it is gone or unreadable (then no supplementary group counts)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        return None
    return None


@contextmanager
def _thread_groups(groups: tuple[int, ...] | None) -> Iterator[None]:
    """This thread's supplementary groups are ``groups`` for the body (then none)."""
    if not groups or not _thread.groups_dropped:
        yield
        return
    code = _raw_setgroups(groups[:_NGROUPS_MAX])
    if code:
        raise OSError(code, f"setgroups: {os.strerror(code)}")
    try:
        yield
    finally:
        code = _raw_setgroups(())
        if code:  # never leave a caller's groups on a worker thread
            raise OSError(code, f"setgroups(0): {os.strerror(code)}")


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


class _CreatingUmask:
    """umask 0 for the body, when this thread has a umask of its own.

    All a creation needs when the thread already has the caller's fsuid and
    fsgid (guest root on a root daemon, or any caller of a daemon that does
    not switch): no capability changes, so no ``capget``/``capset``."""

    __slots__ = ("_old",)

    def __enter__(self) -> None:
        self._old = os.umask(0) if _thread.private_umask else None

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            os.umask(self._old)


def creator_credentials(
    uid: int, gid: int, groups: tuple[int, ...] | None = None
) -> AbstractContextManager[None]:
    """Create as ``uid``/``gid`` (with ``groups``), umask 0, and the DAC
    capabilities the fsuid switch cleared raised again (root only).

    CAP_FSETID stays dropped (for a non-root caller), so S_ISGID on a new
    file in a setgid directory survives only for a member of its group.
    Guest root (uid 0) keeps every capability, as root does locally.

    Nothing to switch (the thread's fsuid/fsgid are already the caller's,
    no groups to install, or a daemon that is not root): only the umask,
    with no capability system call (every CREATE, MKDIR, MKNOD and SYMLINK
    of guest root takes this path).
    """
    root = switching_enabled()
    _thread_setup(root)
    if not root or (not (groups and _thread.groups_dropped) and (uid, gid) == current_fs_ids()):
        return _CreatingUmask()
    return _switched_creator(uid, gid, groups)


@contextmanager
def _switched_creator(uid: int, gid: int, groups: tuple[int, ...] | None) -> Iterator[None]:
    """:func:`creator_credentials` with a switch to make (a root daemon)."""
    effective = capabilities.current()[0]
    try:
        with _thread_groups(groups), caller_credentials(uid, gid, creating=True):
            if uid != 0:  # the switch cleared the filesystem capabilities
                capabilities.set_effective(capabilities.current()[0] | effective & _CREATOR_CAPS)
            yield
    finally:
        if capabilities.current()[0] != effective:
            capabilities.set_effective(effective)


@contextmanager
def killing_credentials(gid: int, groups: tuple[int, ...] | None = None) -> Iterator[None]:
    """fsgid ``gid`` (with ``groups``) and no CAP_FSETID for the body: the host
    clears setuid/setgid/capabilities as for a caller of that group.  The
    fsuid stays the daemon's; nothing but the kill depends on it."""
    root = switching_enabled()
    _thread_setup(root)
    if not root:
        with without_fsetid():
            yield
        return
    fsuid = current_fs_ids()[0]
    with _thread_groups(groups), caller_credentials(fsuid, gid), without_fsetid():
        yield


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
