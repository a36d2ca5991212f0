"""The FUSE wire format, protocol 7.38 (Linux ``include/uapi/linux/fuse.h``).

Every structure is a :class:`typing.NamedTuple` paired with a :class:`Layout`
(its ``struct`` format).  All structures are little-endian: virtio-fs carries
FUSE in the guest's byte order and every guest we serve (x86_64, arm64) is
little-endian.  Sizes are checked against the kernel header in the tests.

Only the session decodes bytes; handlers receive the decoded tuples.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from typing import Any, Generic, NamedTuple, TypeVar

from .errors import MalformedRequest

#: Protocol version we implement: 7.37 (Linux 6.1) plus 7.38's request
#: extensions (``total_extlen``, FUSE_EXT_GROUPS, FUSE_CREATE_SUPP_GROUP;
#: Linux 6.2+).  7.38's other additions are replies a daemon may use
#: (FOPEN_PARALLEL_DIRECT_WRITES, EXPIRE_ONLY notifications); we do not.
KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 38
#: Oldest minor we accept: 7.27 is where every structure we use reached its
#: current size (fuse_init_out's 64 bytes since 7.23, READDIRPLUS since 7.21),
#: which keeps the encoders free of per-version variants.
MIN_KERNEL_MINOR_VERSION = 27

ROOT_ID = 1

#: Reply sizes of fuse_init_out for old minors (``FUSE_COMPAT_*_INIT_OUT_SIZE``).
COMPAT_INIT_OUT_SIZE = 8
COMPAT_22_INIT_OUT_SIZE = 24


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


class InitFlag(enum.IntFlag):
    """fuse_init_in/out ``flags`` (bits 0-31) and ``flags2`` (bits 32-63)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34  # 7.38: FUSE_EXT_GROUPS on creations


class OpenOutFlag(enum.IntFlag):
    """fuse_open_out ``open_flags`` (FOPEN_*)."""

    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5


GETATTR_FH = 1 << 0

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# fuse_write_in.write_flags
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2  # "FUSE_WRITE_KILL_PRIV" before 7.31

# fuse_open_in.open_flags / fuse_create_in.open_flags
OPEN_KILL_SUIDGID = 1 << 0

FSYNC_FDATASYNC = 1 << 0
LK_FLOCK = 1 << 0
#: ``OFFSET_MAX`` of the guest kernel: a lock "to end of file".
OFFSET_MAX = (1 << 63) - 1
RELEASE_FLUSH = 1 << 0
RELEASE_FLOCK_UNLOCK = 1 << 1
READ_LOCKOWNER = 1 << 1

_T = TypeVar("_T", bound=tuple[Any, ...])


class Layout(Generic[_T]):
    """A wire structure: a ``struct`` format bound to the tuple it decodes to."""

    __slots__ = ("_make", "_struct", "size")

    def __init__(self, make: Callable[..., _T], fmt: str) -> None:
        self._make = make
        self._struct = struct.Struct(fmt)
        self.size: int = self._struct.size

    def decode(self, data: bytes | bytearray | memoryview, offset: int = 0) -> _T:
        """Decode at ``offset``; :class:`MalformedRequest` if too short."""
        if offset < 0 or len(data) - offset < self.size:
            name = getattr(self._make, "__name__", "struct")
            raise MalformedRequest(
                f"{name} needs {self.size} bytes, {max(len(data) - offset, 0)} present"
            )
        return self._make(*self._struct.unpack_from(data, offset))

    def encode(self, value: _T) -> bytes:
        return self._struct.pack(*value)

    def pack_into(self, buf: bytearray, offset: int, value: _T) -> None:
        self._struct.pack_into(buf, offset, *value)


# --- headers ---------------------------------------------------------------


class InHeader(NamedTuple):
    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int  # 7.38: request extensions at the end, in 8-byte units
    padding: int


class OutHeader(NamedTuple):
    len: int
    error: int  # 0 or -errno
    unique: int


IN_HEADER = Layout(InHeader, "<IIQQIIIHH")
OUT_HEADER = Layout(OutHeader, "<IiQ")


# --- attributes and entries ------------------------------------------------


