"""Per-request credentials, umask and setuid/setgid killing (the tests run as root)."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.daemon.fuse.session import FuseSession
from pyvirtiofsd.daemon.passthrough import PassthroughFs, oscalls
from tests.support.fakechain import (
    CREATE,
    FATTR_GID,
    FATTR_KILL_SUIDGID,
    FATTR_MODE,
    FATTR_SIZE,
    FATTR_UID,
    GETATTR,
    LINK,
    LISTXATTR,
    MKDIR,
    MKNOD,
    OPEN,
    OPEN_KILL_SUIDGID,
    OPENDIR,
    RENAME,
    RENAME2,
    SETATTR,
    SETXATTR,
    SYMLINK,
    SYNCFS,
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


def test_guest_root_creates_without_capability_calls(
    client: FuseClient, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Guest root on a root daemon: nothing to switch, so a creation costs
    no capget/capset (it is on every CREATE of a root guest), yet the mode
    is taken as sent and the objects are root's; a user's creation still
    switches and raises the capabilities again."""
    calls: list[str] = []
    real_current, real_set = oscalls.capabilities.current, oscalls.capabilities.set_effective

    def current() -> tuple[int, int, int]:
        calls.append("capget")
        return real_current()

    def set_effective(mask: int) -> None:
        calls.append("capset")
        real_set(mask)

    monkeypatch.setattr(oscalls.capabilities, "current", current)
    monkeypatch.setattr(oscalls.capabilities, "set_effective", set_effective)
    old = os.umask(0o077)
    try:
        assert client.call(CREATE, 1, create_body(b"f", os.O_WRONLY | os.O_CREAT, 0o100666)).ok
        assert client.call(MKDIR, 1, mkdir_body(b"d", 0o777)).ok
        assert client.call(SYMLINK, 1, b"s\0f\0").ok
        assert client.call(MKNOD, 1, mknod_body(b"p", stat.S_IFIFO | 0o666)).ok
        assert calls == []
        assert os.umask(0o077) == 0o077
    finally:
        os.umask(old)
    for name, mode in [("f", 0o666), ("d", 0o777), ("p", 0o666)]:
        st = os.lstat(root / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, mode), name
    assert client.call(CREATE, 1, create_body(b"g", os.O_WRONLY | os.O_CREAT), uid=A, gid=A).ok
    assert "capset" in calls, "a user's creation raises the DAC capabilities again"
    assert (os.lstat(root / "g").st_uid, os.lstat(root / "g").st_gid) == (A, A)
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


G1, G2 = 2000, 2001  # groups A belongs to only as supplementary groups


def local(
    uid: int, gid: int, groups: tuple[int, ...], where: Path, fn: Callable[[int], object]
) -> object:
    """``fn(dir_fd)`` as a local caller would run it: fsuid/fsgid and
    supplementary groups set on a fresh thread (raw syscalls, per thread),
    no capabilities; ``dir_fd`` is ``where`` opened as root (pytest's tmp
    directories are not searchable by ``uid``).  Returns the result or the
    ``OSError`` it raised."""
    out: list[object] = []
    dir_fd = os.open(where, os.O_PATH | os.O_DIRECTORY)

    def body() -> None:
        with oscalls.caller_credentials(uid, gid):  # (its first use drops all groups)
            assert oscalls._raw_setgroups(groups) == 0
            try:
                out.append(fn(dir_fd))
            except OSError as exc:
                out.append(exc)

    try:
        t = threading.Thread(target=body)
        t.start()
        t.join()
    finally:
        os.close(dir_fd)
    return out[0]


def group_dir(path: Path, gid: int, mode: int) -> Path:
    path.mkdir()
    os.chown(path, 0, gid)
    os.chmod(path, mode)
    return path


def thread_groups() -> list[str]:
    for line in thread_status().splitlines():
        if line.startswith("Groups:"):
            return line.split()[1:]
    raise AssertionError("no Groups")


