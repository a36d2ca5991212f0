"""Regression tests named after the virtiofsd CVE classes (issue 10).

Each CVE of the C virtiofsd is a class of bug any virtio-fs daemon can
have; these tests hold ours to the fixed behaviour, on the filesystem
through the in-process FUSE session (``FuseClient``) and, where the C fast
path answers the request itself, through the whole device (fake
front-end, queue runners; ``running_device``).  Expectations are local
semantics: what the host kernel does for the same caller on a local disk.

Related tests under other names (kept where they are):

* CVE-2020-10717 (fd exhaustion): ``test_inode_fds.py`` (the inode fd
  budget, EMFILE shedding), ``test_passthrough_ops.py::
  test_emfile_becomes_errno_reply``, ``test_locks.py`` (lock owner fds
  capped: ENOLCK), ``test_readdir.py`` (open directories capped: EMFILE),
  ``tests/vm/test_fd_budget.py`` (a guest ``find`` + ``stat`` of 2,200
  inodes under ``--rlimit-nofile 256``).
* CVE-2020-35517 (special files opened): ``test_locks.py::
  test_lock_requests_never_open_a_fifo`` / ``..._a_device_node``.
* CVE-2021-20263 (security.capability kept on write):
  ``test_passthrough_creds.py::test_killpriv_on_write_matches_local``,
  ``test_device_engine.py::test_kill_suidgid_write_in_place_clears_setuid``.
* CVE-2022-0358 (SGID inheritance): ``test_passthrough_creds.py::
  test_setgid_directory_rules`` and ``..._with_and_without_known_groups``.
"""

from __future__ import annotations

import errno
import gc
import os
import resource
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.daemon.fuse.session import FuseSession
from pyvirtiofsd.daemon.passthrough import PassthroughFs, oscalls
from pyvirtiofsd.daemon.passthrough.xattrmap import XattrMap
from tests.support.fakechain import (
    ACCESS,
    CREATE,
    FATTR_GID,
    FATTR_MODE,
    FATTR_SIZE,
    FATTR_UID,
    GETATTR,
    GETLK,
    GETXATTR,
    LINK,
    LISTXATTR,
    LOOKUP,
    MKDIR,
    OPEN,
    OPENDIR,
    READDIRPLUS,
    READLINK,
    REMOVEXATTR,
    RENAME,
    SETATTR,
    SETLK,
    SETLKW,
    SETXATTR,
    STATFS,
    SYNCFS,
    WRITE,
    WRITE_KILL_SUIDGID,
    FuseClient,
    create_body,
    fill_fds,
    init_body,
    lk_body,
    mkdir_body,
    name_body,
    open_fds,
    parse_entry,
    read_body,
    rename_body,
    request,
    setattr_body,
    write_body,
)
from tests.unit.test_device_frontend import INIT, Rig, running_device

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="credentials and mknod need root")

A, B = 1000, 1001  # unprivileged guest users
G = 2000  # a group neither belongs to
CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # v2: cap_net_raw
F_WRLCK = 1
O_PATH = 0o10000000
JOIN = 30.0


def client_for(share: Path, **kw: object) -> FuseClient:
    fs = PassthroughFs(share, xattr=True, posix_locks=True, flock=True, **kw)  # type: ignore[arg-type]
    c = FuseClient(FuseSession(fs))
    c.init()
    return c


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    os.chmod(d, 0o777)
    (d / "hello.txt").write_bytes(b"hello\n")
    return d


@pytest.fixture
def client(share: Path) -> Iterator[FuseClient]:
    c = client_for(share)
    yield c
    c.session.fs.close()


