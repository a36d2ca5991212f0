"""vhost-user wire format: request codes, feature bits, header, typed payloads.

Every message is a 12-byte little-endian header (request u32, flags u32,
size u32) followed by ``size`` payload bytes; file descriptors travel as
SCM_RIGHTS ancillary data with the message (QEMU sends the header, payload
and fds in one ``sendmsg``).

:func:`decode_request` is the only place that turns bytes into typed values:
it checks the header flags, the exact payload size for the request type and
the number of fds, and raises a :class:`~.errors.ProtocolError` subclass
naming what is wrong.  Nothing here trusts a size read from the wire.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from .errors import (
    FdCountError,
    HeaderError,
    InvalidParameterError,
    PayloadSizeError,
    UnknownRequestError,
    UnsupportedRequestError,
)

__all__ = [
    "HEADER_SIZE",
    "MAX_FDS",
    "MAX_MEM_TABLE_REGIONS",
    "MAX_PAYLOAD_SIZE",
    "U64",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_VERSION",
    "BackendReq",
    "Empty",
    "FdRule",
    "FrontendReq",
    "Header",
    "HeaderFlags",
    "MemRegionMsg",
    "MemoryRegionDesc",
    "MemoryTable",
    "Payload",
    "ProtocolFeature",
    "Request",
    "RequestSpec",
    "VringAddr",
    "VringFd",
    "VringState",
    "decode_request",
    "encode_message",
    "protocol_feature_mask",
    "request_name",
]

HEADER_SIZE = 12
#: Largest payload accepted.  The largest message this backend handles is a
#: full SET_MEM_TABLE (8 + 8 * 32 bytes); 4096 leaves room for the spec's
#: variable-sized messages (config space) without trusting the wire.
MAX_PAYLOAD_SIZE = 4096
#: Most fds one message can carry (SET_MEM_TABLE: one per region, 8 regions).
MAX_FDS = 8
#: VHOST_MEMORY_BASELINE_NREGIONS: regions in one SET_MEM_TABLE.
MAX_MEM_TABLE_REGIONS = 8

VHOST_USER_VERSION = 0x1
#: Virtio feature bit 30: the back-end understands GET/SET_PROTOCOL_FEATURES.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

#: In SET_VRING_KICK/CALL/ERR: "Bit 8 is the invalid FD flag. This flag is set
#: when there is no file descriptor in the ancillary data."
VRING_NOFD_MASK = 1 << 8
VRING_INDEX_MASK = 0xFF

_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_VRING_STATE = struct.Struct("<II")
_VRING_ADDR = struct.Struct("<IIQQQQ")
_REGION = struct.Struct("<QQQQ")
_MEM_TABLE_HEAD = struct.Struct("<II")


class FrontendReq(enum.IntEnum):
    """Requests sent by the front-end (QEMU) on the main socket."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # a.k.a. SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendReq(enum.IntEnum):
    """Requests the back-end sends on the SET_BACKEND_REQ_FD channel."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(enum.IntEnum):
    """Protocol feature *bit numbers* (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5  # a.k.a. SLAVE_REQ
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19

    @property
    def mask(self) -> int:
        return 1 << self.value


def protocol_feature_mask(*features: ProtocolFeature) -> int:
    """The u64 mask with the given protocol feature bits set."""
    mask = 0
    for feature in features:
        mask |= 1 << feature.value
    return mask


class HeaderFlags(enum.IntFlag):
    """Header flag bits: bits 0-1 the version, bit 2 reply, bit 3 need_reply."""

    VERSION_MASK = 0x3
    REPLY = 0x4
    NEED_REPLY = 0x8


_VALID_REQUEST_FLAGS = int(HeaderFlags.VERSION_MASK | HeaderFlags.NEED_REPLY)


def request_name(code: int) -> str:
    """``GET_FEATURES`` for 1, ``UNKNOWN(99)`` for an undefined code."""
    try:
        return FrontendReq(code).name
    except ValueError:
        return f"UNKNOWN({code})"


@dataclass(frozen=True, slots=True)
class Header:
    request: int
    flags: int
    size: int

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        if len(data) != HEADER_SIZE:
            raise HeaderError(f"header is {len(data)} bytes, expected {HEADER_SIZE}")
        request, flags, size = _HEADER.unpack(data)
        return cls(request, flags, size)

    def pack(self) -> bytes:
        return _HEADER.pack(self.request, self.flags, self.size)

    @property
    def version(self) -> int:
        return self.flags & HeaderFlags.VERSION_MASK

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.REPLY)