class Attr(NamedTuple):
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int


_ATTR_FMT = "QQQqqqIIIIIIIIII"
ATTR = Layout(Attr, "<" + _ATTR_FMT)


class EntryOut(NamedTuple):
    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    entry_valid_nsec: int
    attr_valid_nsec: int
    attr: Attr

    def encode(self) -> bytes:
        return _ENTRY_HEAD.pack(*self[:6]) + ATTR.encode(self.attr)


_ENTRY_HEAD = struct.Struct("<QQQQII")
ENTRY_OUT_SIZE = _ENTRY_HEAD.size + ATTR.size


class AttrOut(NamedTuple):
    attr_valid: int
    attr_valid_nsec: int
    dummy: int
    attr: Attr

    def encode(self) -> bytes:
        return _ATTR_OUT_HEAD.pack(*self[:3]) + ATTR.encode(self.attr)


_ATTR_OUT_HEAD = struct.Struct("<QII")
ATTR_OUT_SIZE = _ATTR_OUT_HEAD.size + ATTR.size


# --- request bodies --------------------------------------------------------


class InitIn(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int
    flags2: int  # 7.36+, only meaningful with INIT_EXT


#: The kernel sent 8 bytes before 7.6, 16 before 7.36, 64 since.
INIT_IN_FULL_SIZE = 64


class InitOut(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int
    map_alignment: int
    flags2: int


INIT_OUT = Layout(InitOut, "<IIIIHHIIHHI28x")


class ForgetIn(NamedTuple):
    nlookup: int


FORGET_IN = Layout(ForgetIn, "<Q")


class ForgetOne(NamedTuple):
    nodeid: int
    nlookup: int


FORGET_ONE = Layout(ForgetOne, "<QQ")


class BatchForgetIn(NamedTuple):
    nitems: int  # "count" in fuse.h (a NamedTuple cannot have a field named count)
    dummy: int


BATCH_FORGET_IN = Layout(BatchForgetIn, "<II")


class GetattrIn(NamedTuple):
    getattr_flags: int
    dummy: int
    fh: int


GETATTR_IN = Layout(GetattrIn, "<IIQ")


class OpenIn(NamedTuple):
    flags: int
    open_flags: int  # FUSE_OPEN_KILL_SUIDGID (7.33)


OPEN_IN = Layout(OpenIn, "<II")


class OpenOut(NamedTuple):
    fh: int
    open_flags: int
    padding: int


OPEN_OUT = Layout(OpenOut, "<QII")


class ReleaseIn(NamedTuple):
    fh: int
    flags: int
    release_flags: int
    lock_owner: int


RELEASE_IN = Layout(ReleaseIn, "<QIIQ")


class FlushIn(NamedTuple):
    fh: int
    unused: int
    padding: int
    lock_owner: int


FLUSH_IN = Layout(FlushIn, "<QIIQ")


class ReadIn(NamedTuple):
    """READ, READDIR and READDIRPLUS."""

    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int
    padding: int


READ_IN = Layout(ReadIn, "<QQIIQII")


class WriteIn(NamedTuple):
    fh: int
    offset: int
    size: int
    write_flags: int
    lock_owner: int
    flags: int
    padding: int


WRITE_IN = Layout(WriteIn, "<QQIIQII")


class WriteOut(NamedTuple):
    size: int
    padding: int


WRITE_OUT = Layout(WriteOut, "<II")


class AccessIn(NamedTuple):
    mask: int
    padding: int


ACCESS_IN = Layout(AccessIn, "<II")


class GetxattrIn(NamedTuple):
    size: int
    padding: int


GETXATTR_IN = Layout(GetxattrIn, "<II")


class GetxattrOut(NamedTuple):
    size: int
    padding: int


GETXATTR_OUT = Layout(GetxattrOut, "<II")


class SetattrIn(NamedTuple):
    valid: int  # FATTR_* bits
    padding: int
    fh: int
    size: int
    lock_owner: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    unused4: int
    uid: int
    gid: int
    unused5: int


SETATTR_IN = Layout(SetattrIn, "<IIQQQQQQIIIIIIII")


class MknodIn(NamedTuple):
    mode: int
    rdev: int  # new_encode_dev() form
    umask: int
    padding: int


MKNOD_IN = Layout(MknodIn, "<IIII")


class MkdirIn(NamedTuple):
    mode: int
    umask: int


MKDIR_IN = Layout(MkdirIn, "<II")


class RenameIn(NamedTuple):
    newdir: int


RENAME_IN = Layout(RenameIn, "<Q")


class Rename2In(NamedTuple):
    newdir: int
    flags: int  # RENAME_NOREPLACE / EXCHANGE / WHITEOUT
    padding: int


RENAME2_IN = Layout(Rename2In, "<QII")


class LinkIn(NamedTuple):
    oldnodeid: int


LINK_IN = Layout(LinkIn, "<Q")


class CreateIn(NamedTuple):
    flags: int
    mode: int
    umask: int
    open_flags: int  # FUSE_OPEN_KILL_SUIDGID (7.33)


CREATE_IN = Layout(CreateIn, "<IIII")


class FsyncIn(NamedTuple):
    """FSYNC and FSYNCDIR."""

    fh: int
    fsync_flags: int
    padding: int


FSYNC_IN = Layout(FsyncIn, "<QII")


class SetxattrIn(NamedTuple):
    """Without FUSE_SETXATTR_EXT (which we do not negotiate): 8 bytes."""

    size: int
    flags: int


SETXATTR_IN = Layout(SetxattrIn, "<II")


class FileLock(NamedTuple):
    """fuse_file_lock: ``end`` is inclusive, OFFSET_MAX means "to EOF"."""

    start: int
    end: int
    type: int
    pid: int


class LkIn(NamedTuple):
    fh: int
    owner: int
    start: int
    end: int
    type: int
    pid: int
    lk_flags: int
    padding: int

    @property
    def lock(self) -> FileLock:
        return FileLock(self.start, self.end, self.type, self.pid)


LK_IN = Layout(LkIn, "<QQQQIIII")
LK_OUT = Layout(FileLock, "<QQII")


class FallocateIn(NamedTuple):
    fh: int
    offset: int
    length: int
    mode: int
    padding: int


FALLOCATE_IN = Layout(FallocateIn, "<QQQII")


class LseekIn(NamedTuple):
    fh: int
    offset: int
    whence: int
    padding: int


LSEEK_IN = Layout(LseekIn, "<QQII")


class LseekOut(NamedTuple):
    offset: int


LSEEK_OUT = Layout(LseekOut, "<Q")


class CopyFileRangeIn(NamedTuple):
    fh_in: int
    off_in: int
    nodeid_out: int
    fh_out: int
    off_out: int
    len: int
    flags: int


COPY_FILE_RANGE_IN = Layout(CopyFileRangeIn, "<QQQQQQQ")


class SyncfsIn(NamedTuple):
    padding: int


SYNCFS_IN = Layout(SyncfsIn, "<Q")


class InterruptIn(NamedTuple):
    unique: int


INTERRUPT_IN = Layout(InterruptIn, "<Q")


class Kstatfs(NamedTuple):
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int


KSTATFS = Layout(Kstatfs, "<QQQQQIII28x")  # padding + spare[6]


# --- directory records -----------------------------------------------------

_DIRENT_HEAD = struct.Struct("<QQII")
#: ``FUSE_NAME_OFFSET``: size of fuse_dirent without its name.
DIRENT_NAME_OFFSET = _DIRENT_HEAD.size


def rec_align(n: int) -> int:
    """``FUSE_REC_ALIGN``: records are padded to 8 bytes."""
    return (n + 7) & ~7


def dirent_size(name: bytes) -> int:
    return rec_align(DIRENT_NAME_OFFSET + len(name))


def direntplus_size(name: bytes) -> int:
    return rec_align(ENTRY_OUT_SIZE + DIRENT_NAME_OFFSET + len(name))


def encode_dirent(ino: int, off: int, dtype: int, name: bytes) -> bytes:
    rec = _DIRENT_HEAD.pack(ino, off, len(name), dtype) + name
    return rec + bytes(rec_align(len(rec)) - len(rec))


def encode_direntplus(entry: EntryOut, ino: int, off: int, dtype: int, name: bytes) -> bytes:
    return entry.encode() + encode_dirent(ino, off, dtype, name)


# --- request extensions (7.38) ------------------------------------------------

#: ``total_extlen`` counts 8-byte units; every extension record is that aligned.
EXT_ALIGN = 8
#: fuse_ext_header: ``size`` (of the whole record, header included), ``type``.
EXT_HEADER = struct.Struct("<II")
#: Types 0..FUSE_MAX_NR_SECCTX are a fuse_secctx_header's ``nr_secctx``.
FUSE_MAX_NR_SECCTX = 31
FUSE_EXT_GROUPS = 32


def decode_ext_groups(ext: bytes) -> tuple[int, ...] | None:
    """The groups of the FUSE_EXT_GROUPS record in ``ext`` (a request's
    extensions), or None when there is none; other types are skipped.

    Malformed (MalformedRequest): a record shorter than its header, not a
    multiple of 8 bytes or running past ``ext``; two group records; a
    ``nr_groups`` that does not fill its record (``fuse_ext_size``: header,
    count and groups rounded up to 8).
    """
    groups: tuple[int, ...] | None = None
    pos = 0
    while pos < len(ext):
        if len(ext) - pos < EXT_HEADER.size:
            raise MalformedRequest(f"{len(ext) - pos} bytes left for a fuse_ext_header")
        size, kind = EXT_HEADER.unpack_from(ext, pos)
        if size < EXT_HEADER.size or size % EXT_ALIGN or size > len(ext) - pos:
            raise MalformedRequest(f"extension of {size} bytes at {pos} (of {len(ext)})")
        if kind == FUSE_EXT_GROUPS:
            if groups is not None:
                raise MalformedRequest("two FUSE_EXT_GROUPS extensions")
            payload = ext[pos + EXT_HEADER.size : pos + size]
            (count,) = struct.unpack_from("<I", payload)
            want = EXT_HEADER.size + 4 + 4 * count
            if -(-want // EXT_ALIGN) * EXT_ALIGN != size:
                raise MalformedRequest(f"FUSE_EXT_GROUPS of {count} groups in {size} bytes")
            groups = struct.unpack_from(f"<{count}I", payload, 4)
        pos += size
    return groups


# --- encoders for old-kernel compatibility ---------------------------------


def encode_init_out(out: InitOut, minor: int) -> bytes:
    """fuse_init_out truncated to the size a kernel of ``minor`` expects."""
    data = INIT_OUT.encode(out)
    if minor < 5:
        return data[:COMPAT_INIT_OUT_SIZE]
    if minor < 23:
        return data[:COMPAT_22_INIT_OUT_SIZE]
    return data


def decode_init_in(body: bytes) -> InitIn:
    """fuse_init_in of any age: absent trailing fields read as zero."""
    if len(body) < 8:
        raise MalformedRequest(f"fuse_init_in needs at least 8 bytes, {len(body)} present")
    padded = body[:20].ljust(20, b"\0")
    return InitIn(*struct.unpack_from("<IIIII", padded))


# Sizes fixed by the kernel ABI; a mistake here breaks every guest.
assert IN_HEADER.size == 40
assert OUT_HEADER.size == 16
assert ATTR.size == 88
assert ENTRY_OUT_SIZE == 128
assert ATTR_OUT_SIZE == 104
assert INIT_OUT.size == 64
assert READ_IN.size == 40
assert WRITE_IN.size == 40
assert RELEASE_IN.size == 24
assert FLUSH_IN.size == 24
assert KSTATFS.size == 80
assert SETATTR_IN.size == 88
assert MKNOD_IN.size == 16 and MKDIR_IN.size == 8 and CREATE_IN.size == 16
assert RENAME2_IN.size == 16 and LINK_IN.size == 8
assert FSYNC_IN.size == 16 and SETXATTR_IN.size == 8
assert LK_IN.size == 48 and LK_OUT.size == 24
assert FALLOCATE_IN.size == 32 and LSEEK_IN.size == 24
assert COPY_FILE_RANGE_IN.size == 56
assert DIRENT_NAME_OFFSET == 24
