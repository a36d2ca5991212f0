"""Guest lock owners through the daemon behave as OFD owners on the host.

Random sequences of SETLK / GETLK / FLUSH by a few owners go to the daemon
and, as a reference, straight to the host: one OFD fd per owner on a second
file, closed and reopened for FLUSH (close(2) drops an owner's locks).  Every
answer must match, and the daemon keeps an fd only for owners holding a lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtiofsd.daemon.fuse.abi import OFFSET_MAX
from pyvirtiofsd.daemon.fuse.session import FuseSession
from pyvirtiofsd.daemon.passthrough import PassthroughFs
from pyvirtiofsd.daemon.passthrough.locks import holds_ofd_locks, read_fdinfo
from tests.support.fakechain import FLUSH, GETLK, SETLK, FuseClient, flush_body, lk_body

OWNERS = 3
_FLOCK = struct.Struct("=hhxxxxqqi4x")

ends = st.one_of(st.integers(0, 40), st.just(OFFSET_MAX))
op = st.one_of(
    st.tuples(
        st.just("setlk"),
        st.integers(0, OWNERS - 1),
        st.sampled_from([fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK]),
        st.integers(0, 40),
        ends,
    ),
    st.tuples(
        st.just("getlk"),
        st.integers(0, OWNERS - 1),
        st.sampled_from([fcntl.F_RDLCK, fcntl.F_WRLCK]),
        st.integers(0, 40),
        ends,
    ),
    st.tuples(st.just("flush"), st.integers(0, OWNERS - 1), st.just(0), st.just(0), st.just(0)),
)


def host_flock(ltype: int, start: int, end: int) -> bytes:
    length = 0 if end == OFFSET_MAX else end - start + 1
    return _FLOCK.pack(ltype, os.SEEK_SET, start, length, 0)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(op, max_size=40))
def test_owners_match_host_ofd_owners(
    tmp_path: Path, ops: list[tuple[str, int, int, int, int]]
) -> None:
    share = tmp_path / "share"
    share.mkdir(exist_ok=True)
    (share / "f").write_bytes(b"x" * 64)
    ref_path = tmp_path / "ref"
    ref_path.write_bytes(b"x" * 64)
    fs = PassthroughFs(share, posix_locks=True)
    client = FuseClient(FuseSession(fs))
    ref = [os.open(ref_path, os.O_RDWR) for _ in range(OWNERS)]
    try:
        client.init()
        node = client.lookup(1, b"f").nodeid
        fh = client.open(node, os.O_RDWR)
        for kind, owner, ltype, start, end in ops:
            if end != OFFSET_MAX and end < start:
                start, end = end, start
            if kind == "flush":
                assert client.call(FLUSH, node, flush_body(fh, lock_owner=owner)).ok
                os.close(ref[owner])
                ref[owner] = os.open(ref_path, os.O_RDWR)
            elif kind == "setlk":
                got = client.call(SETLK, node, lk_body(fh, owner, start, end, ltype)).error
                try:
                    fcntl.fcntl(ref[owner], fcntl.F_OFD_SETLK, host_flock(ltype, start, end))
                    want = 0
                except OSError as exc:
                    want = -(errno.EAGAIN if exc.errno == errno.EACCES else exc.errno)
                assert got == want, (kind, owner, ltype, start, end)
            else:
                reply = client.call(GETLK, node, lk_body(fh, owner, start, end, ltype))
                assert reply.ok
                gtype_start_end = struct.unpack("<QQII", reply.payload)[:3]
                out = fcntl.fcntl(ref[owner], fcntl.F_OFD_GETLK, host_flock(ltype, start, end))
                rtype, _w, rstart, rlen, _pid = _FLOCK.unpack(out)
                if rtype == fcntl.F_UNLCK:
                    assert gtype_start_end[2] == fcntl.F_UNLCK
                else:
                    rend = OFFSET_MAX if rlen == 0 else rstart + rlen - 1
                    assert gtype_start_end == (rstart, rend, rtype)
            holders = sum(1 for fd in ref if holds_ofd_locks(read_fdinfo(fd)))
            assert fs.locks.owner_fds == holders, "an fd for each owner holding a lock, no more"
    finally:
        for fd in ref:
            os.close(fd)
        fs.close()
