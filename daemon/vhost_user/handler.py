"""The vhost-user protocol state machine (the back-end side).

All protocol state of one connection lives here: ownership, offered and acked
virtio features, negotiated protocol features, the memory map, and the state
of each vring.  :meth:`VhostUserHandler.handle` takes one raw message, checks
it (shape via :func:`~.messages.decode_request`, then state and values), calls
the device with typed values, and returns the bytes to send back, if any.

It never raises for anything a front-end can send: a refused message is
logged at warning, answered with a failed REPLY_ACK when one was asked for,
and the connection goes on.  Every fd a message carried is either handed to
the device or closed before ``handle`` returns.

Leniencies, each for what QEMU 7.2 really does:

* GET_FEATURES, GET/SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS
  and SET_BACKEND_REQ_FD arrive *before* SET_OWNER (``vhost_user_backend_init``
  runs before ``vhost_set_owner``), so only the requests that configure the
  device (features, memory, vrings, status) require an owner.
* QEMU 7.2's vhost-user-fs does not put ``VHOST_USER_F_PROTOCOL_FEATURES``
  back into SET_FEATURES (fixed in 8.0 by "vhost-user: Fix the virtio features
  negotiation flaw"), yet it negotiates protocol features and sends
  SET_VRING_ENABLE.  So protocol features are in force once SET_PROTOCOL_FEATURES
  acked them, whatever SET_FEATURES said, and SET_VRING_ENABLE is accepted
  whenever bit 30 was offered.  Bit 30 in SET_FEATURES decides only the
  initial ring state, as the spec says.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from .backend import VhostUserDevice, VringConfig
from .connection import RawMessage, close_fds
from .errors import (
    DeviceError,
    FdCountError,
    InvalidParameterError,
    NotNegotiatedError,
    PayloadSizeError,
    StateError,
    VhostUserError,
)
from .messages import (
    MAX_PAYLOAD_SIZE,
    OWN_REPLY_REQUESTS,
    U64,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VERSION,
    FrontendReq,
    HeaderFlags,
    MemoryRegionDesc,
    MemoryTable,
    MemRegionMsg,
    ProtocolFeature,
    Request,
    VringAddr,
    VringFd,
    VringState,
    decode_request,
    encode_message,
    protocol_feature_mask,
    request_name,
)

__all__ = [
    "DEFAULT_MAX_MEM_SLOTS",
    "HANDLER_PROTOCOL_FEATURES",
    "VIRTIO_F_RING_PACKED",
    "VhostUserHandler",
]

log = logging.getLogger("pyvirtiofsd.vhost_user")

#: Memory slots reported by GET_MAX_MEM_SLOTS (libvhost-user's VHOST_USER_MAX_RAM_SLOTS).
DEFAULT_MAX_MEM_SLOTS = 509

#: Protocol features the handler implements; the offer is these ANDed with the device's.
HANDLER_PROTOCOL_FEATURES = protocol_feature_mask(
    ProtocolFeature.MQ,
    ProtocolFeature.REPLY_ACK,
    ProtocolFeature.BACKEND_REQ,
    ProtocolFeature.BACKEND_SEND_FD,
    ProtocolFeature.RESET_DEVICE,
    ProtocolFeature.CONFIGURE_MEM_SLOTS,
    ProtocolFeature.STATUS,
)

VIRTIO_F_RING_PACKED = 1 << 34
_U64_MAX = (1 << 64) - 1
_U16_MAX = (1 << 16) - 1

#: Requests a front-end may send before SET_OWNER (QEMU 7.2 does, see above).
_NO_OWNER_NEEDED = frozenset(
    {
        FrontendReq.GET_FEATURES,
        FrontendReq.SET_OWNER,
        FrontendReq.RESET_OWNER,
        FrontendReq.GET_PROTOCOL_FEATURES,
        FrontendReq.SET_PROTOCOL_FEATURES,
        FrontendReq.GET_QUEUE_NUM,
        FrontendReq.GET_MAX_MEM_SLOTS,
        FrontendReq.SET_BACKEND_REQ_FD,
        FrontendReq.RESET_DEVICE,
        FrontendReq.GET_STATUS,
    }
)

#: Requests valid only with a given protocol feature negotiated.
_NEEDS_PROTOCOL_FEATURE: dict[FrontendReq, ProtocolFeature] = {
    FrontendReq.GET_QUEUE_NUM: ProtocolFeature.MQ,
    FrontendReq.SET_BACKEND_REQ_FD: ProtocolFeature.BACKEND_REQ,
    FrontendReq.RESET_DEVICE: ProtocolFeature.RESET_DEVICE,
    FrontendReq.GET_MAX_MEM_SLOTS: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    FrontendReq.ADD_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    FrontendReq.REM_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    FrontendReq.SET_STATUS: ProtocolFeature.STATUS,
    FrontendReq.GET_STATUS: ProtocolFeature.STATUS,
}


@dataclass(slots=True)
class _Vring:
    """One vring's protocol state; the handler is its only owner.

    ``base`` is where the ring starts next: SET_VRING_BASE sets it, and
    every stop replaces it with where the device got to, so a restart
    without a new SET_VRING_BASE (SET_VRING_ENABLE 0 then 1, a second
    SET_VRING_KICK) resumes there instead of replaying served requests.
    ``running``: the device is serving it (kick fd received and enabled).
    """

    num: int | None = None
    addr: VringAddr | None = None
    base: int = 0
    kick: bool = False
    call: bool = False
    err: bool = False
    enabled: bool = False
    running: bool = False


class _Fds:
    """A message's fds: ``take`` hands one on, ``close`` closes the rest."""

    def __init__(self, fds: list[int]) -> None:
        self._fds = fds

    def __len__(self) -> int:
        return len(self._fds)

    def peek(self, i: int) -> int:
        return self._fds[i]

    def all(self) -> list[int]:
        return list(self._fds)

    def take(self, i: int) -> int:
        """Ownership of fd ``i`` moves to the caller."""
        return self._fds.pop(i)

    def close(self) -> None:
        close_fds(self._fds)


