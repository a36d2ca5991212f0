"""The lock manager through FuseSession: blocking SETLKW, INTERRUPT, reset, fd budget.

Threads stand in for the device's concurrent request workers.  No test
sleeps to synchronise: a waiter is known to be blocked through
``LockManager.wait_until_blocked`` (a condition), every join is bounded.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pyvirtiofsd.daemon.fuse.abi import InitFlag
from pyvirtiofsd.daemon.fuse.session import FuseSession
from pyvirtiofsd.daemon.passthrough import PassthroughFs
from tests.support.fakechain import (
    DESTROY,
    FLUSH,
    GETATTR,
    GETLK,
    INTERRUPT,
    LK_FLOCK,
    OFFSET_MAX,
    RELEASE,
    RELEASE_FLOCK_UNLOCK,
    SETLK,
    SETLKW,
    FuseClient,
    Reply,
    build_tree,
    flush_body,
    lk_body,
    open_fds,
    release_flags_body,
)

if TYPE_CHECKING:
    from pyvirtiofsd.daemon.passthrough.locks import LockManager

F_RDLCK, F_WRLCK, F_UNLCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK
JOIN = 30.0  # bound of every join/wait; a pass never comes near it


@pytest.fixture
def root(tmp_path: Path) -> Path:
    share = tmp_path / "share"
    share.mkdir()
    build_tree(share, many=False)
    return share


def make_client(root: Path, **kw: object) -> FuseClient:
    kw.setdefault("posix_locks", True)
    kw.setdefault("flock", True)
    client = FuseClient(FuseSession(PassthroughFs(root, **kw)))  # type: ignore[arg-type]
    client.init()
    return client


@pytest.fixture
def client(root: Path) -> Iterator[FuseClient]:
    c = make_client(root)
    yield c
    c.session.close()


def locks_of(client: FuseClient) -> LockManager:
    return client.session.fs.locks


class Caller(threading.Thread):
    """One request on its own thread (a device worker); ``reply`` once it is answered."""

    def __init__(
        self,
        client: FuseClient,
        opcode: int,
        nodeid: int,
        body: bytes,
        unique: int,
        before: Callable[[], object] = lambda: None,
    ) -> None:
        super().__init__(daemon=True)
        self.args = (opcode, nodeid, body, unique)
        self.before = before
        self.client = FuseClient(client.session)
        self.reply: Reply | None = None

    def run(self) -> None:
        opcode, nodeid, body, unique = self.args
        self.before()
        self.reply = self.client.call(opcode, nodeid, body, unique=unique)

    def result(self) -> int:
        self.join(JOIN)
        assert not self.is_alive(), "the request never completed"
        assert self.reply is not None
        return self.reply.error


def start_waiter(client: FuseClient, nodeid: int, body: bytes, unique: int, blocked: int) -> Caller:
    """A SETLKW on its own thread, returned once ``blocked`` waits are blocked."""
    t = Caller(client, SETLKW, nodeid, body, unique)
    t.start()
    assert locks_of(client).wait_until_blocked(blocked, JOIN), "SETLKW did not block"
    assert t.is_alive()
    return t


def getlk(
    client: FuseClient,
    nodeid: int,
    fh: int,
    owner: int,
    ltype: int = F_WRLCK,
    end: int = OFFSET_MAX,
) -> tuple[int, ...]:
    """(start, end, type) of the first lock in [0, end] that conflicts for ``owner``."""
    reply = client.call(GETLK, nodeid, lk_body(fh, owner, 0, end, ltype))
    assert reply.ok, reply.error
    return struct.unpack("<QQII", reply.payload)[:3]


# --- SETLKW blocks until granted ------------------------------------------------------


def test_setlkw_waits_while_held_and_is_granted_on_release(client: FuseClient) -> None:
    f = client.lookup(1, b"hello.txt")
    fh1 = client.open(f.nodeid, os.O_RDWR)
    fh2 = client.open(f.nodeid, os.O_RDWR)
    assert client.call(SETLK, f.nodeid, lk_body(fh1, 111, 0, 99, F_WRLCK)).ok
    # no re-poll within the test's time: only the daemon-side release can wake it
    locks_of(client).poll_min = locks_of(client).poll_max = 3600
    waiter = start_waiter(client, f.nodeid, lk_body(fh2, 222, 50, 50, F_WRLCK), 500, 1)
    # other requests keep being served while it waits, lock requests included
    assert client.call(GETATTR, f.nodeid, struct.pack("<IIQ", 0, 0, 0)).ok
    assert getlk(client, f.nodeid, fh1, 333) == (0, 99, F_WRLCK)
    assert client.call(SETLK, f.nodeid, lk_body(fh1, 333, 200, 300, F_WRLCK)).ok
    assert waiter.is_alive(), "still conflicting: still waiting"
    # releasing a part that does not cover the waiter's byte keeps it waiting
    assert client.call(SETLK, f.nodeid, lk_body(fh1, 111, 0, 9, F_UNLCK)).ok
    assert locks_of(client).wait_until_blocked(1, JOIN) and waiter.is_alive()
    assert client.call(SETLK, f.nodeid, lk_body(fh1, 111, 0, 99, F_UNLCK)).ok
    assert waiter.result() == 0
    assert getlk(client, f.nodeid, fh1, 111, end=199) == (50, 50, F_WRLCK), "222 holds it"


def test_setlkw_waits_for_a_host_process_lock(client: FuseClient, root: Path) -> None:
    f = client.lookup(1, b"hello.txt")
    fh = client.open(f.nodeid, os.O_RDWR)
    host = os.open(root / "hello.txt", os.O_RDWR)
    try:
        fcntl.lockf(host, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)  # classic POSIX, bytes 0-9
        waiter = start_waiter(client, f.nodeid, lk_body(fh, 1, 5, 5, F_RDLCK), 501, 1)
        fcntl.lockf(host, fcntl.LOCK_UN, 10, 0)  # no event reaches the daemon: re-polled
        assert waiter.result() == 0
        with pytest.raises(OSError) as info:
            fcntl.lockf(host, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 5)
        assert info.value.errno in (errno.EAGAIN, errno.EACCES), "the guest owner holds it"
    finally:
        os.close(host)


def test_setlkw_has_no_deadline(client: FuseClient, root: Path) -> None:
    """Waiting far longer than any "short wait" (hundreds of re-polls): still waiting."""
    f = client.lookup(1, b"hello.txt")
    fh = client.open(f.nodeid, os.O_RDWR)
    locks = locks_of(client)
    locks.poll_min = locks.poll_max = 0.002
    host = os.open(root / "hello.txt", os.O_RDWR)
    try:
        fcntl.lockf(host, fcntl.LOCK_EX | fcntl.LOCK_NB)
        waiter = start_waiter(client, f.nodeid, lk_body(fh, 1, 0, 0, F_WRLCK), 504, 1)
        # >= 500 polls of 2 ms: a second at least
        assert locks.wait_for(lambda m: m.polls >= 500 or not waiter.is_alive(), JOIN)
        assert waiter.is_alive(), f"answered {waiter.result()} instead of waiting"
        fcntl.lockf(host, fcntl.LOCK_UN)
        assert waiter.result() == 0
    finally:
        os.close(host)


def test_flock_wait_is_granted_when_the_holder_releases(client: FuseClient) -> None:
    f = client.lookup(1, b"hello.txt")
    fh1 = client.open(f.nodeid, os.O_RDONLY)
    fh2 = client.open(f.nodeid, os.O_RDONLY)
    ex = lk_body(fh1, 0, 0, OFFSET_MAX, F_WRLCK, flags=LK_FLOCK)
    assert client.call(SETLK, f.nodeid, ex).ok
    sh2 = lk_body(fh2, 0, 0, OFFSET_MAX, F_RDLCK, flags=LK_FLOCK)
    locks_of(client).poll_min = locks_of(client).poll_max = 3600  # woken, not re-polled
    waiter = start_waiter(client, f.nodeid, sh2, 502, 1)
    assert client.call(RELEASE, f.nodeid, release_flags_body(fh1, RELEASE_FLOCK_UNLOCK)).ok
    assert waiter.result() == 0


def test_flush_of_the_holder_wakes_the_waiter(client: FuseClient) -> None:
    f = client.lookup(1, b"hello.txt")
    fh = client.open(f.nodeid, os.O_RDWR)
    assert client.call(SETLK, f.nodeid, lk_body(fh, 1, 0, OFFSET_MAX, F_RDLCK)).ok
    locks_of(client).poll_min = locks_of(client).poll_max = 3600  # woken, not re-polled
    waiter = start_waiter(client, f.nodeid, lk_body(fh, 2, 0, 0, F_WRLCK), 503, 1)
    assert client.call(FLUSH, f.nodeid, flush_body(fh, lock_owner=1)).ok  # close(2) by owner 1
    assert waiter.result() == 0


# --- INTERRUPT and reset ------------------------------------------------------------------


def interrupt(client: FuseClient, unique: int) -> None:
    reply = client.call(INTERRUPT, 0, struct.pack("<Q", unique), unique=(unique + 1000) | 1)
    assert reply.used == 0, "INTERRUPT has no reply"


def test_interrupt_makes_a_waiting_setlkw_answer_eintr(client: FuseClient) -> None:
    f = client.lookup(1, b"hello.txt")
    fh = client.open(f.nodeid, os.O_RDWR)
    assert client.call(SETLK, f.nodeid, lk_body(fh, 1, 0, 0, F_WRLCK)).ok
    waiter = start_waiter(client, f.nodeid, lk_body(fh, 2, 0, 0, F_WRLCK), 600, 1)
    interrupt(client, 599)  # another request's unique: nothing happens to this one
    assert locks_of(client).wait_until_blocked(1, JOIN) and waiter.is_alive()
    interrupt(client, 600)
    assert waiter.result() == -errno.EINTR
    assert getlk(client, f.nodeid, fh, 3) == (0, 0, F_WRLCK), "owner 1 still holds it"
    assert locks_of(client).owner_fds == 1, "the interrupted owner's fd is gone"


def test_interrupt_that_overtakes_its_setlkw(client: FuseClient) -> None:
    """Served concurrently, INTERRUPT may run before the SETLKW it names."""
    f = client.lookup(1, b"hello.txt")
    fh = client.open(f.nodeid, os.O_RDWR)
    assert client.call(SETLK, f.nodeid, lk_body(fh, 1, 0, 0, F_WRLCK)).ok
    interrupt(client, 700)
    assert client.call(SETLKW, f.nodeid, lk_body(fh, 2, 0, 0, F_WRLCK), unique=700).error == (
        -errno.EINTR
    )


def test_destroy_wakes_every_waiter_with_an_error(client: FuseClient) -> None:
    baseline = open_fds()
    f = client.lookup(1, b"hello.txt")
    fh = client.open(f.nodeid, os.O_RDWR)
    fh2 = client.open(f.nodeid, os.O_RDONLY)
    assert client.call(SETLK, f.nodeid, lk_body(fh, 1, 0, OFFSET_MAX, F_WRLCK)).ok
    assert client.call(SETLK, f.nodeid, lk_body(fh, 0, 0, 0, F_WRLCK, flags=LK_FLOCK)).ok
    waiters = [
        start_waiter(client, f.nodeid, lk_body(fh, 10 + i, i, i, F_WRLCK), 800 + i, i + 1)
        for i in range(3)
    ]
    sh = lk_body(fh2, 0, 0, OFFSET_MAX, F_RDLCK, flags=LK_FLOCK)
    waiters.append(start_waiter(client, f.nodeid, sh, 810, 4))
    assert client.call(DESTROY, 0).ok
    assert [w.result() for w in waiters] == [-errno.EIO] * 4
    assert open_fds() == baseline, "every handle and lock fd closed"
    # a new session locks afresh
    client.init()
    f = client.lookup(1, b"hello.txt")
    fh = client.open(f.nodeid, os.O_RDWR)
    assert client.call(SETLKW, f.nodeid, lk_body(fh, 10, 0, 0, F_WRLCK)).ok


def test_device_reset_wakes_waiters(client: FuseClient) -> None:
    f = client.lookup(1, b"hello.txt")
    fh = client.open(f.nodeid, os.O_RDWR)
    assert client.call(SETLK, f.nodeid, lk_body(fh, 1, 0, 0, F_WRLCK)).ok
    waiter = start_waiter(client, f.nodeid, lk_body(fh, 2, 0, 0, F_WRLCK), 900, 1)
    client.session.reset()  # what the device does when the front-end resets
    assert waiter.result() == -errno.EIO


# --- what a lock request may open -------------------------------------------------------------


def fds_on(path: Path) -> list[int]:
    """Our fds that refer to the inode at ``path`` (O_PATH ones included)."""
    target = os.stat(path, follow_symlinks=False)
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            out.append(int(name))
    return out


def non_path_fds_on(path: Path) -> list[int]:
    """Like :func:`fds_on`, leaving out O_PATH fds (those the inode table holds)."""
    out = []
    for fd in fds_on(path):
        with open(f"/proc/self/fdinfo/{fd}") as f:
            flags = int(f.read().split("flags:")[1].split()[0], 8)
        if not flags & 0o10000000:  # O_PATH
            out.append(fd)
    return out


def in_syscall(tid: int, nr: int) -> bool:
    with open(f"/proc/self/task/{tid}/syscall") as f:
        return f.read().split()[0] == str(nr)


def test_lock_requests_never_open_a_fifo(client: FuseClient, root: Path) -> None:
    fifo = root / "lock.fifo"
    os.mkfifo(fifo)
    opened = threading.Event()
    reader_fd: list[int] = []

    def reader() -> None:
        reader_fd.append(os.open(fifo, os.O_RDONLY))  # blocks until a writer opens
        opened.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    assert t.native_id is not None
    for _ in range(10_000):  # bounded: until the reader sits in openat(2)
        if in_syscall(t.native_id, 257) or opened.wait(0.001):
            break
    assert not opened.is_set()
    try:
        node = client.lookup(1, b"lock.fifo").nodeid
        fh = client.open(client.lookup(1, b"hello.txt").nodeid, os.O_RDWR)
        requests = [
            (GETLK, lk_body(fh, 1, 0, 0, F_WRLCK)),
            (SETLK, lk_body(fh, 1, 0, 0, F_WRLCK)),
            (SETLK, lk_body(fh, 1, 0, 0, F_RDLCK)),
            (SETLKW, lk_body(fh, 1, 0, 0, F_WRLCK)),
            (SETLK, lk_body(fh, 1, 0, 0, F_WRLCK, flags=LK_FLOCK)),
        ]
        for opcode, body in requests:
            reply = client.call(opcode, node, body)
            assert reply.error in (-errno.EBADF, -errno.EINVAL), (opcode, reply.error)
        assert non_path_fds_on(fifo) == [], "the FIFO was opened"
        assert not opened.wait(0.2), "the host reader was released"
    finally:
        os.close(os.open(fifo, os.O_WRONLY))  # release the reader ourselves
        t.join(JOIN)
        for fd in reader_fd:
            os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device needs root")
def test_lock_requests_never_open_a_device_node(client: FuseClient, root: Path) -> None:
    dev = root / "null"
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    node = client.lookup(1, b"null").nodeid
    fh = client.open(client.lookup(1, b"hello.txt").nodeid, os.O_RDWR)
    for opcode in (GETLK, SETLK, SETLKW):
        reply = client.call(opcode, node, lk_body(fh, 1, 0, 0, F_RDLCK))
        assert reply.error in (-errno.EBADF, -errno.EINVAL), (opcode, reply.error)
    assert non_path_fds_on(dev) == []


def test_lock_needs_a_handle_of_that_inode(client: FuseClient) -> None:
    hello = client.lookup(1, b"hello.txt").nodeid
    empty = client.lookup(1, b"empty").nodeid
    fh = client.open(hello, os.O_RDWR)
    assert client.call(SETLK, empty, lk_body(fh, 1, 0, 0, F_WRLCK)).error == -errno.EBADF
    assert client.call(GETLK, 1, lk_body(fh, 1, 0, 0, F_WRLCK)).error == -errno.EBADF
    dh = client.opendir(1)
    assert client.call(GETLK, 1, lk_body(dh, 1, 0, 0, F_WRLCK)).error == -errno.EBADF


# inotify(7), for "a host watcher never sees a write-close"
IN_MODIFY, IN_CLOSE_WRITE, IN_OPEN = 0x2, 0x8, 0x20
_libc = ctypes.CDLL(None, use_errno=True)


class Inotify:
    def __init__(self, path: Path, mask: int) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        assert _libc.inotify_add_watch(self.fd, os.fsencode(path), mask) >= 0

    def masks(self) -> list[int]:
        out = []
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return out
        pos = 0
        while pos < len(data):
            _wd, mask, _cookie, length = struct.unpack_from("<iIII", data, pos)
            out.append(mask)
            pos += 16 + length
        return out

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize("readonly", [True, False])
def test_lock_fds_keep_the_handles_access_mode(root: Path, readonly: bool) -> None:
    client = make_client(root, readonly=readonly)
    watch = Inotify(root / "hello.txt", IN_CLOSE_WRITE | IN_MODIFY)
    try:
        f = client.lookup(1, b"hello.txt")
        fh = client.open(f.nodeid, os.O_RDONLY)
        assert getlk(client, f.nodeid, fh, 1) == (0, 0, F_UNLCK)
        assert client.call(SETLK, f.nodeid, lk_body(fh, 1, 0, 9, F_RDLCK)).ok
        held = [
            fd
            for fd in non_path_fds_on(root / "hello.txt")
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
        ]
        assert held == [], "a lock fd was opened for writing"
        # a write lock needs a writable fd: refused as the host refuses it
        assert client.call(SETLK, f.nodeid, lk_body(fh, 2, 20, 29, F_WRLCK)).error == -errno.EBADF
        assert client.call(SETLKW, f.nodeid, lk_body(fh, 1, 0, 9, F_WRLCK)).error == -errno.EBADF
        assert client.call(SETLK, f.nodeid, lk_body(fh, 1, 0, 9, F_UNLCK)).ok
        assert client.call(FLUSH, f.nodeid, flush_body(fh, lock_owner=1)).ok
        assert client.call(RELEASE, f.nodeid, release_flags_body(fh, 0)).ok
        assert watch.masks() == [], "a host watcher saw a write-close"
    finally:
        watch.close()
        client.session.close()


# --- negotiation -------------------------------------------------------------------------------


LOCK_REQUESTS: list[tuple[int, Callable[[int], bytes]]] = [
    (GETLK, lambda fh: lk_body(fh, 1, 0, 0, F_WRLCK)),
    (SETLK, lambda fh: lk_body(fh, 1, 0, 0, F_WRLCK)),
    (SETLKW, lambda fh: lk_body(fh, 1, 0, 0, F_WRLCK)),
    (SETLK, lambda fh: lk_body(fh, 1, 0, 0, F_WRLCK, flags=LK_FLOCK)),
    (SETLKW, lambda fh: lk_body(fh, 1, 0, 0, F_WRLCK, flags=LK_FLOCK)),
]


def test_locks_are_enosys_without_the_option(root: Path) -> None:
    client = make_client(root, posix_locks=False, flock=False)
    try:
        f = client.lookup(1, b"hello.txt")
        fh = client.open(f.nodeid, os.O_RDWR)
        before = open_fds()
        for opcode, body in LOCK_REQUESTS:
            assert client.call(opcode, f.nodeid, body(fh)).error == -errno.ENOSYS, opcode
        assert open_fds() == before
        host = os.open(root / "hello.txt", os.O_RDWR)
        try:
            fcntl.lockf(host, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody on the host holds it
        finally:
            os.close(host)
    finally:
        client.session.close()


def test_locks_are_enosys_unless_the_guest_negotiated_them(root: Path) -> None:
    fs = PassthroughFs(root, posix_locks=True, flock=True)
    client = FuseClient(FuseSession(fs))
    offered = 0xFFFF_FFFF & ~int(InitFlag.POSIX_LOCKS | InitFlag.FLOCK_LOCKS)
    try:
        client.init(flags=offered)
        f = client.lookup(1, b"hello.txt")
        fh = client.open(f.nodeid, os.O_RDWR)
        for opcode, body in LOCK_REQUESTS:
            assert client.call(opcode, f.nodeid, body(fh)).error == -errno.ENOSYS, opcode
        assert client.call(DESTROY, 0).ok
        # POSIX locks negotiated, flock not: only flock requests are refused
        client.init(flags=0xFFFF_FFFF & ~int(InitFlag.FLOCK_LOCKS))
        f = client.lookup(1, b"hello.txt")
        fh = client.open(f.nodeid, os.O_RDWR)
        errors = [client.call(op, f.nodeid, body(fh)).error for op, body in LOCK_REQUESTS]
        assert errors == [0, 0, 0, -errno.ENOSYS, -errno.ENOSYS]
    finally:
        fs.close()


# --- the fd budget -------------------------------------------------------------------


def test_a_thousand_owners_cost_at_most_the_cap(root: Path) -> None:
    client = make_client(root, lock_fds_per_inode=64, lock_fds=100)
    try:
        hello = client.lookup(1, b"hello.txt").nodeid
        empty = client.lookup(1, b"empty").nodeid
        fh = client.open(hello, os.O_RDWR)
        fh_empty = client.open(empty, os.O_RDWR)
        baseline = open_fds()
        # asking, refused attempts and unlocks of owners that hold nothing: no fd
        assert client.call(SETLK, hello, lk_body(fh, 1, 0, OFFSET_MAX, F_WRLCK)).ok
        for owner in range(2, 1002):
            assert getlk(client, hello, fh, owner)[2] == F_WRLCK
            assert client.call(SETLK, hello, lk_body(fh, owner, 0, 0, F_RDLCK)).error == (
                -errno.EAGAIN
            )
            assert client.call(SETLK, hello, lk_body(fh, owner, 0, 0, F_UNLCK)).ok
        assert open_fds() == baseline + 1, "only owner 1's fd"
        assert client.call(SETLK, hello, lk_body(fh, 1, 0, OFFSET_MAX, F_UNLCK)).ok
        assert open_fds() == baseline, "an owner without locks keeps no fd"
        # 1,000 owners each holding a lock: the per-inode cap, then ENOLCK
        errors = [
            client.call(SETLK, hello, lk_body(fh, owner, owner, owner, F_RDLCK)).error
            for owner in range(1, 1001)
        ]
        assert errors == [0] * 64 + [-errno.ENOLCK] * 936
        assert open_fds() == baseline + 64
        # the total cap, across inodes
        errors = [
            client.call(SETLK, empty, lk_body(fh_empty, owner, 0, 0, F_RDLCK)).error
            for owner in range(1, 101)
        ]
        assert errors == [0] * 36 + [-errno.ENOLCK] * 64
        assert open_fds() == baseline + 100
        # an owner that holds locks still locks more (no new fd); releases free room
        assert client.call(SETLK, hello, lk_body(fh, 1, 5000, 5000, F_WRLCK)).ok
        assert client.call(FLUSH, hello, flush_body(fh, lock_owner=1)).ok
        assert client.call(SETLK, empty, lk_body(fh_empty, 1000, 0, 0, F_RDLCK)).ok
        assert open_fds() == baseline + 100
        for owner in range(1, 1001):
            client.call(SETLK, hello, lk_body(fh, owner, 0, OFFSET_MAX, F_UNLCK))
            client.call(SETLK, empty, lk_body(fh_empty, owner, 0, OFFSET_MAX, F_UNLCK))
        assert open_fds() == baseline
    finally:
        client.session.close()


def test_unlock_succeeds_when_fdinfo_cannot_be_read(client: FuseClient) -> None:
    f = client.lookup(1, b"hello.txt")
    fh = client.open(f.nodeid, os.O_RDWR)
    locks = locks_of(client)
    assert client.call(SETLK, f.nodeid, lk_body(fh, 1, 0, 9, F_WRLCK)).ok

    def no_fdinfo(fd: int) -> bytes:
        raise OSError(errno.EMFILE, "no fd left")

    locks._fdinfo = no_fdinfo  # e.g. the fd limit is reached
    assert client.call(SETLK, f.nodeid, lk_body(fh, 1, 0, 9, F_UNLCK)).ok
    assert locks.owner_fds == 1, "kept while it cannot be checked"
    assert client.call(SETLK, f.nodeid, lk_body(fh, 2, 0, 0, F_WRLCK)).ok, "really unlocked"
    locks._fdinfo = client.session.fs._fdinfo  # readable again
    assert client.call(SETLK, f.nodeid, lk_body(fh, 1, 0, 0, F_UNLCK)).ok
    assert locks.owner_fds == 1, "owner 1's fd went; owner 2 holds its lock"


def test_forget_closes_the_lock_fds(client: FuseClient) -> None:
    baseline = open_fds()
    f = client.lookup(1, b"hello.txt")
    fh = client.open(f.nodeid, os.O_RDWR)
    for owner in (1, 2, 3):
        assert client.call(SETLK, f.nodeid, lk_body(fh, owner, owner, owner, F_WRLCK)).ok
    assert client.call(RELEASE, f.nodeid, release_flags_body(fh, 0)).ok
    client.forget(f.nodeid, 1)
    assert open_fds() == baseline
    assert locks_of(client).owner_fds == 0


# --- DESTROY racing lock requests ----------------------------------------------------------


def test_destroy_racing_lock_requests_leaks_no_fd(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock request that is between its checks and its open when DESTROY runs.

    The racing thread's reopen is held at a gate while DESTROY runs, then let
    go: whatever it opened must be closed, not kept for a session that is gone.
    """
    racer: list[int] = []
    reached = threading.Event()
    gate = threading.Event()
    original = PassthroughFs._reopen

    def gated(self: PassthroughFs, fd: int, flags: int) -> int:
        if threading.get_ident() in racer:
            reached.set()
            assert gate.wait(JOIN)
        return original(self, fd, flags)

    monkeypatch.setattr(PassthroughFs, "_reopen", gated)
    client = make_client(root)
    try:
        baseline = open_fds()
        cases = [
            (GETLK, 1, F_WRLCK),  # the root, named with a file's handle
            (SETLK, 1, F_RDLCK),
            (GETLK, 0, F_WRLCK),  # 0: the file itself
            (SETLK, 0, F_RDLCK),
            (SETLKW, 0, F_WRLCK),
        ]
        for n, (opcode, node, ltype) in enumerate(cases):
            f = client.lookup(1, b"hello.txt")
            fh = client.open(f.nodeid, os.O_RDONLY)
            reached.clear()
            gate.clear()
            body = lk_body(fh, 50 + n, 0, 0, ltype)
            mark = lambda: racer.append(threading.get_ident())  # noqa: E731
            t = Caller(client, opcode, node or f.nodeid, body, 5, before=mark)
            t.start()
            # until it is held at the gate, or done without opening anything
            for _ in range(int(JOIN * 1000)):
                if reached.wait(0.001) or not t.is_alive():
                    break
            assert client.call(DESTROY, 0).ok
            gate.set()
            t.result()
            racer.clear()
            assert open_fds() == baseline, (opcode, node)
            client.init()
    finally:
        client.session.close()


