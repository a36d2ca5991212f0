"""The request engine: C fast path, Python workers, out-of-order completion.

Through the whole device (fake front-end -> vhost-user -> queue runner), as
in test_device_frontend.py: what the fast path answers must be byte for
byte what the Python session answers, requests complete in whatever order
they finish, and a restarted ring never replays what it already served.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import stat
import struct
import threading
from pathlib import Path

import pytest
import trio

from pyvirtiofsd.daemon.config import DEFAULT_POLL_MAX_NS
from pyvirtiofsd.daemon.device import FsDevice
from pyvirtiofsd.dma import FastPath
from tests.support.fakechain import (
    init_body,
    name_body,
    open_fds,
    parse_attr,
    parse_dirents,
    parse_entry,
    read_body,
    release_body,
    request,
    write_body,
)
from tests.unit.test_device_frontend import GETATTR, INIT, LOOKUP, OPEN, READ, Rig, running_device

WRITE, OPENDIR, RELEASE, FSYNC = 16, 27, 18, 20
READDIR, RELEASEDIR, READDIRPLUS, BATCH_FORGET = 28, 29, 44, 42


async def setup_file(rig: Rig, flags: int = os.O_RDWR) -> tuple[int, int]:
    assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
    err, payload = await rig.fuse(LOOKUP, 1, name_body(b"file.bin"))
    assert err == 0
    nodeid = parse_entry(payload).nodeid
    err, payload = await rig.fuse(OPEN, nodeid, struct.pack("<II", flags, 0))
    assert err == 0
    return nodeid, struct.unpack_from("<Q", payload)[0]


def fast(rig: Rig) -> FastPath:
    dev = rig.devices[0]
    assert dev.fast is not None
    return dev.fast


async def both_ways(rig: Rig, opcode: int, nodeid: int, body: bytes,
                    writable: list[int] | None = None) -> tuple[int, bytes]:  # fmt: skip
    """The same request answered by the fast path, then by Python: identical replies.

    Returns the error and a bytes object as long as the number of requests
    the fast path answered (0 or 1).
    """
    fp = fast(rig)
    before = fp.stats()
    in_c = await rig.fuse(opcode, nodeid, body, writable)
    after = fp.stats()
    fp.ready = False  # the session's switch: everything goes to Python
    try:
        in_python = await rig.fuse(opcode, nodeid, body, writable)
    finally:
        fp.ready = True
    served = slice(2, 9)  # getattr .. readdir: the requests answered in place
    assert fp.stats()[served] == after[served]  # Python's answer did not come from C
    assert in_c == in_python
    in_place = sum(after[served]) - sum(before[served])
    return in_c[0], bytes(in_place)


async def test_fast_path_answers_exactly_as_python(tmp_path: Path) -> None:
    async with running_device(tmp_path) as rig:
        nodeid, fh = await setup_file(rig)
        data = bytes(range(256)) * 40
        # GETATTR of an inode and of a handle (GETATTR_FH), in place
        err, n = await both_ways(rig, GETATTR, 1, bytes(16))
        assert err == 0 and len(n) == 1
        err, n = await both_ways(rig, GETATTR, nodeid, struct.pack("<IIQ", 1, 0, fh))
        assert err == 0 and len(n) == 1
        # READ: inside, across EOF, past EOF, zero bytes, split reply buffers
        for off, size, writable in [(0, 4096, None), (10000, 4096, None), (20000, 100, None),
                                    (5, 0, None), (100, 9000, [16, 1000, 4096, 4096]),
                                    (0, 4096, [16, 100])]:  # fmt: skip
            err, n = await both_ways(rig, READ, nodeid, read_body(fh, off, size), writable)
            assert err == 0 and len(n) == 1, (off, size)
        assert (await rig.fuse(READ, nodeid, read_body(fh, 1, 9)))[1] == data[1:10]
        # WRITE, answered in place and landing in the file
        err, n = await both_ways(rig, WRITE, nodeid, write_body(fh, 3, b"hello"))
        assert err == 0 and len(n) == 1
        assert (rig.share / "file.bin").read_bytes()[:10] == data[:3] + b"hello" + data[8:10]
        # what the fast path hands to Python, Python answers (and both agree)
        cases = [
            (GETATTR, 999, bytes(16)),  # unknown node: EBADF
            (GETATTR, 1, struct.pack("<IIQ", 1, 0, 999)),  # unknown handle
            (READ, nodeid, read_body(999, 0, 10)),
            (READ, nodeid, read_body(fh, 1 << 63, 10)),  # offset > OFFSET_MAX
            (WRITE, nodeid, write_body(999, 0, b"x")),
            (GETATTR, 1, bytes(8)),  # body too short: malformed
        ]
        for opcode, node, body in cases:
            err, n = await both_ways(rig, opcode, node, body)
            assert err < 0 and len(n) == 0, (opcode, body)
        # a directory handle is not read in place (EBADF from Python)
        err, payload = await rig.fuse(OPENDIR, 1, struct.pack("<II", os.O_RDONLY, 0))
        assert err == 0
        dfh = struct.unpack_from("<Q", payload)[0]
        err, n = await both_ways(rig, READ, 1, read_body(dfh, 0, 10))
        assert err == -errno.EBADF and len(n) == 0
        err, n = await both_ways(rig, GETATTR, 1, struct.pack("<IIQ", 1, 0, dfh))
        assert err == 0 and len(n) == 1


async def test_fast_path_reply_matches_host_stat(tmp_path: Path) -> None:
    async with running_device(tmp_path) as rig:
        nodeid, _fh = await setup_file(rig)
        before = fast(rig).stats().getattr
        err, payload = await rig.fuse(GETATTR, nodeid, bytes(16))
        assert err == 0 and fast(rig).stats().getattr == before + 1
        attr_valid, attr_nsec = struct.unpack_from("<QI", payload)
        assert (attr_valid, attr_nsec) == (1, 0)  # cache=auto: 1 s
        attr = parse_attr(payload, 16)
        st = os.stat(rig.share / "file.bin")
        assert attr[0] == st.st_ino and attr[1] == st.st_size
        assert attr[9] == st.st_mode and stat.S_ISREG(attr[9])


async def test_kill_suidgid_write_in_place_clears_setuid(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("credential switching needs root")
    async with running_device(tmp_path) as rig:
        path = rig.share / "file.bin"
        os.chown(path, 1000, 1000)
        os.chmod(path, 0o6755)
        nodeid, fh = await setup_file(rig)
        before = fast(rig).stats().write
        rig.unique += 1
        body = write_body(fh, 0, b"abc", write_flags=4)  # FUSE_WRITE_KILL_SUIDGID
        head = rig.q.add_chain([request(WRITE, nodeid, body, unique=rig.unique, uid=1000,
                                        gid=1000)], [4096])  # fmt: skip
        ((h, used),) = await rig.submit()
        assert h == head and used == 24
        assert fast(rig).stats().write == before + 1  # served in C, as the caller
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o755  # setuid and setgid gone
        assert path.read_bytes()[:3] == b"abc"


async def test_blocking_request_does_not_hold_up_the_queue(tmp_path: Path) -> None:
    """FSYNC blocks on a Python worker while GETATTRs behind it complete first.

    The FSYNC is held until the test releases it; the later requests on the
    same queue must finish meanwhile, and the FSYNC completes after them.
    """
    async with running_device(tmp_path) as rig:
        nodeid, fh = await setup_file(rig)
        dev: FsDevice = rig.devices[0]
        hold = threading.Event()
        released = threading.Event()
        real_fsync = dev.session.fs.fsync

        def slow_fsync(fh_: int, datasync: bool, *, isdir: bool = False) -> None:
            hold.wait(10)
            released.set()
            real_fsync(fh_, datasync, isdir=isdir)

        dev.session.fs.fsync = slow_fsync  # type: ignore[method-assign]
        rig.unique += 1
        fsync_head = rig.q.add_chain(
            [request(FSYNC, nodeid, struct.pack("<QII", fh, 0, 0), unique=rig.unique)], [16]
        )
        os.eventfd_write(rig.kick, 1)
        # GETATTRs submitted after the FSYNC complete while it still blocks
        for _ in range(3):
            err, _ = await rig.fuse(GETATTR, 1, bytes(16))
            assert err == 0
        assert not released.is_set()
        hold.set()
        assert await rig.wait_used() == [(fsync_head, 16)]


async def test_restart_without_get_vring_base_does_not_replay(tmp_path: Path) -> None:
    async with running_device(tmp_path) as rig:
        _nodeid, _fh = await setup_file(rig)
        served = rig.devices[0]._rings[1].vq.stats().requests
        # SET_VRING_ENABLE 0 then 1: the ring resumes where it stopped
        assert await rig.fe.set_vring_enable(1, False, need_reply=True) == 0
        assert await rig.fe.set_vring_enable(1, True, need_reply=True) == 0
        # and a second SET_VRING_KICK does the same
        await rig.fe.set_vring_kick(1, os.dup(rig.kick))
        err, _ = await rig.fuse(GETATTR, 1, bytes(16))
        assert err == 0
        vq = rig.devices[0]._rings[1].vq
        assert vq.stats().requests == served + 1  # nothing served twice
        assert vq.last_avail_idx == rig.q.avail_idx


async def test_runner_failure_is_signalled_on_the_err_eventfd(tmp_path: Path) -> None:
    async with running_device(tmp_path, thread_pool_size=0) as rig:
        assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
        err_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            assert await rig.fe.set_vring_err(1, os.dup(err_fd), need_reply=True) == 0
            dev = rig.devices[0]

            def broken(chain: object) -> None:
                raise RuntimeError("injected bug")

            dev._serve = broken  # type: ignore[method-assign,assignment]
            rig.unique += 1
            rig.q.add_chain([request(LOOKUP, 1, name_body(b"file.bin"), unique=rig.unique)],
                            [4096])  # fmt: skip
            os.eventfd_write(rig.kick, 1)
            with trio.fail_after(10):
                await trio.lowlevel.wait_readable(err_fd)
            assert os.eventfd_read(err_fd) == 1
        finally:
            os.close(err_fd)


async def test_stats_file_counts_requests_per_queue(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    async with running_device(tmp_path, stats_file=stats) as rig:
        nodeid, fh = await setup_file(rig)
        for _ in range(5):
            assert (await rig.fuse(READ, nodeid, read_body(fh, 0, 100)))[0] == 0
        rig.devices[0]._write_stats()
        data = json.loads(stats.read_text())
        q1 = data["queues"]["1"]
        assert q1["requests"] == 8 and q1["fast"] == 5 and q1["slow"] == 3
        assert data["queues"]["2"]["requests"] == 0
        assert data["fast_path"]["read"] == 5
        assert data["busy_max"] >= 1
        # request queues poll (--poll-max-ns, on by default), the hiprio one never
        assert data["queues"]["0"]["poll"] == {"hits": 0, "misses": 0, "window_ns": 0}
        assert set(q1["poll"]) == {"hits", "misses", "window_ns"}
        assert 0 <= q1["poll"]["window_ns"] <= DEFAULT_POLL_MAX_NS


async def test_destroy_leaks_no_fd_through_the_mirror(tmp_path: Path) -> None:
    async with running_device(tmp_path) as rig:
        assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
        gc.collect()  # earlier tests' garbage must not close fds while we count
        base = open_fds()
        for i in range(20):
            (rig.share / f"f{i}").write_bytes(b"x")
        handles = []
        for i in range(20):
            err, payload = await rig.fuse(LOOKUP, 1, name_body(f"f{i}".encode()))
            nodeid = parse_entry(payload).nodeid
            err, payload = await rig.fuse(OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0))
            handles.append((nodeid, struct.unpack_from("<Q", payload)[0]))
        assert open_fds() == base + 40
        assert fast(rig).stats()[:2] == (21, 20)
        for _nodeid, fh in handles[:10]:
            assert (await rig.fuse(RELEASE, 1, release_body(fh)))[0] == 0
        assert open_fds() == base + 30 and fast(rig).stats().handles == 10
        assert (await rig.fuse(38, 1, b""))[0] == 0  # DESTROY
        assert open_fds() == base
        assert fast(rig).stats()[:2] == (1, 0) and not fast(rig).ready
        # after DESTROY nothing is served in place until the next INIT
        before = fast(rig).stats().getattr
        err, _ = await rig.fuse(GETATTR, 1, bytes(16))
        assert err == -errno.EIO and fast(rig).stats().getattr == before


def test_mirror_closes_a_retired_fd_and_refuses_duplicates(tmp_path: Path) -> None:
    fp = FastPath()
    fd = os.open(tmp_path, os.O_PATH)
    st = os.fstat(fd)
    fp.publish_inode(5, fd, st.st_dev, st.st_ino)
    with pytest.raises(ValueError):
        fp.publish_inode(5, fd, st.st_dev, st.st_ino)
    assert fp.stats().inodes == 1
    assert fp.retire_inode(5) is True
    with pytest.raises(OSError) as info:
        os.fstat(fd)
    assert info.value.errno == errno.EBADF
    assert fp.retire_inode(5) is False
    # freeing the mirror closes what is still published
    fd2 = os.open(tmp_path, os.O_PATH)
    fp.publish_handle(9, fd2, directory=True)
    del fp
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd2)


async def test_hostile_chains_fail_alone_with_many_in_flight(tmp_path: Path) -> None:
    """Good requests (in place and in Python) and hostile chains all in flight at once."""
    from tests.support.splitq import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

    async with running_device(tmp_path) as rig:
        nodeid, fh = await setup_file(rig)
        q = rig.q
        data = bytes(range(256)) * 40
        expect: dict[int, tuple[str, int]] = {}  # head -> (kind, offset)
        for i in range(30):
            rig.unique += 1
            kind = ("getattr", "read", "lookup")[i % 3]
            if kind == "getattr":
                req = request(GETATTR, nodeid, bytes(16), unique=rig.unique)
            elif kind == "read":
                req = request(READ, nodeid, read_body(fh, 7 * i, 64), unique=rig.unique)
            else:
                req = request(LOOKUP, 1, name_body(b"file.bin"), unique=rig.unique)
            head = q.add_chain([req], [4096], indirect=True, publish=False)
            expect[head] = (kind, 7 * i)
        good = q.alloc_data(request(GETATTR, 1, bytes(16)))
        out = q.alloc(4096)
        nxt, wr = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
        hostile = {
            58: [(58, good, 56, nxt, 59), (59, out, 4096, wr | nxt, 58)],  # loop
            60: [(60, 8 << 20, 64, 0, 0)],  # outside guest memory
            61: [(61, good, 56, nxt, 200)],  # next out of range
            62: [(62, out, 4096, wr | nxt, 63), (63, good, 56, 0, 0)],  # readable after writable
        }
        for descs in hostile.values():
            for i, a, n, f, nx in descs:
                q.write_desc(i, a, n, f, nx)
        # interleave them in the avail ring, then one kick for everything
        heads = list(expect)
        order = [*heads[:10], 58, *heads[10:20], 60, 61, *heads[20:], 62]
        for head in order:
            q.publish(head)
        os.eventfd_write(rig.kick, 1)
        used = dict(await rig.wait_used(len(order)))
        for head in hostile:
            assert used[head] == 0
        for head, (kind, off) in expect.items():
            reply = q.writable_data(head)[: used[head]]
            length, error, _unique = struct.unpack_from("<IiQ", reply)
            assert error == 0 and length == used[head], kind
            if kind == "read":
                assert reply[16:] == data[off : off + 64]
            elif kind == "lookup":
                assert parse_entry(reply[16:]).nodeid == nodeid
        stats = rig.devices[0]._rings[1].vq.stats()
        assert stats.defects == 4 and stats.fast >= 20
        assert (await rig.fuse(GETATTR, 1, bytes(16)))[0] == 0


async def test_lookup_hits_are_answered_in_place_and_counted(tmp_path: Path) -> None:
    FORGET = 2
    async with running_device(tmp_path) as rig:
        nodeid, _fh = await setup_file(rig)  # the first LOOKUP (a miss) was Python's
        dev = rig.devices[0]
        inodes = dev.session.fs.inodes
        assert inodes.nlookup(nodeid) == 1
        before = fast(rig).stats().lookup
        # a hit: in C, the same reply as Python's, and both count
        err, n = await both_ways(rig, LOOKUP, 1, name_body(b"file.bin"))
        assert err == 0 and len(n) == 1
        assert fast(rig).stats().lookup == before + 1
        assert inodes.nlookup(nodeid) == 3 and fast(rig).credits(nodeid) == 1
        # a name that does not exist: ENOENT from C, as from Python
        err, n = await both_ways(rig, LOOKUP, 1, name_body(b"nope"))
        assert err == -errno.ENOENT and len(n) == 1
        # names Python must judge: "..", a slash, an unknown parent
        for node, body in [(1, name_body(b"..")), (1, name_body(b"a/b")), (999, name_body(b"x"))]:
            err, n = await both_ways(rig, LOOKUP, node, body)
            assert err < 0 and len(n) == 0, body
        # three more hits in place, then the guest forgets all 6 lookups
        for _ in range(3):
            err, payload = await rig.fuse(LOOKUP, 1, name_body(b"file.bin"))
            assert err == 0 and parse_entry(payload).nodeid == nodeid
        assert inodes.nlookup(nodeid) == 6
        fds = open_fds()

        async def forget(n: int) -> None:  # no reply, but the chain comes back used
            rig.unique += 1
            head = rig.q.add_chain([request(FORGET, nodeid, struct.pack("<Q", n),
                                            unique=rig.unique)], [])  # fmt: skip
            assert await rig.submit() == [(head, 0)]

        await forget(5)
        err, _ = await rig.fuse(GETATTR, nodeid, bytes(16))
        assert err == 0 and inodes.nlookup(nodeid) == 1  # 6 - 5: still there
        await forget(1)
        err, _ = await rig.fuse(GETATTR, nodeid, bytes(16))
        assert err == -errno.EBADF  # forgotten: the fd went with it
        assert inodes.nlookup(nodeid) == 0 and open_fds() == fds - 1
        # the next lookup is a miss again: Python, a new node id
        before = fast(rig).stats().lookup
        err, payload = await rig.fuse(LOOKUP, 1, name_body(b"file.bin"))
        assert err == 0 and parse_entry(payload).nodeid > nodeid
        assert fast(rig).stats().lookup == before


async def test_readdirplus_of_known_inodes_is_answered_in_place(tmp_path: Path) -> None:
    """READDIRPLUS in C: byte for byte Python's page once every entry is a
    known inode, each entry counted as one lookup; a new entry ends the
    page there and Python serves the rest; the root's ".." stays hidden.
    READDIR in C: every page, byte for byte Python's."""
    async with running_device(tmp_path) as rig:
        d = rig.share / "d"
        d.mkdir()
        for i in range(60):
            (d / f"entry-{i:02d}").write_bytes(b"x" * i)
        (d / "sub").mkdir()
        os.symlink("entry-01", d / "link")
        assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
        err, payload = await rig.fuse(LOOKUP, 1, name_body(b"d"))
        assert err == 0
        dnode = parse_entry(payload).nodeid
        err, payload = await rig.fuse(OPENDIR, dnode, struct.pack("<II", os.O_RDONLY, 0))
        assert err == 0
        dfh = struct.unpack_from("<Q", payload)[0]
        fp, inodes = fast(rig), rig.devices[0].session.fs.inodes

        async def listing(size: int = 4096) -> tuple[list, int]:
            """Every page from offset 0; and how many the fast path answered."""
            before, out, offset = fp.stats().readdirplus, [], 0
            while True:
                err, payload = await rig.fuse(READDIRPLUS, dnode, read_body(dfh, offset, size),
                                              [16 + size])  # fmt: skip
                assert err == 0
                page = parse_dirents(payload, plus=True)
                if not page:
                    return out, fp.stats().readdirplus - before
                out += page
                offset = page[-1].off

        # a fresh listing: every entry new, all of it Python's (no page of dots
        # alone) but the empty page at the end
        first, in_c = await listing()
        assert in_c == 1 and len(first) == 64
        names = sorted(e.name for e in first)
        expected = [b".", b"..", b"sub", b"link"] + [b"entry-%02d" % i for i in range(60)]
        assert names == sorted(expected)
        # known now: each page in place, exactly as Python answers it
        offset, pages = 0, 0
        while True:
            err, n = await both_ways(rig, READDIRPLUS, dnode, read_body(dfh, offset, 4096),
                                     [16 + 4096])  # fmt: skip
            assert err == 0
            err, payload = await rig.fuse(READDIRPLUS, dnode, read_body(dfh, offset, 4096),
                                          [16 + 4096])  # fmt: skip
            page = parse_dirents(payload, plus=True)
            assert len(n) == 1, offset  # answered in place, the empty page at the end too
            if not page:
                break
            pages += 1
            offset = page[-1].off
        assert pages >= 3  # 64 entries of ~160 bytes do not fit one 4 KiB page
        again, in_c = await listing()
        assert in_c == pages + 1 and [(e.name, e.off, e.ino) for e in again] == [
            (e.name, e.off, e.ino) for e in first
        ]
        for e in again:
            if e.name in (b".", b".."):
                assert e.entry is not None and e.entry.nodeid == 0
                continue
            assert e.entry is not None and e.type == (e.entry.mode >> 12)
            st = os.lstat(d / e.name.decode())
            assert (e.entry.ino, e.entry.size, e.entry.mode) == (st.st_ino, st.st_size, st.st_mode)
            # the first listing, both_ways (twice per page: C then Python,
            # plus the page read back) and the last one
            assert inodes.nlookup(e.entry.nodeid) == 5, e.name
        # a new entry ends the fast page there; Python lists it and the rest
        (d / "new-one").write_bytes(b"")
        third, in_c = await listing()
        assert sorted(e.name for e in third) == sorted([*names, b"new-one"])
        assert len(third) == 65 and 2 <= in_c <= pages + 2
        # FORGET every lookup: every inode goes, with its fd
        fds = open_fds()
        counts = {e.entry.nodeid: inodes.nlookup(e.entry.nodeid) for e in third
                  if e.entry is not None and e.entry.nodeid}  # fmt: skip
        assert len(counts) == 63
        rig.unique += 1
        items = b"".join(struct.pack("<QQ", node, n) for node, n in counts.items())
        head = rig.q.add_chain([request(BATCH_FORGET, 0, struct.pack("<II", len(counts), 0) + items,
                                        unique=rig.unique)], [])  # fmt: skip
        assert await rig.submit() == [(head, 0)]
        assert all(inodes.nlookup(node) == 0 for node in counts)
        assert open_fds() == fds - 63
        # READDIR (no lookups): every page in place, as Python's
        offset, pages = 0, 0
        while True:
            err, n = await both_ways(rig, READDIR, dnode, read_body(dfh, offset, 1024), [1040])
            assert err == 0
            err, payload = await rig.fuse(READDIR, dnode, read_body(dfh, offset, 1024), [1040])
            page = parse_dirents(payload)
            assert len(n) == 1, offset
            if not page:
                break
            pages, offset = pages + 1, page[-1].off
        assert pages >= 2
        # the root's "..": its ino is the root's own, never what lies above the share
        err, payload = await rig.fuse(OPENDIR, 1, struct.pack("<II", os.O_RDONLY, 0))
        rfh = struct.unpack_from("<Q", payload)[0]
        err, payload = await rig.fuse(LOOKUP, 1, name_body(b"file.bin"))
        assert err == 0
        err, payload = await rig.fuse(LOOKUP, 1, name_body(b"d"))
        assert err == 0
        err, n = await both_ways(rig, READDIRPLUS, 1, read_body(rfh, 0, 4096), [16 + 4096])
        assert err == 0 and len(n) == 1
        err, payload = await rig.fuse(READDIRPLUS, 1, read_body(rfh, 0, 4096), [16 + 4096])
        dots = {e.name: e.ino for e in parse_dirents(payload, plus=True)}
        assert dots[b".."] == dots[b"."] == os.stat(rig.share).st_ino
        err, n = await both_ways(rig, READDIR, 1, read_body(rfh, 0, 4096), [16 + 4096])
        assert err == 0 and len(n) == 1
        err, payload = await rig.fuse(READDIR, 1, read_body(rfh, 0, 4096), [16 + 4096])
        dots = {e.name: e.ino for e in parse_dirents(payload)}
        assert dots[b".."] == dots[b"."] == os.stat(rig.share).st_ino


