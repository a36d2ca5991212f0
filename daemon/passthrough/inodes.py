"""The inode and handle tables of the passthrough filesystem.

Every object the guest can name is held by an open file descriptor, never by
a path: inodes by an ``O_PATH | O_NOFOLLOW`` fd, open files and directories
by a real fd reopened from it.  Both tables are shared by the worker threads
of all request queues, so every mutation happens under the table's lock.

Closing an fd while another thread still uses it would let the number be
reused by an unrelated ``open`` and the late user would act on the wrong
file.  So users *borrow* an entry (:meth:`InodeTable.borrow`,
:meth:`HandleTable.borrow`); FORGET / RELEASE only mark an entry dead, and its
fd is closed by whoever drops the last borrow (or at once if nobody holds it).

Node IDs come from a counter that is never reset, not even by DESTROY, so a
node ID is never reused and the generation number can stay 0 ("nodeid:gen
must be unique for the fs's lifetime", fuse.h).

The fd budget (``--inode-file-handles prefer|mandatory``): an inode whose
file handle could be made (:mod:`.filehandles`) keeps its O_PATH fd only
while it is among the ``max_fds`` most recently used; past that the least
recently used unborrowed one is *evicted* (its fd closed, or retired from
the C fast path's mirror, which hands back its unsettled lookups), and the
next borrow reopens it by handle.  The root and inodes without a handle
always keep their fds.  A borrowed inode is never evicted, so ``inode.fd``
is valid for the whole borrow.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from ..fuse.abi import ROOT_ID

if TYPE_CHECKING:
    from .filehandles import FileHandles
    from .locks import InodeLocks

__all__ = ["DirHandle", "FileHandle", "Handle", "HandleTable", "Inode", "InodeTable"]

InodeKey = tuple[int, int]  # (st_dev, st_ino)
_log = logging.getLogger("pyvirtiofsd.passthrough")


class FdMirror(Protocol):
    """Where the tables publish their fds for the C fast path (:class:`~pyvirtiofsd.dma.FastPath`).

    A published fd is closed by the mirror: the entry retires it instead of
    closing it.  ``retire_*`` returns False when the key was not published
    (the caller then still owns the fd).  LOOKUPs of known inodes answered
    in place are counted by the mirror as *credits*; the table folds them
    into ``nlookup`` (``settle``) whenever it decides about an inode's life.
    """

    def publish_inode(self, nodeid: int, fd: int, dev: int, ino: int) -> None: ...

    def retire_inode(self, nodeid: int) -> bool: ...

    def evict_inode(self, nodeid: int) -> int | None: ...

    def settle(self, nodeid: int, count: int, forget: int, *, keep: bool = False) -> int | None: ...

    def credits(self, nodeid: int) -> int: ...

    def publish_handle(self, fh: int, fd: int, *, directory: bool) -> None: ...

    def retire_handle(self, fh: int) -> bool: ...


class _Pinned:
    """An fd-holding entry: closed once it is dead and no longer borrowed.

    ``_retire`` is set when the entry's fd was published to the C fast
    path's mirror (:class:`~pyvirtiofsd.dma.FastPath`): the mirror closes a
    published fd, so the entry retires it there instead of closing it.
    """

    __slots__ = ("_dead", "_pins", "_retire", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pins = 0
        self._dead = False
        self._retire: Callable[[], bool] | None = None

    def close_fds(self) -> None:
        """Close every fd the entry owns (once it is dead and unborrowed)."""
        self._release_fd()

    def _release_fd(self) -> None:
        retire, self._retire = self._retire, None
        if (retire is None or not retire()) and self.fd >= 0:
            _close(self.fd)


def _close(fd: int) -> None:
    # EBADF here would be our bug, EINTR is harmless: neither may stop a worker.
    with contextlib.suppress(OSError):
        os.close(fd)


_P = TypeVar("_P", bound=_Pinned)


class _PinnedTable(Generic[_P]):
    """Shared locking and borrow/kill logic of both tables."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[int, _P] = {}
        self._mirror: FdMirror | None = None

    def attach_mirror(self, mirror: FdMirror) -> None:
        """Publish every entry to ``mirror``, now and from now on."""
        with self._lock:
            self._mirror = mirror
            for key, entry in self._entries.items():
                if entry._retire is None:
                    self._publish_locked(key, entry)

    def _publish_locked(self, key: int, entry: _P) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @contextmanager
    def _borrow(self, key: int, missing: int) -> Iterator[_P]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise OSError(missing, os.strerror(missing))
            entry._pins += 1
            self._used_locked(key, entry)
        try:
            yield entry
        finally:
            with self._lock:
                entry._pins -= 1
                close = entry._dead and entry._pins == 0
            if close:
                entry.close_fds()

    def _used_locked(self, key: int, entry: _P) -> None:
        """A borrow of ``entry`` began (lock held)."""

    def _kill_locked(self, entry: _P) -> bool:
        """Mark dead (caller holds the lock, entry already unlinked); True: close now."""
        entry._dead = True
        return entry._pins == 0


