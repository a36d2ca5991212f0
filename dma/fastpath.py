"""The FUSE fast path's side of the C core: the table mirror and the slow queue.

:class:`FastPath` is the mirror of the passthrough filesystem's inode and
handle tables that the queue runners (:meth:`VirtQueue.run`) read to serve
GETATTR, READ, WRITE, LOOKUP of a known inode, READDIR, READDIRPLUS of known
inodes, UNLINK and RMDIR entirely in C.  The protocol, in full:

* Python owns the tables.  When it creates an entry it *publishes* it
  (:meth:`FastPath.publish_inode`, :meth:`FastPath.publish_handle`); from then
  on the mirror, not Python, closes that fd.
* Where Python would close the fd (its entry is dead and no longer
  borrowed) it *retires* the entry instead (:meth:`FastPath.retire_inode`,
  :meth:`FastPath.retire_handle`); the mirror closes the fd at once, or when
  the last in-place request using it is done.
* To keep the daemon's fds under a budget Python may *evict* a live
  inode's fd (:meth:`FastPath.evict_inode`): a retire that also hands back
  the inode's unsettled in-place lookups.  The inode stays Python's; a later
  request for it misses here, and Python reopens it (by file handle) and
  publishes it again under the same node ID.
* Requests are served in place only while the session is :attr:`ready`
  (after INIT, until DESTROY or reset); settings are fixed at
  :meth:`FastPath.configure`.

:class:`SlowQueue` holds the chains the fast path did not answer until a
Python worker takes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from ._core import ffi, lib  # type: ignore[import-not-found, unused-ignore]
from .memory import strerror
from .virtqueue import Chain, VirtQueue

__all__ = ["FastPath", "FastPathStats", "SlowQueue"]


class FastPathStats(NamedTuple):
    inodes: int
    handles: int
    getattr: int
    read: int
    write: int
    lookup: int
    readdirplus: int
    unlink: int  #: UNLINK and RMDIR
    readdir: int
    busy_now: int
    busy_max: int


def _u64(name: str, value: int) -> int:
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{name} out of range: {value}")
    return value


class FastPath:
    """The mirror one FUSE session's queue runners read (see the module docstring)."""

    def __init__(self) -> None:
        ptr = lib.pvd_fs_new()
        if ptr == ffi.NULL:
            raise MemoryError("cannot create the fast-path mirror")
        self._fs: Any = ffi.gc(ptr, lib.pvd_fs_free)
        self._ready = False

    def _c_handle(self) -> Any:
        return self._fs

    def configure(
        self,
        *,
        attr_valid: tuple[int, int],
        entry_valid: tuple[int, int],
        readonly: bool,
        switch_creds: bool,
        announce_submounts: bool,
        python_writes: bool = False,
    ) -> None:
        """Settings the in-place handlers apply (timeouts as (sec, nsec)).

        ``python_writes``: leave every WRITE to Python (it must also drop a
        remapped ``security.capability``, which C does not know of)."""
        st = ffi.new("struct pvd_fs_settings *")
        st.attr_valid = _u64("attr_valid", attr_valid[0])
        st.attr_valid_nsec = attr_valid[1]
        st.entry_valid = _u64("entry_valid", entry_valid[0])
        st.entry_valid_nsec = entry_valid[1]
        st.readonly = int(readonly)
        st.switch_creds = int(switch_creds)
        st.announce_submounts = int(announce_submounts)
        st.python_writes = int(python_writes)
        lib.pvd_fs_configure(self._fs, st)

    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = bool(value)
        lib.pvd_fs_set_ready(self._fs, int(value))

    @staticmethod
    def _published(rc: int, key: int) -> None:
        if rc == lib.PVD_E_NOMEM:
            raise MemoryError(f"publish {key}: {strerror(rc)}")
        if rc:  # a duplicate key or a bad fd: the caller's bug
            raise ValueError(f"publish {key}: {strerror(rc)}")

    def _retire(self, table: int, key: int) -> bool:
        return bool(lib.pvd_fs_retire(self._fs, table, _u64("key", key)) == 0)

    def publish_inode(self, nodeid: int, fd: int, dev: int, ino: int) -> None:
        """``nodeid``'s O_PATH fd and host identity; the mirror closes the fd from now on."""
        rc = lib.pvd_fs_publish_inode(
            self._fs, _u64("nodeid", nodeid), fd, _u64("dev", dev), _u64("ino", ino)
        )
        self._published(rc, nodeid)

    def retire_inode(self, nodeid: int) -> bool:
        """Unpublish; the fd is closed once unused.  False: was not published."""
        return self._retire(lib.PVD_FS_INODES, nodeid)

    def evict_inode(self, nodeid: int) -> int | None:
        """Retire ``nodeid``'s fd while Python keeps the inode (the fd budget).

        Returns the lookups answered in place and not yet settled (read as
        the entry is unlinked: none is lost; Python adds them to its count),
        or None when ``nodeid`` was not published (the caller still owns the
        fd).  The mirror closes the fd once no in-place request uses it; a
        later request for ``nodeid`` misses and goes to Python, which
        reopens the inode and publishes it again.
        """
        credits = ffi.new("uint64_t *")
        rc = lib.pvd_fs_evict_inode(self._fs, _u64("nodeid", nodeid), credits)
        return int(credits[0]) if rc == 0 else None

    def settle(self, nodeid: int, count: int, forget: int, *, keep: bool = False) -> int | None:
        """Python's lookup count of ``nodeid`` after forgetting ``forget``, with the
        lookups answered in place folded in (they are reset).

        At 0 (and not ``keep``) the inode is hidden from the fast path at once;
        Python must then drop it.  None: ``nodeid`` is not published.
        """
        total = ffi.new("uint64_t *")
        found = lib.pvd_fs_settle(
            self._fs, _u64("nodeid", nodeid), _u64("count", count), _u64("forget", forget),
            int(keep), total,
        )  # fmt: skip
        return int(total[0]) if found else None

    def credits(self, nodeid: int) -> int:
        """Lookups of ``nodeid`` answered in place and not yet settled."""
        return int(lib.pvd_fs_credits(self._fs, _u64("nodeid", nodeid)))

    def publish_handle(self, fh: int, fd: int, *, directory: bool) -> None:
        """Open file or directory ``fh``; only files are read and written in place."""
        kind = lib.PVD_KIND_DIR if directory else lib.PVD_KIND_FILE
        self._published(lib.pvd_fs_publish_handle(self._fs, _u64("fh", fh), fd, kind), fh)

    def retire_handle(self, fh: int) -> bool:
        return self._retire(lib.PVD_FS_HANDLES, fh)

    def stats(self) -> FastPathStats:
        out = ffi.new("struct pvd_fs_stats *")
        lib.pvd_fs_stats(self._fs, out)
        return FastPathStats(
            int(out.inodes),
            int(out.handles),
            int(out.getattr),
            int(out.read),
            int(out.write),
            int(out.lookup),
            int(out.readdirplus),
            int(out.unlink),
            int(out.readdir),
            int(out.busy_now),
            int(out.busy_max),
        )

    def reset_busy_max(self) -> None:
        lib.pvd_fs_reset_busy_max(self._fs)


