"""Per-request credentials, umask and setuid/setgid killing (the tests run as root)."""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.daemon.fuse.session import FuseSession
from pyvirtiofsd.daemon.passthrough import PassthroughFs, oscalls
from tests.support.fakechain import (
    CREATE,
    FATTR_KILL_SUIDGID,
    FATTR_MODE,
    FATTR_SIZE,
    LINK,
    MKDIR,
    MKNOD,
    OPEN,
    OPEN_KILL_SUIDGID,
    RENAME,
    SETATTR,
    SYMLINK,
    UNLINK,
    WRITE,
    WRITE_KILL_SUIDGID,
    FuseClient,
    create_body,
    mkdir_body,
    mknod_body,
    name_body,
    parse_entry,
    rename_body,
    setattr_body,
    write_body,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="credential switching needs root")

A, B = 1000, 1001  # two unprivileged guest users


@pytest.fixture
def root(tmp_path: Path) -> Path:
    share = tmp_path / "share"
    share.mkdir()
    os.chmod(share, 0o777)
    return share


@pytest.fixture
def client(root: Path) -> Iterator[FuseClient]:
    fs = PassthroughFs(root)
    c = FuseClient(FuseSession(fs))
    c.init()
    yield c
    fs.close()


def fs_ids(status: str) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["Uid"].split()[3]), int(fields["Gid"].split()[3])


def thread_status() -> str:
    with open("/proc/thread-self/status") as f:
        return f.read()


def test_fsuid_switch_is_per_thread() -> None:
    inside: list[tuple[int, int]] = []
    main_during: list[tuple[int, int]] = []
    entered, release = threading.Event(), threading.Event()

    def worker() -> None:
        with oscalls.caller_credentials(A, 2000):
            inside.append(fs_ids(thread_status()))
            entered.set()
            release.wait(10)
        inside.append(fs_ids(thread_status()))

    t = threading.Thread(target=worker)
    t.start()
    assert entered.wait(10)
    main_during.append(fs_ids(thread_status()))
    release.set()
    t.join()
    assert inside == [(A, 2000), (0, 0)]
    assert main_during == [(0, 0)], "glibc setfsuid must not be broadcast to other threads"


def test_created_objects_belong_to_the_caller(client: FuseClient, root: Path) -> None:
    reply = client.call(CREATE, 1, create_body(b"f", os.O_WRONLY | os.O_CREAT), uid=A, gid=A)
    assert reply.ok
    reply = client.call(MKDIR, 1, mkdir_body(b"d"), uid=A, gid=A)
    assert reply.ok
    assert client.call(SYMLINK, 1, b"s\0f\0", uid=A, gid=A).ok
    assert client.call(MKNOD, 1, mknod_body(b"p", stat.S_IFIFO | 0o600), uid=A, gid=A).ok
    for name in ["f", "d", "s", "p"]:
        st = os.lstat(root / name)
        assert (st.st_uid, st.st_gid) == (A, A), name
    # and the daemon thread is root again afterwards
    assert fs_ids(thread_status()) == (0, 0)


def test_mode_is_taken_as_sent_without_host_umask(client: FuseClient, root: Path) -> None:
    old = os.umask(0o077)
    try:
        reply = client.call(CREATE, 1, create_body(b"f", os.O_WRONLY | os.O_CREAT, 0o100666))
        assert reply.ok
        assert client.call(MKDIR, 1, mkdir_body(b"d", 0o777)).ok
        assert os.umask(0o077) == 0o077, "the process umask is untouched"
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(root / "f").st_mode) == 0o666
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o777


