"""FuseSession: INIT negotiation, lifecycle, dispatch and robustness."""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtiofsd.daemon.fuse import abi
from pyvirtiofsd.daemon.fuse.abi import InitFlag
from pyvirtiofsd.daemon.fuse.session import SUPPORTED_INIT_FLAGS, FuseSession
from pyvirtiofsd.daemon.passthrough import PassthroughFs
from pyvirtiofsd.daemon.passthrough.filesystem import WANTED_INIT_FLAGS
from tests.support.fakechain import (
    BATCH_FORGET,
    DESTROY,
    FORGET,
    GETATTR,
    GETXATTR,
    INIT,
    INTERRUPT,
    LOOKUP,
    STATFS,
    FakeChain,
    FuseClient,
    build_tree,
    init_body,
    name_body,
    open_fds,
    request,
)

INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[PassthroughFs]:
    build_tree(tmp_path, many=False)
    fs = PassthroughFs(tmp_path)
    yield fs
    fs.close()


@pytest.fixture
def client(fs: PassthroughFs) -> FuseClient:
    return FuseClient(FuseSession(fs))


def getattr_body() -> bytes:
    return struct.pack("<IIQ", 0, 0, 0)


# --- INIT ---------------------------------------------------------------------


def test_init_737(client: FuseClient) -> None:
    offered = 0xFFFF_FFFF
    reply = client.call(INIT, 0, init_body(minor=37, flags=offered, readahead=65536), unique=1)
    assert reply.ok and reply.unique == 1
    assert len(reply.payload) == 64
    major, minor, ra, flags, mb, ct, max_write, tg, max_pages, ma, flags2 = INIT_OUT.unpack(
        reply.payload
    )
    assert (major, minor) == (7, 37)
    assert ra == 65536
    host_locks = InitFlag.POSIX_LOCKS | InitFlag.FLOCK_LOCKS
    assert flags == int(WANTED_INIT_FLAGS) & offered
    assert not flags & host_locks, "host-visible locks are opt-in"
    assert flags & InitFlag.DO_READDIRPLUS and flags & InitFlag.PARALLEL_DIROPS
    assert not flags & (InitFlag.INIT_EXT | InitFlag.SUBMOUNTS | InitFlag.WRITEBACK_CACHE)
    assert flags2 == 0
    assert max_write == 1 << 20 and max_pages == 256
    assert tg == 1 and mb == 0 and ct == 0 and ma == 0
    assert client.session.initialized and client.session.proto_minor == 37


def test_init_flags_are_masked_by_what_the_kernel_offers(client: FuseClient) -> None:
    client.session.fs.posix_locks = True  # the filesystem's init() now wants them
    offered = int(InitFlag.ASYNC_READ | InitFlag.POSIX_LOCKS | InitFlag.EXPORT_SUPPORT)
    reply = client.call(INIT, 0, init_body(flags=offered))
    fields = INIT_OUT.unpack(reply.payload)
    assert fields[3] == int(InitFlag.ASYNC_READ | InitFlag.POSIX_LOCKS)
    assert fields[8] == 0, "max_pages only with MAX_PAGES"


def test_init_newer_minor_gets_ours(client: FuseClient) -> None:
    reply = client.call(INIT, 0, init_body(minor=41))
    assert reply.ok
    assert INIT_OUT.unpack(reply.payload)[:2] == (7, 38)


def test_init_older_minor(client: FuseClient) -> None:
    # A 7.31 kernel sends the 16-byte fuse_init_in (no flags2).
    body = struct.pack("<IIII", 7, 31, 4096, 0xFFFF_FFFF)
    reply = client.call(INIT, 0, body)
    assert reply.ok
    assert INIT_OUT.unpack(reply.payload)[:2] == (7, 31)
    assert client.session.proto_minor == 31


def test_init_too_old_minor_refused(client: FuseClient) -> None:
    reply = client.call(INIT, 0, init_body(minor=8))
    assert reply.error == -errno.EPROTO
    assert not client.session.initialized


def test_init_major_8_answers_with_our_major_only(client: FuseClient) -> None:
    reply = client.call(INIT, 0, init_body(major=8, minor=0))
    assert reply.ok
    major, minor, *_rest = INIT_OUT.unpack(reply.payload)
    assert (major, minor) == (7, 38)
    assert not client.session.initialized, "the kernel must send a new INIT"
    client.init()
    assert client.session.initialized


def test_init_major_6_refused(client: FuseClient) -> None:
    assert client.call(INIT, 0, init_body(major=6, minor=99)).error == -errno.EPROTO
    assert not client.session.initialized


