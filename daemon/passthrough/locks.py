"""Host-visible guest locks: the lock manager, and fuse_file_lock <-> ``struct flock``.

POSIX record locks of the guest are taken on the host as open file
description (OFD) locks, ``F_OFD_GETLK``/``F_OFD_SETLK``: classic POSIX locks
belong to a *process*, and every guest lock owner would be the daemon.  Each
guest lock owner that holds (or waits for) a lock on an inode gets its own
open file description of it, which gives POSIX semantics between guest
owners and real conflicts with host processes' locks of either kind.  flock
locks are taken on the handle's own fd (one guest open file = one host open
file description, which is flock's granularity).

:class:`LockManager` is the one owner of that state: the owner -> fd maps
(hung on each inode as :class:`InodeLocks`), the condition variable every
lock syscall runs under, the wait loop of SETLKW and the fd budget.

* **Which fds.**  An owner fd is reopened from the request's handle (never
  from the O_PATH inode) with the handle's access mode, read-only under
  ``readonly``; so no lock request ever opens a file in a way its guest open
  did not.  GETLK of an owner that holds nothing here asks through the
  handle's fd (which never carries POSIX locks) and opens nothing.  An
  owner's fd is closed as soon as it holds no lock (its fdinfo lists none:
  after an unlock or a refused attempt), on FLUSH/RELEASE of that owner,
  when its inode dies, and on :meth:`LockManager.reset`.  A cap per inode
  and one in total bound them: past either a new owner gets ENOLCK.
* **Concurrency.**  Every ``fcntl``/``flock`` on a lock fd and every close of
  one happens under the manager's condition variable, so no fd number is
  used after it was closed; the syscalls are non-blocking.  Only the reopen
  runs outside it, and its result is registered (or closed) under it: a
  reset that happened meanwhile is seen and nothing leaks.
* **Waiting (SETLKW).**  The caller's thread blocks until the lock is
  granted, the wait is cancelled (:meth:`LockWait.cancel`: FUSE INTERRUPT ->
  EINTR) or the manager is reset (DESTROY / device reset -> EIO); there is
  no deadline.  A lock released through the daemon wakes every waiter at
  once.  A lock held by a host process gives no event to wait for (Linux has
  no lock-release notification, and a blocking ``F_OFD_SETLKW`` cannot be
  cancelled from Python: PEP 475 retries it on EINTR), so the waiter polls
  with a backoff from 1 ms doubling to 50 ms, reset to 1 ms on every
  daemon-side release.

The kernel encodes a range as ``[start, end]`` with ``end == OFFSET_MAX``
meaning "to end of file"; ``struct flock`` uses ``l_start``/``l_len`` with
``l_len == 0`` for the same.  OFD locks demand ``l_pid == 0``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..fuse.abi import OFFSET_MAX, FileLock

if TYPE_CHECKING:
    from .inodes import FileHandle, Inode

__all__ = [
    "F_RDLCK",
    "F_UNLCK",
    "F_WRLCK",
    "InodeLocks",
    "LockManager",
    "LockWait",
    "from_flock",
    "to_flock",
]

F_RDLCK = fcntl.F_RDLCK
F_WRLCK = fcntl.F_WRLCK
F_UNLCK = fcntl.F_UNLCK

#: ``struct flock`` on x86_64 and arm64: short l_type, short l_whence, 4 bytes
#: of padding, off_t l_start, off_t l_len, pid_t l_pid, 4 bytes of padding.
_FLOCK = struct.Struct("=hhxxxxqqi4x")
assert _FLOCK.size == 32

#: Default caps on owner fds: per inode and for the whole filesystem.
MAX_OWNER_FDS_PER_INODE = 128
MAX_OWNER_FDS = 1024
#: Re-poll of a conflict held outside the daemon: first and longest pause (s).
POLL_MIN = 0.001
POLL_MAX = 0.05

_FLOCK_OPS = {F_RDLCK: fcntl.LOCK_SH, F_WRLCK: fcntl.LOCK_EX, F_UNLCK: fcntl.LOCK_UN}


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def to_flock(lock: FileLock) -> bytes:
    """A guest lock range as a ``struct flock`` for ``F_OFD_*``; EINVAL if malformed."""
    if lock.type not in (F_RDLCK, F_WRLCK, F_UNLCK):
        raise _err(errno.EINVAL)
    if lock.start > OFFSET_MAX or lock.end > OFFSET_MAX or lock.end < lock.start:
        raise _err(errno.EINVAL)
    length = 0 if lock.end == OFFSET_MAX else lock.end - lock.start + 1
    return _FLOCK.pack(lock.type, os.SEEK_SET, lock.start, length, 0)


def from_flock(raw: bytes, pid: int = 0) -> FileLock:
    """What ``F_OFD_GETLK`` returned, as a fuse_file_lock (``pid`` reported as given)."""
    ltype, _whence, start, length, _pid = _FLOCK.unpack(raw)
    if ltype == F_UNLCK:
        return FileLock(0, 0, F_UNLCK, 0)
    end = OFFSET_MAX if length == 0 else start + length - 1
    return FileLock(start, end, ltype, pid)


def read_fdinfo(fd: int) -> bytes:
    """``/proc/self/fdinfo/N`` by path (the filesystem passes one that needs no path)."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        return f.read()


