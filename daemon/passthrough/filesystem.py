"""The passthrough filesystem: FUSE operations over a host directory.

Security model (what keeps the guest inside the share):

* Every inode is an ``O_PATH | O_NOFOLLOW`` fd; names are resolved one
  component at a time with ``openat(parent_fd, name)``, never by building a
  path string from the root.  A name must be a single component: empty, ``.``,
  ``..`` and anything containing ``/`` or NUL is refused with EINVAL, so a
  lookup can never climb above the root.
* Symlinks are opened with ``O_NOFOLLOW`` and handed to the guest as
  symlinks; the host never follows them (READLINK returns the target text, the
  guest resolves it in its own namespace, which again lands on LOOKUPs here).
  A LOOKUP *under* a symlink node fails with ENOTDIR from ``openat``.
* O_PATH fds are turned into real fds by reopening ``/proc/self/fd/N`` (as
  virtiofsd does), which reaches the very inode the O_PATH fd holds.

Handlers are thin: they validate, borrow the inode/handle, call a private
helper and return a typed value.  Failures are ``OSError`` and are turned into
an errno reply by the session.

The share is read-only for now (``read_only`` is True): OPEN for writing and
``ACCESS(W_OK)`` answer EROFS.  Write operations will be added beside these.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from ..fuse.abi import (
    ROOT_ID,
    Attr,
    AttrOut,
    EntryOut,
    Kstatfs,
    OpenOut,
    dirent_size,
    direntplus_size,
    encode_dirent,
    encode_direntplus,
)
from .inodes import DirEntry, DirHandle, FileHandle, Handle, HandleTable, InodeTable

__all__ = ["PassthroughFs", "ReadInto", "RequestContext"]

logger = logging.getLogger("pyvirtiofsd.passthrough")

#: ``fn(fd, file_offset, length) -> bytes_read``: the transport's zero-copy read.
ReadInto = Callable[[int, int, int], int]

_U32 = 0xFFFF_FFFF
_NS = 1_000_000_000


class RequestContext(NamedTuple):
    """Who is asking (from fuse_in_header)."""

    uid: int
    gid: int
    pid: int


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _split_timeout(seconds: float) -> tuple[int, int]:
    if seconds < 0:
        raise ValueError("timeouts must not be negative")
    ns = round(seconds * _NS)
    return ns // _NS, ns % _NS


def encode_dev(rdev: int) -> int:
    """Host ``dev_t`` -> the kernel's 32-bit ``new_encode_dev`` form used by fuse_attr."""
    major, minor = os.major(rdev), os.minor(rdev)
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & _U32


def stat_to_attr(st: os.stat_result) -> Attr:
    """``struct stat`` -> fuse_attr, with nanosecond timestamps."""
    atime, atimensec = divmod(st.st_atime_ns, _NS)
    mtime, mtimensec = divmod(st.st_mtime_ns, _NS)
    ctime, ctimensec = divmod(st.st_ctime_ns, _NS)
    return Attr(
        ino=st.st_ino,
        size=st.st_size,
        blocks=st.st_blocks,
        atime=atime,
        mtime=mtime,
        ctime=ctime,
        atimensec=atimensec,
        mtimensec=mtimensec,
        ctimensec=ctimensec,
        mode=st.st_mode & _U32,
        nlink=min(st.st_nlink, _U32),
        uid=st.st_uid & _U32,
        gid=st.st_gid & _U32,
        rdev=encode_dev(st.st_rdev),
        blksize=min(st.st_blksize, _U32),
        flags=0,
    )