async def test_unlink_and_rmdir_are_answered_in_place(tmp_path: Path) -> None:
    UNLINK, RMDIR = 10, 11
    async with running_device(tmp_path) as rig:
        for name in ("a", "b"):
            (rig.share / name).write_bytes(b"")
        (rig.share / "empty").mkdir()
        (rig.share / "full").mkdir()
        (rig.share / "full" / "x").write_bytes(b"")
        assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
        fp = fast(rig)

        async def in_place(opcode: int, nodeid: int, name: bytes) -> tuple[int, int]:
            before = fp.stats().unlink
            err, payload = await rig.fuse(opcode, nodeid, name_body(name), [16])
            assert payload == b""
            return err, fp.stats().unlink - before

        assert await in_place(UNLINK, 1, b"a") == (0, 1)
        assert not (rig.share / "a").exists()
        assert await in_place(RMDIR, 1, b"empty") == (0, 1)
        assert not (rig.share / "empty").exists()
        # host errors, answered in place as Python answers them
        errors = [(UNLINK, b"a", errno.ENOENT), (RMDIR, b"full", errno.ENOTEMPTY),
                  (UNLINK, b"full", errno.EISDIR), (RMDIR, b"b", errno.ENOTDIR)]  # fmt: skip
        for opcode, name, code in errors:
            err, n = await both_ways(rig, opcode, 1, name_body(name), [16])
            assert err == -code and len(n) == 1, name
        # what only Python judges: "..", a slash, an unknown parent, no NUL
        for node, body in [(1, name_body(b"..")), (1, name_body(b"b/x")), (999, name_body(b"b")),
                           (1, b"b")]:  # fmt: skip
            err, n = await both_ways(rig, UNLINK, node, body, [16])
            assert err < 0 and len(n) == 0, body
        assert (rig.share / "b").exists() and (rig.share / "full" / "x").exists()


