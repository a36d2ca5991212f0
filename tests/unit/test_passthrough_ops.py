"""The read-only operations, end to end through FuseSession against a tmp tree."""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from pyvirtiofsd.daemon.fuse.session import FuseSession
from pyvirtiofsd.daemon.passthrough import PassthroughFs
from pyvirtiofsd.daemon.passthrough.filesystem import encode_dev, stat_to_attr
from tests.support.fakechain import (
    ACCESS,
    BATCH_FORGET,
    BIG_SIZE,
    FLUSH,
    GETATTR,
    LOOKUP,
    MANY,
    OPEN,
    OPENDIR,
    READ,
    READDIR,
    READDIRPLUS,
    READLINK,
    RELEASE,
    RELEASEDIR,
    STATFS,
    Dirent,
    FuseClient,
    build_tree,
    name_body,
    open_fds,
    parse_attr,
    parse_dirents,
    read_body,
    release_body,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    share = tmp_path / "share"
    share.mkdir()
    build_tree(share)
    (tmp_path / "secret").write_text("outside the share\n")
    return share


@pytest.fixture
def fs(root: Path) -> Iterator[PassthroughFs]:
    fs = PassthroughFs(root, entry_timeout=2.5, attr_timeout=0.25)
    yield fs
    fs.close()


@pytest.fixture
def client(fs: PassthroughFs) -> FuseClient:
    c = FuseClient(FuseSession(fs))
    c.init()
    return c


def getattr_body(fh: int | None = None) -> bytes:
    return struct.pack("<IIQ", 0 if fh is None else 1, 0, fh or 0)


def assert_attr_matches(attr: tuple[int, ...], st: os.stat_result) -> None:
    (
        ino,
        size,
        blocks,
        atime,
        mtime,
        ctime,
        atns,
        mtns,
        ctns,
        mode,
        nlink,
        uid,
        gid,
        rdev,
        blksize,
        flags,
    ) = attr
    assert (ino, size, blocks, mode, nlink, uid, gid) == (
        st.st_ino,
        st.st_size,
        st.st_blocks,
        st.st_mode,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
    )
    assert mtime * 10**9 + mtns == st.st_mtime_ns
    assert atime * 10**9 + atns == st.st_atime_ns
    assert ctime * 10**9 + ctns == st.st_ctime_ns
    assert blksize == st.st_blksize and flags == 0
    assert rdev == encode_dev(st.st_rdev)


# --- LOOKUP / GETATTR ---------------------------------------------------------------


def test_lookup_matches_lstat(client: FuseClient, root: Path) -> None:
    for name in ["hello.txt", "sub", "link_etc", "fifo", "empty"]:
        entry = client.lookup(1, name.encode())
        assert entry.nodeid > 1 and entry.generation == 0
        assert entry.entry_valid == 2 and entry.attr_valid == 0
        assert_attr_matches(entry.attr, os.lstat(root / name))


def test_lookup_timeouts_nsec(client: FuseClient) -> None:
    reply = client.call(LOOKUP, 1, name_body(b"hello.txt"))
    _n, _g, ev, av, evn, avn = struct.unpack_from("<QQQQII", reply.payload)
    assert (ev, evn, av, avn) == (2, 500_000_000, 0, 250_000_000)


def test_lookup_nested_and_missing(client: FuseClient, root: Path) -> None:
    sub = client.lookup(1, b"sub")
    nested = client.lookup(sub.nodeid, b"nested.txt")
    assert nested.ino == os.stat(root / "sub" / "nested.txt").st_ino
    assert client.call(LOOKUP, sub.nodeid, name_body(b"nope")).error == -errno.ENOENT
    hello = client.lookup(1, b"hello.txt")
    assert client.call(LOOKUP, hello.nodeid, name_body(b"x")).error == -errno.ENOTDIR
    assert client.call(LOOKUP, 12345, name_body(b"x")).error == -errno.EBADF


def test_same_file_shares_one_inode(client: FuseClient, root: Path) -> None:
    os.link(root / "hello.txt", root / "hardlink")
    a = client.lookup(1, b"hello.txt")
    b = client.lookup(1, b"hello.txt")
    c = client.lookup(1, b"hardlink")
    assert a.nodeid == b.nodeid == c.nodeid
    assert client.session.fs.inodes.nlookup(a.nodeid) == 3


def test_getattr_root_and_file(client: FuseClient, root: Path) -> None:
    reply = client.call(GETATTR, 1, getattr_body())
    assert reply.ok and len(reply.payload) == 104
    valid, valid_ns, _dummy = struct.unpack_from("<QII", reply.payload)
    assert (valid, valid_ns) == (0, 250_000_000)
    assert_attr_matches(parse_attr(reply.payload, 16), os.stat(root))
    entry = client.lookup(1, b"big.bin")
    reply = client.call(GETATTR, entry.nodeid, getattr_body())
    assert_attr_matches(parse_attr(reply.payload, 16), os.stat(root / "big.bin"))


def test_getattr_by_fh(client: FuseClient, root: Path) -> None:
    entry = client.lookup(1, b"hello.txt")
    fh = client.open(entry.nodeid)
    reply = client.call(GETATTR, entry.nodeid, getattr_body(fh))
    assert_attr_matches(parse_attr(reply.payload, 16), os.stat(root / "hello.txt"))
    assert client.call(GETATTR, entry.nodeid, getattr_body(999)).error == -errno.EBADF


def test_getattr_follows_host_changes(client: FuseClient, root: Path) -> None:
    entry = client.lookup(1, b"hello.txt")
    (root / "hello.txt").write_bytes(b"longer content now\n")
    reply = client.call(GETATTR, entry.nodeid, getattr_body())
    assert parse_attr(reply.payload, 16)[1] == len(b"longer content now\n")


def test_stat_to_attr_negative_time() -> None:
    ns = -1_500_000_000
    fake = SimpleNamespace(
        st_mode=0o020644,
        st_ino=5,
        st_nlink=1,
        st_uid=0,
        st_gid=0,
        st_size=0,
        st_blocks=0,
        st_blksize=4096,
        st_rdev=os.makedev(259, 300),
        st_atime_ns=ns,
        st_mtime_ns=ns,
        st_ctime_ns=ns,
    )
    attr = stat_to_attr(cast(os.stat_result, fake))
    assert (attr.mtime, attr.mtimensec) == (-2, 500_000_000)
    # new_encode_dev: minor low byte, 12-bit major, minor high bits above
    assert attr.rdev == (300 & 0xFF) | (259 << 8) | ((300 & ~0xFF) << 12)


# --- hostile names ------------------------------------------------------------------


@pytest.mark.parametrize("name", [b"..", b".", b"", b"a/b", b"/etc", b"../secret", b"sub/.."])
def test_hostile_names_refused(client: FuseClient, name: bytes) -> None:
    assert client.call(LOOKUP, 1, name_body(name)).error == -errno.EINVAL
    sub = client.lookup(1, b"sub")
    assert client.call(LOOKUP, sub.nodeid, name_body(name)).error == -errno.EINVAL


def test_names_without_nul_or_with_inner_nul_refused(client: FuseClient) -> None:
    assert client.call(LOOKUP, 1, b"hello.txt").error == -errno.EINVAL
    assert client.call(LOOKUP, 1, b"hello\0.txt\0").error == -errno.EINVAL
    assert client.call(LOOKUP, 1, b"").error == -errno.EINVAL


def test_overlong_name(client: FuseClient) -> None:
    assert client.call(LOOKUP, 1, name_body(b"a" * 256)).error == -errno.ENAMETOOLONG


# --- symlinks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "target"),
    [("link_etc", b"/etc"), ("link_up", b"../../.."), ("link_rel", b"hello.txt")],
)
def test_symlink_returned_as_symlink(client: FuseClient, name: str, target: bytes) -> None:
    entry = client.lookup(1, name.encode())
    assert stat.S_ISLNK(entry.mode)
    assert entry.size == len(target)
    reply = client.call(READLINK, entry.nodeid)
    assert reply.ok and reply.payload == target
    # Nothing can be resolved through it on the host.
    for child in [b"passwd", b"hostname", b"secret", b"share"]:
        assert client.call(LOOKUP, entry.nodeid, name_body(child)).error == -errno.ENOTDIR
    assert (
        client.call(OPENDIR, entry.nodeid, struct.pack("<II", os.O_RDONLY, 0)).error
        == -errno.ENOTDIR
    )
    assert client.call(OPEN, entry.nodeid, struct.pack("<II", os.O_RDONLY, 0)).error != 0


