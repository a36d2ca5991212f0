"""The modifying operations, end to end through FuseSession, compared with a local directory.

Each test runs the same sequence against the share (through FUSE requests)
and, where it helps, directly on a second local directory, and compares.
Requests carry uid/gid 0 here; credentials are tested in
``test_passthrough_creds.py``.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.daemon.fuse.session import FuseSession
from pyvirtiofsd.daemon.passthrough import PassthroughFs
from tests.support.fakechain import (
    COPY_FILE_RANGE,
    CREATE,
    FALLOCATE,
    FATTR_ATIME,
    FATTR_ATIME_NOW,
    FATTR_FH,
    FATTR_GID,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_SIZE,
    FATTR_UID,
    FLUSH,
    FSYNC,
    FSYNCDIR,
    GETATTR,
    LINK,
    LOOKUP,
    LSEEK,
    MKDIR,
    MKNOD,
    OPEN,
    RELEASE,
    RELEASEDIR,
    REMOVEXATTR,
    RENAME,
    RENAME2,
    RMDIR,
    SETATTR,
    SETXATTR,
    SYMLINK,
    SYNCFS,
    UNLINK,
    WRITE,
    Entry,
    FuseClient,
    build_tree,
    create_body,
    flush_body,
    mkdir_body,
    mknod_body,
    name_body,
    open_fds,
    parse_attr_out,
    parse_entry,
    release_body,
    rename_body,
    setattr_body,
    write_body,
)

RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


@pytest.fixture
def root(tmp_path: Path) -> Path:
    share = tmp_path / "share"
    share.mkdir()
    build_tree(share, many=False)
    return share


@pytest.fixture
def local(tmp_path: Path) -> Path:
    """A plain directory the same sequences run on directly, for comparison."""
    d = tmp_path / "local"
    d.mkdir()
    return d


@pytest.fixture
def fs(root: Path) -> Iterator[PassthroughFs]:
    fs = PassthroughFs(root)
    yield fs
    fs.close()


@pytest.fixture
def client(fs: PassthroughFs) -> FuseClient:
    c = FuseClient(FuseSession(fs))
    c.init()
    return c


def create(
    client: FuseClient, parent: int, name: bytes, flags: int, mode: int = 0o644
) -> tuple[Entry, int]:
    reply = client.call(CREATE, parent, create_body(name, flags | os.O_CREAT, 0o100000 | mode))
    assert reply.ok, (name, reply.error)
    assert len(reply.payload) == 128 + 16
    fh: int = struct.unpack_from("<Q", reply.payload, 128)[0]
    return parse_entry(reply.payload), fh


def write(client: FuseClient, nodeid: int, fh: int, offset: int, data: bytes, **kw: object) -> int:
    reply = client.call(WRITE, nodeid, write_body(fh, offset, data), **kw)
    assert reply.ok, reply.error
    assert len(reply.payload) == 8
    size: int = struct.unpack_from("<I", reply.payload)[0]
    return size


def setattr(client: FuseClient, nodeid: int, body: bytes) -> tuple[int, ...]:
    reply = client.call(SETATTR, nodeid, body)
    assert reply.ok, reply.error
    return parse_attr_out(reply.payload)


# --- CREATE / WRITE ----------------------------------------------------------------


def test_create_write_read_matches_local(client: FuseClient, root: Path, local: Path) -> None:
    entry, fh = create(client, 1, b"new.txt", os.O_RDWR | os.O_EXCL, 0o640)
    assert client.session.fs.inodes.nlookup(entry.nodeid) == 1, "CREATE counts one lookup"
    assert write(client, entry.nodeid, fh, 0, b"hello") == 5
    assert write(client, entry.nodeid, fh, 10, b"world") == 5
    reply = client.read(entry.nodeid, fh, 0, 100)
    assert reply.ok
    fd = os.open(local / "new.txt", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
    os.pwrite(fd, b"hello", 0)
    os.pwrite(fd, b"world", 10)
    os.close(fd)
    expected = (local / "new.txt").read_bytes()
    assert reply.payload == expected == (root / "new.txt").read_bytes()
    st = os.stat(root / "new.txt")
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_ino == entry.ino
    assert client.last_chain is not None and client.last_chain.preadv_calls == 1


def test_create_exclusive_and_existing(client: FuseClient, root: Path) -> None:
    reply = client.call(CREATE, 1, create_body(b"hello.txt", os.O_RDWR | os.O_CREAT | os.O_EXCL))
    assert reply.error == -errno.EEXIST
    # Without O_EXCL the existing file is opened (and truncated with O_TRUNC).
    entry, fh = create(client, 1, b"hello.txt", os.O_RDWR)
    assert client.read(entry.nodeid, fh, 0, 100).payload == b"hello world\n"
    entry2, _fh2 = create(client, 1, b"hello.txt", os.O_WRONLY | os.O_TRUNC)
    assert entry2.nodeid == entry.nodeid and client.session.fs.inodes.nlookup(entry.nodeid) == 2
    assert (root / "hello.txt").read_bytes() == b""
    for name, err in [(b"sub", errno.EISDIR), (b"fifo", errno.ENXIO), (b"link_rel", errno.ELOOP)]:
        reply = client.call(CREATE, 1, create_body(name, os.O_WRONLY | os.O_CREAT))
        assert reply.error == -err, name
    assert os.readlink(root / "link_rel") == "hello.txt" and stat.S_ISFIFO(
        os.lstat(root / "fifo").st_mode
    )


def test_write_offsets_and_multi_segment_payload(client: FuseClient, root: Path) -> None:
    entry = client.lookup(1, b"big.bin")
    fh = client.open(entry.nodeid, os.O_RDWR)
    model = bytearray((root / "big.bin").read_bytes())
    payload = bytes(range(256)) * 40  # 10240 bytes
    # header (40) + write_in (40) in one descriptor, the payload over three more
    segments = [80, 1000, 4096, len(payload) - 5096]
    assert write(client, entry.nodeid, fh, 4093, payload, segments=segments) == len(payload)
    chain = client.last_chain
    assert chain is not None and chain.pwritev_calls == 1 and chain.pwritev_iovecs == 3
    model[4093 : 4093 + len(payload)] = payload
    # header and payload split mid-way through one descriptor
    assert write(client, entry.nodeid, fh, 7, b"abcdef", segments=[83, 3]) == 6
    assert client.last_chain is not None and client.last_chain.pwritev_iovecs == 2
    model[7:13] = b"abcdef"
    end = len(model) + 3  # past EOF: a hole of zeros
    assert write(client, entry.nodeid, fh, end, b"tail") == 4
    model += bytes(3) + b"tail"
    assert (root / "big.bin").read_bytes() == bytes(model)
    assert write(client, entry.nodeid, fh, 0, b"") == 0


def test_write_append_goes_to_the_real_end(client: FuseClient, root: Path, local: Path) -> None:
    entry = client.lookup(1, b"hello.txt")
    fh = client.open(entry.nodeid, os.O_WRONLY | os.O_APPEND)
    assert write(client, entry.nodeid, fh, 0, b"one\n") == 4
    with open(root / "hello.txt", "ab") as f:  # the host grows it behind the guest's back
        f.write(b"host\n")
    assert write(client, entry.nodeid, fh, 3, b"two\n") == 4
    (local / "f").write_bytes(b"hello world\n")
    fd = os.open(local / "f", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"one\n")
    with open(local / "f", "ab") as f:
        f.write(b"host\n")
    os.write(fd, b"two\n")
    os.close(fd)
    assert (root / "hello.txt").read_bytes() == (local / "f").read_bytes()


def test_write_errors(client: FuseClient, root: Path) -> None:
    entry = client.lookup(1, b"hello.txt")
    rfh = client.open(entry.nodeid, os.O_RDONLY)
    assert client.call(WRITE, entry.nodeid, write_body(rfh, 0, b"x")).error == -errno.EBADF
    assert client.call(WRITE, entry.nodeid, write_body(999, 0, b"x")).error == -errno.EBADF
    wfh = client.open(entry.nodeid, os.O_WRONLY)
    short = write_body(wfh, 0, b"xyz")[:-1]  # announces 3 bytes, carries 2
    assert client.call(WRITE, entry.nodeid, short).error == -errno.EINVAL
    huge = write_body(wfh, (1 << 63) - 2, b"xyz")
    assert client.call(WRITE, entry.nodeid, huge).error == -errno.EFBIG
    assert (root / "hello.txt").read_bytes() == b"hello world\n"


def test_open_write_modes_and_truncate(client: FuseClient, root: Path) -> None:
    entry = client.lookup(1, b"hello.txt")
    fh = client.open(entry.nodeid, os.O_RDWR | os.O_TRUNC)
    assert (root / "hello.txt").read_bytes() == b""
    write(client, entry.nodeid, fh, 0, b"abc")
    assert client.read(entry.nodeid, fh, 0, 10).payload == b"abc"


# --- SETATTR --------------------------------------------------------------------------


def test_setattr_size_with_and_without_fh(client: FuseClient, root: Path) -> None:
    entry = client.lookup(1, b"hello.txt")
    attr = setattr(client, entry.nodeid, setattr_body(FATTR_SIZE, size=5))
    assert attr[1] == 5 and (root / "hello.txt").read_bytes() == b"hello"
    fh = client.open(entry.nodeid, os.O_WRONLY)
    attr = setattr(client, entry.nodeid, setattr_body(FATTR_SIZE | FATTR_FH, fh=fh, size=8))
    assert attr[1] == 8 and (root / "hello.txt").read_bytes() == b"hello\0\0\0"
    sub = client.lookup(1, b"sub")
    assert client.call(SETATTR, sub.nodeid, setattr_body(FATTR_SIZE)).error == -errno.EISDIR


def test_setattr_mode_owner_times(client: FuseClient, root: Path) -> None:
    entry = client.lookup(1, b"hello.txt")
    attr = setattr(client, entry.nodeid, setattr_body(FATTR_MODE, mode=0o100600))
    assert stat.S_IMODE(os.stat(root / "hello.txt").st_mode) == 0o600 == stat.S_IMODE(attr[9])
    attr = setattr(client, entry.nodeid, setattr_body(FATTR_UID | FATTR_GID, uid=1000, gid=2000))
    st = os.stat(root / "hello.txt")
    assert (st.st_uid, st.st_gid) == (1000, 2000) == (attr[11], attr[12])
    setattr(client, entry.nodeid, setattr_body(FATTR_GID, gid=3000))
    assert (os.stat(root / "hello.txt").st_uid, os.stat(root / "hello.txt").st_gid) == (1000, 3000)
    body = setattr_body(FATTR_ATIME | FATTR_MTIME, atime=(1000, 5), mtime=(2000, 999_999_999))
    setattr(client, entry.nodeid, body)
    st = os.stat(root / "hello.txt")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1000 * 10**9 + 5, 2000 * 10**9 + 999_999_999)
    # mtime alone: atime is left alone (UTIME_OMIT)
    setattr(client, entry.nodeid, setattr_body(FATTR_MTIME, mtime=(3000, 0)))
    st = os.stat(root / "hello.txt")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1000 * 10**9 + 5, 3000 * 10**9)
    # atime = now (the kernel sends ATIME together with ATIME_NOW)
    setattr(client, entry.nodeid, setattr_body(FATTR_ATIME | FATTR_ATIME_NOW, atime=(1, 1)))
    st = os.stat(root / "hello.txt")
    assert st.st_atime_ns > 10**18 and st.st_mtime_ns == 3000 * 10**9
    bad = setattr_body(FATTR_MTIME, mtime=(1, 10**9))
    assert client.call(SETATTR, entry.nodeid, bad).error == -errno.EINVAL
    # the same through an open handle
    fh = client.open(entry.nodeid, os.O_RDONLY)
    setattr(client, entry.nodeid, setattr_body(FATTR_MODE | FATTR_FH, fh=fh, mode=0o644))
    setattr(client, entry.nodeid, setattr_body(FATTR_MTIME | FATTR_FH, fh=fh, mtime=(7, 7)))
    st = os.stat(root / "hello.txt")
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_mtime_ns == 7 * 10**9 + 7


def test_setattr_on_symlink_never_reaches_target(client: FuseClient, root: Path) -> None:
    target_before = os.stat(root / "hello.txt")
    link = client.lookup(1, b"link_rel")
    body = setattr_body(FATTR_MODE, mode=0o100777)
    assert client.call(SETATTR, link.nodeid, body).error == -errno.EOPNOTSUPP
    setattr(client, link.nodeid, setattr_body(FATTR_UID | FATTR_GID, uid=1234, gid=5678))
    setattr(client, link.nodeid, setattr_body(FATTR_MTIME, mtime=(42, 0)))
    lst = os.lstat(root / "link_rel")
    assert (lst.st_uid, lst.st_gid, lst.st_mtime_ns) == (1234, 5678, 42 * 10**9)
    after = os.stat(root / "hello.txt")
    assert (after.st_mode, after.st_uid, after.st_gid, after.st_mtime_ns) == (
        target_before.st_mode,
        target_before.st_uid,
        target_before.st_gid,
        target_before.st_mtime_ns,
    )


# --- names ------------------------------------------------------------------------------


def test_mkdir_mknod_symlink(client: FuseClient, root: Path) -> None:
    reply = client.call(MKDIR, 1, mkdir_body(b"d", 0o40750))
    assert reply.ok
    d = parse_entry(reply.payload)
    assert stat.S_ISDIR(d.mode) and stat.S_IMODE(os.stat(root / "d").st_mode) == 0o750
    for name, mode in [(b"p", stat.S_IFIFO | 0o600), (b"s", stat.S_IFSOCK | 0o644), (b"r", 0o640)]:
        reply = client.call(MKNOD, d.nodeid, mknod_body(name, mode))
        assert reply.ok, (name, reply.error)
        st = os.lstat(root / "d" / os.fsdecode(name))
        assert parse_entry(reply.payload).ino == st.st_ino
        assert stat.S_IMODE(st.st_mode) == mode & 0o777
        assert stat.S_IFMT(st.st_mode) == (stat.S_IFMT(mode) or stat.S_IFREG)
    reply = client.call(SYMLINK, d.nodeid, b"ln\0../../outside\0")
    assert reply.ok and stat.S_ISLNK(parse_entry(reply.payload).mode)
    assert os.readlink(root / "d" / "ln") == "../../outside"
    assert client.call(SYMLINK, d.nodeid, b"ln\0x\0").error == -errno.EEXIST
    assert client.call(SYMLINK, d.nodeid, b"ln2\0").error == -errno.EINVAL  # no target
    assert client.call(MKDIR, 1, mkdir_body(b"d")).error == -errno.EEXIST
    assert client.call(MKDIR, 1, mkdir_body(b"x" * 256)).error == -errno.ENAMETOOLONG
    assert client.call(MKDIR, 1, mkdir_body(b"..")).error == -errno.EINVAL
    assert client.call(MKDIR, 424242, mkdir_body(b"y")).error == -errno.EBADF
    hello = client.lookup(1, b"hello.txt")
    assert client.call(MKDIR, hello.nodeid, mkdir_body(b"y")).error == -errno.ENOTDIR


def test_device_nodes(root: Path) -> None:
    for allow in (False, True):
        fs = PassthroughFs(root, allow_device_nodes=allow)
        try:
            client = FuseClient(FuseSession(fs))
            client.init()
            null = (1 << 8) | 3  # new_encode_dev(1:3)
            reply = client.call(
                MKNOD, 1, mknod_body(f"null{allow}".encode(), stat.S_IFCHR | 0o600, null)
            )
            if allow:
                assert reply.ok and os.lstat(root / "nullTrue").st_rdev == os.makedev(1, 3)
            else:
                assert reply.error == -errno.EPERM and not (root / "nullFalse").exists()
            # a whiteout (char 0:0) is always allowed
            reply = client.call(MKNOD, 1, mknod_body(f"wh{allow}".encode(), stat.S_IFCHR))
            assert reply.ok and os.lstat(root / f"wh{allow}").st_rdev == 0
        finally:
            fs.close()


def test_unlink_rmdir(client: FuseClient, root: Path) -> None:
    sub = client.lookup(1, b"sub")
    assert client.call(RMDIR, 1, name_body(b"sub")).error == -errno.ENOTEMPTY
    assert client.call(UNLINK, 1, name_body(b"sub")).error == -errno.EISDIR
    assert client.call(RMDIR, 1, name_body(b"hello.txt")).error == -errno.ENOTDIR
    assert client.call(UNLINK, 1, name_body(b"nope")).error == -errno.ENOENT
    assert client.call(UNLINK, sub.nodeid, name_body(b"nested.txt")).ok
    assert client.call(RMDIR, sub.nodeid, name_body(b"deeper")).ok
    assert client.call(RMDIR, 1, name_body(b"sub")).ok
    assert not (root / "sub").exists()
    assert client.call(UNLINK, 1, name_body(b"link_etc")).ok  # the link, not /etc
    assert not os.path.lexists(root / "link_etc") and os.path.isdir("/etc")
    assert client.call(LOOKUP, 1, name_body(b"sub")).error == -errno.ENOENT


def test_open_unlinked_file_keeps_working(client: FuseClient, root: Path) -> None:
    entry = client.lookup(1, b"hello.txt")
    fh = client.open(entry.nodeid, os.O_RDWR)
    assert client.call(UNLINK, 1, name_body(b"hello.txt")).ok
    write(client, entry.nodeid, fh, 0, b"HELLO")
    assert client.read(entry.nodeid, fh, 0, 100).payload == b"HELLO world\n"
    reply = client.call(GETATTR, entry.nodeid, struct.pack("<IIQ", 0, 0, 0))
    assert reply.ok and parse_attr_out(reply.payload)[10] == 0  # nlink


def test_rename_variants(client: FuseClient, root: Path, local: Path) -> None:
    sub = client.lookup(1, b"sub")
    hello = client.lookup(1, b"hello.txt")
    assert client.call(RENAME, 1, rename_body(sub.nodeid, b"hello.txt", b"moved")).ok
    assert (root / "sub" / "moved").read_bytes() == b"hello world\n"
    # the node keeps working: it is held by fd, not by path
    reply = client.call(GETATTR, hello.nodeid, struct.pack("<IIQ", 0, 0, 0))
    assert reply.ok
    (root / "a").write_bytes(b"A")
    (root / "b").write_bytes(b"B")
    body = rename_body(1, b"a", b"b", RENAME_NOREPLACE)
    assert client.call(RENAME2, 1, body).error == -errno.EEXIST
    assert client.call(RENAME2, 1, rename_body(1, b"a", b"c", RENAME_NOREPLACE)).ok
    assert client.call(RENAME2, 1, rename_body(1, b"c", b"b", RENAME_EXCHANGE)).ok
    assert (root / "b").read_bytes() == b"A" and (root / "c").read_bytes() == b"B"
    assert (
        client.call(RENAME2, 1, rename_body(1, b"c", b"zz", RENAME_EXCHANGE)).error == -errno.ENOENT
    )
    assert client.call(RENAME2, 1, rename_body(1, b"c", b"d", 0x80)).error == -errno.EINVAL
    assert client.call(RENAME2, 1, rename_body(1, b"c", b"d", RENAME_WHITEOUT)).ok
    assert (root / "d").read_bytes() == b"B"
    wst = os.lstat(root / "c")
    assert stat.S_ISCHR(wst.st_mode) and wst.st_rdev == 0
    # rename over a non-empty directory, dir over file: same errors as locally
    (local / "x").mkdir()
    (local / "x" / "f").touch()
    (local / "y").mkdir()
    with pytest.raises(OSError) as info:
        os.rename(local / "y", local / "x")
    assert client.call(RENAME, 1, rename_body(1, b"many", b"sub")).error == -info.value.errno
    assert client.call(RENAME, 1, rename_body(1, b"many", b"b")).error == -errno.ENOTDIR
    assert client.call(RENAME, 1, rename_body(1, b"b", b"../b")).error == -errno.EINVAL


def test_link(client: FuseClient, root: Path) -> None:
    hello = client.lookup(1, b"hello.txt")
    sub = client.lookup(1, b"sub")
    reply = client.call(LINK, sub.nodeid, struct.pack("<Q", hello.nodeid) + b"hl\0")
    assert reply.ok
    entry = parse_entry(reply.payload)
    assert entry.nodeid == hello.nodeid and entry.attr[10] == 2
    assert client.session.fs.inodes.nlookup(hello.nodeid) == 2, "LINK counts a lookup"
    assert os.stat(root / "sub" / "hl").st_ino == os.stat(root / "hello.txt").st_ino
    # a symlink node is linked as the symlink itself
    link = client.lookup(1, b"link_etc")
    assert client.call(LINK, 1, struct.pack("<Q", link.nodeid) + b"l2\0").ok
    assert os.readlink(root / "l2") == "/etc"
    assert client.call(LINK, 1, struct.pack("<Q", sub.nodeid) + b"d2\0").error == -errno.EPERM
    assert client.call(LINK, 1, struct.pack("<Q", hello.nodeid) + b"l2\0").error == -errno.EEXIST


# --- data operations ----------------------------------------------------------------------


def test_fsync_flush_fallocate_lseek_copy(client: FuseClient, root: Path) -> None:
    entry, fh = create(client, 1, b"f", os.O_RDWR)
    write(client, entry.nodeid, fh, 0, b"x" * 8192)
    for datasync in (0, 1):
        assert client.call(FSYNC, entry.nodeid, struct.pack("<QII", fh, datasync, 0)).ok
    dfh = client.opendir(1)
    assert client.call(FSYNCDIR, 1, struct.pack("<QII", dfh, 0, 0)).ok
    assert client.call(FSYNC, 1, struct.pack("<QII", dfh, 0, 0)).error == -errno.EBADF
    assert client.call(FLUSH, entry.nodeid, flush_body(fh)).ok
    assert client.call(SYNCFS, entry.nodeid, struct.pack("<Q", 0)).ok
    # KEEP_SIZE allocation does not change the size; PUNCH_HOLE (| KEEP_SIZE) zeroes
    falloc = struct.pack("<QQQII", fh, 0, 1 << 20, 1, 0)
    assert client.call(FALLOCATE, entry.nodeid, falloc).ok
    assert os.stat(root / "f").st_size == 8192
    punch = struct.pack("<QQQII", fh, 0, 4096, 1 | 2, 0)
    assert client.call(FALLOCATE, entry.nodeid, punch).ok
    data = (root / "f").read_bytes()
    assert data == bytes(4096) + b"x" * 4096
    grow = struct.pack("<QQQII", fh, 0, 16384, 0, 0)
    assert client.call(FALLOCATE, entry.nodeid, grow).ok and os.stat(root / "f").st_size == 16384
    bad = struct.pack("<QQQII", fh, 0, 1, 0x1000, 0)
    assert client.call(FALLOCATE, entry.nodeid, bad).error == -errno.EOPNOTSUPP
    # SEEK_DATA / SEEK_HOLE agree with the host
    fd = os.open(root / "f", os.O_RDONLY)
    try:
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            reply = client.call(LSEEK, entry.nodeid, struct.pack("<QQII", fh, 0, whence, 0))
            assert reply.ok and struct.unpack("<Q", reply.payload)[0] == os.lseek(fd, 0, whence)
    finally:
        os.close(fd)
    past = struct.pack("<QQII", fh, 1 << 20, os.SEEK_DATA, 0)
    assert client.call(LSEEK, entry.nodeid, past).error == -errno.ENXIO
    # COPY_FILE_RANGE between two handles
    hello = client.lookup(1, b"hello.txt")
    src = client.open(hello.nodeid, os.O_RDONLY)
    body = struct.pack("<QQQQQQQ", src, 6, entry.nodeid, fh, 100, 1000, 0)
    reply = client.call(COPY_FILE_RANGE, hello.nodeid, body)
    assert reply.ok and struct.unpack("<II", reply.payload)[0] == 6
    assert (root / "f").read_bytes()[100:106] == b"world\n"
    body = struct.pack("<QQQQQQQ", src, 0, entry.nodeid, fh, 0, 10, 1)
    assert client.call(COPY_FILE_RANGE, hello.nodeid, body).error == -errno.EINVAL


# --- lifecycle ----------------------------------------------------------------------------


def test_every_fd_returns_after_forget_and_release(client: FuseClient, root: Path) -> None:
    baseline = open_fds()
    inodes = client.session.fs.inodes
    d = parse_entry(client.call(MKDIR, 1, mkdir_body(b"d")).payload)
    f, fh = create(client, d.nodeid, b"f", os.O_RDWR)
    write(client, f.nodeid, fh, 0, b"data")
    n = parse_entry(client.call(MKNOD, d.nodeid, mknod_body(b"n", stat.S_IFIFO | 0o644)).payload)
    s = parse_entry(client.call(SYMLINK, d.nodeid, b"s\0f\0").payload)
    link_reply = client.call(LINK, d.nodeid, struct.pack("<Q", f.nodeid) + b"g\0")
    assert link_reply.ok
    fh2 = client.open(f.nodeid, os.O_WRONLY | os.O_APPEND)
    dfh = client.opendir(d.nodeid)
    assert inodes.nlookup(f.nodeid) == 2
    assert client.call(RELEASE, f.nodeid, release_body(fh)).ok
    assert client.call(RELEASE, f.nodeid, release_body(fh2)).ok
    assert client.call(RELEASEDIR, d.nodeid, release_body(dfh)).ok
    for nodeid, count in [(f.nodeid, 2), (n.nodeid, 1), (s.nodeid, 1), (d.nodeid, 1)]:
        client.forget(nodeid, count)
    assert len(inodes) == 1 and len(client.session.fs.handles) == 0
    assert open_fds() == baseline


def test_readonly_refuses_every_modifying_op(root: Path) -> None:
    fs = PassthroughFs(root, readonly=True, xattr=True)
    try:
        client = FuseClient(FuseSession(fs))
        client.init()
        hello = client.lookup(1, b"hello.txt")
        fh = client.open(hello.nodeid, os.O_RDONLY)
        before = {p.name: os.lstat(p) for p in root.iterdir()}
        requests = [
            (SETATTR, hello.nodeid, setattr_body(FATTR_MODE, mode=0o777)),
            (SETATTR, hello.nodeid, setattr_body(FATTR_SIZE | FATTR_FH, fh=fh)),
            (SYMLINK, 1, b"s\0t\0"),
            (MKNOD, 1, mknod_body(b"n", stat.S_IFIFO | 0o644)),
            (MKDIR, 1, mkdir_body(b"d")),
            (UNLINK, 1, name_body(b"hello.txt")),
            (RMDIR, 1, name_body(b"many")),
            (RENAME, 1, rename_body(1, b"hello.txt", b"x")),
            (RENAME2, 1, rename_body(1, b"hello.txt", b"x", RENAME_NOREPLACE)),
            (LINK, 1, struct.pack("<Q", hello.nodeid) + b"l\0"),
            (CREATE, 1, create_body(b"c", os.O_WRONLY | os.O_CREAT)),
            (OPEN, hello.nodeid, struct.pack("<II", os.O_WRONLY, 0)),
            (OPEN, hello.nodeid, struct.pack("<II", os.O_RDONLY | os.O_TRUNC, 0)),
            (WRITE, hello.nodeid, write_body(fh, 0, b"x")),
            (FALLOCATE, hello.nodeid, struct.pack("<QQQII", fh, 0, 10, 0, 0)),
            (COPY_FILE_RANGE, hello.nodeid, struct.pack("<QQQQQQQ", fh, 0, 2, fh, 0, 1, 0)),
            (SETXATTR, hello.nodeid, struct.pack("<II", 1, 0) + b"user.a\0v"),
            (REMOVEXATTR, hello.nodeid, name_body(b"user.a")),
        ]
        for opcode, nodeid, body in requests:
            assert client.call(opcode, nodeid, body).error == -errno.EROFS, opcode
        assert {p.name: os.lstat(p) for p in root.iterdir()} == before
        assert (root / "hello.txt").read_bytes() == b"hello world\n"
    finally:
        fs.close()