async def test_device_reset_ends_a_lock_wait_at_once(tmp_path: Path) -> None:
    """A SETLKW blocked in a worker must not hold the reset for the drain timeout."""
    import time

    from pyvirtiofsd.daemon import device as device_mod

    SETLK, SETLKW = 32, 33
    lk = struct.Struct("<QQQQIIII")
    async with running_device(tmp_path, posix_locks=True) as rig:
        nodeid, fh = await setup_file(rig)
        body = lk.pack(fh, 1, 0, 100, 1, 0, 0, 0)  # owner 1: write lock on [0, 100]
        assert (await rig.fuse(SETLK, nodeid, body))[0] == 0
        rig.unique += 1
        waiter = rig.q.add_chain([request(SETLKW, nodeid, lk.pack(fh, 2, 0, 100, 1, 0, 0, 0),
                                          unique=rig.unique)], [16])  # fmt: skip
        os.eventfd_write(rig.kick, 1)
        assert (await rig.fuse(GETATTR, 1, bytes(16)))[0] == 0  # owner 2 is waiting meanwhile
        dev = rig.devices[0]
        start = time.monotonic()
        await trio.to_thread.run_sync(dev.reset)
        took = time.monotonic() - start
        assert took < device_mod.DRAIN_TIMEOUT / 2, took
        del waiter