def test_destroy_under_concurrent_lock_traffic_leaks_no_fd(root: Path) -> None:
    client = make_client(root)
    try:
        baseline = open_fds()
        for _round in range(5):
            f = client.lookup(1, b"hello.txt")
            fh = client.open(f.nodeid, os.O_RDWR)
            go = threading.Barrier(5)

            def traffic(
                worker: int, nodeid: int = f.nodeid, fh: int = fh, go: threading.Barrier = go
            ) -> None:
                c = FuseClient(client.session)
                go.wait(JOIN)
                for i in range(200):
                    owner = worker * 1000 + i
                    c.call(GETLK, nodeid, lk_body(fh, owner, 0, 0, F_WRLCK))
                    c.call(SETLK, nodeid, lk_body(fh, owner, i, i, F_RDLCK))
                    if i % 2:
                        c.call(SETLK, nodeid, lk_body(fh, owner, i, i, F_UNLCK))

            threads = [threading.Thread(target=traffic, args=(w,)) for w in range(4)]
            for t in threads:
                t.start()
            go.wait(JOIN)
            assert client.call(DESTROY, 0).ok
            for t in threads:
                t.join(JOIN)
                assert not t.is_alive()
            assert open_fds() == baseline
            assert locks_of(client).owner_fds == 0
            client.init()
    finally:
        client.session.close()


