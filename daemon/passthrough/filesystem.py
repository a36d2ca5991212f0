"""The passthrough filesystem: FUSE operations over a host directory.

Security model (what keeps the guest inside the share):

* Every inode is an ``O_PATH | O_NOFOLLOW`` fd; names are resolved one
  component at a time with ``openat(parent_fd, name)``, never by building a
  path string from the root.  A name must be a single component: empty, ``.``,
  ``..`` and anything containing ``/`` or NUL is refused with EINVAL, so a
  lookup can never climb above the root.  Operations on names (create,
  unlink, rename, link) act on ``(parent_fd, name)`` pairs, so RENAME and
  LINK across directories never build a path either.
* Symlinks are opened with ``O_NOFOLLOW`` and handed to the guest as
  symlinks; the host never follows them (READLINK returns the target text, the
  guest resolves it in its own namespace, which again lands on LOOKUPs here).
  A LOOKUP *under* a symlink node fails with ENOTDIR from ``openat``; CREATE
  over an existing symlink fails with ELOOP.
* O_PATH fds are turned into real fds by reopening ``/proc/self/fd/N`` (as
  virtiofsd does), which reaches the very inode the O_PATH fd holds.  The
  same "magic link" gives path-based calls their target without following a
  symlink the inode may be: it lands on the symlink itself (chmod of a
  symlink node is refused with EOPNOTSUPP all the same; chown uses
  ``AT_EMPTY_PATH``, timestamps of a symlink ``AT_EMPTY_PATH`` too).
* Device nodes are not created unless ``allow_device_nodes`` (a device node
  in the share is a device on the host); a whiteout (char 0:0) is allowed.

Credentials (see :mod:`.oscalls`, and DESIGN.md opcode by opcode): the
guest mounts virtio-fs with ``default_permissions`` and has checked every
permission with the caller's full group list, so the host never checks
again.  Operations that make an inode (CREATE, MKNOD, MKDIR, SYMLINK, a
RENAME_WHITEOUT) run as the caller's fsuid/fsgid for its owner and setgid
inheritance, with the DAC capabilities raised again; a kill of
setuid/setgid runs with the caller's fsgid and without CAP_FSETID; all
else (SETATTR, OPEN, LINK, UNLINK, RMDIR, RENAME, xattrs, reads) runs as
the daemon.

Handlers are thin: they validate, borrow the inode/handle, call a private
helper and return a typed value.  Failures are ``OSError`` and are turned into
an errno reply by the session.  With ``readonly`` every modifying operation
answers EROFS.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Protocol

from .. import config as config_mod
from .. import limits, procfs
from ..fuse import abi
from ..fuse import filesystem as fuse_fs
from ..fuse import session as fuse_session
from ..fuse.abi import (
    ROOT_ID,
    Attr,
    AttrOut,
    EntryOut,
    FileLock,
    InitFlag,
    Kstatfs,
    OpenOut,
    SetattrIn,
)
from ..fuse.filesystem import DirBudget, DirEntry, ReadInto, RequestContext, WriteFrom
from . import dirents, filehandles, locks, oscalls
from . import xattrmap as xattrmap_mod
from .inodes import (
    DirHandle,
    FdMirror,
    FileHandle,
    Handle,
    HandleTable,
    Inode,
    InodeTable,
)
from .xattrmap import XattrMap

__all__ = ["PassthroughFs", "ReadInto", "RequestContext", "WriteFrom"]

logger = logging.getLogger("pyvirtiofsd.passthrough")

#: INIT flags the passthrough wants whenever the guest offers them:
#:
#: * ASYNC_READ: several READs of one file may be in flight (we are threaded).
#: * ATOMIC_O_TRUNC: OPEN carries O_TRUNC and truncates as the caller, with
#:   FUSE_OPEN_KILL_SUIDGID honoured, in one step instead of OPEN + SETATTR.
#: * BIG_WRITES: writes larger than a page (implied by modern kernels).
#: * AUTO_INVAL_DATA: the host may change files behind the guest's back; drop
#:   cached pages when mtime/size change.
#: * DO_READDIRPLUS, READDIRPLUS_AUTO: READDIRPLUS saves a LOOKUP per entry
#:   for ``ls -l``, and the kernel picks when it pays off.
#: * ASYNC_DIO: direct I/O may be split into parallel requests.
#: * PARALLEL_DIROPS: lookups and readdirs of one directory may run at once;
#:   the inode table is thread-safe.
#: * HANDLE_KILLPRIV_V2: the guest tells us (WRITE_KILL_SUIDGID,
#:   FATTR_KILL_SUIDGID, OPEN_KILL_SUIDGID) when its caller lacks
#:   CAP_FSETID, and we let the host kernel clear setuid/setgid/caps as it
#:   would for that caller.  Without it the guest turns the kill into a
#:   SETATTR(mode) sent as the writer, which a non-owner may not do.
#: * MAX_PAGES: honour the session's max_pages (and so large READs/WRITEs).
#: * CACHE_SYMLINKS: a symlink's target never changes without a new inode.
#: * CREATE_SUPP_GROUP (7.38, flags2): a creation in a directory whose group
#:   is a supplementary group of the caller carries that group, so a
#:   requested S_ISGID survives as on a local disk (``_groups``).
#:
#: By option only: POSIX_LOCKS / FLOCK_LOCKS (``posix_locks``/``flock``,
#: virtiofsd's no_posix_lock/no_flock defaults: without them the guest
#: kernel locks locally, invisible to host processes), WRITEBACK_CACHE
#: (``writeback``: the host then sees guest writes only once flushed),
#: SUBMOUNTS (``announce_submounts``).  Never: HANDLE_KILLPRIV (v1: kill on
#: every write, even by a caller with CAP_FSETID), DONT_MASK (the guest
#: applies the umask; we create with exactly the mode it sends),
#: EXPORT_SUPPORT (we refuse lookups of ``.``/``..``), POSIX_ACL, the
#: rest of flags2 (no DAX, no security context; the session sets INIT_EXT
#: when a flags2 bit is chosen), SETXATTR_EXT
#: (needs INIT_EXT), SPLICE_* (meaningless over virtio), EXPLICIT_INVAL_DATA
#: (contradicts AUTO).
WANTED_INIT_FLAGS = (
    InitFlag.ASYNC_READ
    | InitFlag.ATOMIC_O_TRUNC
    | InitFlag.BIG_WRITES
    | InitFlag.AUTO_INVAL_DATA
    | InitFlag.DO_READDIRPLUS
    | InitFlag.READDIRPLUS_AUTO
    | InitFlag.ASYNC_DIO
    | InitFlag.PARALLEL_DIROPS
    | InitFlag.HANDLE_KILLPRIV_V2
    | InitFlag.MAX_PAGES
    | InitFlag.CACHE_SYMLINKS
    | InitFlag.CREATE_SUPP_GROUP
)

#: Flags of the guest's open(2) passed on to the host: access mode, append,
#: truncate, synchronous I/O.  Dropped: O_CREAT/O_EXCL (CREATE decides),
#: O_NOFOLLOW (the proc reopen needs to follow its magic link; the inode is
#: never a symlink here), O_DIRECT (alignment is the guest page cache's
#: business), O_NOATIME (EPERM for non-owners), O_NONBLOCK, O_LARGEFILE.
_OPEN_PASS = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_SYNC | os.O_DSYNC
_XATTR_NAME_MAX = 255
_XATTR_SIZE_MAX = 1 << 16
_SYMLINK_MAX = 4095  # PATH_MAX - 1
#: fallocate(2) modes we pass on; the host filesystem judges the combination.
_FALLOC_MODES = 0x01 | 0x02 | 0x08 | 0x10 | 0x20 | 0x40
_RENAME_FLAGS = 0x1 | 0x2 | 0x4  # NOREPLACE, EXCHANGE, WHITEOUT
_RENAME_WHITEOUT = 0x4
_FATTR_TIMES = abi.FATTR_ATIME | abi.FATTR_MTIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW
_MAX_RW = 0x7FFF_F000  # MAX_RW_COUNT: the kernel's cap on one transfer

_U32 = 0xFFFF_FFFF
#: fuse_attr.flags: this directory is a mount point on the host (FUSE 7.32).
FUSE_ATTR_SUBMOUNT = 1 << 0
_NS = 1_000_000_000
#: fuse_direntplus / linux_dirent64 size for one name, at least (152+ vs 24+ bytes)
_DIRENTPLUS_PER_HOST_DIRENT = 4


class FastPathMirror(FdMirror, Protocol):
    """What :meth:`PassthroughFs.attach_fast_path` needs (a :class:`~pyvirtiofsd.dma.FastPath`)."""

    def configure(
        self,
        *,
        attr_valid: tuple[int, int],
        entry_valid: tuple[int, int],
        readonly: bool,
        switch_creds: bool,
        announce_submounts: bool,
        python_writes: bool = False,
    ) -> None: ...


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
    """``struct stat`` -> fuse_attr, with nanosecond timestamps.

    On every LOOKUP, GETATTR and READDIRPLUS entry, so built positionally
    (a keyword-built NamedTuple costs three times as much).  Floor division
    gives ``tv_sec``/``tv_nsec`` as the kernel keeps them, before 1970 too.
    """
    rdev = st.st_rdev
    return Attr._make(
        (
            st.st_ino,
            st.st_size,
            st.st_blocks,
            st.st_atime_ns // _NS,
            st.st_mtime_ns // _NS,
            st.st_ctime_ns // _NS,
            st.st_atime_ns % _NS,
            st.st_mtime_ns % _NS,
            st.st_ctime_ns % _NS,
            st.st_mode & _U32,
            min(st.st_nlink, _U32),
            st.st_uid & _U32,
            st.st_gid & _U32,
            encode_dev(rdev) if rdev else 0,
            min(st.st_blksize, _U32),
            0,
        )
    )


def validate_name(name: bytes) -> bytes:
    """A single path component, or EINVAL (never ``.``/``..``, ``/``, NUL or empty)."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise _err(errno.EINVAL)
    if len(name) > 255:
        raise _err(errno.ENAMETOOLONG)
    return name