def test_init_short_body(client: FuseClient) -> None:
    assert client.call(INIT, 0, b"\x07\0\0").error == -errno.EINVAL


def test_init_ext_flags2_considered(fs: PassthroughFs) -> None:
    session = FuseSession(
        fs, init_flags=SUPPORTED_INIT_FLAGS | InitFlag.INIT_EXT | InitFlag.SECURITY_CTX
    )
    client = FuseClient(session)
    body = struct.pack("<IIIII44x", 7, 37, 0, 0xFFFF_FFFF, 0xFFFF_FFFF)
    fields = INIT_OUT.unpack(client.call(INIT, 0, body).payload)
    flags, flags2 = fields[3], fields[10]
    assert flags & InitFlag.INIT_EXT
    assert flags2 == int(InitFlag.SECURITY_CTX) >> 32


def test_second_init_starts_over(client: FuseClient) -> None:
    """A guest that restarted without unmounting sends INIT again: it is
    served, and the old session's inodes are gone (as after DESTROY)."""
    client.init()
    old = client.lookup(1, b"hello.txt").nodeid
    assert client.call(GETATTR, old, getattr_body()).ok
    assert client.call(INIT, 0, init_body()).ok
    assert client.call(GETATTR, old, getattr_body()).error != 0
    assert client.call(GETATTR, 1, getattr_body()).ok


def test_requests_before_init_get_eio(client: FuseClient) -> None:
    assert client.call(GETATTR, 1, getattr_body()).error == -errno.EIO
    assert client.call(LOOKUP, 1, name_body(b"hello.txt")).error == -errno.EIO
    # no-reply requests stay silent
    assert client.call(FORGET, 1, struct.pack("<Q", 1)).used == 0


def test_session_parameters_validated(fs: PassthroughFs) -> None:
    with pytest.raises(ValueError):
        FuseSession(fs, max_write=100)
    with pytest.raises(ValueError):
        FuseSession(fs, max_pages=0)
    session = FuseSession(fs, max_write=1 << 17, max_pages=32)
    fields = INIT_OUT.unpack(FuseClient(session).init().payload)
    assert fields[6] == 1 << 17 and fields[8] == 32


def test_init_flags_logged_at_debug(client: FuseClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="pyvirtiofsd.fuse"):
        client.init()
    assert any("INIT flags" in r.getMessage() for r in caplog.records)


# --- DESTROY --------------------------------------------------------------------


def test_destroy_drops_everything_and_returns_to_pre_init(client: FuseClient) -> None:
    baseline = open_fds()
    client.init()
    client.lookup(1, b"hello.txt")
    entry = client.lookup(1, b"sub")
    client.opendir(entry.nodeid)
    assert open_fds() > baseline
    reply = client.call(DESTROY, 0)
    assert reply.ok and reply.payload == b""
    assert open_fds() == baseline
    assert not client.session.initialized
    assert client.call(GETATTR, 1, getattr_body()).error == -errno.EIO
    client.init()
    assert client.call(GETATTR, 1, getattr_body()).ok


def test_reset_and_close(tmp_path: Path) -> None:
    build_tree(tmp_path, many=False)
    baseline = open_fds()
    session = FuseSession(PassthroughFs(tmp_path))
    client = FuseClient(session)
    client.init()
    client.lookup(1, b"hello.txt")
    session.reset()
    assert not session.initialized and len(session.fs.inodes) == 1
    client.init()
    client.lookup(1, b"sub")
    session.close()
    assert open_fds() == baseline


# --- dispatch and robustness ------------------------------------------------------


def test_unknown_opcode_enosys(client: FuseClient) -> None:
    client.init()
    assert client.call(9999, 1).error == -errno.ENOSYS
    assert client.call(0, 1).error == -errno.ENOSYS
    # xattrs are off by default (like virtiofsd without -o xattr)
    assert client.call(GETXATTR, 1, struct.pack("<II", 0, 0) + b"user.x\0").error == -errno.ENOSYS
    for opcode in (
        abi.Opcode.BMAP,
        abi.Opcode.IOCTL,
        abi.Opcode.POLL,
        abi.Opcode.NOTIFY_REPLY,
        abi.Opcode.SETUPMAPPING,
        abi.Opcode.REMOVEMAPPING,
        abi.Opcode.TMPFILE,
    ):
        assert client.call(opcode, 1, bytes(64)).error == -errno.ENOSYS, opcode


def test_reply_carries_unique(client: FuseClient) -> None:
    client.init()
    reply = client.call(STATFS, 1, unique=0xDEADBEEF12345678)
    assert reply.ok and reply.unique == 0xDEADBEEF12345678


