"""Wire format: header, payloads, decode_request's size/fd/flag checks."""

from __future__ import annotations

import struct

import pytest

from pyvirtiofsd.daemon.vhost_user.errors import (
    FdCountError,
    HeaderError,
    InvalidParameterError,
    PayloadSizeError,
    ProtocolError,
    UnknownRequestError,
    UnsupportedRequestError,
)
from pyvirtiofsd.daemon.vhost_user.messages import (
    HEADER_SIZE,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    Empty,
    FrontendReq,
    Header,
    HeaderFlags,
    MemoryRegionDesc,
    MemoryTable,
    MemRegionMsg,
    ProtocolFeature,
    VringAddr,
    VringFd,
    VringState,
    decode_request,
    encode_message,
    protocol_feature_mask,
    request_name,
)

V1 = 0x1


def header(code: int, payload: bytes, flags: int = V1) -> Header:
    return Header(code, flags, len(payload))


def decode(code: int, payload: bytes = b"", nfds: int = 0, flags: int = V1) -> object:
    return decode_request(header(code, payload, flags), payload, nfds).body


def test_constants_match_the_spec() -> None:
    assert FrontendReq.GET_QUEUE_NUM == 17
    assert FrontendReq.SET_VRING_ENABLE == 18
    assert FrontendReq.SET_BACKEND_REQ_FD == 21
    assert FrontendReq.RESET_DEVICE == 34
    assert FrontendReq.GET_MAX_MEM_SLOTS == 36
    assert FrontendReq.ADD_MEM_REG == 37
    assert FrontendReq.REM_MEM_REG == 38
    assert FrontendReq.SET_STATUS == 39
    assert FrontendReq.GET_STATUS == 40
    assert ProtocolFeature.REPLY_ACK.mask == 1 << 3
    assert ProtocolFeature.BACKEND_REQ.mask == 1 << 5
    assert ProtocolFeature.CONFIGURE_MEM_SLOTS == 15
    assert ProtocolFeature.STATUS == 16
    assert VHOST_USER_F_PROTOCOL_FEATURES == 1 << 30
    assert HeaderFlags.REPLY == 0x4 and HeaderFlags.NEED_REPLY == 0x8
    assert protocol_feature_mask(ProtocolFeature.MQ, ProtocolFeature.STATUS) == 1 | 1 << 16
    assert request_name(1) == "GET_FEATURES"
    assert request_name(999) == "UNKNOWN(999)"


def test_header_roundtrip_and_size() -> None:
    raw = encode_message(FrontendReq.SET_FEATURES, V1 | HeaderFlags.NEED_REPLY, b"x" * 8)
    assert len(raw) == HEADER_SIZE + 8
    h = Header.unpack(raw[:HEADER_SIZE])
    assert h == Header(2, 0x9, 8)
    assert h.need_reply and not h.is_reply and h.version == 1
    with pytest.raises(HeaderError):
        Header.unpack(raw[:11])


def test_payload_layouts() -> None:
    assert VringState(1, 256).pack() == struct.pack("<II", 1, 256)
    addr = VringAddr(1, 0, 0x1000, 0x2000, 0x3000, 0)
    assert len(addr.pack()) == 40 == VringAddr.SIZE
    assert VringAddr.unpack(addr.pack()) == addr
    region = MemoryRegionDesc(0x1000, 0x2000, 0x7F00_0000_0000, 0x10)
    assert region.pack() == struct.pack("<QQQQ", 0x1000, 0x2000, 0x7F00_0000_0000, 0x10)
    assert MemRegionMsg.unpack(MemRegionMsg(region).pack()).region == region
    assert MemRegionMsg.SIZE == 40
    table = MemoryTable((region, region))
    assert len(table.pack()) == 8 + 2 * 32
    assert MemoryTable.unpack(table.pack()) == table
    assert VringFd(3, True).pack() == struct.pack("<Q", 0x103)
    assert VringFd.unpack(struct.pack("<Q", 0x105)) == VringFd(5, True)


@pytest.mark.parametrize(
    ("code", "payload", "body"),
    [
        (FrontendReq.GET_FEATURES, b"", Empty()),
        (FrontendReq.SET_FEATURES, struct.pack("<Q", 7), U64(7)),
        (FrontendReq.SET_VRING_NUM, struct.pack("<II", 1, 128), VringState(1, 128)),
        (FrontendReq.GET_VRING_BASE, struct.pack("<II", 0, 0), VringState(0, 0)),
        (FrontendReq.SET_STATUS, struct.pack("<Q", 15), U64(15)),
    ],
)
def test_decode_typed(code: FrontendReq, payload: bytes, body: object) -> None:
    assert decode(code, payload) == body


def test_decode_need_reply_flag_kept() -> None:
    req = decode_request(Header(FrontendReq.SET_OWNER, V1 | HeaderFlags.NEED_REPLY, 0), b"", 0)
    assert req.need_reply and req.code is FrontendReq.SET_OWNER