def test_readlink_of_non_symlink(client: FuseClient) -> None:
    entry = client.lookup(1, b"hello.txt")
    assert client.call(READLINK, entry.nodeid).error == -errno.EINVAL


def test_root_dotdot_in_readdir_does_not_reveal_parent(client: FuseClient, root: Path) -> None:
    fh = client.opendir(1)
    ents = {d.name: d for d in client.readdir_all(1, fh, 4096)}
    assert ents[b".."].ino == os.stat(root).st_ino
    assert ents[b"."].ino == os.stat(root).st_ino


# --- OPEN / READ / RELEASE ------------------------------------------------------------


def test_open_write_modes_refused_when_readonly(root: Path) -> None:
    fs = PassthroughFs(root, readonly=True)
    try:
        client = FuseClient(FuseSession(fs))
        client.init()
        entry = client.lookup(1, b"hello.txt")
        for flags in [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC]:
            reply = client.call(OPEN, entry.nodeid, struct.pack("<II", flags, 0))
            assert reply.error == -errno.EROFS
        assert _access(client, entry.nodeid, os.W_OK, 0, 0) == -errno.EROFS
        assert _access(client, entry.nodeid, os.R_OK, 0, 0) == 0
    finally:
        fs.close()


def test_open_special_files_refused(client: FuseClient) -> None:
    fifo = client.lookup(1, b"fifo")  # opening it on the host would block
    assert client.call(OPEN, fifo.nodeid, struct.pack("<II", os.O_RDONLY, 0)).error == -errno.ENXIO
    sub = client.lookup(1, b"sub")
    assert client.call(OPEN, sub.nodeid, struct.pack("<II", os.O_RDONLY, 0)).error == -errno.EISDIR