def caps_effective() -> int:
    with open("/proc/thread-self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


def test_supplementary_group_dir_accepts_what_the_guest_allowed(
    client: FuseClient, root: Path
) -> None:
    # root:G1 0770: A may create here only through G1 (the guest checked that)
    group_dir(root / "grp", G1, 0o770)
    before = caps_effective()
    d = client.lookup(1, b"grp")
    assert client.call(
        CREATE, d.nodeid, create_body(b"f", os.O_WRONLY | os.O_CREAT), uid=A, gid=A
    ).ok
    assert client.call(MKDIR, d.nodeid, mkdir_body(b"d"), uid=A, gid=A).ok
    assert client.call(MKNOD, d.nodeid, mknod_body(b"p", stat.S_IFIFO | 0o640), uid=A, gid=A).ok
    assert client.call(SYMLINK, d.nodeid, b"s\0f\0", uid=A, gid=A).ok
    f = client.lookup(d.nodeid, b"f")
    link = struct.pack("<Q", f.nodeid) + b"h\0"
    assert client.call(LINK, d.nodeid, link, uid=A, gid=A).ok
    assert client.call(RENAME, d.nodeid, rename_body(d.nodeid, b"h", b"h2"), uid=A, gid=A).ok
    for name in ("f", "d", "p", "s"):
        st = os.lstat(root / "grp" / name)
        assert (st.st_uid, st.st_gid) == (A, A), name  # a plain directory: the caller's gid
    assert (root / "grp/h2").samefile(root / "grp/f")
    assert client.call(UNLINK, d.nodeid, name_body(b"h2"), uid=A, gid=A).ok
    # a file writable only through G1 opens for writing and truncates
    (root / "grp/shared").write_bytes(b"data")
    os.chown(root / "grp/shared", 0, G1)
    os.chmod(root / "grp/shared", 0o660)
    shared = client.lookup(d.nodeid, b"shared")
    wr = struct.pack("<II", os.O_WRONLY, 0)
    assert client.call(OPEN, shared.nodeid, wr, uid=A, gid=A).ok
    assert client.call(SETATTR, shared.nodeid, setattr_body(FATTR_SIZE, size=1), uid=A, gid=A).ok
    assert os.stat(root / "grp/shared").st_size == 1
    # and the thread is the daemon again, every capability back
    assert fs_ids(thread_status()) == (0, 0) and caps_effective() == before


@pytest.mark.parametrize("mode", [0o6755, 0o4755, 0o2755, 0o0755])
def test_chown_to_a_supplementary_group_matches_local(
    client: FuseClient, root: Path, tmp_path: Path, mode: int
) -> None:
    """The issue's case: uid A, egid A, supplementary {G1}: chown(f, A, G1)
    succeeds and clears setuid/setgid as a local chown does."""
    refdir = group_dir(tmp_path / "refdir", 0, 0o755)
    ref = refdir / "f"
    for path in (root / "f", ref):
        path.write_bytes(b"#!/bin/sh\n")
        os.chown(path, A, A)
        os.chmod(path, mode)
    result = local(A, A, (G1,), refdir, lambda d: os.chown("f", A, G1, dir_fd=d))
    assert result is None, result
    f = client.lookup(1, b"f")
    # the guest sends FATTR_KILL_SUIDGID with every chown of a non-directory
    body = setattr_body(FATTR_UID | FATTR_GID | FATTR_KILL_SUIDGID, uid=A, gid=G1)
    assert client.call(SETATTR, f.nodeid, body, uid=A, gid=A).ok
    ours, theirs = os.stat(root / "f"), os.stat(ref)
    assert (ours.st_uid, ours.st_gid, ours.st_mode) == (
        theirs.st_uid,
        theirs.st_gid,
        theirs.st_mode,
    )
    assert not stat.S_IMODE(ours.st_mode) & stat.S_ISUID
    assert fs_ids(thread_status()) == (0, 0)


def test_chmod_setgid_on_a_supplementary_group_file_is_kept(client: FuseClient, root: Path) -> None:
    # A owns f, f's group is G1 (A is a member): chmod g+s stays, as locally
    (root / "f").write_bytes(b"")
    os.chown(root / "f", A, G1)
    f = client.lookup(1, b"f")
    body = setattr_body(FATTR_MODE, mode=0o2755)
    assert client.call(SETATTR, f.nodeid, body, uid=A, gid=A).ok
    assert stat.S_IMODE(os.stat(root / "f").st_mode) == 0o2755


@pytest.mark.parametrize("groups", [None, (G1,)])
def test_setgid_directory_with_and_without_known_groups(
    client: FuseClient, root: Path, tmp_path: Path, groups: tuple[int, ...] | None
) -> None:
    """A new file asking for S_ISGID in a setgid directory of group G1 keeps it
    exactly when the creator is known to be in G1 (the host mount knows the
    groups; a virtio guest does not send them, and then no group counts)."""
    group_dir(root / "sg", G1, 0o2777)
    ref = group_dir(tmp_path / "ref", G1, 0o2777)
    client.session.fs.caller_groups = None if groups is None else (lambda pid: groups)
    sg = client.lookup(1, b"sg")
    body = create_body(b"f", os.O_WRONLY | os.O_CREAT, 0o102755)
    assert client.call(CREATE, sg.nodeid, body, uid=A, gid=A).ok
    assert client.call(MKDIR, sg.nodeid, mkdir_body(b"d", 0o755), uid=A, gid=A).ok

    def make(d: int) -> None:
        os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o2755, dir_fd=d))
        os.mkdir("d", 0o755, dir_fd=d)

    old = os.umask(0)
    try:
        assert local(A, A, groups or (), ref, make) is None
    finally:
        os.umask(old)
    for name in ("f", "d"):
        ours, theirs = os.stat(root / "sg" / name), os.stat(ref / name)
        assert (ours.st_uid, ours.st_gid, ours.st_mode) == (
            theirs.st_uid,
            theirs.st_gid,
            theirs.st_mode,
        ), name
    assert os.stat(ref / "d").st_mode & stat.S_ISGID and os.stat(ref / "d").st_gid == G1
    assert bool(os.stat(ref / "f").st_mode & stat.S_ISGID) == (groups is not None)
    assert thread_groups() == [], "no caller's group stays on the thread"


