"""Extended attributes and POSIX/flock locks through FuseSession."""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.daemon.fuse.session import FuseSession
from pyvirtiofsd.daemon.passthrough import PassthroughFs
from tests.support.fakechain import (
    FLUSH,
    GETLK,
    GETXATTR,
    LISTXATTR,
    LK_FLOCK,
    OFFSET_MAX,
    RELEASE,
    RELEASE_FLOCK_UNLOCK,
    REMOVEXATTR,
    SETLK,
    SETLKW,
    SETXATTR,
    FuseClient,
    build_tree,
    flush_body,
    lk_body,
    name_body,
    open_fds,
    release_flags_body,
)

F_RDLCK, F_WRLCK, F_UNLCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK


@pytest.fixture
def root(tmp_path: Path) -> Path:
    share = tmp_path / "share"
    share.mkdir()
    build_tree(share, many=False)
    return share


@pytest.fixture
def client(root: Path) -> Iterator[FuseClient]:
    fs = PassthroughFs(root, xattr=True, posix_locks=True, flock=True)
    c = FuseClient(FuseSession(fs))
    c.init()
    yield c
    fs.close()


def setxattr_body(name: bytes, value: bytes, flags: int = 0) -> bytes:
    return struct.pack("<II", len(value), flags) + name + b"\0" + value


def getxattr_body(name: bytes, size: int) -> bytes:
    return struct.pack("<II", size, 0) + name + b"\0"


# --- xattrs ---------------------------------------------------------------------------


def test_xattr_roundtrip_matches_host(client: FuseClient, root: Path) -> None:
    f = client.lookup(1, b"hello.txt")
    assert client.call(SETXATTR, f.nodeid, setxattr_body(b"user.a", b"value-a")).ok
    assert client.call(SETXATTR, f.nodeid, setxattr_body(b"user.b", b"")).ok
    assert os.getxattr(root / "hello.txt", "user.a") == b"value-a"
    probe = client.call(GETXATTR, f.nodeid, getxattr_body(b"user.a", 0))
    assert probe.ok and struct.unpack("<II", probe.payload) == (7, 0)
    assert client.call(GETXATTR, f.nodeid, getxattr_body(b"user.a", 7)).payload == b"value-a"
    assert client.call(GETXATTR, f.nodeid, getxattr_body(b"user.a", 6)).error == -errno.ERANGE
    assert client.call(GETXATTR, f.nodeid, getxattr_body(b"user.b", 10)).payload == b""
    assert client.call(GETXATTR, f.nodeid, getxattr_body(b"user.zz", 10)).error == -errno.ENODATA
    names = b"".join(os.fsencode(n) + b"\0" for n in os.listxattr(root / "hello.txt"))
    assert b"user.a\0" in names and b"user.b\0" in names
    probe = client.call(LISTXATTR, f.nodeid, struct.pack("<II", 0, 0))
    assert struct.unpack("<II", probe.payload)[0] == len(names)
    listed = client.call(LISTXATTR, f.nodeid, struct.pack("<II", len(names), 0))
    assert listed.payload == names
    short = client.call(LISTXATTR, f.nodeid, struct.pack("<II", len(names) - 1, 0))
    assert short.error == -errno.ERANGE
    # XATTR_CREATE / XATTR_REPLACE
    create = setxattr_body(b"user.a", b"x", os.XATTR_CREATE)
    assert client.call(SETXATTR, f.nodeid, create).error == -errno.EEXIST
    replace = setxattr_body(b"user.c", b"x", os.XATTR_REPLACE)
    assert client.call(SETXATTR, f.nodeid, replace).error == -errno.ENODATA
    assert client.call(REMOVEXATTR, f.nodeid, name_body(b"user.a")).ok
    assert client.call(REMOVEXATTR, f.nodeid, name_body(b"user.a")).error == -errno.ENODATA
    assert "user.a" not in os.listxattr(root / "hello.txt")
    # a directory works too
    sub = client.lookup(1, b"sub")
    assert client.call(SETXATTR, sub.nodeid, setxattr_body(b"user.d", b"1")).ok
    assert os.getxattr(root / "sub", "user.d") == b"1"


def test_xattr_names_and_malformed(client: FuseClient, root: Path) -> None:
    f = client.lookup(1, b"hello.txt")
    long_name = b"user." + b"n" * 251
    assert client.call(GETXATTR, f.nodeid, getxattr_body(long_name, 10)).error == -errno.ERANGE
    assert client.call(GETXATTR, f.nodeid, getxattr_body(b"", 10)).error == -errno.ERANGE
    bad = struct.pack("<II", 5, 0) + b"user.x\0abc"  # announces 5, carries 3
    assert client.call(SETXATTR, f.nodeid, bad).error == -errno.EINVAL
    assert (
        client.call(SETXATTR, f.nodeid, setxattr_body(b"user.x", b"v", 0x10)).error == -errno.EINVAL
    )


def test_xattr_on_symlink_stays_on_the_symlink(client: FuseClient, root: Path) -> None:
    link = client.lookup(1, b"link_rel")
    # user.* xattrs are not allowed on symlinks: the host says so, and the
    # target (hello.txt) must not receive it instead
    reply = client.call(SETXATTR, link.nodeid, setxattr_body(b"user.l", b"1"))
    assert reply.error == -errno.EPERM
    assert "user.l" not in os.listxattr(root / "hello.txt")


# --- POSIX locks -------------------------------------------------------------------------


