"""FUSE requests as the benchmark sends them, encoded with ``struct``.

Written apart from the daemon's ``fuse/abi.py`` on purpose: a benchmark that
shares the daemon's encoder cannot catch its mistakes, and the peers must get
what a Linux guest sends (``include/uapi/linux/fuse.h``, protocol 7.31 here,
which all three daemons speak). The ``unique`` field is left 0: the C request
loop stamps each request just before posting it.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

__all__ = [
    "CREATE_FH_OFFSET",
    "IN_HEADER",
    "OUT_HEADER",
    "Op",
    "ReplySize",
    "create",
    "forget",
    "getattr_",
    "init",
    "lookup",
    "open_",
    "opendir",
    "read",
    "readdirplus",
    "release",
    "unlink",
    "write",
]

IN_HEADER = struct.Struct("<IIQQIIII")  # len opcode unique nodeid uid gid pid extlen+pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
_INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags (16 bytes before 7.36)
_GETATTR_IN = struct.Struct("<IIQ")  # getattr_flags dummy fh
_OPEN_IN = struct.Struct("<II")  # flags open_flags
_CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
_RW_IN = struct.Struct("<QQIIQII")  # fh offset size rw_flags lock_owner flags padding
_RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
_FORGET_IN = struct.Struct("<Q")  # nlookup

MAJOR, MINOR = 7, 31
ROOT = 1
# fuse_init_in.flags: what a 6.1 guest asks that matters here
FUSE_ASYNC_READ = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
INIT_FLAGS = (
    FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_DO_READDIRPLUS | FUSE_PARALLEL_DIROPS | FUSE_MAX_PAGES
)


class Op:
    """Opcodes (fuse.h)."""

    LOOKUP = 1
    FORGET = 2
    GETATTR = 3
    UNLINK = 10
    OPEN = 14
    READ = 15
    WRITE = 16
    RELEASE = 18
    INIT = 26
    OPENDIR = 27
    CREATE = 35
    READDIRPLUS = 44


class ReplySize:
    """Exact reply lengths (out header included) of fixed-size replies."""

    GETATTR = OUT_HEADER.size + 104  # fuse_attr_out
    ENTRY = OUT_HEADER.size + 128  # fuse_entry_out
    OPEN = OUT_HEADER.size + 16  # fuse_open_out
    CREATE = ENTRY + 16  # fuse_entry_out + fuse_open_out
    WRITE = OUT_HEADER.size + 8  # fuse_write_out
    EMPTY = OUT_HEADER.size


#: Where CREATE's reply carries the new handle (fuse_open_out.fh).
CREATE_FH_OFFSET = ReplySize.ENTRY
#: Where RELEASE's request carries the handle (fuse_release_in.fh).
RELEASE_FH_OFFSET = IN_HEADER.size


class Request(NamedTuple):
    """The readable part of one request: header and body, and a separate data buffer."""

    head: bytes
    data: bytes = b""

    @property
    def opcode(self) -> int:
        return int(IN_HEADER.unpack_from(self.head)[1])


def _req(opcode: int, nodeid: int, body: bytes = b"", data: bytes = b"") -> Request:
    total = IN_HEADER.size + len(body) + len(data)
    header = IN_HEADER.pack(total, opcode, 0, nodeid, 0, 0, os.getpid(), 0)
    return Request(header + body, data)


def _name(name: str) -> bytes:
    raw = name.encode()
    if not raw or b"\0" in raw or b"/" in raw:
        raise ValueError(f"bad file name {name!r}")
    return raw + b"\0"


def init() -> Request:
    return _req(Op.INIT, 0, _INIT_IN.pack(MAJOR, MINOR, 1 << 17, INIT_FLAGS))


def getattr_(nodeid: int = ROOT) -> Request:
    return _req(Op.GETATTR, nodeid, _GETATTR_IN.pack(0, 0, 0))


def lookup(name: str, parent: int = ROOT) -> Request:
    return _req(Op.LOOKUP, parent, _name(name))


def open_(nodeid: int, flags: int = os.O_RDWR) -> Request:
    return _req(Op.OPEN, nodeid, _OPEN_IN.pack(flags, 0))


def opendir(nodeid: int) -> Request:
    return _req(Op.OPENDIR, nodeid, _OPEN_IN.pack(os.O_RDONLY | os.O_DIRECTORY, 0))


def read(nodeid: int, fh: int, offset: int, size: int) -> Request:
    return _req(Op.READ, nodeid, _RW_IN.pack(fh, offset, size, 0, 0, os.O_RDWR, 0))


def write(nodeid: int, fh: int, offset: int, data: bytes) -> Request:
    return _req(Op.WRITE, nodeid, _RW_IN.pack(fh, offset, len(data), 0, 0, os.O_RDWR, 0), data)


def readdirplus(nodeid: int, fh: int, size: int = 4096, offset: int = 0) -> Request:
    return _req(Op.READDIRPLUS, nodeid, _RW_IN.pack(fh, offset, size, 0, 0, os.O_RDONLY, 0))


def create(name: str, parent: int = ROOT, mode: int = 0o100644) -> Request:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    return _req(Op.CREATE, parent, _CREATE_IN.pack(flags, mode, 0o022, 0) + _name(name))


def release(nodeid: int, fh: int = 0) -> Request:
    """RELEASE of ``fh`` (0: the C loop patches in the handle CREATE returned)."""
    return _req(Op.RELEASE, nodeid, _RELEASE_IN.pack(fh, os.O_WRONLY, 0, 0))


def forget(nodeid: int = 0, nlookup: int = 1) -> Request:
    """FORGET (no reply); nodeid 0: the C loop patches in the one CREATE returned."""
    return _req(Op.FORGET, nodeid, _FORGET_IN.pack(nlookup))


def unlink(name: str, parent: int = ROOT) -> Request:
    return _req(Op.UNLINK, parent, _name(name))