def local(uid: int, gid: int, fn: Callable[[], object]) -> object:
    """``fn()`` as a local unprivileged caller (fsuid/fsgid, no groups, no
    capabilities) on a fresh thread; returns its result or its OSError."""
    out: list[object] = []

    def body() -> None:
        with oscalls.caller_credentials(uid, gid):
            assert oscalls._raw_setgroups(()) == 0
            try:
                out.append(fn())
            except OSError as exc:
                out.append(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join(JOIN)
    return out[0]


def setxattr_body(name: bytes, value: bytes) -> bytes:
    return struct.pack("<II", len(value), 0) + name + b"\0" + value


def getxattr_body(name: bytes, size: int) -> bytes:
    return struct.pack("<II", size, 0) + name + b"\0"


# --- CVE-2020-10717: a guest cannot run the daemon out of fds or wedge it -----------


@pytest.fixture
def few_fds() -> Iterator[Callable[[], list[int]]]:
    """Lower the soft RLIMIT_NOFILE near what the process holds; ``fill()``
    then opens /dev/null until EMFILE.  Everything is given back after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []

    def fill() -> list[int]:
        # Garbage of earlier tests first: an fd it holds, closed by a later
        # collection, would give the daemon the one fd this test denies it.
        gc.collect()
        return fill_fds(held)

    top = max(int(n) for n in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 64, hard))
    try:
        yield fill
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_cve_2020_10717_inode_fds_stay_under_the_budget(share: Path) -> None:
    """A guest looking up 500 files makes a daemon with inode file handles
    hold at most its budget of inode fds, and every file stays reachable."""
    for i in range(500):
        (share / f"n{i}").write_bytes(b"%d" % i)
    c = client_for(share, inode_file_handles="prefer", inode_fds=32)
    try:
        baseline = open_fds()
        nodes = [c.lookup(1, b"n%d" % i).nodeid for i in range(500)]
        assert open_fds() - baseline <= 32
        for i, node in enumerate(nodes):
            fh = c.open(node)
            assert c.read(node, fh, 0, 16).payload == b"%d" % i
            c.call(18, node, struct.pack("<QIIQ", fh, 0, 0, 0))  # RELEASE
        assert open_fds() - baseline <= 32
    finally:
        c.session.fs.close()


async def test_cve_2020_10717_fd_exhaustion_is_an_errno_and_never_wedges_a_queue(
    tmp_path: Path, few_fds: Callable[[], list[int]]
) -> None:
    """The daemon out of fds (EMFILE): LOOKUP and OPEN of new files answer
    -EMFILE on the same queue, requests needing no fd are still served in
    C, and once fds are free again the queue serves everything (no reply is
    lost, no kick is missed)."""
    async with running_device(tmp_path) as rig:
        for i in range(4):
            (rig.share / f"x{i}").write_bytes(b"x")
        assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
        err, payload = await rig.fuse(LOOKUP, 1, name_body(b"file.bin"))
        assert err == 0
        known = parse_entry(payload).nodeid
        held = few_fds()
        for _ in range(3):
            err, _ = await rig.fuse(LOOKUP, 1, name_body(b"x0"))
            assert err == -errno.EMFILE
            err, _ = await rig.fuse(OPEN, known, struct.pack("<II", os.O_RDONLY, 0))
            assert err == -errno.EMFILE
            err, _ = await rig.fuse(OPENDIR, 1, struct.pack("<II", os.O_RDONLY, 0))
            assert err == -errno.EMFILE
            assert (await rig.fuse(GETATTR, known, bytes(16)))[0] == 0
        for fd in held:
            os.close(fd)
        held.clear()
        for i in range(4):
            err, payload = await rig.fuse(LOOKUP, 1, name_body(b"x%d" % i))
            assert err == 0
        err, payload = await rig.fuse(OPEN, known, struct.pack("<II", os.O_RDONLY, 0))
        assert err == 0
        fh = struct.unpack_from("<Q", payload)[0]
        err, payload = await rig.fuse(15, known, read_body(fh, 0, 4))  # READ
        assert err == 0 and payload == bytes(range(4))


# --- CVE-2020-35517: no special file is ever opened by the daemon -----------------


class FifoWatch:
    """Two host FIFOs whose blocked openers notice the daemon opening them:
    ``r`` has a host reader waiting (released by an open for writing),
    ``w`` a host writer waiting (released by an open for reading)."""

    def __init__(self, share: Path) -> None:
        self.paths = {"r": share / "fifo_r", "w": share / "fifo_w"}
        self.released = {k: threading.Event() for k in self.paths}
        self.fds: list[int] = []
        self.threads = []
        for key, path in self.paths.items():
            os.mkfifo(path, 0o666)
            mode = os.O_RDONLY if key == "r" else os.O_WRONLY
            t = threading.Thread(target=self._wait, args=(key, path, mode), daemon=True)
            t.start()
            self.threads.append(t)
        for t in self.threads:  # bounded: until each opener sits in openat(2)
            assert t.native_id is not None
            for _ in range(20_000):
                if in_openat(t.native_id):
                    break
                threading.Event().wait(0.0005)
            assert in_openat(t.native_id)

    def _wait(self, key: str, path: Path, mode: int) -> None:
        self.fds.append(os.open(path, mode))
        self.released[key].set()

    def opened(self) -> list[str]:
        """Which FIFOs the daemon opened so far (a blocked opener was released,
        or the daemon holds a non-O_PATH fd on one)."""
        out = [k for k, ev in self.released.items() if ev.is_set()]
        for key, path in self.paths.items():
            if daemon_fds_on(path) and key not in out:
                out.append(key)
        return out

    def close(self) -> None:
        for key, path in self.paths.items():
            if not self.released[key].is_set():  # release the waiter ourselves
                mode = os.O_WRONLY if key == "r" else os.O_RDONLY
                os.close(os.open(path, mode | os.O_NONBLOCK if key == "w" else mode))
        for t in self.threads:
            t.join(JOIN)
        for fd in self.fds:
            os.close(fd)


def in_openat(tid: int) -> bool:
    with open(f"/proc/self/task/{tid}/syscall") as f:
        return f.read().split()[0] == "257"


def daemon_fds_on(path: Path) -> list[int]:
    """Non-O_PATH fds of this process on ``path``'s inode."""
    st = os.stat(path)
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fst = os.stat(f"/proc/self/fd/{fd}")
            with open(f"/proc/self/fdinfo/{fd}") as f:
                flags = int(f.read().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError):
            continue
        if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino) and not flags & O_PATH:
            out.append(int(fd))
    return out