# --------------------------------------------------------------------------
# Payloads.  Each has a fixed SIZE (or a variable size it checks itself),
# pack() and unpack() raising PayloadSizeError on a size mismatch.
# --------------------------------------------------------------------------


def _check_size(kind: str, payload: bytes, expected: int) -> None:
    if len(payload) != expected:
        raise PayloadSizeError(f"{kind} payload is {len(payload)} bytes, expected {expected}")


@dataclass(frozen=True, slots=True)
class Empty:
    """No payload (GET_FEATURES, SET_OWNER, ...)."""

    SIZE: ClassVar[int] = 0

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        _check_size("empty", payload, 0)
        return cls()

    def pack(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class U64:
    """A single little-endian u64."""

    value: int
    SIZE: ClassVar[int] = _U64.size

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        _check_size("u64", payload, cls.SIZE)
        return cls(_U64.unpack(payload)[0])

    def pack(self) -> bytes:
        return _U64.pack(self.value)


@dataclass(frozen=True, slots=True)
class VringState:
    """``struct vhost_vring_state``: a ring index and a number (size, base, enable)."""

    index: int
    num: int
    SIZE: ClassVar[int] = _VRING_STATE.size

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        _check_size("vring state", payload, cls.SIZE)
        return cls(*_VRING_STATE.unpack(payload))

    def pack(self) -> bytes:
        return _VRING_STATE.pack(self.index, self.num)


@dataclass(frozen=True, slots=True)
class VringAddr:
    """``struct vhost_vring_addr``: ring addresses in the front-end's address space."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int
    SIZE: ClassVar[int] = _VRING_ADDR.size
    #: flags bit 0: log writes to the used ring (dirty logging).
    F_LOG: ClassVar[int] = 0x1

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        _check_size("vring address", payload, cls.SIZE)
        return cls(*_VRING_ADDR.unpack(payload))

    def pack(self) -> bytes:
        return _VRING_ADDR.pack(
            self.index,
            self.flags,
            self.desc_user_addr,
            self.used_user_addr,
            self.avail_user_addr,
            self.log_guest_addr,
        )


@dataclass(frozen=True, slots=True)
class MemoryRegionDesc:
    """One guest memory region: where it is in the guest, in the front-end, in the fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    SIZE: ClassVar[int] = _REGION.size

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        _check_size("memory region", payload, cls.SIZE)
        return cls(*_REGION.unpack(payload))

    def pack(self) -> bytes:
        return _REGION.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """SET_MEM_TABLE: ``u32 nregions, u32 padding, regions[nregions]``.

    QEMU sends exactly ``8 + nregions * 32`` bytes, and that is what is accepted.
    """

    regions: tuple[MemoryRegionDesc, ...]

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        if len(payload) < _MEM_TABLE_HEAD.size:
            raise PayloadSizeError(
                f"memory table payload is {len(payload)} bytes, "
                f"shorter than its {_MEM_TABLE_HEAD.size}-byte head"
            )
        nregions, _padding = _MEM_TABLE_HEAD.unpack_from(payload)
        if nregions > MAX_MEM_TABLE_REGIONS:
            raise PayloadSizeError(
                f"memory table has {nregions} regions, at most {MAX_MEM_TABLE_REGIONS} allowed"
            )
        _check_size(
            f"memory table ({nregions} regions)",
            payload,
            _MEM_TABLE_HEAD.size + nregions * MemoryRegionDesc.SIZE,
        )
        regions = tuple(
            MemoryRegionDesc(*_REGION.unpack_from(payload, _MEM_TABLE_HEAD.size + i * _REGION.size))
            for i in range(nregions)
        )
        return cls(regions)

    def pack(self) -> bytes:
        return _MEM_TABLE_HEAD.pack(len(self.regions), 0) + b"".join(r.pack() for r in self.regions)


@dataclass(frozen=True, slots=True)
class MemRegionMsg:
    """ADD_MEM_REG / REM_MEM_REG: ``u64 padding`` then one region."""

    region: MemoryRegionDesc
    SIZE: ClassVar[int] = _U64.size + MemoryRegionDesc.SIZE

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        _check_size("single memory region", payload, cls.SIZE)
        return cls(MemoryRegionDesc.unpack(payload[_U64.size :]))

    def pack(self) -> bytes:
        return _U64.pack(0) + self.region.pack()


@dataclass(frozen=True, slots=True)
class VringFd:
    """SET_VRING_KICK/CALL/ERR u64: bits 0-7 the index, bit 8 "no fd" (polling).

    The other bits are not defined by the spec and must be zero.
    """

    index: int
    nofd: bool
    SIZE: ClassVar[int] = _U64.size

    @classmethod
    def unpack(cls, payload: bytes) -> Self:
        value = U64.unpack(payload).value
        if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
            raise InvalidParameterError(
                f"vring fd payload {value:#x} has bits set beyond the index and NOFD flag"
            )
        return cls(value & VRING_INDEX_MASK, bool(value & VRING_NOFD_MASK))

    def pack(self) -> bytes:
        return _U64.pack(self.index | (VRING_NOFD_MASK if self.nofd else 0))


Payload = Empty | U64 | VringState | VringAddr | MemoryTable | MemRegionMsg | VringFd
_PayloadType = (
    type[Empty]
    | type[U64]
    | type[VringState]
    | type[VringAddr]
    | type[MemoryTable]
    | type[MemRegionMsg]
    | type[VringFd]
)


class FdRule(enum.Enum):
    """How many fds a request must carry."""

    NONE = "no fd"
    ONE = "exactly one fd"
    ZERO_OR_ONE = "at most one fd"
    PER_REGION = "one fd per memory region"
    VRING = "one fd, or none when the NOFD bit is set"


@dataclass(frozen=True, slots=True)
class RequestSpec:
    payload: _PayloadType
    fds: FdRule
    #: The request has its own reply (a GET); otherwise only a REPLY_ACK.
    has_reply: bool = False


#: The requests this backend implements, with their exact wire shape.
REQUEST_SPECS: dict[FrontendReq, RequestSpec] = {
    FrontendReq.GET_FEATURES: RequestSpec(Empty, FdRule.NONE, has_reply=True),
    FrontendReq.SET_FEATURES: RequestSpec(U64, FdRule.NONE),
    FrontendReq.SET_OWNER: RequestSpec(Empty, FdRule.NONE),
    FrontendReq.RESET_OWNER: RequestSpec(Empty, FdRule.NONE),
    FrontendReq.SET_MEM_TABLE: RequestSpec(MemoryTable, FdRule.PER_REGION),
    FrontendReq.SET_VRING_NUM: RequestSpec(VringState, FdRule.NONE),
    FrontendReq.SET_VRING_ADDR: RequestSpec(VringAddr, FdRule.NONE),
    FrontendReq.SET_VRING_BASE: RequestSpec(VringState, FdRule.NONE),
    FrontendReq.GET_VRING_BASE: RequestSpec(VringState, FdRule.NONE, has_reply=True),
    FrontendReq.SET_VRING_KICK: RequestSpec(VringFd, FdRule.VRING),
    FrontendReq.SET_VRING_CALL: RequestSpec(VringFd, FdRule.VRING),
    FrontendReq.SET_VRING_ERR: RequestSpec(VringFd, FdRule.VRING),
    FrontendReq.GET_PROTOCOL_FEATURES: RequestSpec(Empty, FdRule.NONE, has_reply=True),
    FrontendReq.SET_PROTOCOL_FEATURES: RequestSpec(U64, FdRule.NONE),
    FrontendReq.GET_QUEUE_NUM: RequestSpec(Empty, FdRule.NONE, has_reply=True),
    FrontendReq.SET_VRING_ENABLE: RequestSpec(VringState, FdRule.NONE),
    FrontendReq.SET_BACKEND_REQ_FD: RequestSpec(Empty, FdRule.ONE),
    FrontendReq.RESET_DEVICE: RequestSpec(Empty, FdRule.NONE),
    FrontendReq.GET_MAX_MEM_SLOTS: RequestSpec(Empty, FdRule.NONE, has_reply=True),
    FrontendReq.ADD_MEM_REG: RequestSpec(MemRegionMsg, FdRule.ONE),
    # QEMU 7.2 sends the region's fd with REM_MEM_REG, later QEMUs send none
    # ("The mmap offset is ignored", the fd is not needed): accept both.
    FrontendReq.REM_MEM_REG: RequestSpec(MemRegionMsg, FdRule.ZERO_OR_ONE),
    FrontendReq.SET_STATUS: RequestSpec(U64, FdRule.NONE),
    FrontendReq.GET_STATUS: RequestSpec(Empty, FdRule.NONE, has_reply=True),
}

#: Requests that carry their own reply, known or not implemented; a failed
#: one gets no REPLY_ACK (the spec: their reply replaces the ack).
OWN_REPLY_REQUESTS: frozenset[int] = frozenset(
    {
        *(code for code, spec in REQUEST_SPECS.items() if spec.has_reply),
        FrontendReq.GET_CONFIG,
        FrontendReq.GET_INFLIGHT_FD,
        FrontendReq.POSTCOPY_ADVISE,
        FrontendReq.GET_SHARED_OBJECT,
        FrontendReq.SET_DEVICE_STATE_FD,
        FrontendReq.CHECK_DEVICE_STATE,
        FrontendReq.CREATE_CRYPTO_SESSION,
    }
)


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded, shape-checked request."""

    code: FrontendReq
    flags: int
    body: Payload

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & HeaderFlags.NEED_REPLY)


def check_header(header: Header) -> None:
    """Version must be 1; a request must not carry the reply bit or reserved bits."""
    if header.version != VHOST_USER_VERSION:
        raise HeaderError(f"header version {header.version}, expected {VHOST_USER_VERSION}")
    if header.flags & ~_VALID_REQUEST_FLAGS:
        raise HeaderError(f"header flags {header.flags:#x} have reply or reserved bits set")


def _check_fds(code: FrontendReq, rule: FdRule, body: Payload, nfds: int) -> None:
    match rule:
        case FdRule.NONE:
            expected: tuple[int, ...] = (0,)
        case FdRule.ONE:
            expected = (1,)
        case FdRule.ZERO_OR_ONE:
            expected = (0, 1)
        case FdRule.PER_REGION:
            assert isinstance(body, MemoryTable)
            expected = (len(body.regions),)
        case FdRule.VRING:
            assert isinstance(body, VringFd)
            expected = (0,) if body.nofd else (1,)
    if nfds not in expected:
        raise FdCountError(
            f"{code.name} carries {nfds} fds, expected {rule.value} "
            f"({' or '.join(map(str, expected))})"
        )


def decode_request(header: Header, payload: bytes, nfds: int) -> Request:
    """Check a request's header, payload size and fd count; return it typed.

    Raises :class:`HeaderError`, :class:`UnknownRequestError`,
    :class:`UnsupportedRequestError`, :class:`PayloadSizeError` or
    :class:`FdCountError`.
    """
    check_header(header)
    if len(payload) != header.size:
        raise PayloadSizeError(f"payload is {len(payload)} bytes, header says {header.size}")
    try:
        code = FrontendReq(header.request)
    except ValueError:
        raise UnknownRequestError(f"unknown request code {header.request}") from None
    spec = REQUEST_SPECS.get(code)
    if spec is None:
        raise UnsupportedRequestError(f"{code.name} is not supported by this backend")
    try:
        body: Payload = spec.payload.unpack(payload)
    except PayloadSizeError as err:
        raise PayloadSizeError(f"{code.name}: {err}") from err
    _check_fds(code, spec.fds, body, nfds)
    return Request(code, header.flags, body)


def encode_message(request: int, flags: int, payload: bytes = b"") -> bytes:
    """Header plus payload, ready for the socket."""
    return Header(request, flags, len(payload)).pack() + payload
