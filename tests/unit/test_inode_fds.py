"""The inode fd budget: ``--inode-file-handles prefer|mandatory`` and the LRU.

Inodes the guest knows are kept by file handle; only the most recently used
``inode_fds`` hold an O_PATH fd, the rest are reopened by handle
(``open_by_handle_at``) when a request needs them.  Evicting a published
inode retires it from the C fast path's mirror first and hands back the
lookups the fast path answered in place, so no count is lost.  Checked on
the filesystem alone and through the whole device (fake front-end, queue
runners answering GETATTR/LOOKUP in C).
"""

from __future__ import annotations

import errno
import gc
import os
import resource
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.daemon.fuse.filesystem import RequestContext
from pyvirtiofsd.daemon.passthrough import PassthroughFs
from pyvirtiofsd.dma import FastPath
from tests.support.fakechain import (
    fill_fds,
    init_body,
    name_body,
    open_fds,
    parse_attr,
    parse_entry,
    request,
)
from tests.unit.test_device_frontend import GETATTR, INIT, LOOKUP, Rig, running_device

FORGET = 2
ROOT = RequestContext(uid=0, gid=0, pid=1)


async def forget(rig: Rig, nodeid: int, n: int) -> None:
    """FORGET has no reply, but its chain comes back used."""
    rig.unique += 1
    head = rig.q.add_chain([request(FORGET, nodeid, struct.pack("<Q", n), unique=rig.unique)], [])
    assert await rig.submit() == [(head, 0)]


def make_tree(root: Path, dirs: int = 6, per_dir: int = 40) -> dict[tuple[str, str], int]:
    """``dirs`` directories of ``per_dir`` files; (dir, name) -> host inode number."""
    inos = {}
    for d in range(dirs):
        sub = root / f"d{d}"
        sub.mkdir()
        for i in range(per_dir):
            p = sub / f"f{i}"
            p.write_bytes(b"%d/%d" % (d, i))
            inos[(sub.name, p.name)] = p.stat().st_ino
    return inos


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    return root


@pytest.fixture
def small(share: Path) -> Iterator[PassthroughFs]:
    fs = PassthroughFs(share, inode_file_handles="prefer", inode_fds=8)
    assert fs.inode_file_handles == "prefer"  # root: CAP_DAC_READ_SEARCH
    yield fs
    fs.close()


def lookup_all(fs: PassthroughFs, share: Path) -> dict[tuple[str, str], int]:
    nodes = {}
    for sub in sorted(share.iterdir()):
        dnode = fs.lookup(1, sub.name.encode()).nodeid
        for f in sorted(sub.iterdir()):
            nodes[(sub.name, f.name)] = fs.lookup(dnode, f.name.encode()).nodeid
    return nodes


def test_prefer_keeps_inode_fds_under_the_budget(share: Path, small: PassthroughFs) -> None:
    inos = make_tree(share)
    baseline = open_fds()
    nodes = lookup_all(small, share)
    assert len(small.inodes) == 1 + 6 + 240  # every inode known ...
    assert small.inodes.fds() <= 8 + 1  # ... but only the budget (and the root) hold fds
    assert open_fds() - baseline <= 8
    # every evicted inode is reopened by its handle, and it is the same inode
    for key, nodeid in nodes.items():
        assert small.getattr(nodeid).attr.ino == inos[key]
    assert small.inodes.fds() <= 9 and open_fds() - baseline <= 8
    assert small.inodes.evictions >= 240 and small.inodes.reopens >= 230
    # and the counts stay exact: every lookup forgotten frees every inode
    for nodeid in nodes.values():
        small.forget(nodeid, 1)
    assert len(small.inodes) == 1 + 6
    assert open_fds() <= baseline + 6


def test_never_holds_one_fd_per_inode(share: Path) -> None:
    make_tree(share, dirs=2, per_dir=30)
    fs = PassthroughFs(share, inode_fds=8)  # never: the budget does not apply
    try:
        baseline = open_fds()
        lookup_all(fs, share)
        assert fs.inodes.fds() == 1 + 2 + 60
        assert open_fds() - baseline == 62
        assert fs.inodes.evictions == 0
    finally:
        fs.close()


def test_an_evicted_inode_follows_renames_and_never_names_a_newer_file(
    share: Path, small: PassthroughFs
) -> None:
    make_tree(share, dirs=1, per_dir=30)
    a = small.lookup(1, b"d0").nodeid
    victim = small.lookup(a, b"f0").nodeid
    gone = small.lookup(a, b"f1").nodeid
    for i in range(2, 30):  # push both out of the cache
        small.lookup(a, b"f%d" % i)
    assert small.inodes.evictions > 2
    (share / "d0" / "f0").rename(share / "renamed")
    assert small.getattr(victim).attr.ino == (share / "renamed").stat().st_ino
    # a deleted inode is not resurrected by its number: the handle's
    # generation refuses the reopen, even when a new file takes the name
    (share / "d0" / "f1").unlink()
    (share / "d0" / "f1").write_bytes(b"new")
    for i in range(2, 30):
        small.lookup(a, b"f%d" % i)
    with pytest.raises(OSError) as info:
        small.getattr(gone)
    assert info.value.errno == errno.ESTALE
    assert small.lookup(a, b"f1").nodeid != gone