def special_file_requests(c: FuseClient, node: int, name: bytes, fh: int) -> list[tuple]:
    """Every request a hostile guest can aim at the special file ``node``
    (called ``name`` in the root); fh is an open regular file's handle."""
    return [
        (LOOKUP, 1, name_body(name)),
        (GETATTR, node, bytes(16)),
        (GETATTR, node, struct.pack("<IIQ", 1, 0, fh)),  # by a handle of another file
        (OPEN, node, struct.pack("<II", os.O_RDONLY, 0)),
        (OPEN, node, struct.pack("<II", os.O_WRONLY, 0)),
        (OPEN, node, struct.pack("<II", os.O_RDWR | os.O_TRUNC, 0)),
        (OPENDIR, node, struct.pack("<II", os.O_RDONLY, 0)),
        (CREATE, 1, create_body(name, os.O_WRONLY | os.O_CREAT, 0o100644)),
        (CREATE, 1, create_body(name, os.O_RDONLY | os.O_CREAT | os.O_TRUNC, 0o100644)),
        (SETATTR, node, setattr_body(FATTR_SIZE, size=0)),
        (SETATTR, node, setattr_body(FATTR_MODE, mode=0o666)),
        (SETATTR, node, setattr_body(FATTR_UID | FATTR_GID, uid=0, gid=0)),
        (SETATTR, node, setattr_body(1 << 4 | 1 << 5, atime=(5, 0), mtime=(5, 0))),
        (SETXATTR, node, setxattr_body(b"user.x", b"1")),
        (GETXATTR, node, getxattr_body(b"user.x", 64)),
        (LISTXATTR, node, struct.pack("<II", 256, 0)),
        (REMOVEXATTR, node, name_body(b"user.x")),
        (GETLK, node, lk_body(fh, 1, 0, 0, F_WRLCK)),
        (SETLK, node, lk_body(fh, 1, 0, 0, F_WRLCK)),
        (SETLKW, node, lk_body(fh, 1, 0, 0, F_WRLCK)),
        (ACCESS, node, struct.pack("<II", 6, 0)),
        (READLINK, node, b""),
        (STATFS, node, b""),
        (SYNCFS, node, bytes(8)),
        (LINK, node, struct.pack("<Q", 1) + name_body(name + b".lnk")),
        (RENAME, 1, rename_body(1, name + b".lnk", name + b".mv")),
    ]


def test_cve_2020_35517_no_opcode_opens_a_fifo(share: Path) -> None:
    watch = FifoWatch(share)
    c = client_for(share, writeback=True)
    seen: list[tuple[str, int, bytes, list[str]]] = []

    def probe() -> None:
        fh = c.open(c.lookup(1, b"hello.txt").nodeid, os.O_RDWR)
        for key, path in watch.paths.items():
            node = c.lookup(1, path.name.encode()).nodeid
            for opcode, nodeid, body in special_file_requests(c, node, path.name.encode(), fh):
                c.call(opcode, nodeid, body, uid=0)
                c.call(opcode, nodeid, body, uid=A, gid=A)
                seen.append((key, opcode, body[:16], watch.opened()))
        # a directory listing with attributes (READDIRPLUS looks each entry up)
        dh = c.opendir(1)
        names = {d.name for d in c.readdir_all(1, dh, 4096, plus=True)}
        assert {b"fifo_r", b"fifo_w"} <= names
        assert c.call(READDIRPLUS, 1, read_body(dh, 0, 4096)).ok
        seen.append(("readdirplus", READDIRPLUS, b"", watch.opened()))

    t = threading.Thread(target=probe, daemon=True)
    try:
        t.start()
        t.join(JOIN)
        # an open in the wrong direction blocks the daemon: that is a failure too
        assert not t.is_alive(), f"a request blocked in the daemon after {seen[-1:]}"
        assert len(seen) == 2 * len(special_file_requests(c, 1, b"x", 1)) + 1
        assert [s for s in seen if s[3]] == []
        assert not any(ev.is_set() for ev in watch.released.values())
    finally:
        watch.close()  # (also releases a daemon thread blocked on a FIFO)
        t.join(JOIN)
        c.session.fs.close()