class Inode(_Pinned):
    """One host inode known to the guest.

    ``plocks``: the lock owners' fds on this inode (one open file
    description per guest lock owner, see :mod:`.locks`), made and guarded
    by the filesystem's :class:`~.locks.LockManager`; None until a lock
    request needs one.  The inode only closes it when it dies.
    """

    __slots__ = ("handle", "key", "mode", "nlookup", "nodeid", "plocks")

    def __init__(
        self,
        nodeid: int,
        fd: int,
        key: InodeKey,
        mode: int,
        handle: tuple[int, bytes] | None = None,
    ) -> None:
        super().__init__(fd)
        self.nodeid = nodeid
        self.key = key
        self.mode = mode  # file type bits (st_mode & S_IFMT); fixed for an inode's life
        self.nlookup = 0
        self.plocks: InodeLocks | None = None
        #: (mount id, file handle): the fd may be evicted and reopened (-1 meanwhile)
        self.handle = handle

    def close_fds(self) -> None:
        if self.plocks is not None:
            self.plocks.close()
        self._release_fd()


class InodeTable(_PinnedTable[Inode]):
    """Node IDs -> :class:`Inode`, deduplicated by ``(st_dev, st_ino)``.

    ``handles``: make file handles of new inodes, so that at most
    ``max_fds`` of them hold an fd at once (see the module docstring);
    None: every inode holds its fd (``--inode-file-handles never``).
    """

    def __init__(
        self,
        root_fd: int,
        root_stat: os.stat_result,
        *,
        handles: FileHandles | None = None,
        max_fds: int = 0,
    ) -> None:
        super().__init__()
        if handles is not None and max_fds < 1:
            raise ValueError("max_fds must be at least 1 with file handles")
        self._handles = handles
        self.max_fds = max_fds
        #: evictable inodes holding an fd, least recently used first
        self._cached: OrderedDict[int, Inode] = OrderedDict()
        self.evictions = 0
        self.reopens = 0
        self._by_key: dict[InodeKey, Inode] = {}
        self._ids = itertools.count(ROOT_ID + 1)
        self.root = Inode(ROOT_ID, root_fd, (root_stat.st_dev, root_stat.st_ino), 0)
        self.root.mode = root_stat.st_mode & 0o170000
        self.root.nlookup = 1
        self._entries[ROOT_ID] = self.root
        self._by_key[self.root.key] = self.root

    def borrow(self, nodeid: int) -> AbstractContextManager[Inode]:
        """Pin ``nodeid`` for the duration of a ``with``; EBADF if unknown.

        An evicted inode is reopened by its handle first (ESTALE if it is
        gone from the host, EMFILE/ENFILE if no fd can be had even after
        shedding the cache).
        """
        if self._handles is None:
            return self._borrow(nodeid, errno.EBADF)
        return self._borrow_open(nodeid)

    @contextmanager
    def _borrow_open(self, nodeid: int) -> Iterator[Inode]:
        with self._borrow(nodeid, errno.EBADF) as inode:
            if inode.fd < 0:
                self._reopen(inode)
            yield inode

    def _reopen(self, inode: Inode) -> None:
        """Give the pinned, evicted ``inode`` an fd again (by its handle)."""
        assert self._handles is not None and inode.handle is not None
        mount_id, handle = inode.handle
        fd = self.retry_fds(lambda: self._handles.open(mount_id, handle))  # type: ignore[union-attr]
        with self._lock:
            if inode.fd < 0 and not inode._dead:
                inode.fd, fd = fd, -1
                self.reopens += 1
                self._cache_locked(inode)
        if fd >= 0:  # another borrower was first, or the inode died meanwhile
            _close(fd)

    def retry_fds(self, open_fd: Callable[[], int]) -> int:
        """``open_fd()``; on EMFILE/ENFILE shed cached inode fds and try once more."""
        try:
            return open_fd()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not self.shed():
                raise
        return open_fd()

    def shed(self) -> int:
        """Evict an eighth of the cached inode fds (at least one); how many went.

        For a process out of fds (EMFILE/ENFILE): the callers retry their open.
        """
        with self._lock:
            return self._evict_locked(len(self._cached) - max(1, len(self._cached) // 8))

    def _used_locked(self, key: int, entry: Inode) -> None:
        if key in self._cached:
            self._cached.move_to_end(key)

    def _cache_locked(self, inode: Inode) -> None:
        """``inode`` got an fd (lock held): publish it, count it, keep the budget."""
        if self._mirror is not None and inode._retire is None:
            self._publish_locked(inode.nodeid, inode)
        if inode.handle is None or inode is self.root:
            return
        self._cached[inode.nodeid] = inode
        if len(self._cached) > self.max_fds:
            self._evict_locked(self.max_fds)

    def _evict_locked(self, keep: int) -> int:
        """Close the fds of the least recently used unborrowed inodes until
        ``keep`` hold one (lock held); returns how many were evicted."""
        victims = []
        excess = len(self._cached) - keep
        for inode in self._cached.values():
            if excess <= 0:
                break
            if inode._pins == 0:
                victims.append(inode)
                excess -= 1
        for inode in victims:
            del self._cached[inode.nodeid]
            retire, inode._retire = inode._retire, None
            credits = None
            if retire is not None and self._mirror is not None:
                # The mirror closes the fd once no C request uses it; the
                # lookups it answered in place become Python's.
                credits = self._mirror.evict_inode(inode.nodeid)
            if credits is None:
                _close(inode.fd)
            else:
                inode.nlookup += credits
            inode.fd = -1
        self.evictions += len(victims)
        return len(victims)

    def fds(self) -> int:
        """Inode fds held now (root included; fds the mirror still closes are not)."""
        with self._lock:
            return sum(1 for i in self._entries.values() if i.fd >= 0)

    def _publish_locked(self, key: int, entry: Inode) -> None:
        mirror = self._mirror
        if mirror is None or entry.fd < 0:
            return
        try:
            mirror.publish_inode(key, entry.fd, entry.key[0], entry.key[1])
        except (OSError, MemoryError, ValueError) as exc:  # stays Python's: served there
            _log.warning("inode %d not published to the fast path: %s", key, exc)
            return
        entry._retire = partial(mirror.retire_inode, key)

    def add_lookup(self, fd: int, st: os.stat_result) -> Inode:
        """Count one lookup of the inode ``fd`` refers to; the table owns ``fd`` after.

        If the inode is already known, ``fd`` is closed and the existing entry
        (and node ID) is reused, so two names of one file share one node.
        An evicted entry holds nothing that keeps its host inode alive, so
        its inode number may since belong to a newer file: the handles
        (which carry the generation) tell, and a newer file gets a node of
        its own (the old node's reopen then answers ESTALE).
        """
        key = (st.st_dev, st.st_ino)
        handle = None
        with self._lock:
            inode = self._by_key.get(key)
            if self._handles is not None and (inode is None or inode.fd < 0):
                try:  # no I/O: the kernel encodes what the fd holds
                    handle = self._handles.make(fd, directory=stat.S_ISDIR(st.st_mode))
                except OSError:  # mandatory: no inode without a handle
                    _close(fd)
                    raise
                if inode is not None and (handle is None or inode.handle != handle):
                    del self._by_key[key]  # a newer inode with a reused number
                    inode = None
            if inode is None:
                inode = Inode(next(self._ids), fd, key, st.st_mode & 0o170000, handle)
                self._entries[inode.nodeid] = inode
                self._by_key[key] = inode
                fd = -1
                self._cache_locked(inode)
            elif inode.fd < 0:  # evicted: this fd is as good as a reopen
                inode.fd, fd = fd, -1
                self._cache_locked(inode)
            elif inode.nodeid in self._cached:
                self._cached.move_to_end(inode.nodeid)
            inode.nlookup += 1
        if fd >= 0:
            _close(fd)
        return inode

    def forget(self, nodeid: int, nlookup: int) -> None:
        """Drop ``nlookup`` references; at zero the inode is freed (never the root)."""
        with self._lock:
            inode = self._entries.get(nodeid)
            if inode is None:
                return
            settled = None
            if inode._retire is not None and self._mirror is not None:
                # Lookups the fast path answered count too; at 0 the mirror
                # has already hidden the inode, so none can be added now.
                settled = self._mirror.settle(
                    nodeid, inode.nlookup, nlookup, keep=inode is self.root
                )
            inode.nlookup = max(inode.nlookup - nlookup, 0) if settled is None else settled
            if inode.nlookup or inode is self.root:
                return
            del self._entries[nodeid]
            if self._by_key.get(inode.key) is inode:  # else a newer inode took the number
                del self._by_key[inode.key]
            self._cached.pop(nodeid, None)
            close = self._kill_locked(inode)
        if close:
            inode.close_fds()

    def nlookup(self, nodeid: int) -> int:
        """Current lookup count of ``nodeid`` (0 if unknown); for tests and debugging."""
        with self._lock:
            inode = self._entries.get(nodeid)
            if inode is None:
                return 0
            credits = 0
            if inode._retire is not None and self._mirror is not None:
                credits = self._mirror.credits(nodeid)
            return inode.nlookup + credits

    def clear(self) -> None:
        """Forget everything but the root (DESTROY)."""
        to_close: list[Inode] = []
        with self._lock:
            for inode in self._entries.values():
                if inode is not self.root and self._kill_locked(inode):
                    to_close.append(inode)
            self._entries = {ROOT_ID: self.root}
            self._by_key = {self.root.key: self.root}
            self._cached.clear()
            self.root.nlookup = 1
        for inode in to_close:
            inode.close_fds()

    def close_root(self) -> None:
        """Close everything including the root; the table is unusable after."""
        self.clear()
        with self._lock:
            self._entries.clear()
            self._by_key.clear()
            close = self._kill_locked(self.root)
        if close:
            self.root.close_fds()
        if self._handles is not None:
            self._handles.close()


class Handle(_Pinned):
    """An open file or directory (the guest's ``fh``)."""

    __slots__ = ("nodeid",)

    def __init__(self, fd: int, nodeid: int) -> None:
        super().__init__(fd)
        self.nodeid = nodeid


class FileHandle(Handle):
    __slots__ = ()


class DirHandle(Handle):
    """An open directory, read by READDIR straight from its fd.

    Nothing but a lock is kept per handle: READDIR streams from the fd with
    the host's own resume cookies (see :mod:`.dirents`), so memory does not
    grow with the directory.  ``lock`` serialises the READDIRs of one handle
    (they move the fd's position).  ``on_close`` runs once the fd is closed
    (the filesystem's count of open directories).
    """

    __slots__ = ("_on_close", "lock")

    def __init__(self, fd: int, nodeid: int, on_close: Callable[[], None] | None = None) -> None:
        super().__init__(fd, nodeid)
        self.lock = threading.Lock()
        self._on_close = on_close

    def close_fds(self) -> None:
        try:
            super().close_fds()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


Handle_T = TypeVar("Handle_T", bound=Handle)


class HandleTable(_PinnedTable[Handle]):
    """``fh`` -> :class:`Handle`."""

    def __init__(self) -> None:
        super().__init__()
        self._ids = itertools.count(1)

    def add(self, handle: Handle) -> int:
        with self._lock:
            fh = next(self._ids)
            self._entries[fh] = handle
            self._publish_locked(fh, handle)
        return fh

    def _publish_locked(self, key: int, entry: Handle) -> None:
        mirror = self._mirror
        if mirror is None:
            return
        try:
            mirror.publish_handle(key, entry.fd, directory=isinstance(entry, DirHandle))
        except (OSError, MemoryError, ValueError) as exc:
            _log.warning("handle %d not published to the fast path: %s", key, exc)
            return
        entry._retire = partial(mirror.retire_handle, key)

    @contextmanager
    def borrow(self, fh: int, kind: type[Handle_T]) -> Iterator[Handle_T]:
        """Pin handle ``fh``, which must be a ``kind``; EBADF otherwise."""
        with self._borrow(fh, errno.EBADF) as handle:
            if not isinstance(handle, kind):
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            yield handle

    def release(self, fh: int) -> None:
        with self._lock:
            handle = self._entries.pop(fh, None)
            close = handle is not None and self._kill_locked(handle)
        if handle is not None and close:
            handle.close_fds()

    def clear(self) -> None:
        with self._lock:
            handles = list(self._entries.values())
            self._entries.clear()
            to_close = [h for h in handles if self._kill_locked(h)]
        for handle in to_close:
            handle.close_fds()