STATFS = 17


async def test_metadata_runs_on_the_queue_thread_and_data_on_a_worker(tmp_path: Path) -> None:
    """With a pool, INLINE_OPCODES (here STATFS) are served by the queue's own
    runner thread, FSYNC by a pool worker; a held FSYNC does not hold up the
    metadata requests submitted after it on the same queue."""
    async with running_device(tmp_path) as rig:
        nodeid, fh = await setup_file(rig)
        dev: FsDevice = rig.devices[0]
        assert dev._pool_size > 0
        threads: dict[str, str] = {}
        hold = threading.Event()
        released = threading.Event()
        real_fsync, real_statfs = dev.session.fs.fsync, dev.session.fs.statfs

        def slow_fsync(fh_: int, datasync: bool, *, isdir: bool = False) -> None:
            threads["fsync"] = threading.current_thread().name
            hold.wait(10)
            released.set()
            real_fsync(fh_, datasync, isdir=isdir)

        def statfs(nodeid_: int) -> object:
            threads["statfs"] = threading.current_thread().name
            return real_statfs(nodeid_)

        dev.session.fs.fsync = slow_fsync  # type: ignore[method-assign]
        dev.session.fs.statfs = statfs  # type: ignore[assignment, method-assign]
        rig.unique += 1
        fsync_head = rig.q.add_chain(
            [request(FSYNC, nodeid, struct.pack("<QII", fh, 0, 0), unique=rig.unique)], [16]
        )
        os.eventfd_write(rig.kick, 1)
        for _ in range(3):
            err, _ = await rig.fuse(STATFS, 1, b"", [16 + 80])
            assert err == 0
        assert not released.is_set()
        hold.set()
        assert await rig.wait_used() == [(fsync_head, 16)]
        assert threads["statfs"] == "vq1", threads
        assert threads["fsync"].startswith("fuse"), threads