def test_cve_2020_35517_no_opcode_opens_a_device_node(share: Path) -> None:
    """A character device in the share (here /dev/full's numbers: opening it
    would be harmless to observe, and is still never done)."""
    dev = share / "full"
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    c = client_for(share)
    try:
        fh = c.open(c.lookup(1, b"hello.txt").nodeid, os.O_RDWR)
        node = c.lookup(1, b"full").nodeid
        for opcode, nodeid, body in special_file_requests(c, node, b"full", fh):
            c.call(opcode, nodeid, body)
            assert daemon_fds_on(dev) == [], (opcode, body[:16])
        opened = c.call(OPEN, node, struct.pack("<II", os.O_RDWR, 0))
        assert opened.error == -errno.ENXIO
    finally:
        c.session.fs.close()


# --- CVE-2021-20263: a write clears security.capability and setuid -----------------


def cap_file(path: Path, mode: int = 0o4755, owner: int = A) -> None:
    path.write_bytes(b"#!/bin/sh\n")
    os.chown(path, owner, owner)
    os.chmod(path, mode)
    os.setxattr(path, "security.capability", CAP)


def has_cap(path: Path, name: str = "security.capability") -> bool:
    try:
        os.getxattr(path, name)
    except OSError as exc:
        assert exc.errno == errno.ENODATA
        return False
    return True