def validate_name(name: bytes) -> bytes:
    """A single path component, or EINVAL (never ``.``/``..``, ``/``, NUL or empty)."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise _err(errno.EINVAL)
    if len(name) > 255:
        raise _err(errno.ENAMETOOLONG)
    return name


def _dtype(mode: int) -> int:
    """``S_IFMT`` bits -> ``DT_*`` (the kernel's ``(mode & S_IFMT) >> 12``)."""
    return (mode & 0o170000) >> 12


class PassthroughFs:
    """Serves the directory ``root`` (resolved once, at construction)."""

    def __init__(
        self,
        root: str | Path,
        *,
        entry_timeout: float = 1.0,
        attr_timeout: float = 1.0,
    ) -> None:
        self.entry_timeout = _split_timeout(entry_timeout)
        self.attr_timeout = _split_timeout(attr_timeout)
        self.read_only = True
        self._proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            os.close(self._proc_fd)
            raise
        self.inodes = InodeTable(root_fd, os.fstat(root_fd))
        self.handles = HandleTable()

    def close(self) -> None:
        """Release every fd, the root's included."""
        self.handles.clear()
        self.inodes.close_root()
        os.close(self._proc_fd)

    # --- private helpers ----------------------------------------------------

    def _reopen(self, fd: int, flags: int) -> int:
        """A real fd for the inode an O_PATH fd holds (via /proc/self/fd/N)."""
        return os.open(str(fd), flags | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=self._proc_fd)

    def _entry(self, nodeid: int, st: os.stat_result) -> EntryOut:
        return EntryOut(
            nodeid=nodeid,
            generation=0,
            entry_valid=self.entry_timeout[0],
            attr_valid=self.attr_timeout[0],
            entry_valid_nsec=self.entry_timeout[1],
            attr_valid_nsec=self.attr_timeout[1],
            attr=stat_to_attr(st),
        )

    def _lookup_at(self, dir_fd: int, name: bytes) -> EntryOut:
        """Open ``name`` under ``dir_fd`` as O_PATH and count one lookup of it."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        inode = self.inodes.add_lookup(fd, st)
        return self._entry(inode.nodeid, st)

    def _snapshot(self, handle: DirHandle) -> list[DirEntry]:
        st = os.fstat(handle.fd)
        if handle.nodeid == ROOT_ID:
            parent_ino = st.st_ino  # never reveal what lies above the share
        else:
            try:
                parent_ino = os.stat(b"..", dir_fd=handle.fd, follow_symlinks=False).st_ino
            except OSError:
                parent_ino = st.st_ino
        entries = [
            DirEntry(b".", st.st_ino, stat.S_IFDIR >> 12),
            DirEntry(b"..", parent_ino, stat.S_IFDIR >> 12),
        ]
        # scandir(fd) works on a dup and rewinds it when done.
        with os.scandir(handle.fd) as it:
            for de in it:
                entries.append(DirEntry(os.fsencode(de.name), de.inode(), self._de_type(de)))
        return entries

    @staticmethod
    def _de_type(de: os.DirEntry[str]) -> int:
        try:
            if de.is_symlink():
                return stat.S_IFLNK >> 12
            if de.is_dir(follow_symlinks=False):
                return stat.S_IFDIR >> 12
            if de.is_file(follow_symlinks=False):
                return stat.S_IFREG >> 12
            return _dtype(de.stat(follow_symlinks=False).st_mode)
        except OSError:
            return 0  # DT_UNKNOWN: the guest will ask with LOOKUP

    def _dir_entries(self, handle: DirHandle, offset: int) -> list[DirEntry]:
        """The snapshot from ``offset`` on; caller holds ``handle.lock``."""
        if offset == 0 or handle.entries is None:
            handle.entries = self._snapshot(handle)
        return handle.entries[offset:]

    # --- operations -----------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> EntryOut:
        validate_name(name)
        with self.inodes.borrow(parent) as inode:
            return self._lookup_at(inode.fd, name)

    def forget(self, nodeid: int, nlookup: int) -> None:
        self.inodes.forget(nodeid, nlookup)

    def batch_forget(self, items: Iterable[tuple[int, int]]) -> None:
        for nodeid, nlookup in items:
            self.inodes.forget(nodeid, nlookup)

    def getattr(self, nodeid: int, fh: int | None = None) -> AttrOut:
        if fh is not None:
            with self.handles.borrow(fh, Handle) as handle:
                st = os.fstat(handle.fd)
        else:
            with self.inodes.borrow(nodeid) as inode:
                st = os.fstat(inode.fd)
        return AttrOut(self.attr_timeout[0], self.attr_timeout[1], 0, stat_to_attr(st))

    def readlink(self, nodeid: int) -> bytes:
        with self.inodes.borrow(nodeid) as inode:
            if inode.mode != stat.S_IFLNK:
                raise _err(errno.EINVAL)
            return os.readlink(b"", dir_fd=inode.fd)

    def open(self, nodeid: int, flags: int) -> OpenOut:
        accmode = flags & os.O_ACCMODE
        if self.read_only and (accmode != os.O_RDONLY or flags & os.O_TRUNC):
            raise _err(errno.EROFS)
        with self.inodes.borrow(nodeid) as inode:
            if inode.mode == stat.S_IFDIR:
                raise _err(errno.EISDIR)
            if inode.mode != stat.S_IFREG:
                # Device nodes, FIFOs and sockets are the guest's business (its
                # kernel never sends OPEN for them); opening one here would
                # reach a host device or block a worker on a FIFO.
                raise _err(errno.ENXIO)
            fd = self._reopen(inode.fd, os.O_RDONLY)
        fh = self.handles.add(FileHandle(fd, nodeid))
        return OpenOut(fh=fh, open_flags=0, padding=0)

    def read(self, fh: int, offset: int, size: int, into: ReadInto) -> int:
        """Read straight into the reply via ``into``; returns the byte count."""
        if offset < 0 or offset > (1 << 63) - 1:
            raise _err(errno.EINVAL)
        with self.handles.borrow(fh, FileHandle) as handle:
            return into(handle.fd, offset, size) if size else 0

    def flush(self, fh: int) -> None:
        with self.handles.borrow(fh, FileHandle):
            pass  # read-only: nothing buffered here (close-to-open is the guest's)

    def release(self, fh: int) -> None:
        self.handles.release(fh)

    def opendir(self, nodeid: int, flags: int) -> OpenOut:
        del flags  # only O_RDONLY|O_DIRECTORY make sense for a directory
        with self.inodes.borrow(nodeid) as inode:
            if inode.mode != stat.S_IFDIR:
                raise _err(errno.ENOTDIR)
            fd = self._reopen(inode.fd, os.O_RDONLY | os.O_DIRECTORY)
        fh = self.handles.add(DirHandle(fd, nodeid))
        return OpenOut(fh=fh, open_flags=0, padding=0)

    def readdir(self, fh: int, offset: int, size: int) -> bytes:
        """fuse_dirent records from ``offset`` on, at most ``size`` bytes."""
        out = bytearray()
        with self.handles.borrow(fh, DirHandle) as handle, handle.lock:
            for i, de in enumerate(self._dir_entries(handle, offset), start=offset + 1):
                if len(out) + dirent_size(de.name) > size:
                    break
                out += encode_dirent(de.ino, i, de.dtype, de.name)
        return bytes(out)

    def readdirplus(self, fh: int, offset: int, size: int) -> bytes:
        """fuse_direntplus records; each entry but ``.``/``..`` counts one lookup.

        An entry is looked up only once it is known to fit, so the guest's
        lookup counts match exactly what it received.  Entries that vanished
        since the snapshot are skipped.
        """
        out = bytearray()
        with self.handles.borrow(fh, DirHandle) as handle, handle.lock:
            for i, de in enumerate(self._dir_entries(handle, offset), start=offset + 1):
                if len(out) + direntplus_size(de.name) > size:
                    break
                if de.name in (b".", b".."):
                    # nodeid 0: "no entry for this name", the kernel takes no reference.
                    empty = EntryOut(0, 0, 0, 0, 0, 0, Attr(*([0] * 16)))
                    out += encode_direntplus(empty, de.ino, i, de.dtype, de.name)
                    continue
                try:
                    entry = self._lookup_at(handle.fd, de.name)
                except FileNotFoundError:
                    continue
                except OSError:
                    if out:
                        break  # return what we have; the guest asks again from here
                    raise
                out += encode_direntplus(entry, entry.attr.ino, i, _dtype(entry.attr.mode), de.name)
        return bytes(out)

    def releasedir(self, fh: int) -> None:
        self.handles.release(fh)

    def statfs(self, nodeid: int) -> Kstatfs:
        with self.inodes.borrow(nodeid) as inode:
            sv = os.statvfs(inode.fd)
        return Kstatfs(
            blocks=sv.f_blocks,
            bfree=sv.f_bfree,
            bavail=sv.f_bavail,
            files=sv.f_files,
            ffree=sv.f_ffree,
            bsize=sv.f_bsize & _U32,
            namelen=sv.f_namemax & _U32,
            frsize=sv.f_frsize & _U32,
        )

    def access(self, nodeid: int, mask: int, ctx: RequestContext) -> None:
        """``access(2)`` for the caller in ``ctx``, judged on the host mode bits.

        Only the primary gid is known (fuse_in_header has no supplementary
        groups), as in virtiofsd.
        """
        if mask & ~(os.R_OK | os.W_OK | os.X_OK):
            raise _err(errno.EINVAL)
        with self.inodes.borrow(nodeid) as inode:
            st = os.fstat(inode.fd)
        if mask == os.F_OK:
            return
        if mask & os.W_OK and self.read_only:
            raise _err(errno.EROFS)
        mode = st.st_mode
        if ctx.uid == 0:
            if mask & os.X_OK and not (mode & 0o111 or stat.S_ISDIR(mode)):
                raise _err(errno.EACCES)
            return
        if ctx.uid == st.st_uid:
            granted = (mode >> 6) & 7
        elif ctx.gid == st.st_gid:
            granted = (mode >> 3) & 7
        else:
            granted = mode & 7
        if mask & ~granted:
            raise _err(errno.EACCES)

    def destroy(self) -> None:
        """Forget every inode and handle (DESTROY); the root stays open."""
        self.handles.clear()
        self.inodes.clear()