class SlowQueue:
    """Chains waiting for a Python worker; many runners put, many workers take."""

    def __init__(self) -> None:
        ptr = lib.pvd_slowq_new()
        if ptr == ffi.NULL:
            raise MemoryError("cannot create the slow queue")
        self._q: Any = ffi.gc(ptr, lib.pvd_slowq_free)

    def _c_handle(self) -> Any:
        return self._q

    def take(self, queue: Callable[[int], VirtQueue]) -> Chain | None:
        """Block (GIL released) for the next chain; None once closed and empty.

        ``queue(index)`` gives the :class:`VirtQueue` a chain came from.
        """
        out = ffi.new("struct pvd_chain **")
        if not lib.pvd_slowq_take(self._q, out):
            return None
        c = ffi.gc(out[0], lib.pvd_chain_free)
        return Chain._wrap(queue(Chain._queue_index(c)), c)

    def serve_inline(self, opcodes: Iterable[int]) -> None:
        """Have the runners hand these opcodes back to their own thread
        (:meth:`VirtQueue.run` returns the chain) instead of queueing them
        here.  Call before any runner uses the queue."""
        mask = 0
        for op in opcodes:
            if not 0 < op < 64:
                raise ValueError(f"opcode {op} cannot be served inline")
            mask |= 1 << op
        lib.pvd_slowq_set_inline(self._q, mask)

    def close(self) -> None:
        """Wake every taker; take() returns None once the queue is empty."""
        lib.pvd_slowq_close(self._q)

    def __len__(self) -> int:
        return int(lib.pvd_slowq_len(self._q))