def test_lru_keeps_the_hot_inode(share: Path, small: PassthroughFs) -> None:
    make_tree(share, dirs=1, per_dir=40)
    d = small.lookup(1, b"d0").nodeid
    hot = small.lookup(d, b"f0").nodeid
    for i in range(1, 40):
        small.lookup(d, b"f%d" % i)
        small.getattr(hot)  # used after every other lookup: never the oldest
    reopens = small.inodes.reopens
    small.getattr(hot)
    assert small.inodes.reopens == reopens  # still had its fd


@pytest.fixture
def low_nofile() -> Iterator[None]:
    """A soft RLIMIT_NOFILE just above what the process holds now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = max(int(n) for n in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 40, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_out_of_fds_sheds_the_cache_and_the_lookup_succeeds(
    share: Path, small: PassthroughFs, low_nofile: None
) -> None:
    make_tree(share, dirs=1, per_dir=20)
    d = small.lookup(1, b"d0").nodeid
    for i in range(10):
        small.lookup(d, b"f%d" % i)
    held = fill_fds()
    try:
        # the process has no fd left: the lookup sheds cached inode fds and retries
        entry = small.lookup(d, b"f15")
        assert entry.attr.ino == (share / "d0" / "f15").stat().st_ino
        # OPEN reopens through /proc/self/fd: the same retry
        for _ in range(3):
            small.release(small.open(entry.nodeid, os.O_RDONLY, ROOT).fh)
    finally:
        for fd in held:
            os.close(fd)


def test_out_of_fds_without_handles_is_an_errno(share: Path, low_nofile: None) -> None:
    (share / "x").write_bytes(b"x")
    fs = PassthroughFs(share)
    held = fill_fds()
    try:
        with pytest.raises(OSError) as info:
            fs.lookup(1, b"x")
        assert info.value.errno == errno.EMFILE
    finally:
        for fd in held:
            os.close(fd)
        fs.close()
    fs = PassthroughFs(share)  # and once fds are back, it works
    assert fs.lookup(1, b"x").nodeid > 1
    fs.close()


def test_concurrent_borrows_evictions_and_forgets_with_the_mirror(share: Path) -> None:
    """Threads looking up, stating and forgetting inodes under a tiny budget,
    with the fast path's mirror attached: every answer names the right inode,
    counts stay exact and no fd leaks."""
    inos = make_tree(share, dirs=4, per_dir=25)
    gc.collect()  # earlier tests' unreachable objects may still hold fds
    baseline = open_fds()
    fs = PassthroughFs(share, inode_file_handles="prefer", inode_fds=4)
    fp = FastPath()
    fs.attach_fast_path(fp)
    dnodes = {f"d{d}": fs.lookup(1, b"d%d" % d).nodeid for d in range(4)}
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for r in range(150):
                d = f"d{(k + r) % 4}"
                name = f"f{(k * 7 + r) % 25}"
                entry = fs.lookup(dnodes[d], name.encode())
                assert entry.attr.ino == inos[(d, name)]
                assert fs.getattr(entry.nodeid).attr.ino == inos[(d, name)]
                fs.forget(entry.nodeid, 1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]
    assert len(fs.inodes) == 1 + 4  # every file forgotten: only the root and the dirs
    assert fs.inodes.fds() <= 5 and fp.stats().inodes <= 5
    assert fs.inodes.evictions > 0
    fs.close()
    del fp
    gc.collect()
    assert open_fds() == baseline


def test_mandatory_refuses_to_start_without_dac_read_search(share: Path) -> None:
    """Without CAP_DAC_READ_SEARCH open_by_handle_at is EPERM: mandatory is a
    clear start-up error, prefer falls back to fds (in a child: capabilities
    are dropped for good)."""
    code = (
        "import sys\n"
        "from pyvirtiofsd.daemon import capabilities as c\n"
        "from pyvirtiofsd.daemon.passthrough import PassthroughFs\n"
        "c.restrict(c.DEFAULT_CAPS - {'dac_read_search'})\n"
        "fs = PassthroughFs(sys.argv[1], inode_file_handles='prefer')\n"
        "print(fs.inode_file_handles)\n"
        "try:\n"
        "    PassthroughFs(sys.argv[1], inode_file_handles='mandatory')\n"
        "except OSError as e:\n"
        "    print('refused', e.errno, e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(share)], capture_output=True,
                         text=True, timeout=60, check=True)  # fmt: skip
    lines = out.stdout.splitlines()
    assert lines[0] == "never"
    assert lines[1].startswith(f"refused {errno.EPERM} ") and "mandatory" in lines[1]


def test_cli_mandatory_without_the_capability_is_refused(tmp_path: Path, share: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pyvirtiofsd.daemon", "--socket-path", str(tmp_path / "s.sock"),
         "--shared-dir", str(share), "--sandbox", "none", "--seccomp", "none",
         "--modcaps=-dac_read_search", "--inode-file-handles", "mandatory"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert "--inode-file-handles mandatory: cannot open by handle" in out.stderr


# --- through the device: C fast path + Python workers ------------------------


async def test_eviction_keeps_the_lookups_answered_in_place(tmp_path: Path) -> None:
    """A LOOKUP the fast path answers is a credit in the mirror; evicting the
    inode must hand it back to Python, or a later FORGET frees an inode the
    guest still holds."""
    async with running_device(tmp_path, inode_file_handles="prefer") as rig:
        for i in range(20):
            (rig.share / f"f{i}").write_bytes(b"%d" % i)
        fs = rig.devices[0].session.fs
        fs.inodes.max_fds = 4  # type: ignore[attr-defined]
        fast = rig.devices[0].fast
        assert fast is not None
        assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
        err, payload = await rig.fuse(LOOKUP, 1, name_body(b"f0"))  # new: Python
        assert err == 0
        node = parse_entry(payload).nodeid
        before = fast.stats().lookup
        err, payload = await rig.fuse(LOOKUP, 1, name_body(b"f0"))  # known: in C
        assert err == 0 and parse_entry(payload).nodeid == node
        assert fast.stats().lookup == before + 1
        for i in range(1, 20):  # f0 is evicted from the cache and the mirror
            assert (await rig.fuse(LOOKUP, 1, name_body(b"f%d" % i)))[0] == 0
        assert fs.inodes.fds() <= 5  # type: ignore[attr-defined]
        assert fast.stats().inodes <= 5
        # two lookups: after one FORGET the inode is still there (the C
        # GETATTR misses, Python reopens it by handle and publishes it again)
        ino = (rig.share / "f0").stat().st_ino
        await forget(rig, node, 1)
        err, payload = await rig.fuse(GETATTR, node, bytes(16))
        assert err == 0 and parse_attr(payload, 16)[0] == ino
        before = fast.stats().getattr
        err, payload = await rig.fuse(GETATTR, node, bytes(16))
        assert err == 0 and fast.stats().getattr == before + 1  # republished: in C again
        await forget(rig, node, 1)
        err, _ = await rig.fuse(GETATTR, node, bytes(16))
        assert err == -errno.EBADF


async def test_many_in_flight_requests_under_a_tiny_budget(tmp_path: Path) -> None:
    """GETATTR and LOOKUP of 60 inodes, all in flight at once through C runners
    and Python workers while Python evicts and reopens: every reply is right."""
    async with running_device(tmp_path, inode_file_handles="prefer") as rig:
        inos = {}
        for i in range(30):
            p = rig.share / f"g{i}"
            p.write_bytes(b"x" * i)
            inos[i] = p.stat().st_ino
        fs = rig.devices[0].session.fs
        fs.inodes.max_fds = 3  # type: ignore[attr-defined]
        assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
        nodes = {}
        for i in range(30):
            err, payload = await rig.fuse(LOOKUP, 1, name_body(b"g%d" % i))
            assert err == 0
            nodes[i] = parse_entry(payload).nodeid
        for _ in range(3):
            expect = {}
            for i in range(30):
                rig.unique += 1
                req = request(GETATTR, nodes[i], bytes(16), unique=rig.unique)
                expect[rig.q.add_chain([req], [4096], indirect=True, publish=False)] = ("attr", i)
                rig.unique += 1
                req = request(LOOKUP, 1, name_body(b"g%d" % i), unique=rig.unique)
                expect[rig.q.add_chain([req], [4096], indirect=True, publish=False)] = ("entry", i)
            for head in expect:
                rig.q.publish(head)
            os.eventfd_write(rig.kick, 1)
            used = dict(await rig.wait_used(len(expect)))
            assert set(used) == set(expect)
            for head, (kind, i) in expect.items():
                rec = rig.q.chains[head]
                data = b"".join(rig.ram.read(g, n) for g, n in rec.writable)[: used[head]]
                _len, error, _u = struct.unpack_from("<IiQ", data)
                assert error == 0, (kind, i, error)
                if kind == "attr":
                    assert parse_attr(data, 32)[0] == inos[i]
                else:
                    entry = parse_entry(data, 16)
                    assert (entry.nodeid, entry.ino) == (nodes[i], inos[i])
        assert fs.inodes.fds() <= 4  # type: ignore[attr-defined]
        assert fs.inodes.evictions > 30  # type: ignore[attr-defined]