def local_write(path: Path, uid: int) -> tuple[int, bool]:
    """(mode, capability kept) after a local write by ``uid`` (no CAP_FSETID)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        assert local(uid, uid, lambda: os.write(fd, b"x")) == 1
    finally:
        os.close(fd)
    return stat.S_IMODE(os.stat(path).st_mode), has_cap(path)


@pytest.mark.parametrize("writer", [A, B])
def test_cve_2021_20263_write_by_non_root_clears_security_capability(
    client: FuseClient, share: Path, tmp_path: Path, writer: int
) -> None:
    ref = tmp_path / "ref"
    for p in (share / "prog", ref):
        cap_file(p)
    expected = local_write(ref, writer)
    assert expected == (0o755, False)  # the local kernel clears both
    node = client.lookup(1, b"prog").nodeid
    fh = client.open(node, os.O_WRONLY)
    body = write_body(fh, 0, b"x", WRITE_KILL_SUIDGID)  # the guest: no CAP_FSETID
    assert client.call(WRITE, node, body, uid=writer, gid=writer).ok
    assert (stat.S_IMODE(os.stat(share / "prog").st_mode), has_cap(share / "prog")) == expected


async def test_cve_2021_20263_fast_path_write_clears_security_capability(
    tmp_path: Path,
) -> None:
    """The same write answered in C by the queue runner."""
    async with running_device(tmp_path, xattr=True) as rig:
        path = rig.share / "file.bin"
        os.chown(path, A, A)
        os.chmod(path, 0o4755)
        os.setxattr(path, "security.capability", CAP)
        nodeid, fh = await open_in_device(rig, path.name)
        fast = rig.devices[0].fast
        assert fast is not None
        before = fast.stats().write
        rig.unique += 1
        body = write_body(fh, 0, b"abc", WRITE_KILL_SUIDGID)
        req = request(WRITE, nodeid, body, unique=rig.unique, uid=A, gid=A)
        head = rig.q.add_chain([req], [4096])
        assert await rig.submit() == [(head, 24)]
        assert fast.stats().write == before + 1  # answered in place
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
        assert not has_cap(path)


async def open_in_device(rig: Rig, name: str) -> tuple[int, int]:
    assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
    err, payload = await rig.fuse(LOOKUP, 1, name_body(name.encode()))
    assert err == 0
    nodeid = parse_entry(payload).nodeid
    err, payload = await rig.fuse(OPEN, nodeid, struct.pack("<II", os.O_RDWR, 0))
    assert err == 0
    return nodeid, struct.unpack_from("<Q", payload)[0]


REMAP = ":prefix:all::user.virtiofs.:"  # every guest name under user.virtiofs.


@pytest.mark.parametrize("writer", [0, A])
def test_cve_2021_20263_remapped_security_capability_is_dropped_on_write(
    share: Path, writer: int
) -> None:
    """The CVE itself: with ``--xattrmap`` the guest's security.capability
    lives on the host as user.virtiofs.security.capability, which the host
    kernel does not know to clear; the daemon must drop it on every write
    (the kernel drops a real security.capability on any write, root's too)."""
    (share / "prog").write_bytes(b"#!/bin/sh\n")
    os.chmod(share / "prog", 0o777)
    c = client_for(share, xattrmap=XattrMap.from_option(REMAP))
    try:
        node = c.lookup(1, b"prog").nodeid
        assert c.call(SETXATTR, node, setxattr_body(b"security.capability", CAP)).ok
        host = "user.virtiofs.security.capability"
        assert os.getxattr(share / "prog", host) == CAP
        fh = c.open(node, os.O_WRONLY)
        flags = WRITE_KILL_SUIDGID if writer else 0
        assert c.call(WRITE, node, write_body(fh, 0, b"x", flags), uid=writer, gid=writer).ok
        assert not has_cap(share / "prog", host)
        got = c.call(GETXATTR, node, getxattr_body(b"security.capability", 64))
        assert got.error == -errno.ENODATA
        # and a truncate or a chown drops it too, as the kernel's killpriv does
        for valid, kw in [(FATTR_SIZE, {"size": 1}), (FATTR_UID | FATTR_GID, {"uid": A, "gid": A})]:
            assert c.call(SETXATTR, node, setxattr_body(b"security.capability", CAP)).ok
            assert c.call(SETATTR, node, setattr_body(valid, **kw)).ok  # type: ignore[arg-type]
            assert not has_cap(share / "prog", host), valid
    finally:
        c.session.fs.close()


async def test_cve_2021_20263_remapped_capability_dropped_on_a_device_write(
    tmp_path: Path,
) -> None:
    """With the name remapped, a WRITE through the device drops it too (the
    fast path leaves such writes to Python, which knows the map)."""
    async with running_device(tmp_path, xattr=True, xattrmap=XattrMap.from_option(REMAP)) as rig:
        path = rig.share / "file.bin"
        host = "user.virtiofs.security.capability"
        os.setxattr(path, host, CAP)
        nodeid, fh = await open_in_device(rig, path.name)
        err, _ = await rig.fuse(WRITE, nodeid, write_body(fh, 0, b"abc"))
        assert err == 0
        assert not has_cap(path, host)
        assert path.read_bytes()[:3] == b"abc"


# --- CVE-2022-0358: no setgid file for a creator outside the directory's group ------


def sgid_dir(path: Path) -> Path:
    path.mkdir()
    os.chown(path, 0, G)
    os.chmod(path, 0o2777)
    return path


def test_cve_2022_0358_create_in_setgid_dir_matches_local(
    client: FuseClient, share: Path, tmp_path: Path
) -> None:
    """A caller not in the directory's group creates files asking for
    S_ISGID (CREATE, MKNOD-less MKDIR, and OPEN|O_CREAT through CREATE): the
    new file takes the directory's group but, as locally, not the setgid bit
    (the daemon's root groups or capabilities must not count)."""
    sg = sgid_dir(share / "sg")
    ref = sgid_dir(tmp_path / "ref")
    node = client.lookup(1, b"sg").nodeid
    body = create_body(b"f", os.O_WRONLY | os.O_CREAT, 0o102755)
    assert client.call(CREATE, node, body, uid=A, gid=A).ok
    assert client.call(MKDIR, node, mkdir_body(b"d", 0o2755), uid=A, gid=A).ok
    dir_fd = os.open(ref, os.O_PATH | os.O_DIRECTORY)
    old = os.umask(0)
    try:

        def make() -> None:
            os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o2755, dir_fd=dir_fd))
            os.mkdir("d", 0o2755, dir_fd=dir_fd)

        assert local(A, A, make) is None
    finally:
        os.umask(old)
        os.close(dir_fd)
    for name in ("f", "d"):
        ours, theirs = os.stat(sg / name), os.stat(ref / name)
        assert (ours.st_uid, ours.st_gid, stat.S_IMODE(ours.st_mode)) == (
            theirs.st_uid,
            theirs.st_gid,
            stat.S_IMODE(theirs.st_mode),
        ), name
    assert os.stat(sg / "f").st_gid == G and not os.stat(sg / "f").st_mode & stat.S_ISGID
    assert os.stat(sg / "d").st_mode & stat.S_ISGID  # directories inherit it, as locally