def test_read_whole_small_file(client: FuseClient) -> None:
    entry = client.lookup(1, b"hello.txt")
    fh = client.open(entry.nodeid)
    reply = client.read(entry.nodeid, fh, 0, 4096)
    assert reply.ok and reply.payload == b"hello world\n"
    assert client.last_chain is not None and client.last_chain.preadv_calls == 1


@pytest.mark.parametrize(
    ("offset", "size"),
    [
        (0, 0),
        (0, 1),
        (5, 100),
        (BIG_SIZE - 3, 100),
        (BIG_SIZE, 10),
        (BIG_SIZE + 100, 10),
        (0, (1 << 20) + 1),
        (4095, 8193),
    ],
)
def test_read_offsets(client: FuseClient, root: Path, offset: int, size: int) -> None:
    data = (root / "big.bin").read_bytes()
    entry = client.lookup(1, b"big.bin")
    fh = client.open(entry.nodeid)
    reply = client.read(entry.nodeid, fh, offset, size)
    assert reply.ok
    assert reply.payload == data[offset : offset + size]


def test_read_clamped_to_writable_part(client: FuseClient, root: Path) -> None:
    entry = client.lookup(1, b"big.bin")
    fh = client.open(entry.nodeid)
    reply = client.call(READ, entry.nodeid, read_body(fh, 10, 1 << 20), writable_len=16 + 1000)
    assert reply.ok and reply.payload == (root / "big.bin").read_bytes()[10:1010]


def test_read_bad_handle_and_offset(client: FuseClient) -> None:
    entry = client.lookup(1, b"hello.txt")
    assert client.read(entry.nodeid, 77, 0, 10).error == -errno.EBADF
    fh = client.open(entry.nodeid)
    assert client.read(entry.nodeid, fh, 1 << 63, 10).error == -errno.EINVAL
    dfh = client.opendir(1)
    assert client.read(1, dfh, 0, 10).error == -errno.EBADF


def test_flush_and_release(client: FuseClient) -> None:
    baseline = open_fds()
    entry = client.lookup(1, b"hello.txt")
    fh = client.open(entry.nodeid)
    assert client.call(FLUSH, entry.nodeid, struct.pack("<QIIQ", fh, 0, 0, 0)).ok
    assert client.call(RELEASE, entry.nodeid, release_body(fh)).ok
    assert client.read(entry.nodeid, fh, 0, 10).error == -errno.EBADF
    assert client.call(FLUSH, entry.nodeid, struct.pack("<QIIQ", fh, 0, 0, 0)).error == -errno.EBADF
    client.forget(entry.nodeid, 1)
    assert open_fds() == baseline