def test_truncated_header_is_einval(client: FuseClient, caplog: pytest.LogCaptureFixture) -> None:
    client.init()
    with caplog.at_level(logging.WARNING, logger="pyvirtiofsd.fuse"):
        reply = client.raw(request(GETATTR, 1, getattr_body())[:30])
    assert reply.error == -errno.EINVAL
    assert caplog.records


def test_header_len_larger_than_chain_is_einval(client: FuseClient) -> None:
    client.init()
    raw = bytearray(request(GETATTR, 1, getattr_body()))
    struct.pack_into("<I", raw, 0, len(raw) + 100)
    assert client.raw(bytes(raw)).error == -errno.EINVAL
    struct.pack_into("<I", raw, 0, 10)
    assert client.raw(bytes(raw)).error == -errno.EINVAL


def test_truncated_body_is_einval_not_exception(client: FuseClient) -> None:
    client.init()
    assert client.call(GETATTR, 1, b"\0\0\0").error == -errno.EINVAL
    assert client.call(abi.Opcode.READ, 1, b"\0" * 20).error == -errno.EINVAL
    assert client.call(abi.Opcode.OPEN, 1, b"").error == -errno.EINVAL
    # no reply expected, nothing written, no exception
    assert client.call(FORGET, 1, b"\1").used == 0
    assert client.call(BATCH_FORGET, 0, b"\1").used == 0


def test_writable_part_too_small_returns_zero(client: FuseClient) -> None:
    client.init()
    assert client.call(GETATTR, 1, getattr_body(), writable_len=20).used == 0
    assert client.call(GETATTR, 1, getattr_body(), writable_len=0).used == 0
    # An error reply needs only the header.
    assert client.call(9999, 1, writable_len=16).error == -errno.ENOSYS
    assert client.call(9999, 1, writable_len=15).used == 0
    assert client.call(LOOKUP, 1, name_body(b"hello.txt"), writable_len=100).used == 0


def test_interrupt_has_no_reply(client: FuseClient) -> None:
    client.init()
    assert client.call(INTERRUPT, 0, struct.pack("<Q", 5)).used == 0


def test_internal_bug_becomes_eio(client: FuseClient, monkeypatch: pytest.MonkeyPatch) -> None:
    client.init()

    def broken(*_a: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(client.session.fs, "statfs", broken)
    assert client.call(STATFS, 1).error == -errno.EIO


class _ExplodingChain(FakeChain):
    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        raise RuntimeError("transport failure")


class _RefusingChain(FakeChain):
    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        raise ValueError("does not fit after all")


def test_transport_failure_never_raises(client: FuseClient) -> None:
    client.init()
    chain = _ExplodingChain(request(STATFS, 1), 4096)
    assert client.session.handle(chain) == 16
    assert struct.unpack_from("<Ii", chain.writable) == (16, -errno.EIO)
    assert client.session.handle(_RefusingChain(request(STATFS, 1), 4096)) == 0


def test_oversized_body_refused(client: FuseClient) -> None:
    client.init()
    assert client.call(LOOKUP, 1, b"a" * (1 << 20) + b"\0").error == -errno.EINVAL


# --- fuzz -------------------------------------------------------------------------

_OPCODES = st.sampled_from([int(o) for o in abi.Opcode] + [0, 7, 19, 52, 4096, 0xFFFF_FFFF])


@st.composite
def _requests(draw: st.DrawFn) -> tuple[bytes, int]:
    opcode = draw(_OPCODES)
    body = draw(st.binary(max_size=300))
    nodeid = draw(st.sampled_from([0, 1, 2, 3, 2**64 - 1]))
    raw = bytearray(request(opcode, nodeid, body))
    if draw(st.booleans()):
        struct.pack_into("<I", raw, 0, draw(st.integers(0, 2**32 - 1)))
    cut = draw(st.integers(0, len(raw)))
    raw = raw[:cut] if draw(st.booleans()) else raw
    return bytes(raw), draw(st.sampled_from([0, 8, 16, 17, 100, 200, 4096, 1 << 16]))


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.lists(_requests(), max_size=12), junk=st.binary(max_size=200))
def test_fuzz_handle_never_raises(
    client: FuseClient, data: list[tuple[bytes, int]], junk: bytes
) -> None:
    if not client.session.initialized:
        client.init()
    for raw, writable in [*data, (junk, 4096)]:
        chain = FakeChain(raw, writable)
        used = client.session.handle(chain)
        assert 0 <= used <= writable
        if used:
            length = struct.unpack_from("<I", chain.writable)[0]
            assert length == used
