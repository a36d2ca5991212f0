"""The interface between the FUSE session and a filesystem: typed values only.

:class:`~.session.FuseSession` decodes requests and encodes replies; a
:class:`Filesystem` (the passthrough in :mod:`pyvirtiofsd.daemon.passthrough`)
takes and returns typed values and never sees wire bytes -- the model is
the Rust virtiofsd's ``Server<F: FileSystem>``.  Failures are ``OSError``
with the errno to answer.  Payloads move through callbacks so that READ and
WRITE never copy through Python (:data:`ReadInto`, :data:`WriteFrom`), and a
directory listing stops where the reply is full (:class:`DirBudget`).

The filesystem also chooses what to negotiate: :meth:`Filesystem.init`
gets what the guest and the session can do and returns the subset it wants.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

from .abi import AttrOut, EntryOut, FileLock, InitFlag, Kstatfs, OpenOut, SetattrIn

__all__ = [
    "DirBudget",
    "DirEntry",
    "Filesystem",
    "LockWait",
    "ReadInto",
    "RequestContext",
    "WriteFrom",
]

#: ``fn(fd, file_offset, length) -> bytes_read``: the transport's zero-copy read.
ReadInto = Callable[[int, int, int], int]
#: ``fn(fd, file_offset, length) -> bytes_written``: the transport's zero-copy write.
WriteFrom = Callable[[int, int, int], int]


class RequestContext(NamedTuple):
    """Who is asking (from fuse_in_header)."""

    uid: int
    gid: int
    pid: int


class DirEntry(NamedTuple):
    """One directory entry: ``off`` is the cookie to continue after it."""

    ino: int
    off: int
    dtype: int
    name: bytes


class DirBudget(Protocol):
    """Room left in a READDIR reply; the session knows the wire sizes."""

    @property
    def room(self) -> int:
        """Bytes left (to size reads from the host directory)."""
        ...

    def take(self, name: bytes) -> bool:
        """Reserve one record for ``name``; False (nothing reserved) when it does not fit."""
        ...


class LockWait(Protocol):
    """One SETLKW's cancellation point (held with ``with`` while it waits)."""

    def cancel(self, code: int) -> None: ...

    def __enter__(self) -> LockWait: ...

    def __exit__(self, *exc: object) -> None: ...


class Filesystem(Protocol):
    """What the FUSE session calls; one method per opcode family."""

    def init(self, capable: InitFlag) -> InitFlag:
        """The INIT flags wanted, a subset of ``capable`` (what guest and session can do)."""
        ...

    def destroy(self) -> None: ...

    def close(self) -> None: ...

    def lookup(self, parent: int, name: bytes) -> EntryOut: ...

    def forget(self, nodeid: int, nlookup: int) -> None: ...

    def batch_forget(self, items: Iterable[tuple[int, int]]) -> None: ...

    def getattr(self, nodeid: int, fh: int | None = None) -> AttrOut: ...

    def setattr(self, nodeid: int, arg: SetattrIn, ctx: RequestContext) -> AttrOut: ...

    def readlink(self, nodeid: int) -> bytes: ...

    def open(
        self, nodeid: int, flags: int, ctx: RequestContext, open_flags: int = 0
    ) -> OpenOut: ...

    def read(self, fh: int, offset: int, size: int, into: ReadInto) -> int: ...

    def write(
        self,
        fh: int,
        offset: int,
        size: int,
        write_flags: int,
        source: WriteFrom,
        ctx: RequestContext,
    ) -> int: ...

    def flush(self, fh: int, lock_owner: int) -> None: ...

    def release(self, fh: int, release_flags: int = 0, lock_owner: int = 0) -> None: ...

    def fsync(self, fh: int, datasync: bool, *, isdir: bool = False) -> None: ...

    def opendir(self, nodeid: int, flags: int) -> OpenOut: ...

    def readdir(self, fh: int, offset: int, budget: DirBudget) -> list[DirEntry]:
        """Entries after cookie ``offset`` while ``budget`` has room; [] at the end."""
        ...

    def readdirplus(
        self, fh: int, offset: int, budget: DirBudget
    ) -> list[tuple[DirEntry, EntryOut | None]]:
        """As readdir, each entry looked up (one lookup counted) once it fits;
        None for ``.`` and ``..`` (no lookup)."""
        ...

    def releasedir(self, fh: int) -> None: ...

    def statfs(self, nodeid: int) -> Kstatfs: ...

    def access(self, nodeid: int, mask: int, ctx: RequestContext) -> None: ...

    def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, ctx: RequestContext
    ) -> EntryOut: ...

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: RequestContext) -> EntryOut: ...

    def symlink(
        self, parent: int, name: bytes, target: bytes, ctx: RequestContext
    ) -> EntryOut: ...

    def link(self, nodeid: int, parent: int, name: bytes, ctx: RequestContext) -> EntryOut: ...

    def unlink(self, parent: int, name: bytes, ctx: RequestContext) -> None: ...

    def rmdir(self, parent: int, name: bytes, ctx: RequestContext) -> None: ...

    def rename(
        self,
        parent: int,
        name: bytes,
        newparent: int,
        newname: bytes,
        flags: int,
        ctx: RequestContext,
    ) -> None: ...

    def create(
        self,
        parent: int,
        name: bytes,
        flags: int,
        mode: int,
        ctx: RequestContext,
        open_flags: int = 0,
    ) -> tuple[EntryOut, OpenOut]: ...

    def fallocate(
        self, fh: int, offset: int, length: int, mode: int, ctx: RequestContext
    ) -> None: ...

    def lseek(self, fh: int, offset: int, whence: int) -> int: ...

    def copy_file_range(
        self,
        fh_in: int,
        off_in: int,
        fh_out: int,
        off_out: int,
        length: int,
        flags: int,
        ctx: RequestContext,
    ) -> int: ...

    def syncfs(self, nodeid: int) -> None: ...

    def setxattr(
        self, nodeid: int, name: bytes, value: bytes, flags: int, ctx: RequestContext
    ) -> None: ...

    def getxattr(self, nodeid: int, name: bytes, size: int) -> bytes | int:
        """The value, or its size when ``size`` is 0."""
        ...

    def listxattr(self, nodeid: int, size: int) -> bytes | int: ...

    def removexattr(self, nodeid: int, name: bytes, ctx: RequestContext) -> None: ...

    def lock_wait(self) -> LockWait: ...

    def reset_locks(self) -> None:
        """Every lock wait ends (EIO) and every lock goes: the device is reset."""
        ...

    @property
    def lock_epoch(self) -> int:
        """Bumped by every DESTROY/reset: an INTERRUPT remembered before it is stale."""
        ...

    def getlk(self, nodeid: int, fh: int, owner: int, lock: FileLock) -> FileLock: ...

    def setlk(
        self,
        nodeid: int,
        fh: int,
        owner: int,
        lock: FileLock,
        *,
        flock: bool,
        wait: LockWait | None,
    ) -> None: ...