def test_emfile_becomes_errno_reply(client: FuseClient) -> None:
    entry = client.lookup(1, b"hello.txt")
    open_body = struct.pack("<II", os.O_RDONLY, 0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(n) for n in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    try:
        replies = []
        for _ in range(highest + 2):  # fills any free slots below the limit, then EMFILE
            replies.append(client.call(OPEN, entry.nodeid, open_body))
            if replies[-1].error:
                break
        lookup = client.call(LOOKUP, 1, name_body(b"empty"))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert replies[-1].error == -errno.EMFILE
    assert all(r.ok for r in replies[:-1])
    assert lookup.error == -errno.EMFILE
    assert client.call(LOOKUP, 1, name_body(b"empty")).ok


# --- directories ----------------------------------------------------------------------


def expected_listing(path: Path) -> set[bytes]:
    return {os.fsencode(n) for n in os.listdir(path)} | {b".", b".."}


@pytest.mark.parametrize("size", [64, 100, 256, 4096, 1 << 16])
def test_readdir_paging_every_entry_once(client: FuseClient, root: Path, size: int) -> None:
    entry = client.lookup(1, b"many")
    fh = client.opendir(entry.nodeid)
    ents = client.readdir_all(entry.nodeid, fh, size)
    names = [d.name for d in ents]
    assert len(names) == len(set(names))
    assert set(names) == expected_listing(root / "many")
    for d in ents:
        if d.name not in (b".", b".."):
            assert d.ino == os.lstat(root / "many" / os.fsdecode(d.name)).st_ino
            assert d.type == stat.S_IFREG >> 12


def test_readdir_types(client: FuseClient, root: Path) -> None:
    fh = client.opendir(1)
    types = {d.name: d.type for d in client.readdir_all(1, fh, 4096)}
    assert types[b"sub"] == 4 and types[b"hello.txt"] == 8
    assert types[b"link_etc"] == 10 and types[b"fifo"] == 1


def test_readdir_buffer_too_small_for_one_entry(client: FuseClient) -> None:
    fh = client.opendir(1)
    reply = client.call(READDIR, 1, read_body(fh, 0, 10))
    assert reply.ok and reply.payload == b""


def test_readdir_offsets_stable_while_host_changes(client: FuseClient, root: Path) -> None:
    entry = client.lookup(1, b"many")
    fh = client.opendir(entry.nodeid)
    first = parse_dirents(client.call(READDIR, entry.nodeid, read_body(fh, 0, 512)).payload)
    before = expected_listing(root / "many")
    for name in os.listdir(root / "many")[:50]:
        os.unlink(root / "many" / name)
    survivors = expected_listing(root / "many")
    (root / "many" / "new").touch()
    rest: list[Dirent] = []
    offset = first[-1].off
    while True:
        batch = parse_dirents(
            client.call(READDIR, entry.nodeid, read_body(fh, offset, 512)).payload
        )
        if not batch:
            break
        rest += batch
        offset = batch[-1].off
    names = [d.name for d in first + rest]
    # As a host process would see it: no entry twice, every entry present
    # throughout listed, removed/created ones either way.
    assert len(names) == len(set(names))
    assert survivors <= set(names) <= before | {b"new"}
    # A rewind (offset 0) sees the new state.
    again = {d.name for d in client.readdir_all(entry.nodeid, fh, 4096)}
    assert again == expected_listing(root / "many")


def test_readdirplus_paging_and_lookup_counts(client: FuseClient, root: Path) -> None:
    many = client.lookup(1, b"many")
    fh = client.opendir(many.nodeid)
    ents = client.readdir_all(many.nodeid, fh, 700, plus=True)  # ~4 records per call
    names = [d.name for d in ents]
    assert len(names) == len(set(names)) and set(names) == expected_listing(root / "many")
    inodes = client.session.fs.inodes
    for d in ents:
        assert d.entry is not None
        if d.name in (b".", b".."):
            assert d.entry.nodeid == 0
            continue
        st = os.lstat(root / "many" / os.fsdecode(d.name))
        assert d.entry.nodeid > 1 and d.entry.ino == st.st_ino == d.ino
        assert_attr_matches(d.entry.attr, st)
        assert inodes.nlookup(d.entry.nodeid) == 1, "each emitted entry counted exactly once"
    assert len(inodes) == 2 + MANY  # root, many, its files


def test_readdirplus_entry_that_does_not_fit_is_not_counted(client: FuseClient, root: Path) -> None:
    (root / "four").mkdir()
    for name in ["aaaa", "bbbb", "cccc"]:
        (root / "four" / name).touch()
    four = client.lookup(1, b"four")
    fh = client.opendir(four.nodeid)
    inodes = client.session.fs.inodes
    before = len(inodes)
    # Every record here is 128 + 24 + len(name) rounded up to 8 = 160 bytes.
    reply = client.call(READDIRPLUS, four.nodeid, read_body(fh, 0, 3 * 160 + 159))
    ents = parse_dirents(reply.payload, plus=True)
    assert len(ents) == 3  # in the host's order, "." and ".." anywhere
    real = [d for d in ents if d.name not in (b".", b"..")]
    assert len(inodes) == before + len(real), "only the emitted entries were looked up"
    for d in real:
        assert d.entry is not None and inodes.nlookup(d.entry.nodeid) == 1
    # The next call resumes after the last one; those that did not fit come now.
    rest = parse_dirents(
        client.call(READDIRPLUS, four.nodeid, read_body(fh, ents[2].off, 4096)).payload, plus=True
    )
    names = sorted(d.name for d in [*ents, *rest])
    assert names == [b".", b"..", b"aaaa", b"bbbb", b"cccc"]
    assert len(inodes) == before + 3


def test_readdirplus_then_forget_returns_fds(client: FuseClient) -> None:
    baseline = open_fds()
    sub = client.lookup(1, b"sub")
    fh = client.opendir(sub.nodeid)
    ents = client.readdir_all(sub.nodeid, fh, 4096, plus=True)
    assert client.call(RELEASEDIR, sub.nodeid, release_body(fh)).ok
    items = [(d.entry.nodeid, 1) for d in ents if d.entry is not None and d.entry.nodeid]
    items.append((sub.nodeid, 1))
    body = struct.pack("<II", len(items), 0) + b"".join(struct.pack("<QQ", n, c) for n, c in items)
    assert client.call(BATCH_FORGET, 0, body).used == 0
    assert open_fds() == baseline
    assert len(client.session.fs.inodes) == 1


def test_opendir_on_file_and_releasedir(client: FuseClient) -> None:
    hello = client.lookup(1, b"hello.txt")
    assert client.call(OPENDIR, hello.nodeid, struct.pack("<II", 0, 0)).error == -errno.ENOTDIR
    fh = client.opendir(1)
    assert client.call(RELEASEDIR, 1, release_body(fh)).ok
    assert client.call(READDIR, 1, read_body(fh, 0, 4096)).error == -errno.EBADF
    file_fh = client.open(hello.nodeid)
    assert client.call(READDIR, 1, read_body(file_fh, 0, 4096)).error == -errno.EBADF


# --- forget accounting ------------------------------------------------------------------


def test_forget_accounting_returns_fds_to_baseline(client: FuseClient) -> None:
    inodes = client.session.fs.inodes
    baseline = open_fds()
    sub = client.lookup(1, b"sub")
    for _ in range(5):
        client.lookup(1, b"hello.txt")
    nested = client.lookup(sub.nodeid, b"nested.txt")
    hello = client.lookup(1, b"hello.txt")
    assert inodes.nlookup(hello.nodeid) == 6
    assert open_fds() == baseline + 3
    client.forget(hello.nodeid, 4)
    assert inodes.nlookup(hello.nodeid) == 2
    assert client.call(GETATTR, hello.nodeid, getattr_body()).ok
    client.forget(hello.nodeid, 2)
    assert client.call(GETATTR, hello.nodeid, getattr_body()).error == -errno.EBADF
    client.forget(nested.nodeid, 1)
    client.forget(sub.nodeid, 1)
    assert open_fds() == baseline
    # a fresh lookup gets a new node ID: IDs are never reused
    again = client.lookup(1, b"hello.txt")
    assert again.nodeid not in (hello.nodeid, sub.nodeid, nested.nodeid)


def test_forget_root_and_unknown_are_harmless(client: FuseClient) -> None:
    client.forget(1, 100)
    client.forget(424242, 1)
    assert client.call(GETATTR, 1, getattr_body()).ok


def test_borrowed_inode_outlives_forget(fs: PassthroughFs) -> None:
    inodes = fs.inodes
    entry = fs.lookup(1, b"hello.txt")
    with inodes.borrow(entry.nodeid) as inode:
        fs.forget(entry.nodeid, 1)
        os.fstat(inode.fd)  # still open while borrowed
        fd = inode.fd
    with pytest.raises(OSError):
        os.fstat(fd)


# --- STATFS / ACCESS ----------------------------------------------------------------


def test_statfs(client: FuseClient, root: Path) -> None:
    reply = client.call(STATFS, 1)
    assert reply.ok and len(reply.payload) == 80
    blocks, bfree, bavail, files, ffree, bsize, namelen, frsize = struct.unpack_from(
        "<QQQQQIII", reply.payload
    )
    sv = os.statvfs(root)
    assert (blocks, bsize, namelen, frsize, files) == (
        sv.f_blocks,
        sv.f_bsize,
        sv.f_namemax,
        sv.f_frsize,
        sv.f_files,
    )
    assert bavail <= bfree <= blocks and ffree <= files


def _access(client: FuseClient, nodeid: int, mask: int, uid: int, gid: int) -> int:
    return client.call(ACCESS, nodeid, struct.pack("<II", mask, 0), uid=uid, gid=gid).error


def test_access_checks_mode_bits(client: FuseClient, root: Path) -> None:
    os.chmod(root / "hello.txt", 0o640)
    os.chown(root / "hello.txt", 1000, 2000)
    entry = client.lookup(1, b"hello.txt")
    n = entry.nodeid
    assert _access(client, n, os.F_OK, 5000, 5000) == 0
    assert _access(client, n, os.R_OK, 1000, 1) == 0  # owner
    assert _access(client, n, os.R_OK, 3000, 2000) == 0  # group
    assert _access(client, n, os.R_OK, 3000, 3000) == -errno.EACCES  # other
    assert _access(client, n, os.X_OK, 1000, 1) == -errno.EACCES
    assert _access(client, n, os.X_OK, 0, 0) == -errno.EACCES  # root needs some x bit
    assert _access(client, n, os.R_OK, 0, 0) == 0
    assert _access(client, n, os.W_OK, 1000, 1) == 0  # owner: rw-
    assert _access(client, n, os.W_OK, 3000, 2000) == -errno.EACCES  # group: r--
    assert _access(client, n, 0x40, 1000, 1) == -errno.EINVAL
    assert _access(client, 1, os.X_OK, 0, 0) == 0


def test_open_reply_flags_follow_cache_policy_and_direct_io(tmp_path: Path) -> None:
    """cache=never -> FOPEN_DIRECT_IO, always -> FOPEN_KEEP_CACHE; O_DIRECT is
    honoured (host O_DIRECT + FOPEN_DIRECT_IO) only with allow_direct_io."""
    from pyvirtiofsd.daemon.fuse.abi import OpenOutFlag
    from pyvirtiofsd.daemon.passthrough.filesystem import PassthroughFs, RequestContext
    from pyvirtiofsd.daemon.passthrough.inodes import FileHandle

    (tmp_path / "f").write_bytes(b"x" * 4096)
    ctx = RequestContext(uid=0, gid=0, pid=1)
    cases = [
        ({"cache": "never"}, os.O_RDONLY, OpenOutFlag.DIRECT_IO, False),
        ({"cache": "always"}, os.O_RDONLY, OpenOutFlag.KEEP_CACHE, False),
        ({"cache": "auto"}, os.O_RDONLY | os.O_DIRECT, 0, False),
        ({"allow_direct_io": True}, os.O_RDONLY | os.O_DIRECT, OpenOutFlag.DIRECT_IO, True),
    ]
    for kwargs, flags, want, host_direct in cases:
        fs = PassthroughFs(tmp_path, **kwargs)  # type: ignore[arg-type]
        try:
            entry = fs.lookup(1, b"f")
            out = fs.open(entry.nodeid, flags, ctx)
            assert out.open_flags == int(want), kwargs
            with fs.handles.borrow(out.fh, FileHandle) as handle:
                fl = fcntl.fcntl(handle.fd, fcntl.F_GETFL)
            assert bool(fl & os.O_DIRECT) == host_direct, kwargs
        finally:
            fs.close()
    with pytest.raises(ValueError):
        PassthroughFs(tmp_path, cache="sometimes")


def test_announce_submounts_marks_host_mount_points(tmp_path: Path) -> None:
    """A directory that is a mount point on the host carries FUSE_ATTR_SUBMOUNT
    (only with announce_submounts), and INIT then offers FUSE_SUBMOUNTS."""
    import subprocess

    from pyvirtiofsd.daemon.fuse.abi import InitFlag
    from pyvirtiofsd.daemon.passthrough.filesystem import FUSE_ATTR_SUBMOUNT, PassthroughFs

    (tmp_path / "plain").mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "pva-sub", str(mnt)], check=True)
    try:
        for announce in (False, True):
            fs = PassthroughFs(tmp_path, announce_submounts=announce)
            try:
                assert bool(fs.lookup(1, b"mnt").attr.flags & FUSE_ATTR_SUBMOUNT) == announce
                assert not fs.lookup(1, b"plain").attr.flags & FUSE_ATTR_SUBMOUNT
                assert bool(fs.init(InitFlag(0xFFFF_FFFF)) & InitFlag.SUBMOUNTS) == announce
            finally:
                fs.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