# --- inside a sandbox: no /proc path -----------------------------------------------------

NO_PROC = r"""
import ctypes, os, struct, sys
from pyvirtiofsd.daemon import procfs
from pyvirtiofsd.daemon.fuse.session import FuseSession
from pyvirtiofsd.daemon.passthrough import PassthroughFs
from tests.support.fakechain import SETLK, FuseClient, lk_body

procfs.set_proc_self_fd(os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
libc = ctypes.CDLL(None, use_errno=True)
if libc.mount(b"none", b"/proc", b"tmpfs", 0, None) != 0:  # as the sandbox: no /proc path
    sys.exit(f"mount: {os.strerror(ctypes.get_errno())}")
assert not os.path.exists("/proc/self")
fs = PassthroughFs(sys.argv[1], posix_locks=True)
c = FuseClient(FuseSession(fs))
c.init()
f = c.lookup(1, b"hello.txt")
fh = c.open(f.nodeid, os.O_RDWR)
assert c.call(SETLK, f.nodeid, lk_body(fh, 1, 0, 9, 1)).ok
assert c.call(SETLK, f.nodeid, lk_body(fh, 1, 0, 4, 2)).ok, "a partial unlock"
assert fs.locks.owner_fds == 1, "still holds 5-9"
reply = c.call(SETLK, f.nodeid, lk_body(fh, 1, 0, 9, 2))
assert reply.ok, reply.error
assert fs.locks.owner_fds == 0, "the owner's fd went with its last lock"
print("ok")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a mount namespace (root)")
def test_owner_fds_are_released_without_a_proc_path(root: Path) -> None:
    """Inside the sandbox only the proc fd reaches /proc: fdinfo is read through it."""
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", NO_PROC, root],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