def test_groups_are_dropped_after_a_creation(client: FuseClient, root: Path) -> None:
    seen: list[str] = []
    client.session.fs.caller_groups = lambda pid: (G1, G2)
    real_mkdir = os.mkdir

    def spy(*args: object, **kw: object) -> None:
        with open("/proc/thread-self/status") as f:
            seen.extend(line for line in f if line.startswith("Groups:"))
        real_mkdir(*args, **kw)  # type: ignore[arg-type]

    os.mkdir = spy  # type: ignore[assignment]
    try:
        assert client.call(MKDIR, 1, mkdir_body(b"d"), uid=A, gid=A).ok
    finally:
        os.mkdir = real_mkdir
    assert seen[0].split()[1:] == [str(G1), str(G2)]
    assert thread_groups() == []


def test_whiteout_rename_belongs_to_the_caller(client: FuseClient, root: Path) -> None:
    group_dir(root / "grp", G1, 0o770)
    d = client.lookup(1, b"grp")
    assert client.call(
        CREATE, d.nodeid, create_body(b"f", os.O_WRONLY | os.O_CREAT), uid=A, gid=A
    ).ok
    body = rename_body(d.nodeid, b"f", b"g", flags=4)  # RENAME_WHITEOUT
    assert client.call(RENAME2, d.nodeid, body, uid=A, gid=A).ok
    st = os.lstat(root / "grp/f")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0 and (st.st_uid, st.st_gid) == (A, A)


def test_supplementary_groups_from_proc() -> None:
    assert oscalls.supplementary_groups(os.getpid()) == tuple(os.getgroups())
    assert oscalls.supplementary_groups(2**22 + 12345) is None  # no such process


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


