"""A fake virtio descriptor chain and a tiny FUSE client for unit tests.

:class:`FakeChain` implements the ``RequestChain`` duck type of
``pyvirtiofsd.daemon.fuse.session`` over two bytearrays.  :class:`FuseClient`
packs raw FUSE requests with ``struct`` (independently of the daemon's own
``abi`` module, so encoding mistakes are not mirrored) and parses replies.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from pyvirtiofsd.daemon.fuse.session import FuseSession

# Opcodes (fuse.h)
LOOKUP, FORGET, GETATTR, SETATTR, READLINK = 1, 2, 3, 4, 5
SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK = 6, 8, 9, 10, 11, 12, 13
OPEN, READ, WRITE, STATFS, RELEASE, FSYNC = 14, 15, 16, 17, 18, 20
SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR, FLUSH, INIT, OPENDIR = 21, 22, 23, 24, 25, 26, 27
READDIR, RELEASEDIR, FSYNCDIR, GETLK, SETLK, SETLKW = 28, 29, 30, 31, 32, 33
ACCESS, CREATE, INTERRUPT, DESTROY = 34, 35, 36, 38
BATCH_FORGET, FALLOCATE, READDIRPLUS, RENAME2, LSEEK, COPY_FILE_RANGE = 42, 43, 44, 45, 46, 47
SYNCFS = 50

IN_HEADER = struct.Struct("<IIQQIIII")
OUT_HEADER = struct.Struct("<IiQ")
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")
ENTRY_HEAD = struct.Struct("<QQQQII")
DIRENT_HEAD = struct.Struct("<QQII")


class FakeChain:
    """A request: ``readable`` bytes for the device, ``writable_len`` bytes of room.

    ``segments`` splits the readable part into descriptors of those sizes
    (default: one); :meth:`pwritev` then hands the file one iovec per
    descriptor it spans, as the real transport does with guest memory.
    """

    def __init__(
        self, readable: bytes, writable_len: int, segments: list[int] | None = None
    ) -> None:
        self._readable = bytearray(readable)
        self.writable = bytearray(writable_len)
        self.readable_len = len(self._readable)
        self.writable_len = writable_len
        default = [self.readable_len] if self.readable_len else []
        self.segments = default if segments is None else list(segments)
        if sum(self.segments) != self.readable_len or any(n <= 0 for n in self.segments):
            raise ValueError("segments must be positive and cover the readable part")
        self.high_water = 0  # one past the last byte ever written
        self.preadv_calls = 0
        self.pwritev_calls = 0
        self.pwritev_iovecs = 0  # iovecs handed to the last pwritev

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
        whole = memoryview(self._readable)
        iov: list[memoryview] = []
        pos = 0
        for size in self.segments:  # the descriptors overlapping [offset, offset + length)
            lo, hi = max(pos, offset), min(pos + size, offset + length)
            if lo < hi:
                iov.append(whole[lo:hi])
            pos += size
        self.pwritev_iovecs = len(iov)
        done = 0
        while iov:
            n = os.pwritev(fd, iov, file_offset + done)
            done += n
            while iov and n >= len(iov[0]):  # drop what was written, keep the rest
                n -= len(iov[0])
                iov.pop(0)
            if iov and n:
                iov[0] = iov[0][n:]
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

    def raw(
        self, readable: bytes, writable_len: int | None = None, segments: list[int] | None = None
    ) -> Reply:
        chain = FakeChain(
            readable, self.writable_len if writable_len is None else writable_len, segments
        )
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
        segments = kw.pop("segments", None)
        return self.raw(request(opcode, nodeid, body, **kw), writable_len, segments)

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


def fill_fds(held: list[int] | None = None) -> list[int]:
    """Open /dev/null until the process is out of fds (EMFILE); the fds are
    appended to ``held`` (a new list without one), which is returned."""
    held = [] if held is None else held
    while True:
        try:
            held.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
            return held


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


# --- bodies of the modifying requests (packed from fuse.h by hand) ---------------

FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 16, 32, 64
FATTR_ATIME_NOW, FATTR_MTIME_NOW, FATTR_KILL_SUIDGID = 128, 256, 2048
WRITE_KILL_SUIDGID = 4
OPEN_KILL_SUIDGID = 1
RELEASE_FLUSH, RELEASE_FLOCK_UNLOCK = 1, 2
LK_FLOCK = 1
OFFSET_MAX = (1 << 63) - 1


def setattr_body(
    valid: int,
    *,
    fh: int = 0,
    size: int = 0,
    atime: tuple[int, int] = (0, 0),
    mtime: tuple[int, int] = (0, 0),
    mode: int = 0,
    uid: int = 0,
    gid: int = 0,
) -> bytes:
    return struct.pack(
        "<IIQQQQQQIIIIIIII",
        valid,
        0,
        fh,
        size,
        0,
        atime[0],
        mtime[0],
        0,
        atime[1],
        mtime[1],
        0,
        mode,
        0,
        uid,
        gid,
        0,
    )


def create_body(name: bytes, flags: int, mode: int = 0o100644, open_flags: int = 0) -> bytes:
    return struct.pack("<IIII", flags, mode, 0o022, open_flags) + name + b"\0"


def mknod_body(name: bytes, mode: int, rdev: int = 0) -> bytes:
    return struct.pack("<IIII", mode, rdev, 0o022, 0) + name + b"\0"


def mkdir_body(name: bytes, mode: int = 0o755) -> bytes:
    return struct.pack("<II", mode, 0o022) + name + b"\0"


def rename_body(newdir: int, old: bytes, new: bytes, flags: int | None = None) -> bytes:
    head = struct.pack("<Q", newdir) if flags is None else struct.pack("<QII", newdir, flags, 0)
    return head + old + b"\0" + new + b"\0"


def write_body(fh: int, offset: int, data: bytes, write_flags: int = 0) -> bytes:
    return struct.pack("<QQIIQII", fh, offset, len(data), write_flags, 0, 0, 0) + data


def lk_body(
    fh: int, owner: int, start: int, end: int, ltype: int, *, pid: int = 0, flags: int = 0
) -> bytes:
    return struct.pack("<QQQQIIII", fh, owner, start, end, ltype, pid, flags, 0)


def flush_body(fh: int, lock_owner: int = 0) -> bytes:
    return struct.pack("<QIIQ", fh, 0, 0, lock_owner)


def release_flags_body(fh: int, release_flags: int, lock_owner: int = 0) -> bytes:
    return struct.pack("<QIIQ", fh, 0, release_flags, lock_owner)


def parse_attr_out(payload: bytes) -> tuple[int, ...]:
    return parse_attr(payload, 16)
