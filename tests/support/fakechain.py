"""A fake virtio descriptor chain and a tiny FUSE client for unit tests.

:class:`FakeChain` implements the ``RequestChain`` duck type of
``pyvirtiofsd.daemon.fuse.session`` over two bytearrays.  :class:`FuseClient`
packs raw FUSE requests with ``struct`` (independently of the daemon's own
``abi`` module, so encoding mistakes are not mirrored) and parses replies.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any

from pyvirtiofsd.daemon.fuse.session import FuseSession

# Opcodes (fuse.h)
LOOKUP, FORGET, GETATTR, SETATTR, READLINK = 1, 2, 3, 4, 5
OPEN, READ, WRITE, STATFS, RELEASE = 14, 15, 16, 17, 18
GETXATTR, LISTXATTR, FLUSH, INIT, OPENDIR = 22, 23, 25, 26, 27
READDIR, RELEASEDIR, ACCESS, INTERRUPT, DESTROY = 28, 29, 34, 36, 38
BATCH_FORGET, READDIRPLUS = 42, 44

IN_HEADER = struct.Struct("<IIQQIIII")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")
ENTRY_HEAD = struct.Struct("<QQQQII")
DIRENT_HEAD = struct.Struct("<QQII")


class FakeChain:
    """A request: ``readable`` bytes for the device, ``writable_len`` bytes of room."""

    def __init__(self, readable: bytes, writable_len: int) -> None:
        self._readable = bytearray(readable)
        self.writable = bytearray(writable_len)
        self.readable_len = len(self._readable)
        self.writable_len = writable_len
        self.high_water = 0  # one past the last byte ever written
        self.preadv_calls = 0
        self.pwritev_calls = 0

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        if offset < 0 or offset > self.readable_len:
            raise ValueError("read outside the readable part")
        end = self.readable_len if length is None else offset + length
        if length is not None and (length < 0 or end > self.readable_len):
            raise ValueError("read outside the readable part")
        return bytes(self._readable[offset:end])

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        n = len(data)
        if offset < 0 or offset + n > self.writable_len:
            raise ValueError(f"write of {n} bytes at {offset} does not fit {self.writable_len}")
        self.writable[offset : offset + n] = data
        self.high_water = max(self.high_water, offset + n)

    def preadv(self, fd: int, file_offset: int, length: int, offset: int) -> int:
        if offset < 0 or length < 0 or offset + length > self.writable_len:
            raise ValueError("preadv outside the writable part")
        self.preadv_calls += 1
        view = memoryview(self.writable)[offset : offset + length]
        done = 0
        while done < length:
            n = os.preadv(fd, [view[done:]], file_offset + done)
            if n == 0:
                break
            done += n
        self.high_water = max(self.high_water, offset + done)
        return done

    def pwritev(self, fd: int, file_offset: int, length: int, offset: int) -> int:
        if offset < 0 or length < 0 or offset + length > self.readable_len:
            raise ValueError("pwritev outside the readable part")
        self.pwritev_calls += 1
        view = memoryview(self._readable)[offset : offset + length]
        done = 0
        while done < length:
            done += os.pwritev(fd, [view[done:]], file_offset + done)
        return done


def request(
    opcode: int,
    nodeid: int = 1,
    body: bytes = b"",
    *,
    unique: int = 7,
    uid: int = 0,
    gid: int = 0,
    pid: int = 42,
) -> bytes:
    return (
        IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid, uid, gid, pid, 0) + body
    )


def init_body(
    major: int = 7, minor: int = 37, flags: int = 0xFFFF_FFFF, readahead: int = 1 << 17
) -> bytes:
    return struct.pack("<IIIII44x", major, minor, readahead, flags, 0)


def read_body(fh: int, offset: int, size: int) -> bytes:
    return struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)


def release_body(fh: int) -> bytes:
    return struct.pack("<QIIQ", fh, 0, 0, 0)


def name_body(name: bytes) -> bytes:
    return name + b"\0"


@dataclass
class Reply:
    len: int
    error: int
    unique: int
    payload: bytes
    used: int

    @property
    def ok(self) -> bool:
        return self.error == 0


@dataclass
class Entry:
    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    attr: tuple[int, ...]

    @property
    def ino(self) -> int:
        return self.attr[0]

    @property
    def size(self) -> int:
        return self.attr[1]

    @property
    def mode(self) -> int:
        return self.attr[9]


def parse_attr(data: bytes, offset: int = 0) -> tuple[int, ...]:
    return ATTR.unpack_from(data, offset)


def parse_entry(data: bytes, offset: int = 0) -> Entry:
    nodeid, gen, ev, av, _evn, _avn = ENTRY_HEAD.unpack_from(data, offset)
    return Entry(nodeid, gen, ev, av, parse_attr(data, offset + ENTRY_HEAD.size))


@dataclass
class Dirent:
    ino: int
    off: int
    type: int
    name: bytes
    entry: Entry | None = None


def parse_dirents(data: bytes, plus: bool = False) -> list[Dirent]:
    out: list[Dirent] = []
    pos = 0
    while pos < len(data):
        entry = None
        if plus:
            entry = parse_entry(data, pos)
            pos += 128
        ino, off, namelen, dtype = DIRENT_HEAD.unpack_from(data, pos)
        name = data[pos + 24 : pos + 24 + namelen]
        assert len(name) == namelen
        pos += (24 + namelen + 7) & ~7
        out.append(Dirent(ino, off, dtype, name, entry))
    assert pos == len(data), "records must be 8-byte aligned and fill the reply exactly"
    return out


@dataclass
class FuseClient:
    """Drives a :class:`FuseSession` with raw requests."""

    session: FuseSession
    writable_len: int = 1 << 21
    last_chain: FakeChain | None = field(default=None, repr=False)

    def raw(self, readable: bytes, writable_len: int | None = None) -> Reply:
        chain = FakeChain(readable, self.writable_len if writable_len is None else writable_len)
        self.last_chain = chain
        used = self.session.handle(chain)
        assert 0 <= used <= chain.writable_len
        if used == 0:
            return Reply(0, 0, 0, b"", 0)
        length, error, unique = OUT_HEADER.unpack_from(chain.writable)
        assert length == used, "out header len must equal the used length"
        return Reply(length, error, unique, bytes(chain.writable[16:used]), used)

    def call(self, opcode: int, nodeid: int = 1, body: bytes = b"", **kw: Any) -> Reply:
        writable_len = kw.pop("writable_len", None)
        return self.raw(request(opcode, nodeid, body, **kw), writable_len)

    def init(self, minor: int = 37, flags: int = 0xFFFF_FFFF) -> Reply:
        reply = self.call(INIT, 0, init_body(minor=minor, flags=flags))
        assert reply.ok, reply
        return reply

    def lookup(self, parent: int, name: bytes) -> Entry:
        reply = self.call(LOOKUP, parent, name_body(name))
        assert reply.ok, (name, reply.error)
        return parse_entry(reply.payload)

    def forget(self, nodeid: int, nlookup: int) -> None:
        assert self.call(FORGET, nodeid, struct.pack("<Q", nlookup)).used == 0

    def open(self, nodeid: int, flags: int = os.O_RDONLY, opcode: int = OPEN) -> int:
        reply = self.call(opcode, nodeid, struct.pack("<II", flags, 0))
        assert reply.ok, reply.error
        fh: int = struct.unpack_from("<Q", reply.payload)[0]
        return fh

    def opendir(self, nodeid: int) -> int:
        return self.open(nodeid, os.O_RDONLY | os.O_DIRECTORY, OPENDIR)

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> Reply:
        return self.call(READ, nodeid, read_body(fh, offset, size))

    def readdir_all(self, nodeid: int, fh: int, size: int, plus: bool = False) -> list[Dirent]:
        """Page through a directory with ``size``-byte READDIR(PLUS) calls."""
        out: list[Dirent] = []
        offset = 0
        for _ in range(100_000):
            reply = self.call(READDIRPLUS if plus else READDIR, nodeid, read_body(fh, offset, size))
            assert reply.ok, reply.error
            batch = parse_dirents(reply.payload, plus)
            if not batch:
                return out
            out += batch
            offset = batch[-1].off
        raise AssertionError("directory paging does not terminate")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


BIG_SIZE = (1 << 20) + 4097
MANY = 120  # files in many/ (file creation is slow on some CI disks)


def build_tree(root: os.PathLike[str] | str, *, many: bool = True) -> None:
    """The standard test share (``many/`` only when asked: creating files is slow)."""
    r = os.fspath(root)
    with open(os.path.join(r, "hello.txt"), "wb") as f:
        f.write(b"hello world\n")
    open(os.path.join(r, "empty"), "wb").close()
    with open(os.path.join(r, "big.bin"), "wb") as f:
        pattern = bytes((i * 7 + i // 251) & 0xFF for i in range(251 * 256))
        f.write((pattern * (BIG_SIZE // len(pattern) + 1))[:BIG_SIZE])
    os.mkdir(os.path.join(r, "sub"))
    os.mkdir(os.path.join(r, "sub", "deeper"))
    with open(os.path.join(r, "sub", "nested.txt"), "wb") as f:
        f.write(b"nested\n")
    os.mkdir(os.path.join(r, "many"))
    for i in range(MANY if many else 0):
        open(os.path.join(r, "many", f"f{i:03d}" + "x" * (i % 37)), "wb").close()
    os.symlink("/etc", os.path.join(r, "link_etc"))
    os.symlink("../../..", os.path.join(r, "link_up"))
    os.symlink("hello.txt", os.path.join(r, "link_rel"))
    os.mkfifo(os.path.join(r, "fifo"))