def test_posix_lock_conflict_between_owners(client: FuseClient, root: Path) -> None:
    f = client.lookup(1, b"hello.txt")
    fh1 = client.open(f.nodeid, os.O_RDWR)
    fh2 = client.open(f.nodeid, os.O_RDWR)
    assert client.call(SETLK, f.nodeid, lk_body(fh1, 111, 0, 99, F_WRLCK)).ok
    # the same owner may re-lock and split its own range, through another handle too
    assert client.call(SETLK, f.nodeid, lk_body(fh2, 111, 50, 60, F_RDLCK)).ok
    # another owner conflicts
    assert client.call(SETLK, f.nodeid, lk_body(fh2, 222, 10, 10, F_RDLCK)).error == -errno.EAGAIN
    assert client.call(SETLK, f.nodeid, lk_body(fh2, 222, 100, OFFSET_MAX, F_WRLCK)).ok
    reply = client.call(GETLK, f.nodeid, lk_body(fh2, 222, 0, OFFSET_MAX, F_WRLCK))
    assert reply.ok and len(reply.payload) == 24
    start, end, ltype, _pid = struct.unpack("<QQII", reply.payload)
    assert (start, end, ltype) == (0, 49, F_WRLCK), "owner 111's first piece"
    reply = client.call(GETLK, f.nodeid, lk_body(fh1, 111, 0, 99, F_WRLCK))
    assert struct.unpack("<QQII", reply.payload)[2] == F_UNLCK, "no conflict with oneself"
    reply = client.call(GETLK, f.nodeid, lk_body(fh1, 111, 0, OFFSET_MAX, F_RDLCK))
    assert struct.unpack("<QQII", reply.payload)[:3] == (100, OFFSET_MAX, F_WRLCK)
    # unlock, then the other owner gets it, blocking variant included (a
    # SETLKW that has to wait: tests/unit/test_locks.py)
    wait = lk_body(fh2, 222, 0, 0, F_WRLCK)
    assert client.call(SETLK, f.nodeid, lk_body(fh1, 111, 0, OFFSET_MAX, F_UNLCK)).ok
    assert client.call(SETLKW, f.nodeid, wait).ok
    # a host process's classic POSIX lock conflicts with the guest's locks
    fd = os.open(root / "hello.txt", os.O_RDWR)
    try:
        with pytest.raises(OSError) as info:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        assert info.value.errno in (errno.EAGAIN, errno.EACCES)
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 10, 50)
        reply = client.call(GETLK, f.nodeid, lk_body(fh1, 333, 55, 55, F_WRLCK))
        assert struct.unpack("<QQII", reply.payload)[:3] == (50, 59, F_RDLCK)
    finally:
        os.close(fd)


def test_flush_drops_the_owners_locks(client: FuseClient) -> None:
    baseline = open_fds()
    f = client.lookup(1, b"hello.txt")
    fh = client.open(f.nodeid, os.O_RDWR)
    assert client.call(SETLK, f.nodeid, lk_body(fh, 1, 0, 9, F_WRLCK)).ok
    assert client.call(SETLK, f.nodeid, lk_body(fh, 2, 5, 5, F_RDLCK)).error == -errno.EAGAIN
    assert client.call(FLUSH, f.nodeid, flush_body(fh, lock_owner=1)).ok  # close(2) by owner 1
    assert client.call(SETLK, f.nodeid, lk_body(fh, 2, 5, 5, F_RDLCK)).ok
    assert client.call(RELEASE, f.nodeid, release_flags_body(fh, 0)).ok
    client.forget(f.nodeid, 1)
    assert open_fds() == baseline, "lock fds die with the inode"


def test_lock_validation(client: FuseClient) -> None:
    f = client.lookup(1, b"hello.txt")
    fh = client.open(f.nodeid, os.O_RDWR)
    assert client.call(SETLK, f.nodeid, lk_body(fh, 1, 10, 5, F_WRLCK)).error == -errno.EINVAL
    assert client.call(SETLK, f.nodeid, lk_body(fh, 1, 0, 5, 7)).error == -errno.EINVAL
    assert client.call(SETLK, f.nodeid, lk_body(999, 1, 0, 5, F_WRLCK)).error == -errno.EBADF
    assert client.call(SETLK, f.nodeid, lk_body(fh, 1, 0, 5, F_WRLCK)[:40]).error == -errno.EINVAL


# --- flock ----------------------------------------------------------------------------------


def test_flock_between_handles(client: FuseClient) -> None:
    f = client.lookup(1, b"hello.txt")
    fh1 = client.open(f.nodeid, os.O_RDONLY)
    fh2 = client.open(f.nodeid, os.O_RDONLY)
    ex = lk_body(fh1, 0, 0, OFFSET_MAX, F_WRLCK, flags=LK_FLOCK)
    assert client.call(SETLK, f.nodeid, ex).ok
    sh2 = lk_body(fh2, 0, 0, OFFSET_MAX, F_RDLCK, flags=LK_FLOCK)
    assert client.call(SETLK, f.nodeid, sh2).error == -errno.EAGAIN
    # RELEASE with FLOCK_UNLOCK drops it
    assert client.call(RELEASE, f.nodeid, release_flags_body(fh1, RELEASE_FLOCK_UNLOCK)).ok
    assert client.call(SETLKW, f.nodeid, sh2).ok
    un = lk_body(fh2, 0, 0, OFFSET_MAX, F_UNLCK, flags=LK_FLOCK)
    assert client.call(SETLK, f.nodeid, un).ok

