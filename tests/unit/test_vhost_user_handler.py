"""The handler in-process: hypothesis throws random messages at it; it must never
raise, must answer only with well-formed replies, and must leak no fd."""

from __future__ import annotations

import logging
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtiofsd.daemon.vhost_user import HANDLER_PROTOCOL_FEATURES, VhostUserHandler
from pyvirtiofsd.daemon.vhost_user.connection import RawMessage
from pyvirtiofsd.daemon.vhost_user.messages import (
    HEADER_SIZE,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    FrontendReq,
    Header,
    HeaderFlags,
    MemoryRegionDesc,
    MemoryTable,
    MemRegionMsg,
    VringAddr,
    VringFd,
    VringState,
)
from tests.unit.test_vhost_user_server import DEVICE_FEATURES, RecordingDevice

u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 0xFFFF_FFFF_FFFF_FFFF)
small_index = st.integers(0, 4)

regions = st.builds(
    MemoryRegionDesc,
    st.one_of(st.integers(0, 1 << 20), u64),
    st.one_of(st.integers(0, 1 << 20), u64),
    u64,
    st.one_of(st.just(0), u64),
)

# Payloads shaped like a real request of some type (so decoding often succeeds
# and the state machine is exercised), or arbitrary bytes.
shaped_payloads = st.one_of(
    st.just(b""),
    st.builds(lambda v: U64(v).pack(), st.one_of(u64, st.sampled_from([0, 1, 0xF, 1 << 30]))),
    st.builds(
        lambda i, n: VringState(i, n).pack(), small_index, st.one_of(st.integers(0, 2048), u32)
    ),
    st.builds(
        lambda i, f, a, b, c, d: VringAddr(i, f, a, b, c, d).pack(),
        small_index,
        st.integers(0, 3),
        u64,
        u64,
        u64,
        u64,
    ),
    st.builds(lambda i, nofd: VringFd(i, nofd).pack(), st.integers(0, 255), st.booleans()),
    st.builds(lambda r: MemRegionMsg(r).pack(), regions),
    st.builds(lambda rs: MemoryTable(tuple(rs)).pack(), st.lists(regions, max_size=8)),
    st.binary(max_size=300),
)

codes = st.one_of(st.sampled_from([int(c) for c in FrontendReq]), u32)
good_flags = st.sampled_from([0x1, 0x1 | HeaderFlags.NEED_REPLY])
flags = st.one_of(good_flags, good_flags, u32)


@st.composite
def messages(draw: st.DrawFn) -> tuple[Header, bytes, int, bool]:
    code = draw(codes)
    payload = draw(shaped_payloads)
    size = len(payload)
    nfds = draw(st.integers(0, 3))
    oversize = draw(st.integers(0, 20)) == 0
    return Header(code, draw(flags), size), payload, nfds, oversize


def _check_reply(reply: bytes | None, header: Header) -> None:
    if reply is None:
        return
    assert len(reply) >= HEADER_SIZE
    rh = Header.unpack(reply[:HEADER_SIZE])
    assert rh.request == header.request
    assert rh.flags == 0x1 | HeaderFlags.REPLY
    assert rh.size == len(reply) - HEADER_SIZE


def _handshake(handler: VhostUserHandler) -> None:
    def send(code: FrontendReq, payload: bytes = b"") -> None:
        handler.handle(RawMessage(Header(code, 1, len(payload)), payload, []))

    send(FrontendReq.SET_PROTOCOL_FEATURES, U64(HANDLER_PROTOCOL_FEATURES).pack())
    send(FrontendReq.SET_OWNER)
    send(FrontendReq.SET_FEATURES, U64(DEVICE_FEATURES).pack())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    handshake=st.booleans(),
    batch=st.lists(messages(), min_size=1, max_size=25),
    device_mode=st.sampled_from(["ok", "fail", "crash"]),
)
def test_handler_never_raises_and_leaks_nothing(
    handshake: bool, batch: list[tuple[Header, bytes, int, bool]], device_mode: str
) -> None:
    device = RecordingDevice()
    if device_mode != "ok":
        methods = {"set_vring_kick", "set_mem_table", "add_mem_region", "set_features"}
        getattr(device, device_mode).update(methods)
    handler = VhostUserHandler(device)
    if handshake:
        _handshake(handler)
    for header, payload, nfds, oversize in batch:
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
        msg = RawMessage(header, b"" if oversize else payload, list(fds), oversize=oversize)
        reply = handler.handle(msg)
        _check_reply(reply, header)
        assert msg.fds == []
        for fd in fds:
            # Every fd is closed: by the handler, or by the device that took it.
            try:
                os.fstat(fd)
            except OSError:
                continue
            raise AssertionError(f"fd {fd} of {header} leaked")
    handler.disconnected()
    assert device.calls[-1] == ("reset",)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=HEADER_SIZE, max_size=400))