def validate_xattr_name(name: bytes) -> bytes:
    """An xattr name as the kernel accepts it (1..255 bytes), else ERANGE."""
    if not 0 < len(name) <= _XATTR_NAME_MAX:
        raise _err(errno.ERANGE)
    return name


def decode_dev(rdev: int) -> int:
    """The kernel's 32-bit ``new_encode_dev`` form -> host ``dev_t``."""
    major = (rdev & 0xFFF00) >> 8
    minor = (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def _dtype(mode: int) -> int:
    """``S_IFMT`` bits -> ``DT_*`` (the kernel's ``(mode & S_IFMT) >> 12``)."""
    return (mode & 0o170000) >> 12


#: Open directory handles allowed at once (``max_dir_handles``).
MAX_DIR_HANDLES = 4096


class _Budget:
    """A count with a cap, shared by threads: EMFILE when it is reached."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            if self.used >= self.cap:
                raise _err(errno.EMFILE)
            self.used += 1

    def give(self) -> None:
        with self._lock:
            self.used -= 1


class PassthroughFs:
    """Serves the directory ``root`` (resolved once, at construction).

    ``readonly``: every modifying operation answers EROFS.  ``xattr``:
    serve extended attributes (off: the xattr operations answer ENOSYS and
    the guest stops asking, like virtiofsd without ``xattr``).
    ``writeback``: the session negotiates WRITEBACK_CACHE; files are then
    opened read-write even for O_WRONLY (the guest page cache reads around
    partial writes) and without O_APPEND (the guest computes the offsets).
    ``allow_device_nodes``: MKNOD may create character/block devices.
    ``max_dir_handles``: open directories at once (OPENDIR past it: EMFILE).
    ``posix_locks``/``flock``: serve POSIX/flock locks as host locks (else
    the lock operations answer ENOSYS); ``lock_fds_per_inode`` and
    ``lock_fds`` cap the lock owners' fds (see :mod:`.locks`).
    ``inode_file_handles``: ``never`` (every inode the guest knows holds an
    O_PATH fd), ``prefer``/``mandatory`` (inodes are kept by file handle and
    at most ``inode_fds`` of them hold an fd, default half the soft
    RLIMIT_NOFILE; see :mod:`.filehandles`).
    """

    def __init__(
        self,
        root: str | Path | config_mod.FsConfig,
        *,
        lock_fds_per_inode: int = locks.MAX_OWNER_FDS_PER_INODE,
        lock_fds: int = locks.MAX_OWNER_FDS,
        max_dir_handles: int = MAX_DIR_HANDLES,
        inode_fds: int | None = None,
        **settings: Any,
    ) -> None:
        """``root`` is an :class:`~pyvirtiofsd.daemon.config.FsConfig`, or the
        share's path with that config's settings as keywords (tests, short)."""
        if isinstance(root, config_mod.FsConfig):
            if settings:
                raise TypeError("give an FsConfig or settings, not both")
            config = root
        else:
            config = config_mod.FsConfig(shared_dir=Path(root), **settings)
        self.config = config
        root = config.shared_dir
        inode_file_handles = config.inode_file_handles
        self.announce_submounts = config.announce_submounts
        self.posix_locks = config.posix_locks
        self.flock = config.flock
        #: what the policy means for file data: never (DIRECT_IO), auto, always
        self.cache = config.cache.data
        self.allow_direct_io = config.allow_direct_io
        self.entry_timeout = _split_timeout(config.entry_timeout_s)
        self.attr_timeout = _split_timeout(config.attr_timeout_s)
        self.readonly = config.readonly
        self.xattr = config.xattr
        self.xattrmap = config.xattrmap
        self.writeback = config.writeback
        self.allow_device_nodes = config.allow_device_nodes
        #: pid -> that caller's supplementary groups, where the pid is a host
        #: process (the host mount); a virtio guest's pids mean nothing here.
        self.caller_groups: Callable[[int], tuple[int, ...] | None] | None = None
        self._device_refusals = 0
        self._device_refusal_logged = float("-inf")
        self._init_wanted = WANTED_INIT_FLAGS
        if not config.serves_readdirplus:
            self._init_wanted &= ~(InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO)
        if not config.killpriv_v2:
            self._init_wanted &= ~InitFlag.HANDLE_KILLPRIV_V2
        if max_dir_handles < 1:
            raise ValueError("max_dir_handles must be at least 1")
        self._dir_budget = _Budget(max_dir_handles)
        self.locks = locks.LockManager(
            self._reopen,
            fdinfo=self._fdinfo,
            readonly=config.readonly,
            per_inode=lock_fds_per_inode,
            total=lock_fds,
        )
        self._proc_fd = procfs.open_proc_self_fd()  # the sandbox may have no /proc
        try:
            root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            os.close(self._proc_fd)
            raise
        try:
            handles = filehandles.probe(root_fd, inode_file_handles, self._reopen_dir)
        except BaseException:
            os.close(root_fd)
            os.close(self._proc_fd)
            raise
        #: the mode in effect (``prefer`` falls back to ``never`` where unusable)
        self.inode_file_handles = "never" if handles is None else handles.mode
        if inode_fds is None:
            inode_fds = limits.inode_fd_budget(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.inodes = InodeTable(root_fd, os.fstat(root_fd), handles=handles, max_fds=inode_fds)
        self.handles = HandleTable()

    def init(self, capable: InitFlag) -> InitFlag:
        """INIT: what this filesystem wants of what guest and session can do."""
        wanted = self._init_wanted  # less what the config turns off
        if self.writeback and not self.readonly:
            wanted |= InitFlag.WRITEBACK_CACHE
        if self.announce_submounts:
            wanted |= InitFlag.SUBMOUNTS
        if self.posix_locks:
            wanted |= InitFlag.POSIX_LOCKS
        if self.flock:
            wanted |= InitFlag.FLOCK_LOCKS
        return InitFlag(capable & wanted)

    def attach_fast_path(self, fast: FastPathMirror) -> None:
        """Let the C fast path serve GETATTR/READ/WRITE from this filesystem's tables.

        ``fast`` (a :class:`~pyvirtiofsd.dma.FastPath`) gets the settings it
        answers with and a mirror of both tables (see :class:`.inodes.FdMirror`);
        call before the first request.
        """
        fast.configure(
            attr_valid=self.attr_timeout,
            entry_valid=self.entry_timeout,
            readonly=self.readonly,
            switch_creds=oscalls.switching_enabled(),
            announce_submounts=self.announce_submounts,
            python_writes=self.remapped_capability() is not None,
        )
        self.inodes.attach_mirror(fast)
        self.handles.attach_mirror(fast)

    def close(self) -> None:
        """Release every fd, the root's included."""
        self.handles.clear()
        self.inodes.close_root()
        os.close(self._proc_fd)

    # --- private helpers ----------------------------------------------------

    def _reopen(self, fd: int, flags: int) -> int:
        """A real fd for the inode an O_PATH fd holds (via /proc/self/fd/N).

        EMFILE/ENFILE: cached inode fds are shed and it is tried once more."""
        flags |= os.O_CLOEXEC | os.O_NOCTTY
        return self.inodes.retry_fds(lambda: os.open(str(fd), flags, dir_fd=self._proc_fd))

    def _reopen_dir(self, fd: int) -> int:
        """A directory's O_PATH fd reopened O_RDONLY (a mount fd for file handles);
        O_DIRECTORY: anything else is refused before it is opened."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOCTTY
        return os.open(str(fd), flags, dir_fd=self._proc_fd)

    def _fdinfo(self, fd: int) -> bytes:
        """``/proc/self/fdinfo/N`` through the proc fd: the sandbox has no /proc path."""
        info = os.open(f"../fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._proc_fd)
        try:
            chunks = []
            while chunk := os.read(info, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(info)

    def _open_inode(self, fd: int, flags: int) -> int:
        """``_reopen`` for OPEN: with writeback, O_WRONLY becomes O_RDWR if allowed."""
        if self.writeback and flags & os.O_ACCMODE == os.O_WRONLY:
            try:
                return self._reopen(fd, (flags & ~os.O_ACCMODE) | os.O_RDWR)
            except PermissionError:
                pass  # a write-only file: the guest must not need to read it
        return self._reopen(fd, flags)

    def _host_open_flags(self, flags: int) -> int:
        out = flags & _OPEN_PASS
        if self.allow_direct_io:
            out |= flags & os.O_DIRECT
        if self.writeback:
            out &= ~os.O_APPEND  # the guest page cache computes append offsets
        return out

    def _open_out_flags(self, flags: int) -> int:
        """FOPEN_* for an opened file, from the cache policy (as virtiofsd):
        never -> direct I/O (no guest page cache), always -> keep the cache
        across opens; with allow_direct_io a guest O_DIRECT open bypasses the
        guest page cache too."""
        if self.cache == "never" or (self.allow_direct_io and flags & os.O_DIRECT):
            return int(abi.OpenOutFlag.DIRECT_IO)
        if self.cache == "always":
            return int(abi.OpenOutFlag.KEEP_CACHE)
        return 0

    def _check_writable(self) -> None:
        if self.readonly:
            raise _err(errno.EROFS)

    @staticmethod
    def _as_caller(ctx: RequestContext) -> AbstractContextManager[None]:
        """The caller's fsuid/fsgid, no capability raised (a kill-suid WRITE)."""
        return oscalls.caller_credentials(ctx.uid, ctx.gid)

    def _groups(self, ctx: RequestContext) -> tuple[int, ...] | None:
        """The caller's supplementary groups where known: all of them on the
        host mount, the one FUSE_EXT_GROUPS sent with a virtio creation."""
        if self.caller_groups is not None:
            return self.caller_groups(ctx.pid)
        return fuse_session.supplied_groups()

    def _as_creator(self, ctx: RequestContext) -> AbstractContextManager[None]:
        """Make an inode: its owner is the caller (see :func:`.oscalls.creator_credentials`)."""
        return oscalls.creator_credentials(ctx.uid, ctx.gid, self._groups(ctx))

    def _killing(self, ctx: RequestContext, kill: object) -> AbstractContextManager[None]:
        """When ``kill``: clear setuid/setgid as the host would for the caller's group."""
        if not kill:
            return nullcontext()
        return oscalls.killing_credentials(ctx.gid, self._groups(ctx))

    @staticmethod
    def _kill_if(kill: object) -> AbstractContextManager[None]:
        """Without CAP_FSETID when ``kill``: the host then clears setuid/setgid itself."""
        return oscalls.without_fsetid() if kill else nullcontext()

    def _entry_for_fd(self, fd: int) -> EntryOut:
        """Count one lookup of the inode an open fd refers to (CREATE)."""
        path_fd = self.inodes.retry_fds(
            lambda: os.open(str(fd), os.O_PATH | os.O_CLOEXEC, dir_fd=self._proc_fd)
        )
        try:
            st = os.fstat(path_fd)
        except BaseException:
            os.close(path_fd)
            raise
        inode = self.inodes.add_lookup(path_fd, st)
        return self._entry(inode.nodeid, st)

    def _entry(self, nodeid: int, st: os.stat_result, *, submount: bool = False) -> EntryOut:
        attr = stat_to_attr(st)
        if submount:
            # FUSE_ATTR_SUBMOUNT: the guest mounts this directory as its own
            # filesystem (own st_dev), like the host's mount point it is.
            attr = attr._replace(flags=attr.flags | FUSE_ATTR_SUBMOUNT)
        entry, attr_t = self.entry_timeout, self.attr_timeout
        return EntryOut(nodeid, 0, entry[0], attr_t[0], entry[1], attr_t[1], attr)

    def _lookup_at(self, dir_fd: int, name: bytes) -> EntryOut:
        """Open ``name`` under ``dir_fd`` as O_PATH and count one lookup of it."""
        flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = self.inodes.retry_fds(lambda: os.open(name, flags, dir_fd=dir_fd))
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        inode = self.inodes.add_lookup(fd, st)
        submount = (
            self.announce_submounts
            and stat.S_ISDIR(st.st_mode)
            and st.st_dev != os.fstat(dir_fd).st_dev
        )
        return self._entry(inode.nodeid, st, submount=submount)

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

    def open(self, nodeid: int, flags: int, ctx: RequestContext, open_flags: int = 0) -> OpenOut:
        """Open a regular file, as the daemon (the guest has checked the access).

        ``open_flags & OPEN_KILL_SUIDGID`` (with O_TRUNC): the truncation
        clears setuid/setgid as it would for a caller without CAP_FSETID.
        """
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        if writing:
            self._check_writable()
        with self.inodes.borrow(nodeid) as inode:
            if inode.mode == stat.S_IFDIR:
                raise _err(errno.EISDIR)
            if inode.mode != stat.S_IFREG:
                # Device nodes, FIFOs and sockets are the guest's business (its
                # kernel never sends OPEN for them); opening one here would
                # reach a host device or block a worker on a FIFO.
                raise _err(errno.ENXIO)
            with self._killing(ctx, flags & os.O_TRUNC and open_flags & abi.OPEN_KILL_SUIDGID):
                fd = self._open_inode(inode.fd, self._host_open_flags(flags))
        fh = self.handles.add(FileHandle(fd, nodeid))
        return OpenOut(fh=fh, open_flags=self._open_out_flags(flags), padding=0)

    def read(self, fh: int, offset: int, size: int, into: ReadInto) -> int:
        """Read straight into the reply via ``into``; returns the byte count."""
        if offset < 0 or offset > (1 << 63) - 1:
            raise _err(errno.EINVAL)
        with self.handles.borrow(fh, FileHandle) as handle:
            return into(handle.fd, offset, size) if size else 0

    def flush(self, fh: int, lock_owner: int) -> None:
        """close(2) of one guest fd: drop the owner's POSIX locks, flush like a close."""
        with self.handles.borrow(fh, FileHandle) as handle:
            self._drop_lock_owner(handle, lock_owner)
            # As virtiofsd: close a duplicate so that filesystems with
            # close-to-open semantics (NFS) flush now, not at RELEASE.
            os.close(os.dup(handle.fd))

    def release(self, fh: int, release_flags: int = 0, lock_owner: int = 0) -> None:
        """The last guest reference to ``fh`` is gone.

        RELEASE_FLUSH: also a flush (drop ``lock_owner``'s POSIX locks);
        RELEASE_FLOCK_UNLOCK: drop the flock lock (closing our fd would too,
        unless a concurrent request still borrows it).
        """
        if release_flags & (abi.RELEASE_FLUSH | abi.RELEASE_FLOCK_UNLOCK):
            with contextlib.suppress(OSError), self.handles.borrow(fh, FileHandle) as handle:
                if release_flags & abi.RELEASE_FLUSH:
                    self._drop_lock_owner(handle, lock_owner)
                if release_flags & abi.RELEASE_FLOCK_UNLOCK:
                    self.locks.flock(handle, locks.F_UNLCK, None)
        self.handles.release(fh)

    def opendir(self, nodeid: int, flags: int) -> OpenOut:
        """Open a directory for READDIR; EMFILE past ``max_dir_handles`` open ones."""
        del flags  # only O_RDONLY|O_DIRECTORY make sense for a directory
        with self.inodes.borrow(nodeid) as inode:
            if inode.mode != stat.S_IFDIR:
                raise _err(errno.ENOTDIR)
            self._dir_budget.take()
            try:
                fd = self._reopen(inode.fd, os.O_RDONLY | os.O_DIRECTORY)
            except BaseException:
                self._dir_budget.give()
                raise
        fh = self.handles.add(DirHandle(fd, nodeid, self._dir_budget.give))
        return OpenOut(fh=fh, open_flags=0, padding=0)

    @property
    def open_dir_handles(self) -> int:
        """Directory handles open now (their fds included until closed)."""
        return self._dir_budget.used

    def _dir_stream(
        self, handle: DirHandle, offset: int, size: int
    ) -> Iterator[dirents.HostDirent]:
        """Entries after host cookie ``offset``, read in batches of about
        ``size`` bytes until the caller stops or the directory ends; caller
        holds ``handle.lock`` (the fd's position is shared)."""
        root_ino = self.inodes.root.key[1] if handle.nodeid == ROOT_ID else None
        while True:
            more = False
            for de in dirents.read_dirents(handle.fd, offset, size):
                more = True
                offset = de.off
                if root_ino is not None and de.name == b"..":
                    de = de._replace(ino=root_ino)  # never reveal what lies above the share
                yield de
            if not more:
                return

    def readdir(self, fh: int, offset: int, budget: DirBudget) -> list[DirEntry]:
        """Entries after host cookie ``offset`` while ``budget`` has room.

        Streamed from the directory fd (see :mod:`.dirents`): each entry's
        ``off`` is the host's ``d_off``; an empty list means the end.
        """
        out: list[DirEntry] = []
        with self.handles.borrow(fh, DirHandle) as handle, handle.lock:
            for de in self._dir_stream(handle, offset, budget.room):
                if not budget.take(de.name):
                    break
                out.append(DirEntry(de.ino, de.off, de.dtype, de.name))
        return out

    def readdirplus(
        self, fh: int, offset: int, budget: DirBudget
    ) -> list[tuple[DirEntry, EntryOut | None]]:
        """As :meth:`readdir`, each entry but ``.``/``..`` looked up (one lookup each).

        An entry is looked up only once it is known to fit, so the guest's
        lookup counts match exactly what it received.  Entries that vanished
        since the host listed them are skipped.
        """
        out: list[tuple[DirEntry, EntryOut | None]] = []
        # A host dirent is about a fifth of a direntplus: read what fits, not 5x it.
        size = budget.room // _DIRENTPLUS_PER_HOST_DIRENT
        with self.handles.borrow(fh, DirHandle) as handle, handle.lock:
            for de in self._dir_stream(handle, offset, size):
                if de.name in (b".", b".."):
                    if not budget.take(de.name):
                        break
                    out.append((DirEntry(de.ino, de.off, de.dtype, de.name), None))
                    continue
                if not budget.take(de.name):
                    break
                try:
                    entry = self._lookup_at(handle.fd, de.name)
                except FileNotFoundError:
                    continue  # gone since listed: its room stays unused
                except OSError:
                    if out:
                        break  # return what we have; the guest asks again from here
                    raise
                out.append(
                    (DirEntry(entry.attr.ino, de.off, _dtype(entry.attr.mode), de.name), entry)
                )
        return out

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
        if mask & os.W_OK and self.readonly:
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

    # --- attributes -----------------------------------------------------------

    def setattr(self, nodeid: int, arg: SetattrIn, ctx: RequestContext) -> AttrOut:
        """Change mode, owner, size and timestamps, in that order (as virtiofsd).

        With FATTR_FH every change goes through the open file; without it,
        through the O_PATH fd: chmod via its /proc magic link (refused for a
        symlink), chown with AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, truncate on
        a write-reopened fd, timestamps on the magic link (AT_EMPTY_PATH for
        a symlink).  Runs as the daemon (the guest has checked with the
        caller's full group list); the host's chown clears setuid/setgid of a
        non-directory itself, and FATTR_KILL_SUIDGID runs chown and truncate
        with the caller's fsgid and without CAP_FSETID so that truncate does too.
        """
        self._check_writable()
        valid = arg.valid
        kill = valid & abi.FATTR_KILL_SUIDGID
        with contextlib.ExitStack() as stack:
            inode = stack.enter_context(self.inodes.borrow(nodeid))
            fd: int | None = None
            if valid & abi.FATTR_FH:
                fd = stack.enter_context(self.handles.borrow(arg.fh, Handle)).fd
            if valid & abi.FATTR_MODE:
                mode = arg.mode & 0o7777
                if fd is not None:
                    os.chmod(fd, mode)
                elif inode.mode == stat.S_IFLNK:
                    raise _err(errno.EOPNOTSUPP)
                else:
                    os.chmod(str(inode.fd), mode, dir_fd=self._proc_fd)
            if valid & (abi.FATTR_UID | abi.FATTR_GID):
                uid = arg.uid if valid & abi.FATTR_UID else -1
                gid = arg.gid if valid & abi.FATTR_GID else -1
                with self._killing(ctx, kill):
                    if fd is not None:
                        os.chown(fd, uid, gid)
                    else:
                        flags = oscalls.AT_EMPTY_PATH | oscalls.AT_SYMLINK_NOFOLLOW
                        oscalls.fchownat(inode.fd, b"", uid, gid, flags)
                if inode.mode == stat.S_IFREG:
                    self._drop_remapped_capability(inode.fd if fd is None else fd)
            if valid & abi.FATTR_SIZE:
                with self._killing(ctx, kill):
                    self._truncate(inode, fd, arg.size)
                self._drop_remapped_capability(inode.fd if fd is None else fd)
            if valid & _FATTR_TIMES:
                self._utimens(inode, fd, arg)
            st = os.fstat(inode.fd if fd is None else fd)
        return AttrOut(self.attr_timeout[0], self.attr_timeout[1], 0, stat_to_attr(st))

    def _truncate(self, inode: Inode, fd: int | None, size: int) -> None:
        if size > abi.OFFSET_MAX:
            raise _err(errno.EINVAL)
        if fd is not None:
            os.truncate(fd, size)
            return
        if inode.mode == stat.S_IFDIR:
            raise _err(errno.EISDIR)
        if inode.mode != stat.S_IFREG:
            raise _err(errno.EINVAL)  # never open a device, FIFO or socket
        wfd = self._reopen(inode.fd, os.O_WRONLY)  # the guest checked write permission
        try:
            os.truncate(wfd, size)
        finally:
            os.close(wfd)

    def _utimens(self, inode: Inode, fd: int | None, arg: SetattrIn) -> None:
        def spec(now: int, given: int, sec: int, nsec: int) -> tuple[int, int]:
            if arg.valid & now:
                return (0, oscalls.UTIME_NOW)
            if arg.valid & given:
                if nsec >= _NS:
                    raise _err(errno.EINVAL)
                return (sec - (1 << 64) if sec >= 1 << 63 else sec, nsec)
            return (0, oscalls.UTIME_OMIT)

        atime = spec(abi.FATTR_ATIME_NOW, abi.FATTR_ATIME, arg.atime, arg.atimensec)
        mtime = spec(abi.FATTR_MTIME_NOW, abi.FATTR_MTIME, arg.mtime, arg.mtimensec)
        if fd is not None:
            oscalls.utimensat(fd, None, atime, mtime, 0)
        elif inode.mode == stat.S_IFLNK:
            oscalls.utimensat(inode.fd, b"", atime, mtime, oscalls.AT_EMPTY_PATH)
        else:
            oscalls.utimensat(self._proc_fd, str(inode.fd).encode(), atime, mtime, 0)

    # --- creating and removing names --------------------------------------------

    def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, ctx: RequestContext
    ) -> EntryOut:
        """Regular files, FIFOs, sockets; devices only with ``allow_device_nodes``.

        A whiteout (character device 0:0, what overlayfs makes) is always allowed.
        """
        self._check_writable()
        validate_name(name)
        ftype = stat.S_IFMT(mode) or stat.S_IFREG
        device = 0
        if ftype in (stat.S_IFCHR, stat.S_IFBLK):
            device = decode_dev(rdev)
            whiteout = ftype == stat.S_IFCHR and device == 0
            if not (whiteout or self.allow_device_nodes):
                self._refuse_device(name, ftype, device)
        with self.inodes.borrow(parent) as dir_inode:
            with self._as_creator(ctx):
                os.mknod(name, ftype | (mode & 0o7777), device, dir_fd=dir_inode.fd)
            return self._lookup_at(dir_inode.fd, name)

    def _refuse_device(self, name: bytes, ftype: int, device: int) -> None:
        """EPERM for a device node, and a log line naming the option (at most
        one a second: a tar of /dev would flood the log)."""
        now = time.monotonic()
        self._device_refusals += 1
        if now - self._device_refusal_logged >= 1.0:
            self._device_refusal_logged = now
            logger.warning(
                "MKNOD of %s device %d:%d %s refused with EPERM (%d so far): "
                "the daemon runs without --allow-device-nodes",
                "block" if ftype == stat.S_IFBLK else "character",
                os.major(device),
                os.minor(device),
                name.decode(errors="replace"),
                self._device_refusals,
            )
        raise _err(errno.EPERM)

    def mkdir(self, parent: int, name: bytes, mode: int, ctx: RequestContext) -> EntryOut:
        self._check_writable()
        validate_name(name)
        with self.inodes.borrow(parent) as dir_inode:
            with self._as_creator(ctx):
                os.mkdir(name, mode & 0o7777, dir_fd=dir_inode.fd)
            return self._lookup_at(dir_inode.fd, name)

    def symlink(self, parent: int, name: bytes, target: bytes, ctx: RequestContext) -> EntryOut:
        """A symlink whose target text is stored as given (never followed here)."""
        self._check_writable()
        validate_name(name)
        if not target or b"\0" in target:
            raise _err(errno.EINVAL) if b"\0" in target else _err(errno.ENOENT)
        if len(target) > _SYMLINK_MAX:
            raise _err(errno.ENAMETOOLONG)
        with self.inodes.borrow(parent) as dir_inode:
            with self._as_creator(ctx):
                os.symlink(target, name, dir_fd=dir_inode.fd)
            return self._lookup_at(dir_inode.fd, name)

    def link(self, nodeid: int, parent: int, name: bytes, ctx: RequestContext) -> EntryOut:
        """A new name for ``nodeid``: ``linkat`` through its /proc magic link.

        (``AT_EMPTY_PATH`` would need CAP_DAC_READ_SEARCH; the magic link is
        followed to the inode itself, a symlink included, never beyond.)
        """
        self._check_writable()
        validate_name(name)
        with self.inodes.borrow(nodeid) as inode, self.inodes.borrow(parent) as dir_inode:
            if inode.mode == stat.S_IFDIR:
                raise _err(errno.EPERM)
            # As the daemon: the guest has applied protected_hardlinks and
            # the directory's permissions; a link makes no inode to own.
            os.link(
                str(inode.fd),
                name,
                src_dir_fd=self._proc_fd,
                dst_dir_fd=dir_inode.fd,
                follow_symlinks=True,
            )
            return self._lookup_at(dir_inode.fd, name)

    def unlink(self, parent: int, name: bytes, ctx: RequestContext) -> None:
        self._check_writable()
        validate_name(name)
        del ctx  # the guest has checked the directory and its sticky bit
        with self.inodes.borrow(parent) as dir_inode:
            os.unlink(name, dir_fd=dir_inode.fd)

    def rmdir(self, parent: int, name: bytes, ctx: RequestContext) -> None:
        self._check_writable()
        validate_name(name)
        del ctx  # the guest has checked the directory and its sticky bit
        with self.inodes.borrow(parent) as dir_inode:
            os.rmdir(name, dir_fd=dir_inode.fd)

    def rename(
        self,
        parent: int,
        name: bytes,
        newparent: int,
        newname: bytes,
        flags: int,
        ctx: RequestContext,
    ) -> None:
        """RENAME / RENAME2 (NOREPLACE, EXCHANGE, WHITEOUT via ``renameat2``)."""
        self._check_writable()
        validate_name(name)
        validate_name(newname)
        if flags & ~_RENAME_FLAGS:
            raise _err(errno.EINVAL)
        with (
            self.inodes.borrow(parent) as old_dir,
            self.inodes.borrow(newparent) as new_dir,
            # A whiteout is a new inode (char 0:0): the caller owns it, and
            # the host wants CAP_MKNOD for it.  Else as the daemon.
            self._as_creator(ctx) if flags & _RENAME_WHITEOUT else nullcontext(),
        ):
            if flags:
                oscalls.renameat2(old_dir.fd, name, new_dir.fd, newname, flags)
            else:
                os.rename(name, newname, src_dir_fd=old_dir.fd, dst_dir_fd=new_dir.fd)

    def create(
        self,
        parent: int,
        name: bytes,
        flags: int,
        mode: int,
        ctx: RequestContext,
        open_flags: int = 0,
    ) -> tuple[EntryOut, OpenOut]:
        """Create-and-open: one lookup counted and one handle, as the caller.

        The file is created with O_EXCL first; only if it exists and the
        guest did not ask for O_EXCL is the existing inode opened, and only
        if it is a regular file (never a FIFO, device or symlink).
        """
        self._check_writable()
        validate_name(name)
        oflags = self._host_open_flags(flags)
        kill = flags & os.O_TRUNC and open_flags & abi.OPEN_KILL_SUIDGID
        with (
            self.inodes.borrow(parent) as dir_inode,
            self._as_creator(ctx),
            self._kill_if(kill),
        ):
            fd = self._create_or_open(dir_inode.fd, name, flags, oflags, mode & 0o7777)
        try:
            entry = self._entry_for_fd(fd)
        except BaseException:
            os.close(fd)
            raise
        fh = self.handles.add(FileHandle(fd, entry.nodeid))
        return entry, OpenOut(fh=fh, open_flags=self._open_out_flags(flags), padding=0)

    def _create_or_open(self, dir_fd: int, name: bytes, flags: int, oflags: int, mode: int) -> int:
        base = os.O_CLOEXEC | os.O_NOCTTY | os.O_NOFOLLOW
        if self.writeback and oflags & os.O_ACCMODE == os.O_WRONLY:
            oflags = (oflags & ~os.O_ACCMODE) | os.O_RDWR  # we create it: readable by us
        try:
            return os.open(name, oflags | base | os.O_CREAT | os.O_EXCL, mode, dir_fd=dir_fd)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
        path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            ftype = stat.S_IFMT(os.fstat(path_fd).st_mode)
            if ftype == stat.S_IFDIR:
                raise _err(errno.EISDIR)
            if ftype == stat.S_IFLNK:
                raise _err(errno.ELOOP)
            if ftype != stat.S_IFREG:
                raise _err(errno.ENXIO)
            return self._open_inode(path_fd, oflags)
        finally:
            os.close(path_fd)

    # --- writing -----------------------------------------------------------------

    def write(
        self,
        fh: int,
        offset: int,
        size: int,
        write_flags: int,
        source: WriteFrom,
        ctx: RequestContext,
    ) -> int:
        """Write ``size`` bytes straight from the request via ``source``.

        O_APPEND handles (without writeback) append wherever the host file
        ends: Linux ignores the offset of ``pwritev`` on an O_APPEND fd,
        which is what an append must do when the guest's idea of the size
        is stale.

        WRITE_KILL_SUIDGID (the guest's caller lacks CAP_FSETID): the write
        runs as the caller and without CAP_FSETID, so the host kernel
        clears setuid, setgid (when group-executable, or when the caller is
        not in the file's group) and ``security.capability`` exactly as it
        would for that caller on a local disk.  Without the flag the
        daemon writes as itself and nothing is cleared.
        """
        self._check_writable()
        if offset > abi.OFFSET_MAX:
            raise _err(errno.EINVAL)
        if offset + size > abi.OFFSET_MAX + 1:
            raise _err(errno.EFBIG)
        kill = write_flags & abi.WRITE_KILL_SUIDGID
        with self.handles.borrow(fh, FileHandle) as handle:
            self._drop_remapped_capability(handle.fd)
            with self._as_caller(ctx) if kill else nullcontext(), self._kill_if(kill):
                return source(handle.fd, offset, size) if size else 0

    def fsync(self, fh: int, datasync: bool, *, isdir: bool = False) -> None:
        kind: type[Handle] = DirHandle if isdir else FileHandle
        with self.handles.borrow(fh, kind) as handle:
            if datasync:
                os.fdatasync(handle.fd)
            else:
                os.fsync(handle.fd)

    def fallocate(self, fh: int, offset: int, length: int, mode: int, ctx: RequestContext) -> None:
        """``fallocate(2)``; without CAP_FSETID for non-root callers (their data changes)."""
        self._check_writable()
        if mode & ~_FALLOC_MODES:
            raise _err(errno.EOPNOTSUPP)
        if offset > abi.OFFSET_MAX or length > abi.OFFSET_MAX:
            raise _err(errno.EINVAL)
        with self.handles.borrow(fh, FileHandle) as handle, self._kill_if(ctx.uid != 0):
            oscalls.fallocate(handle.fd, mode, offset, length)

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        """SEEK_DATA / SEEK_HOLE (the guest answers the others itself)."""
        if whence not in (os.SEEK_SET, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise _err(errno.EINVAL)
        if offset > abi.OFFSET_MAX:
            raise _err(errno.ENXIO if whence in (os.SEEK_DATA, os.SEEK_HOLE) else errno.EINVAL)
        with self.handles.borrow(fh, FileHandle) as handle:
            return os.lseek(handle.fd, offset, whence)

    def copy_file_range(
        self,
        fh_in: int,
        off_in: int,
        fh_out: int,
        off_out: int,
        length: int,
        flags: int,
        ctx: RequestContext,
    ) -> int:
        self._check_writable()
        if flags:
            raise _err(errno.EINVAL)
        if off_in > abi.OFFSET_MAX or off_out > abi.OFFSET_MAX:
            raise _err(errno.EINVAL)
        count = min(length, _MAX_RW)
        with (
            self.handles.borrow(fh_in, FileHandle) as src,
            self.handles.borrow(fh_out, FileHandle) as dst,
            self._kill_if(ctx.uid != 0),
        ):
            return os.copy_file_range(src.fd, dst.fd, count, off_in, off_out) if count else 0

    def syncfs(self, nodeid: int) -> None:
        """``syncfs(2)`` of the filesystem holding ``nodeid`` (else of the root's)."""
        with self.inodes.borrow(nodeid) as inode:
            fd = -1
            if inode.mode in (stat.S_IFDIR, stat.S_IFREG):
                with contextlib.suppress(OSError):
                    fd = self._reopen(inode.fd, os.O_RDONLY)
        if fd < 0:
            with self.inodes.borrow(ROOT_ID) as root:
                fd = self._reopen(root.fd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            oscalls.syncfs(fd)
        finally:
            os.close(fd)

    # --- extended attributes -----------------------------------------------------

    #: Guest <-> host xattr names (``--xattrmap``), from the config.
    xattrmap: XattrMap = xattrmap_mod.IDENTITY

    def _check_xattr(self) -> None:
        if not self.xattr:
            raise _err(errno.ENOSYS)

    _capability_for: tuple[XattrMap, bytes | None] | None = None

    def remapped_capability(self) -> bytes | None:
        """The host name of the guest's ``security.capability`` when
        ``--xattrmap`` moves it elsewhere (None: not moved, or not served).

        CVE-2021-20263: the host kernel drops the real ``security.capability``
        of a regular file on every write, truncate and chown (its killpriv),
        but knows nothing of a remapped one; so the daemon removes that
        itself (``_drop_remapped_capability``), as virtiofsd does.
        """
        cached = self._capability_for
        if cached is not None and cached[0] is self.xattrmap:
            return cached[1]
        host: bytes | None = None
        if self.xattr:
            try:
                host = self.xattrmap.to_host(b"security.capability")
            except OSError:  # refused: the guest can never set it
                host = None
            if host == b"security.capability":
                host = None
        self._capability_for = (self.xattrmap, host)
        return host

    def _drop_remapped_capability(self, fd: int) -> None:
        """Remove the remapped capability xattr of ``fd``'s file (as the daemon).

        By its ``/proc/self/fd`` name, as every xattr call: the seccomp
        allowlist has ``removexattr``, not ``fremovexattr``."""
        host = self.remapped_capability()
        if host is None:
            return
        try:
            with procfs.in_proc_fd_dir(self._proc_fd):
                os.removexattr(str(fd), host)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise

    def _host_xattr_name(self, name: bytes, *, getting: bool = False) -> bytes:
        host = self.xattrmap.to_host(validate_xattr_name(name), getting=getting)
        return validate_xattr_name(host)

    def _write_xattr_name(self, name: bytes, ctx: RequestContext) -> bytes:
        """The host name a set/remove acts on; privileged names only for guest root."""
        host = self._host_xattr_name(name)
        if xattrmap_mod.privileged_write_denied(host, ctx.uid):
            raise _err(errno.EPERM)
        return host

    def setxattr(
        self, nodeid: int, name: bytes, value: bytes, flags: int, ctx: RequestContext
    ) -> None:
        self._check_xattr()
        self._check_writable()
        host = self._write_xattr_name(name, ctx)
        if len(value) > _XATTR_SIZE_MAX:
            raise _err(errno.E2BIG)
        if flags & ~(os.XATTR_CREATE | os.XATTR_REPLACE):
            raise _err(errno.EINVAL)
        with (
            self.inodes.borrow(nodeid) as inode,
            procfs.in_proc_fd_dir(self._proc_fd),
        ):
            os.setxattr(str(inode.fd), host, value, flags)

    def getxattr(self, nodeid: int, name: bytes, size: int) -> bytes | int:
        """The value, or its length when ``size`` is 0; ERANGE when it exceeds ``size``."""
        self._check_xattr()
        host = self._host_xattr_name(name, getting=True)
        with self.inodes.borrow(nodeid) as inode, procfs.in_proc_fd_dir(self._proc_fd):
            value = os.getxattr(str(inode.fd), host)
        if size == 0:
            return len(value)
        if len(value) > size:
            raise _err(errno.ERANGE)
        return value

    def listxattr(self, nodeid: int, size: int) -> bytes | int:
        """NUL-terminated names (as the map shows them), or their total length
        when ``size`` is 0."""
        self._check_xattr()
        with self.inodes.borrow(nodeid) as inode, procfs.in_proc_fd_dir(self._proc_fd):
            names = os.listxattr(str(inode.fd))
        shown = (self.xattrmap.to_guest(os.fsencode(n)) for n in names)
        data = b"".join(n + b"\0" for n in shown if n is not None)
        if size == 0:
            return len(data)
        if len(data) > size:
            raise _err(errno.ERANGE)
        return data

    def removexattr(self, nodeid: int, name: bytes, ctx: RequestContext) -> None:
        self._check_xattr()
        self._check_writable()
        host = self._write_xattr_name(name, ctx)
        with (
            self.inodes.borrow(nodeid) as inode,
            procfs.in_proc_fd_dir(self._proc_fd),
        ):
            os.removexattr(str(inode.fd), host)

    # --- locks ---------------------------------------------------------------------

    def _check_locks(self, flock: bool) -> None:
        """ENOSYS unless this kind of lock is served (the session checks INIT too)."""
        if not (self.flock if flock else self.posix_locks):
            raise _err(errno.ENOSYS)

    @contextlib.contextmanager
    def _lock_target(self, nodeid: int, fh: int) -> Iterator[tuple[Inode, FileHandle]]:
        """Borrow ``fh`` and its inode ``nodeid``: a regular file open in the guest.

        EBADF if ``fh`` is not an open file of ``nodeid``, EINVAL if ``nodeid``
        is not a regular file; nothing is opened before both hold, so no lock
        request reaches a FIFO, a device node or a file the guest has not
        opened.
        """
        with self.handles.borrow(fh, FileHandle) as handle:
            if handle.nodeid != nodeid:
                raise _err(errno.EBADF)
            with self.inodes.borrow(nodeid) as inode:
                if inode.mode != stat.S_IFREG:
                    raise _err(errno.EINVAL)
                yield inode, handle

    def _drop_lock_owner(self, handle: FileHandle, owner: int) -> None:
        """close(2) by ``owner``: every POSIX lock it held on the handle's inode goes."""
        with contextlib.suppress(OSError), self.inodes.borrow(handle.nodeid) as inode:
            self.locks.drop_owner(inode, owner)

    @property
    def lock_epoch(self) -> int:
        """Bumped by every DESTROY/reset (see :attr:`.locks.LockManager.epoch`)."""
        return self.locks.epoch

    def reset_locks(self) -> None:
        self.locks.reset()

    def lock_wait(self) -> locks.LockWait:
        """A cancellation point for one SETLKW (INTERRUPT cancels it, DESTROY too)."""
        return self.locks.new_wait()

    def getlk(self, nodeid: int, fh: int, owner: int, lock: FileLock) -> FileLock:
        """The first lock that would conflict with ``lock`` for ``owner`` (F_UNLCK: none)."""
        self._check_locks(flock=False)
        with self._lock_target(nodeid, fh) as (inode, handle):
            return self.locks.getlk(inode, handle, owner, lock)

    def setlk(
        self,
        nodeid: int,
        fh: int,
        owner: int,
        lock: FileLock,
        *,
        flock: bool,
        wait: fuse_fs.LockWait | None,
    ) -> None:
        """SETLK (``wait`` None) / SETLKW, POSIX record locks or (``flock``) BSD flock.

        SETLKW blocks the calling thread until the lock is granted, ``wait``
        is cancelled (INTERRUPT: EINTR) or the filesystem is destroyed (EIO);
        see :mod:`.locks`.
        """
        if wait is not None and not isinstance(wait, locks.LockWait):
            raise TypeError("SETLKW waits come from lock_wait()")
        self._check_locks(flock)
        with self._lock_target(nodeid, fh) as (inode, handle):
            if flock:
                self.locks.flock(handle, lock.type, wait)
            else:
                self.locks.setlk(inode, handle, owner, lock, wait)

    def destroy(self) -> None:
        """Forget every inode and handle (DESTROY); the root stays open.

        Lock waits end first (EIO) and every lock owner's fd is closed."""
        self.locks.reset()
        self.handles.clear()
        self.inodes.clear()