def holds_ofd_locks(fdinfo: bytes) -> bool:
    """Whether the open file description an fdinfo text describes carries an OFD lock.

    fdinfo lists the locks whose owner is that very file description
    (fs/locks.c, ``show_fd_locks``), not other ones of the inode.
    """
    return b" OFDLCK " in fdinfo


class LockWait:
    """The cancellation point of one blocking request (a SETLKW).

    Made by :meth:`LockManager.new_wait`; the session maps the request's
    ``unique`` to it so that FUSE INTERRUPT can :meth:`cancel` it.  Use it in
    a ``with`` block: leaving it unregisters it from the manager.
    """

    __slots__ = ("_manager", "error")

    def __init__(self, manager: LockManager) -> None:
        self._manager = manager
        #: 0 while the wait may go on, else the errno it is answered with.
        self.error = 0

    def cancel(self, code: int = errno.EINTR) -> None:
        """End the wait with ``code`` (the first cancel wins), now or as it starts."""
        self._manager._cancel(self, code)

    def __enter__(self) -> LockWait:
        return self

    def __exit__(self, *exc: object) -> None:
        self._manager._forget_wait(self)


class _OwnerFd:
    __slots__ = ("fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0  # requests using it right now; it is not closed under them


class InodeLocks:
    """The owner fds of one inode (``Inode.plocks``); guarded by the manager's lock."""

    __slots__ = ("_manager", "closed", "owners")

    def __init__(self, manager: LockManager) -> None:
        self._manager = manager
        self.owners: dict[int, _OwnerFd] = {}
        self.closed = False

    def close(self) -> None:
        """Close every owner fd (the inode died); later lock requests get EBADF."""
        self._manager._close_inode(self)


class LockManager:
    """Every host-visible lock of one passthrough filesystem (see the module doc).

    ``reopen(fd, flags)`` turns a handle's fd into a new open file
    description of the same file; ``fdinfo(fd)`` returns its
    ``/proc/self/fdinfo`` text; ``readonly`` makes owner fds read-only
    whatever the handle; ``per_inode`` and ``total`` cap the owner fds.
    """

    def __init__(
        self,
        reopen: Callable[[int, int], int],
        *,
        fdinfo: Callable[[int], bytes] = read_fdinfo,
        readonly: bool = False,
        per_inode: int = MAX_OWNER_FDS_PER_INODE,
        total: int = MAX_OWNER_FDS,
        poll_min: float = POLL_MIN,
        poll_max: float = POLL_MAX,
    ) -> None:
        if per_inode < 1 or total < 1:
            raise ValueError("lock fd caps must be at least 1")
        if not 0 < poll_min <= poll_max:
            raise ValueError("need 0 < poll_min <= poll_max")
        self._reopen = reopen
        self._fdinfo = fdinfo
        self.readonly = readonly
        self.per_inode = per_inode
        self.total = total
        #: Pauses of the re-poll of a conflict held outside the daemon (s).
        self.poll_min = poll_min
        self.poll_max = poll_max
        self._cond = threading.Condition()
        self._inodes: set[InodeLocks] = set()
        self._waits: set[LockWait] = set()
        self._fds = 0  # owner fds open now
        self._blocked = 0  # waits currently sleeping
        self.polls = 0  #: times a wait went to sleep (tests, diagnostics)
        self._releases = 0  # bumped by every release through the daemon
        self.epoch = 0  # bumped by every reset

    # --- observation (tests, diagnostics) ------------------------------------------

    @property
    def owner_fds(self) -> int:
        """Owner fds open now."""
        with self._cond:
            return self._fds

    @property
    def blocked(self) -> int:
        """Waits asleep right now."""
        return self._blocked

    def wait_for(self, predicate: Callable[[LockManager], bool], timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until ``predicate(self)`` holds, re-checked
        whenever a wait goes to sleep or a lock is released; True if it held."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def wait_until_blocked(self, count: int, timeout: float) -> bool:
        """Wait (at most ``timeout`` s) until ``count`` waits are blocked; True if so."""
        return self.wait_for(lambda m: m.blocked >= count, timeout)

    # --- waits ------------------------------------------------------------------

    def new_wait(self) -> LockWait:
        """A cancellation point for one blocking request; a reset cancels it with EIO."""
        wait = LockWait(self)
        with self._cond:
            self._waits.add(wait)
        return wait

    def _cancel(self, wait: LockWait, code: int) -> None:
        with self._cond:
            if not wait.error:
                wait.error = code
            self._cond.notify_all()

    def _forget_wait(self, wait: LockWait) -> None:
        with self._cond:
            self._waits.discard(wait)

    def reset(self) -> None:
        """DESTROY / device reset: every wait ends with EIO, every owner fd is closed."""
        with self._cond:
            self.epoch += 1
            for wait in self._waits:
                if not wait.error:
                    wait.error = errno.EIO
            self._waits.clear()
            for locks in list(self._inodes):
                self._close_inode_locked(locks)
            self._releases += 1
            self._cond.notify_all()

    # --- owner fds (all under self._cond unless said) ------------------------------

    def _inode_locks(self, inode: Inode) -> InodeLocks:
        locks = inode.plocks
        if locks is None:
            locks = inode.plocks = InodeLocks(self)
            self._inodes.add(locks)
        if locks.closed:
            raise _err(errno.EBADF)  # the inode died with its session
        return locks

    def _check_room(self, locks: InodeLocks) -> None:
        if len(locks.owners) >= self.per_inode or self._fds >= self.total:
            raise _err(errno.ENOLCK)

    def _close_owner(self, locks: InodeLocks, owner: int) -> None:
        entry = locks.owners.pop(owner)
        os.close(entry.fd)
        entry.fd = -1
        self._fds -= 1
        self._released()

    def _close_inode(self, locks: InodeLocks) -> None:
        with self._cond:
            self._close_inode_locked(locks)

    def _close_inode_locked(self, locks: InodeLocks) -> None:
        for owner in list(locks.owners):
            self._close_owner(locks, owner)
        locks.closed = True
        self._inodes.discard(locks)

    def _released(self) -> None:
        self._releases += 1
        self._cond.notify_all()

    def _use_owner(
        self, inode: Inode, handle: FileHandle, owner: int
    ) -> tuple[InodeLocks, _OwnerFd]:
        """The owner's fd on ``inode``, opened from ``handle`` if it has none; caller
        does *not* hold the lock.  Pair with :meth:`_unuse_owner`."""
        with self._cond:
            locks = self._inode_locks(inode)
            entry = locks.owners.get(owner)
            if entry is not None:
                entry.users += 1
                return locks, entry
            self._check_room(locks)
        mode = fcntl.fcntl(handle.fd, fcntl.F_GETFL) & os.O_ACCMODE
        fd = self._reopen(handle.fd, os.O_RDONLY if self.readonly else mode)
        try:
            with self._cond:
                locks = self._inode_locks(inode)  # a reset meanwhile: EBADF, fd closed
                entry = locks.owners.get(owner)
                if entry is None:  # else another request of this owner was first
                    self._check_room(locks)
                    entry = locks.owners[owner] = _OwnerFd(fd)
                    self._fds += 1
                    fd = -1
                entry.users += 1
                return locks, entry
        finally:
            if fd >= 0:
                os.close(fd)

    def _unuse_owner(self, locks: InodeLocks, owner: int, entry: _OwnerFd, settle: bool) -> None:
        """Caller holds the lock.  ``settle``: close the fd if it now holds no lock."""
        entry.users -= 1
        if settle and entry.users == 0 and entry.fd >= 0 and locks.owners.get(owner) is entry:
            try:
                held = holds_ofd_locks(self._fdinfo(entry.fd))
            except OSError:  # cannot tell (EMFILE...): keep it, a later settle decides
                return
            if not held:
                self._close_owner(locks, owner)

    @staticmethod
    def _live(entry: _OwnerFd) -> int:
        if entry.fd < 0:
            raise _err(errno.EBADF)  # closed by a reset or the inode's death
        return entry.fd

    # --- operations -----------------------------------------------------------------

    def getlk(self, inode: Inode, handle: FileHandle, owner: int, lock: FileLock) -> FileLock:
        """The first lock that would conflict with ``lock`` for ``owner`` (F_UNLCK: none).

        Its pid is reported as 0: OFD locks have no process, and a host pid
        means nothing in the guest.
        """
        raw = to_flock(lock)
        with self._cond:
            locks = self._inode_locks(inode)
            entry = locks.owners.get(owner)
            # An owner without an fd holds nothing here: every lock conflicts,
            # and the handle's fd (which never carries POSIX locks) can ask.
            fd = handle.fd if entry is None else self._live(entry)
            out = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, raw)
        return from_flock(out)

    def setlk(
        self, inode: Inode, handle: FileHandle, owner: int, lock: FileLock, wait: LockWait | None
    ) -> None:
        """POSIX SETLK (``wait`` None: EAGAIN on conflict) or SETLKW (block on ``wait``)."""
        raw = to_flock(lock)
        if lock.type == F_UNLCK:
            with self._cond:
                locks = self._inode_locks(inode)
                entry = locks.owners.get(owner)
                if entry is None:
                    return  # holds nothing here: nothing to unlock, nothing to open
                entry.users += 1
                try:
                    fcntl.fcntl(self._live(entry), fcntl.F_OFD_SETLK, raw)
                    self._released()
                finally:
                    self._unuse_owner(locks, owner, entry, settle=True)
            return
        locks, entry = self._use_owner(inode, handle, owner)
        granted = False
        with self._cond:
            try:
                self._attempt(lambda: fcntl.fcntl(self._live(entry), fcntl.F_OFD_SETLK, raw), wait)
                granted = True
            finally:
                # Granted: the fd holds a lock, no need to look.  Refused: it holds
                # what it held before, which is nothing if it was opened for this.
                self._unuse_owner(locks, owner, entry, settle=not granted)

    def flock(self, handle: FileHandle, ltype: int, wait: LockWait | None) -> None:
        """BSD flock on the handle's own open file description."""
        try:
            op = _FLOCK_OPS[ltype]
        except KeyError:
            raise _err(errno.EINVAL) from None
        with self._cond:
            if op == fcntl.LOCK_UN:
                fcntl.flock(handle.fd, op)
                self._released()
                return
            self._attempt(lambda: fcntl.flock(handle.fd, op | fcntl.LOCK_NB), wait)

    def drop_owner(self, inode: Inode, owner: int) -> None:
        """close(2) by ``owner`` (FLUSH, RELEASE_FLUSH): every POSIX lock it held goes."""
        with self._cond:
            locks = inode.plocks
            if locks is None or locks.closed:
                return
            entry = locks.owners.get(owner)
            if entry is None:
                return
            if entry.users:
                # A request of that owner is using the fd (a wait): unlock the
                # whole file instead; the fd goes when that request ends.
                everything = to_flock(FileLock(0, OFFSET_MAX, F_UNLCK, 0))
                fcntl.fcntl(entry.fd, fcntl.F_OFD_SETLK, everything)
                self._released()
            else:
                self._close_owner(locks, owner)

    def flock_released(self) -> None:
        """A flock lock went with a handle (RELEASE_FLOCK_UNLOCK): wake the waiters."""
        with self._cond:
            self._released()

    # --- the wait loop ----------------------------------------------------------------

    def _attempt(self, attempt: Callable[[], object], wait: LockWait | None) -> None:
        """Run ``attempt`` until it does not conflict; caller holds the lock.

        Without ``wait`` a conflict is EAGAIN at once.  With it: sleep until a
        release through the daemon (then retry at once) or the poll pause
        (then retry, pausing twice as long next time), until granted or the
        wait is cancelled.
        """
        pause = self.poll_min
        while True:
            if wait is not None and wait.error:
                raise _err(wait.error)
            try:
                attempt()
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if wait is None:
                    raise _err(errno.EAGAIN) from exc
            assert wait is not None
            seen = self._releases
            deadline = time.monotonic() + pause
            self._blocked += 1
            self.polls += 1
            self._cond.notify_all()  # for wait_for
            try:
                while not wait.error and self._releases == seen:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                self._blocked -= 1
            # A release through the daemon: retry at once; else back off.
            pause = self.poll_min if self._releases != seen else min(pause * 2, self.poll_max)