def test_handler_on_raw_bytes(data: bytes) -> None:
    """Whatever 12+ bytes come in, interpreted as header + payload."""
    handler = VhostUserHandler(RecordingDevice())
    _handshake(handler)
    request, flags, _size = struct.unpack_from("<III", data)
    payload = data[HEADER_SIZE:]
    header = Header(request, flags, len(payload))
    reply = handler.handle(RawMessage(header, payload, []))
    _check_reply(reply, header)


def test_get_features_always_offers_protocol_features_bit() -> None:
    handler = VhostUserHandler(RecordingDevice(features=0))
    reply = handler.handle(RawMessage(Header(FrontendReq.GET_FEATURES, 1, 0), b"", []))
    assert reply is not None
    assert U64.unpack(reply[HEADER_SIZE:]).value == VHOST_USER_F_PROTOCOL_FEATURES


def test_refusals_logged_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    handler = VhostUserHandler(RecordingDevice())
    with caplog.at_level(logging.DEBUG, logger="pyvirtiofsd.vhost_user"):
        handler.handle(RawMessage(Header(77, 1, 0), b"", []))
    levels = [(r.name, r.levelno) for r in caplog.records]
    assert ("pyvirtiofsd.vhost_user", logging.DEBUG) in levels
    assert ("pyvirtiofsd.vhost_user", logging.WARNING) in levels
    assert "UNKNOWN(77)" in caplog.text


def test_handler_state_tracking() -> None:
    device = RecordingDevice()
    handler = VhostUserHandler(device)
    _handshake(handler)
    assert handler.owner
    assert handler.acked_features == DEVICE_FEATURES
    assert handler.acked_protocol_features == HANDLER_PROTOCOL_FEATURES
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    payload = VringFd(1, False).pack()
    # a kick before the ring's size and addresses: kicked, enabled, not running
    handler.handle(RawMessage(Header(FrontendReq.SET_VRING_KICK, 1, 8), payload, [kick]))
    assert handler.vring_started(1) and handler.vring_enabled(1)
    assert not handler.vring_running(1) and "start_vring" not in device.names()
    num = VringState(1, 64).pack()
    handler.handle(RawMessage(Header(FrontendReq.SET_VRING_NUM, 1, 8), num, []))
    addr = VringAddr(1, 0, 0x1000, 0x1800, 0x1400, 0).pack()
    handler.handle(RawMessage(Header(FrontendReq.SET_VRING_ADDR, 1, VringAddr.SIZE), addr, []))
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    handler.handle(RawMessage(Header(FrontendReq.SET_VRING_KICK, 1, 8), payload, [kick]))
    assert handler.vring_running(1) and device.last("start_vring")[0].num == 64
    payload = VringState(1, 0).pack()
    reply = handler.handle(RawMessage(Header(FrontendReq.GET_VRING_BASE, 1, 8), payload, []))
    assert reply is not None and VringState.unpack(reply[HEADER_SIZE:]) == VringState(1, 42)
    assert not handler.vring_started(1) and not handler.vring_running(1)
    region = MemoryRegionDesc(0, 4096, 0x1000, 0)
    memfd = os.memfd_create("t")
    handler.handle(
        RawMessage(
            Header(FrontendReq.ADD_MEM_REG, 1, MemRegionMsg.SIZE),
            MemRegionMsg(region).pack(),
            [memfd],
        )
    )
    assert handler.regions == (region,)
    handler.disconnected()
    assert not handler.owner and handler.regions == () and handler.acked_features is None


@pytest.mark.parametrize(("queues", "size"), [(0, 1024), (257, 1024), (2, 0), (2, 65536)])
def test_handler_refuses_impossible_device_config(queues: int, size: int) -> None:
    with pytest.raises(ValueError):
        VhostUserHandler(RecordingDevice(queues=queues, max_queue_size=size))