@pytest.mark.parametrize(
    ("code", "size"),
    [
        (FrontendReq.GET_FEATURES, 8),
        (FrontendReq.SET_FEATURES, 4),
        (FrontendReq.SET_FEATURES, 16),
        (FrontendReq.SET_OWNER, 1),
        (FrontendReq.SET_VRING_NUM, 12),
        (FrontendReq.SET_VRING_ADDR, 32),
        (FrontendReq.SET_VRING_KICK, 4),
        (FrontendReq.ADD_MEM_REG, 32),
        (FrontendReq.SET_MEM_TABLE, 4),
    ],
)
def test_decode_wrong_payload_size(code: FrontendReq, size: int) -> None:
    nfds = 1 if code in (FrontendReq.ADD_MEM_REG, FrontendReq.SET_VRING_KICK) else 0
    with pytest.raises(PayloadSizeError, match=code.name):
        decode(code, b"\0" * size, nfds)


def test_decode_mem_table_size_must_match_region_count() -> None:
    region = MemoryRegionDesc(0, 4096, 0, 0).pack()
    too_long = struct.pack("<II", 1, 0) + region + region
    with pytest.raises(PayloadSizeError, match="1 regions"):
        decode(FrontendReq.SET_MEM_TABLE, too_long, 1)
    too_many = struct.pack("<II", 9, 0) + region * 9
    with pytest.raises(PayloadSizeError, match="at most 8"):
        decode(FrontendReq.SET_MEM_TABLE, too_many, 9)
    # A lying region count (2**32 - 1) is refused without allocating anything.
    lying = struct.pack("<II", 0xFFFFFFFF, 0) + region
    with pytest.raises(PayloadSizeError):
        decode(FrontendReq.SET_MEM_TABLE, lying, 1)


def test_decode_payload_must_match_header_size() -> None:
    with pytest.raises(PayloadSizeError, match="header says"):
        decode_request(Header(FrontendReq.SET_FEATURES, V1, 8), b"\0" * 4, 0)


@pytest.mark.parametrize(
    ("code", "payload", "nfds"),
    [
        (FrontendReq.SET_FEATURES, struct.pack("<Q", 0), 1),
        (FrontendReq.SET_BACKEND_REQ_FD, b"", 0),
        (FrontendReq.SET_BACKEND_REQ_FD, b"", 2),
        (FrontendReq.ADD_MEM_REG, MemRegionMsg(MemoryRegionDesc(0, 1, 0, 0)).pack(), 0),
        (FrontendReq.REM_MEM_REG, MemRegionMsg(MemoryRegionDesc(0, 1, 0, 0)).pack(), 2),
        (FrontendReq.SET_VRING_KICK, VringFd(0, False).pack(), 0),
        (FrontendReq.SET_VRING_CALL, VringFd(0, True).pack(), 1),
        (FrontendReq.SET_VRING_ERR, VringFd(0, False).pack(), 2),
        (FrontendReq.SET_MEM_TABLE, MemoryTable((MemoryRegionDesc(0, 1, 0, 0),)).pack(), 0),
        (FrontendReq.SET_MEM_TABLE, MemoryTable((MemoryRegionDesc(0, 1, 0, 0),)).pack(), 2),
    ],
)
def test_decode_wrong_fd_count(code: FrontendReq, payload: bytes, nfds: int) -> None:
    with pytest.raises(FdCountError, match=code.name):
        decode(code, payload, nfds)


def test_decode_fd_counts_accepted() -> None:
    region = MemoryRegionDesc(0, 1, 0, 0)
    assert decode(FrontendReq.SET_VRING_KICK, VringFd(2, True).pack(), 0) == VringFd(2, True)
    assert decode(FrontendReq.SET_VRING_KICK, VringFd(2, False).pack(), 1) == VringFd(2, False)
    for nfds in (0, 1):
        assert decode(FrontendReq.REM_MEM_REG, MemRegionMsg(region).pack(), nfds) == MemRegionMsg(
            region
        )
    table = MemoryTable((region, region))
    assert decode(FrontendReq.SET_MEM_TABLE, table.pack(), 2) == table


def test_decode_vring_fd_reserved_bits() -> None:
    with pytest.raises(InvalidParameterError):
        decode(FrontendReq.SET_VRING_CALL, struct.pack("<Q", 0x200), 1)


@pytest.mark.parametrize(
    "flags",
    [0x0, 0x2, 0x3, V1 | HeaderFlags.REPLY, V1 | 0x10, V1 | 0x8000_0000],
)
def test_decode_bad_header_flags(flags: int) -> None:
    with pytest.raises(HeaderError):
        decode(FrontendReq.GET_FEATURES, b"", 0, flags)


def test_decode_unknown_and_unsupported() -> None:
    with pytest.raises(UnknownRequestError, match="99"):
        decode(99, b"")
    with pytest.raises(UnknownRequestError):
        decode(0, b"")
    with pytest.raises(UnsupportedRequestError, match="SET_LOG_BASE"):
        decode(FrontendReq.SET_LOG_BASE, b"\0" * 16, 1)
    assert issubclass(UnknownRequestError, ProtocolError)