def test_setgid_directory_rules(client: FuseClient, root: Path) -> None:
    os.mkdir(root / "g")
    os.chown(root / "g", 0, 2000)
    os.chmod(root / "g", 0o2777)
    g = client.lookup(1, b"g")
    assert client.call(MKDIR, g.nodeid, mkdir_body(b"sub"), uid=A, gid=A).ok
    st = os.stat(root / "g" / "sub")
    assert st.st_gid == 2000 and st.st_mode & stat.S_ISGID, "inherited group and setgid bit"
    # A file asking for S_ISGID while its creator is not in the group loses it
    # (CVE-2022-0358: root's supplementary groups must not count).
    body = create_body(b"f", os.O_WRONLY | os.O_CREAT, 0o102755)
    assert client.call(CREATE, g.nodeid, body, uid=A, gid=A).ok
    st = os.stat(root / "g" / "f")
    assert st.st_gid == 2000 and not st.st_mode & stat.S_ISGID


def test_permission_checks_are_the_callers(client: FuseClient, root: Path) -> None:
    (root / "a.txt").write_bytes(b"A's\n")
    os.chown(root / "a.txt", A, A)
    os.chmod(root / "a.txt", 0o644)
    os.mkdir(root / "adir", 0o755)
    os.chown(root / "adir", A, A)
    f = client.lookup(1, b"a.txt")
    adir = client.lookup(1, b"adir")
    wr = struct.pack("<II", os.O_WRONLY, 0)
    assert client.call(OPEN, f.nodeid, wr, uid=B, gid=B).error == -errno.EACCES
    assert client.call(OPEN, f.nodeid, wr, uid=A, gid=A).ok
    assert client.call(OPEN, f.nodeid, struct.pack("<II", os.O_RDONLY, 0), uid=B, gid=B).ok
    trunc = setattr_body(FATTR_SIZE)
    assert client.call(SETATTR, f.nodeid, trunc, uid=B, gid=B).error == -errno.EACCES
    chmod = setattr_body(FATTR_MODE, mode=0o666)
    assert client.call(SETATTR, f.nodeid, chmod, uid=B, gid=B).error == -errno.EPERM
    body = create_body(b"x", os.O_WRONLY | os.O_CREAT)
    assert client.call(CREATE, adir.nodeid, body, uid=B, gid=B).error == -errno.EACCES
    assert client.call(MKDIR, adir.nodeid, mkdir_body(b"y"), uid=B, gid=B).error == -errno.EACCES
    assert client.call(CREATE, adir.nodeid, body, uid=A, gid=A).ok
    assert client.call(UNLINK, adir.nodeid, name_body(b"x"), uid=B, gid=B).error == -errno.EACCES
    ren = rename_body(1, b"x", b"z")
    assert client.call(RENAME, adir.nodeid, ren, uid=B, gid=B).error == -errno.EACCES
    # B may not link A's file: fs.protected_hardlinks (EPERM, checked first)
    # or, with it off, no write permission on adir (EACCES)
    protected = Path("/proc/sys/fs/protected_hardlinks").read_text().strip() == "1"
    link = struct.pack("<Q", f.nodeid) + b"mine\0"
    expected = errno.EPERM if protected else errno.EACCES
    assert client.call(LINK, adir.nodeid, link, uid=B, gid=B).error == -expected
    assert client.call(UNLINK, adir.nodeid, name_body(b"x"), uid=A, gid=A).ok
    assert (root / "a.txt").read_bytes() == b"A's\n" and stat.S_IMODE(
        os.stat(root / "a.txt").st_mode
    ) == 0o644