@pytest.mark.parametrize("mode", [0o2745, 0o2755, 0o6745, 0o4755])
@pytest.mark.parametrize("caller_gid", [A, B])
def test_killpriv_on_truncate_uses_the_callers_group(
    client: FuseClient, root: Path, tmp_path: Path, mode: int, caller_gid: int
) -> None:
    """SETATTR size with FATTR_KILL_SUIDGID: setuid always goes, setgid
    without group-execute stays only for a caller in the file's group --
    decided by the caller's fsgid, as a local truncate decides it."""
    local = tmp_path / "local"
    for path in (root / "t", local):
        path.write_bytes(b"data")
        os.chown(path, A, A)
        os.chmod(path, mode)
    fd = os.open(local, os.O_WRONLY)
    try:
        with oscalls.caller_credentials(A, caller_gid):
            os.ftruncate(fd, 1)
    finally:
        os.close(fd)
    expected = stat.S_IMODE(os.stat(local).st_mode)
    t = client.lookup(1, b"t")
    body = setattr_body(FATTR_SIZE | FATTR_KILL_SUIDGID, size=1)
    assert client.call(SETATTR, t.nodeid, body, uid=A, gid=caller_gid).ok
    assert stat.S_IMODE(os.stat(root / "t").st_mode) == expected
    assert bool(expected & stat.S_ISGID) == (mode & 0o2010 == 0o2000 and caller_gid == A)
    assert fs_ids(thread_status()) == (0, 0)


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


# --- special files are never opened on the host ------------------------------

_IN_OPEN = 0x20


def _opened_names(fd: int) -> list[str]:
    names = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return names
        off = 0
        while off < len(data):
            length = struct.unpack_from("iIII", data, off)[3]
            name = data[off + 16 : off + 16 + length].rstrip(b"\0").decode()
            if name:
                names.append(name)
            off += 16 + length


def test_special_files_are_never_opened(root: Path) -> None:
    """Every request that could reach a device node, FIFO or socket on the
    host: the inotify IN_OPEN watch (O_PATH opens raise none) stays silent."""
    libc = ctypes.CDLL(None, use_errno=True)
    fs = PassthroughFs(root, allow_device_nodes=True, xattr=True, posix_locks=True)
    client = FuseClient(FuseSession(fs))
    client.init()
    null = os.makedev(1, 3)
    assert client.call(MKNOD, 1, mknod_body(b"null", stat.S_IFCHR | 0o666, null)).ok
    blk = 7 << 8  # new_encode_dev(7:0), as the guest sends it
    assert client.call(MKNOD, 1, mknod_body(b"loop", stat.S_IFBLK | 0o660, blk)).ok
    assert client.call(MKNOD, 1, mknod_body(b"fifo", stat.S_IFIFO | 0o666)).ok
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock"))
    watch = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        assert libc.inotify_add_watch(watch, str(root).encode(), _IN_OPEN) >= 0
        for name in (b"null", b"loop", b"fifo", b"sock"):
            node = client.lookup(1, name).nodeid
            for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_TRUNC):
                reply = client.call(OPEN, node, struct.pack("<II", flags, 0))
                assert reply.error == -errno.ENXIO, (name, flags)
            body = create_body(name, os.O_RDWR | os.O_CREAT)  # no O_EXCL: "open it"
            assert client.call(CREATE, 1, body).error == -errno.ENXIO, name
            body = setattr_body(FATTR_SIZE | FATTR_KILL_SUIDGID)
            assert client.call(SETATTR, node, body, uid=A, gid=A).error == -errno.EINVAL, name
            assert client.call(SETATTR, node, setattr_body(FATTR_MODE, mode=0o600)).ok
            assert client.call(SETATTR, node, setattr_body(FATTR_UID, uid=A)).ok
            assert client.call(GETATTR, node, bytes(16)).ok
            assert client.call(OPENDIR, node, struct.pack("<II", 0, 0)).error == -errno.ENOTDIR
            assert client.call(SYNCFS, node, bytes(8)).ok
            assert client.call(SETXATTR, node, struct.pack("<II", 1, 0) + b"user.x\0v").error in (
                0,
                -errno.EPERM,  # user.* on a special file: the host says EPERM
            )
            assert client.call(LISTXATTR, node, struct.pack("<II", 0, 0)).ok
            link = struct.pack("<Q", node) + name + b".l\0"
            assert client.call(LINK, 1, link).ok, name
            assert client.call(RENAME, 1, rename_body(1, name + b".l", name + b".m")).ok
        opened = _opened_names(watch)
    finally:
        os.close(watch)
        sock.close()
        fs.close()
    assert opened == [], f"special files opened on the host: {opened}"
    st = os.lstat(root / "loop")
    assert stat.S_ISBLK(st.st_mode) and os.major(st.st_rdev) == 7