class _Reply:
    """A request's own reply payload (GET_*)."""

    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


def _check_region(region: MemoryRegionDesc) -> None:
    if region.memory_size == 0:
        raise InvalidParameterError(f"memory region {region} has size 0")
    for name, start in (
        ("guest_phys_addr", region.guest_phys_addr),
        ("userspace_addr", region.userspace_addr),
        ("mmap_offset", region.mmap_offset),
    ):
        if start + region.memory_size - 1 > _U64_MAX:
            raise InvalidParameterError(f"memory region {name} + size overflows: {region}")


def _overlaps(a: MemoryRegionDesc, b: MemoryRegionDesc) -> bool:
    return (
        a.guest_phys_addr < b.guest_phys_addr + b.memory_size
        and b.guest_phys_addr < a.guest_phys_addr + a.memory_size
    )


class VhostUserHandler:
    """Protocol state for one front-end connection, driving one device."""

    def __init__(
        self, device: VhostUserDevice, *, max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS
    ) -> None:
        self._device = device
        self._max_mem_slots = max_mem_slots
        self._num_queues = device.num_queues()
        self._max_queue_size = device.max_queue_size()
        # SET_VRING_KICK/CALL/ERR carry the index in 8 bits.
        if not 0 < self._num_queues <= 256:
            raise ValueError(f"device has {self._num_queues} queues, expected 1..256")
        if not 0 < self._max_queue_size <= 32768:
            raise ValueError(f"device max queue size {self._max_queue_size}, expected 1..32768")
        self._offered_features = device.features() | VHOST_USER_F_PROTOCOL_FEATURES
        self._offered_protocol = device.protocol_features() & HANDLER_PROTOCOL_FEATURES
        self._dispatch: dict[FrontendReq, Callable[[Request, _Fds], _Reply | None]] = {
            FrontendReq.GET_FEATURES: self._get_features,
            FrontendReq.SET_FEATURES: self._set_features,
            FrontendReq.SET_OWNER: self._set_owner,
            FrontendReq.RESET_OWNER: self._reset_owner,
            FrontendReq.SET_MEM_TABLE: self._set_mem_table,
            FrontendReq.SET_VRING_NUM: self._set_vring_num,
            FrontendReq.SET_VRING_ADDR: self._set_vring_addr,
            FrontendReq.SET_VRING_BASE: self._set_vring_base,
            FrontendReq.GET_VRING_BASE: self._get_vring_base,
            FrontendReq.SET_VRING_KICK: self._set_vring_fd,
            FrontendReq.SET_VRING_CALL: self._set_vring_fd,
            FrontendReq.SET_VRING_ERR: self._set_vring_fd,
            FrontendReq.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            FrontendReq.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            FrontendReq.GET_QUEUE_NUM: self._get_queue_num,
            FrontendReq.SET_VRING_ENABLE: self._set_vring_enable,
            FrontendReq.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            FrontendReq.RESET_DEVICE: self._reset_device,
            FrontendReq.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            FrontendReq.ADD_MEM_REG: self._add_mem_reg,
            FrontendReq.REM_MEM_REG: self._rem_mem_reg,
            FrontendReq.SET_STATUS: self._set_status,
            FrontendReq.GET_STATUS: self._get_status,
        }
        self._owner = False
        self._acked_features: int | None = None
        self._acked_protocol = 0
        self._regions: list[MemoryRegionDesc] = []
        self._vrings = [_Vring() for _ in range(self._num_queues)]
        self._backend_req_fd = False

    # ------------------------------------------------------------------ state
    @property
    def owner(self) -> bool:
        return self._owner

    @property
    def offered_features(self) -> int:
        return self._offered_features

    @property
    def acked_features(self) -> int | None:
        """Features from SET_FEATURES (bit 30 included), ``None`` before it."""
        return self._acked_features

    @property
    def offered_protocol_features(self) -> int:
        return self._offered_protocol

    @property
    def acked_protocol_features(self) -> int:
        return self._acked_protocol

    @property
    def regions(self) -> tuple[MemoryRegionDesc, ...]:
        return tuple(self._regions)

    def vring_started(self, index: int) -> bool:
        """The ring was kicked (SET_VRING_KICK) and not stopped by GET_VRING_BASE."""
        return self._vrings[index].kick

    def vring_running(self, index: int) -> bool:
        """The device is serving the ring (kicked and enabled)."""
        return self._vrings[index].running

    def vring_enabled(self, index: int) -> bool:
        return self._vrings[index].enabled

    def _has_protocol(self, feature: ProtocolFeature) -> bool:
        return bool(self._acked_protocol & feature.mask)

    def _reply_ack(self) -> bool:
        return self._has_protocol(ProtocolFeature.REPLY_ACK)

    def _protocol_features_acked_in_set_features(self) -> bool:
        return bool((self._acked_features or 0) & VHOST_USER_F_PROTOCOL_FEATURES)

    # -------------------------------------------------------------- dispatch
    def handle(self, msg: RawMessage) -> bytes | None:
        """Handle one message; return the reply to send, if any.  Never raises
        an ``Exception``; closes every fd of ``msg`` not handed to the device."""
        fds = _Fds(msg.fds)
        code = msg.header.request
        name = request_name(code)
        log.debug(
            "vhost-user request %s flags=%#x size=%d fds=%d",
            name,
            msg.header.flags,
            msg.header.size,
            len(fds),
        )
        ack_before = self._reply_ack()
        try:
            try:
                if msg.oversize:
                    raise PayloadSizeError(
                        f"{name}: payload of {msg.header.size} bytes exceeds "
                        f"the {MAX_PAYLOAD_SIZE}-byte maximum"
                    )
                if msg.fds_truncated:
                    raise FdCountError(f"{name}: more fds than any request carries")
                request = decode_request(msg.header, msg.payload, len(fds))
                reply = self._handle_request(request, fds)
            except VhostUserError as err:
                log.warning("vhost-user %s refused: %s", name, err)
                return self._failure(code, msg.header.flags, ack_before)
            except Exception:
                log.exception("vhost-user %s failed in the device", name)
                return self._failure(code, msg.header.flags, ack_before)
            if reply is not None:
                return encode_message(code, _REPLY_FLAGS, reply.payload)
            if msg.header.flags & HeaderFlags.NEED_REPLY and (ack_before or self._reply_ack()):
                return encode_message(code, _REPLY_FLAGS, U64(0).pack())
            return None
        finally:
            fds.close()

    def _failure(self, code: int, flags: int, ack_before: bool) -> bytes | None:
        # A request with its own reply gets none when it fails: any reply
        # would be read as a value.  Others get a failed REPLY_ACK when the
        # front-end asked for one and REPLY_ACK is negotiated.
        if code in OWN_REPLY_REQUESTS:
            return None
        if flags & HeaderFlags.NEED_REPLY and (ack_before or self._reply_ack()):
            return encode_message(code, _REPLY_FLAGS, U64(1).pack())
        return None

    def _handle_request(self, request: Request, fds: _Fds) -> _Reply | None:
        code = request.code
        if code not in _NO_OWNER_NEEDED and not self._owner:
            raise StateError(f"{code.name} before SET_OWNER")
        feature = _NEEDS_PROTOCOL_FEATURE.get(code)
        if feature is not None and not self._has_protocol(feature):
            raise NotNegotiatedError(
                f"{code.name} needs protocol feature {feature.name}, not negotiated"
            )
        return self._dispatch[code](request, fds)

    def disconnected(self) -> None:
        """The front-end went away: reset the device and forget everything."""
        log.debug("vhost-user front-end disconnected; resetting the device")
        self._reset_all(keep_owner=False, keep_protocol=False)

    def _reset_all(self, *, keep_owner: bool, keep_protocol: bool) -> None:
        try:
            self._device.reset()
        except Exception:
            log.exception("vhost-user device reset failed")
        self._owner = self._owner and keep_owner
        self._acked_features = None
        if not keep_protocol:
            self._acked_protocol = 0
        self._regions = []
        self._vrings = [_Vring() for _ in range(self._num_queues)]
        self._backend_req_fd = False

    def _vring(self, index: int) -> _Vring:
        if not 0 <= index < self._num_queues:
            raise InvalidParameterError(
                f"vring index {index} out of range (device has {self._num_queues} queues)"
            )
        return self._vrings[index]

    # ------------------------------------------------------ feature requests
    def _get_features(self, request: Request, fds: _Fds) -> _Reply:
        return _Reply(U64(self._offered_features).pack())

    def _set_features(self, request: Request, fds: _Fds) -> None:
        assert isinstance(request.body, U64)
        acked = request.body.value
        unoffered = acked & ~self._offered_features
        if unoffered:
            raise InvalidParameterError(f"SET_FEATURES acks unoffered bits {unoffered:#x}")
        self._device.set_features(acked & ~VHOST_USER_F_PROTOCOL_FEATURES)
        self._acked_features = acked

    def _get_protocol_features(self, request: Request, fds: _Fds) -> _Reply:
        if not self._offered_features & VHOST_USER_F_PROTOCOL_FEATURES:
            raise NotNegotiatedError("VHOST_USER_F_PROTOCOL_FEATURES not offered")
        return _Reply(U64(self._offered_protocol).pack())

    def _set_protocol_features(self, request: Request, fds: _Fds) -> None:
        assert isinstance(request.body, U64)
        if not self._offered_features & VHOST_USER_F_PROTOCOL_FEATURES:
            raise NotNegotiatedError("VHOST_USER_F_PROTOCOL_FEATURES not offered")
        acked = request.body.value
        unoffered = acked & ~self._offered_protocol
        if unoffered:
            raise InvalidParameterError(f"SET_PROTOCOL_FEATURES acks unoffered bits {unoffered:#x}")
        self._acked_protocol = acked

    def _get_queue_num(self, request: Request, fds: _Fds) -> _Reply:
        return _Reply(U64(self._num_queues).pack())

    def _get_max_mem_slots(self, request: Request, fds: _Fds) -> _Reply:
        return _Reply(U64(self._max_mem_slots).pack())

    # ------------------------------------------------------- session requests
    def _set_owner(self, request: Request, fds: _Fds) -> None:
        if self._owner:
            raise StateError("SET_OWNER: the session already has an owner")
        self._owner = True

    def _reset_owner(self, request: Request, fds: _Fds) -> None:
        # Deprecated by the spec, still sent by QEMU when RESET_DEVICE is not
        # negotiated: release everything, ownership included.
        self._reset_all(keep_owner=False, keep_protocol=False)

    def _reset_device(self, request: Request, fds: _Fds) -> None:
        # "The back-end retains ownership of the device throughout the reset
        # operation."  Negotiated protocol features stay too.
        self._reset_all(keep_owner=True, keep_protocol=True)

    def _set_backend_req_fd(self, request: Request, fds: _Fds) -> None:
        self._device.set_backend_req_fd(fds.peek(0))
        fds.take(0)
        self._backend_req_fd = True

    def _set_status(self, request: Request, fds: _Fds) -> None:
        assert isinstance(request.body, U64)
        status = request.body.value
        if status > 0xFF:
            raise InvalidParameterError(f"SET_STATUS {status:#x} is not an 8-bit status")
        self._device.set_status(status)

    def _get_status(self, request: Request, fds: _Fds) -> _Reply:
        status = self._device.get_status()
        if not 0 <= status <= 0xFF:
            raise DeviceError(f"device returned status {status!r}, not an 8-bit value")
        return _Reply(U64(status).pack())

    # --------------------------------------------------------- memory table
    def _set_mem_table(self, request: Request, fds: _Fds) -> None:
        assert isinstance(request.body, MemoryTable)
        regions = request.body.regions
        for i, region in enumerate(regions):
            _check_region(region)
            for other in regions[:i]:
                if _overlaps(region, other):
                    raise InvalidParameterError(f"memory regions overlap: {other} and {region}")
        # The handler closes the fds afterwards, whatever the device did.
        self._device.set_mem_table(list(zip(fds.all(), regions, strict=True)))
        self._regions = list(regions)

    def _add_mem_reg(self, request: Request, fds: _Fds) -> None:
        assert isinstance(request.body, MemRegionMsg)
        region = request.body.region
        _check_region(region)
        if len(self._regions) >= self._max_mem_slots:
            raise InvalidParameterError(f"ADD_MEM_REG: all {self._max_mem_slots} slots in use")
        for other in self._regions:
            if _overlaps(region, other):
                raise InvalidParameterError(f"ADD_MEM_REG {region} overlaps {other}")
        self._device.add_mem_region(fds.peek(0), region)
        self._regions.append(region)

    def _rem_mem_reg(self, request: Request, fds: _Fds) -> None:
        assert isinstance(request.body, MemRegionMsg)
        wanted = request.body.region
        # "The memory region to be removed is identified by its guest address,
        # user address and size. The mmap offset is ignored."
        for i, region in enumerate(self._regions):
            if (
                region.guest_phys_addr == wanted.guest_phys_addr
                and region.userspace_addr == wanted.userspace_addr
                and region.memory_size == wanted.memory_size
            ):
                self._device.remove_mem_region(region)
                del self._regions[i]
                return
        raise InvalidParameterError(f"REM_MEM_REG: no such region {wanted}")

    # ---------------------------------------------------------------- vrings
    def _start(self, index: int) -> None:
        """Start the ring on the device if it is kicked and enabled and not running."""
        vring = self._vrings[index]
        if vring.running or not (vring.kick and vring.enabled):
            return
        if vring.num is None or vring.addr is None:
            raise StateError(f"vring {index} started before SET_VRING_NUM and SET_VRING_ADDR")
        self._device.start_vring(VringConfig(index, vring.num, vring.addr, vring.base))
        vring.running = True

    def _stop(self, index: int) -> None:
        """Stop a running ring; its base becomes where the device got to."""
        vring = self._vrings[index]
        if not vring.running:
            return
        base = self._device.stop_vring(index)  # raising: still running, as far as we know
        vring.running = False
        if not 0 <= base <= 0xFFFFFFFF:
            raise DeviceError(f"device returned vring base {base!r}, not a u32")
        vring.base = base

    def _set_vring_num(self, request: Request, fds: _Fds) -> None:
        assert isinstance(request.body, VringState)
        index, num = request.body.index, request.body.num
        vring = self._vring(index)
        packed = bool((self._acked_features or 0) & VIRTIO_F_RING_PACKED)
        if not 0 < num <= self._max_queue_size:
            raise InvalidParameterError(
                f"SET_VRING_NUM {num} for vring {index} not in 1..{self._max_queue_size}"
            )
        if not packed and num & (num - 1):
            raise InvalidParameterError(f"SET_VRING_NUM {num}: split rings are a power of 2")
        vring.num = num  # used at the next start

    def _set_vring_addr(self, request: Request, fds: _Fds) -> None:
        assert isinstance(request.body, VringAddr)
        addr = request.body
        vring = self._vring(addr.index)
        if addr.flags & ~VringAddr.F_LOG:
            raise InvalidParameterError(f"SET_VRING_ADDR flags {addr.flags:#x} undefined")
        if addr.flags & VringAddr.F_LOG:
            raise NotNegotiatedError("SET_VRING_ADDR asks for dirty logging, not supported")
        vring.addr = addr

    def _set_vring_base(self, request: Request, fds: _Fds) -> None:
        assert isinstance(request.body, VringState)
        index, base = request.body.index, request.body.num
        vring = self._vring(index)
        packed = bool((self._acked_features or 0) & VIRTIO_F_RING_PACKED)
        if not packed and base > _U16_MAX:
            raise InvalidParameterError(f"SET_VRING_BASE {base:#x}: a split ring index is 16-bit")
        vring.base = base

    def _get_vring_base(self, request: Request, fds: _Fds) -> _Reply:
        assert isinstance(request.body, VringState)
        index = request.body.index
        vring = self._vring(index)
        # "stop ring upon receiving VHOST_USER_GET_VRING_BASE"
        vring.kick = False
        self._stop(index)
        return _Reply(VringState(index, vring.base).pack())

    def _set_vring_fd(self, request: Request, fds: _Fds) -> None:
        assert isinstance(request.body, VringFd)
        index = request.body.index
        vring = self._vring(index)
        fd = None if request.body.nofd else fds.peek(0)
        if request.code == FrontendReq.SET_VRING_KICK:
            # A new kick fd restarts the ring on it, from where it stopped.
            self._stop(index)
            self._device.set_vring_kick(index, fd)
            if fd is not None:
                fds.take(0)
            # "Client must start ring upon receiving a kick ... on the
            # descriptor specified by VHOST_USER_SET_VRING_KICK".
            vring.kick = True
            # "If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated, the
            # ring starts directly in the enabled state."
            if not self._protocol_features_acked_in_set_features():
                vring.enabled = True
            self._start(index)
        elif request.code == FrontendReq.SET_VRING_CALL:
            self._device.set_vring_call(index, fd)
            if fd is not None:
                fds.take(0)
            vring.call = fd is not None
        else:
            self._device.set_vring_err(index, fd)
            if fd is not None:
                fds.take(0)
            vring.err = fd is not None

    def _set_vring_enable(self, request: Request, fds: _Fds) -> None:
        assert isinstance(request.body, VringState)
        index, num = request.body.index, request.body.num
        vring = self._vring(index)
        # The spec: "should be sent only when VHOST_USER_F_PROTOCOL_FEATURES
        # has been negotiated"; QEMU 7.2 sends it with bit 30 offered but not
        # acked in SET_FEATURES (see the module docstring).
        if not self._offered_features & VHOST_USER_F_PROTOCOL_FEATURES:
            raise NotNegotiatedError("SET_VRING_ENABLE without VHOST_USER_F_PROTOCOL_FEATURES")
        if num not in (0, 1):
            raise InvalidParameterError(f"SET_VRING_ENABLE {num} for vring {index}: not 0 or 1")
        vring.enabled = bool(num)
        if vring.enabled:
            self._start(index)
        else:
            self._stop(index)


_REPLY_FLAGS = VHOST_USER_VERSION | HeaderFlags.REPLY