def local_write_as(path: Path, uid: int) -> int:
    """What a local filesystem does when ``uid`` (no CAP_FSETID) writes ``path``.

    (Opened as root: pytest's tmp directories are not searchable by ``uid``;
    the kill is decided by the writer's credentials at write time.)
    """
    fd = os.open(path, os.O_WRONLY)
    try:
        with oscalls.caller_credentials(uid, uid):
            os.write(fd, b"x")
    finally:
        os.close(fd)
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mode", [0o6757, 0o6747, 0o4777, 0o2777])
@pytest.mark.parametrize("writer", [A, B])
def test_killpriv_on_write_matches_local(
    client: FuseClient, root: Path, tmp_path: Path, mode: int, writer: int
) -> None:
    local = tmp_path / "local"
    for path in (root / "suid", local):
        path.write_bytes(b"#!/bin/sh\n")
        os.chown(path, A, A)
        os.chmod(path, mode)
    expected = local_write_as(local, writer)
    entry = client.lookup(1, b"suid")
    fh = client.open(entry.nodeid, os.O_WRONLY)
    body = write_body(fh, 0, b"x", WRITE_KILL_SUIDGID)  # the guest: writer lacks CAP_FSETID
    assert client.call(WRITE, entry.nodeid, body, uid=writer, gid=writer).ok
    assert stat.S_IMODE(os.stat(root / "suid").st_mode) == expected
    assert not expected & stat.S_ISUID
    # setgid stays only without g+x and for a writer in the file's group
    assert bool(expected & stat.S_ISGID) == (mode & 0o2010 == 0o2000 and writer == A)


def test_no_kill_without_the_flag(client: FuseClient, root: Path) -> None:
    (root / "suid").write_bytes(b"data")
    os.chmod(root / "suid", 0o6755)
    entry = client.lookup(1, b"suid")
    fh = client.open(entry.nodeid, os.O_WRONLY)
    # a caller with CAP_FSETID (guest root): the kernel sends no kill flag
    assert client.call(WRITE, entry.nodeid, write_body(fh, 0, b"x")).ok
    assert stat.S_IMODE(os.stat(root / "suid").st_mode) == 0o6755
    assert oscalls.current_fs_ids() == (0, 0)


def test_killpriv_on_truncate_and_open_trunc(client: FuseClient, root: Path) -> None:
    for name in ("t1", "t2"):
        (root / name).write_bytes(b"data")
        os.chown(root / name, A, A)
        os.chmod(root / name, 0o6777)
    t1 = client.lookup(1, b"t1")
    body = setattr_body(FATTR_SIZE | FATTR_KILL_SUIDGID, size=1)
    assert client.call(SETATTR, t1.nodeid, body, uid=A, gid=A).ok
    assert stat.S_IMODE(os.stat(root / "t1").st_mode) == 0o777
    t2 = client.lookup(1, b"t2")
    open_trunc = struct.pack("<II", os.O_WRONLY | os.O_TRUNC, OPEN_KILL_SUIDGID)
    assert client.call(OPEN, t2.nodeid, open_trunc, uid=B, gid=B).ok
    st = os.stat(root / "t2")
    assert stat.S_IMODE(st.st_mode) == 0o777 and st.st_size == 0


def test_kill_flag_from_root_caller_still_kills(client: FuseClient, root: Path) -> None:
    # uid 0 without CAP_FSETID in the guest (e.g. a dropped capability): the
    # flag alone decides, the daemon drops its own CAP_FSETID for the write.
    (root / "s").write_bytes(b"data")
    os.chmod(root / "s", 0o4755)
    entry = client.lookup(1, b"s")
    fh = client.open(entry.nodeid, os.O_WRONLY)
    assert client.call(WRITE, entry.nodeid, write_body(fh, 0, b"x", WRITE_KILL_SUIDGID)).ok
    assert stat.S_IMODE(os.stat(root / "s").st_mode) == 0o755
    # and CAP_FSETID is back afterwards: a root write without the flag keeps bits
    os.chmod(root / "s", 0o4755)
    assert client.call(WRITE, entry.nodeid, write_body(fh, 0, b"y")).ok
    assert stat.S_IMODE(os.stat(root / "s").st_mode) == 0o4755


def test_create_entry_for_other_user_counts_lookup(client: FuseClient) -> None:
    reply = client.call(CREATE, 1, create_body(b"f", os.O_RDWR | os.O_CREAT), uid=A, gid=A)
    entry = parse_entry(reply.payload)
    assert entry.attr[11] == A and client.session.fs.inodes.nlookup(entry.nodeid) == 1
