"""The virtio-fs device: vhost-user requests in, queue workers and FUSE out.

:class:`FsDevice` is what the vhost-user handler drives (it implements
:class:`~.vhost_user.backend.VhostUserDevice`). It owns the guest memory map
and one :class:`~pyvirtiofsd.dma.VirtQueue` per virtqueue (queue 0 is the
high-priority queue, 1..N the request queues), and runs one worker thread per
started and enabled queue. A worker waits for kicks in C (GIL released), pops
descriptor chains, hands each to the :class:`~.fuse.session.FuseSession`
and completes it; the FUSE session moves READ/WRITE payloads between files
and guest memory in C too, so queues do not serialise behind one Python loop.

Strict window mode (``window=(base, size)``): only that range of guest
memory is mapped, and a ring or descriptor outside the window fails that
request (or that queue) with a logged error; the device keeps serving.
VIRTIO_F_ACCESS_PLATFORM is offered (QEMU demands it for iommu_platform=on)
but cannot be required in SET_FEATURES: QEMU strips it there when the
machine has no vIOMMU.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass

from pyvirtiofsd.dma import (
    Chain,
    ChainError,
    DmaError,
    GuestMemory,
    MemoryRegion,
    QueueError,
    VirtQueue,
)

from .fuse import abi
from .fuse.session import FuseSession
from .vhost_user.backend import VhostUserDeviceBase
from .vhost_user.errors import DeviceError
from .vhost_user.messages import MemoryRegionDesc, ProtocolFeature, VringAddr

log = logging.getLogger("pyvirtiofsd.device")

# virtio feature bits (virtio 1.2, section 6)
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33

DEVICE_FEATURES = (
    VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_F_ACCESS_PLATFORM
)

#: QEMU refuses iommu_platform=on unless REPLY_ACK and BACKEND_REQ are offered.
PROTOCOL_FEATURES = (
    ProtocolFeature.MQ.mask
    | ProtocolFeature.REPLY_ACK.mask
    | ProtocolFeature.BACKEND_REQ.mask
    | ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
    | ProtocolFeature.STATUS.mask
)

MAX_QUEUE_SIZE = 1024


@dataclass
class _Ring:
    """Per-virtqueue state collected from vhost-user messages."""

    vq: VirtQueue
    num: int = 0
    addr: VringAddr | None = None
    base: int = 0
    kicked: bool = False  # a kick fd (or "no fd" = polling) was received
    enabled: bool = False
    broken: bool = False
    worker: threading.Thread | None = None


class FsDevice(VhostUserDeviceBase):
    """A vhost-user-fs device serving one FUSE session."""

    def __init__(
        self,
        session: FuseSession,
        *,
        num_request_queues: int = 16,
        window: tuple[int, int] | None = None,
    ) -> None:
        if not 1 <= num_request_queues <= 255:
            raise ValueError("num_request_queues must be 1..255")
        self.session = session
        self.window = window
        self.memory = GuestMemory(window=window)
        self._rings = [
            _Ring(VirtQueue(self.memory, i, MAX_QUEUE_SIZE)) for i in range(1 + num_request_queues)
        ]
        self._acked = 0
        self._status = 0
        self._backend_req_fd: int | None = None

    # -- features ------------------------------------------------------------
    def num_queues(self) -> int:
        return len(self._rings)

    def max_queue_size(self) -> int:
        return MAX_QUEUE_SIZE

    def features(self) -> int:
        return DEVICE_FEATURES

    def protocol_features(self) -> int:
        return int(PROTOCOL_FEATURES)

    def set_features(self, acked: int) -> None:
        if self.window is not None and not acked & VIRTIO_F_ACCESS_PLATFORM:
            # QEMU strips ACCESS_PLATFORM from SET_FEATURES when the machine has
            # no vIOMMU (vhost_dev_set_features), even with iommu_platform=on,
            # so its absence here proves nothing. The window itself is the
            # guard: rings and buffers outside it are refused.
            log.debug("ACCESS_PLATFORM not in SET_FEATURES (no vIOMMU); window enforced")
        self._acked = acked
        log.debug("driver acked features %#x", acked)

    # -- memory --------------------------------------------------------------
    @staticmethod
    def _region(r: MemoryRegionDesc) -> MemoryRegion:
        return MemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)

    def set_mem_table(self, regions: list[tuple[int, MemoryRegionDesc]]) -> None:
        try:
            self.memory.replace([(fd, self._region(r)) for fd, r in regions])
        except DmaError as e:
            raise DeviceError(f"memory table refused: {e}") from e
        self._log_memory()

    def add_mem_region(self, fd: int, region: MemoryRegionDesc) -> None:
        try:
            self.memory.add_region(fd, self._region(region))
        except DmaError as e:
            raise DeviceError(f"memory region refused: {e}") from e
        self._log_memory()

    def remove_mem_region(self, region: MemoryRegionDesc) -> None:
        try:
            self.memory.remove_region(self._region(region))
        except DmaError as e:
            raise DeviceError(f"memory region removal refused: {e}") from e
        self._log_memory()

    def _log_memory(self) -> None:
        regions = self.memory.regions
        total = sum(r.size for r in regions)
        where = (
            f" (window {self.window[0]:#x}+{self.window[1]:#x})" if self.window is not None else ""
        )
        log.info(
            "guest memory: %d region(s), %d MiB; mapped %d bytes%s",
            len(regions),
            total >> 20,
            self.memory.mapped_bytes,
            where,
        )

    # -- vrings --------------------------------------------------------------
    def _ring(self, index: int) -> _Ring:
        if not 0 <= index < len(self._rings):
            raise DeviceError(f"vring index {index} out of range")
        return self._rings[index]

    def set_vring_num(self, index: int, num: int) -> None:
        if num == 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise DeviceError(f"vring {index}: size {num} is not a power of two <= 1024")
        self._ring(index).num = num

    def set_vring_addr(self, index: int, addr: VringAddr) -> None:
        self._ring(index).addr = addr

    def set_vring_base(self, index: int, base: int) -> None:
        self._ring(index).base = base & 0xFFFF

    def get_vring_base(self, index: int) -> int:
        ring = self._ring(index)
        self._stop(ring)
        base = ring.vq.last_avail_idx if ring.addr is not None else ring.base
        ring.vq.reset()
        ring.kicked = False
        ring.broken = False
        ring.base = base
        return base

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        ring = self._ring(index)
        self._stop(ring)
        ring.vq.set_kick_fd(fd)
        ring.kicked = True
        self._maybe_start(ring)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._ring(index).vq.set_call_fd(fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._ring(index)
        if fd is not None:
            os.close(fd)  # errors are logged, not signalled to the front-end

    def set_vring_enable(self, index: int, enabled: bool) -> None:
        ring = self._ring(index)
        ring.enabled = enabled
        if enabled:
            self._maybe_start(ring)
        else:
            self._stop(ring)

    def set_backend_req_fd(self, fd: int) -> None:
        if self._backend_req_fd is not None:
            os.close(self._backend_req_fd)
        self._backend_req_fd = fd

    def set_status(self, status: int) -> None:
        self._status = status

    def get_status(self) -> int:
        return self._status

    def reset(self) -> None:
        for ring in self._rings:
            self._stop(ring)
            ring.vq.reset()
            ring.vq.set_kick_fd(None)
            ring.vq.set_call_fd(None)
            ring.num, ring.addr, ring.base = 0, None, 0
            ring.kicked = ring.enabled = ring.broken = False
        self.memory.clear()
        if self._backend_req_fd is not None:
            os.close(self._backend_req_fd)
            self._backend_req_fd = None
        self._acked = 0
        self._status = 0
        self.session.reset()

    def close(self) -> None:
        """Reset, then release the queues' fds and the filesystem (root included)."""
        self.reset()
        for ring in self._rings:
            ring.vq.close()
        self.session.close()

    # -- workers -------------------------------------------------------------
    def _maybe_start(self, ring: _Ring) -> None:
        if ring.worker is not None or not (ring.kicked and ring.enabled):
            return
        if ring.addr is None or ring.num == 0:
            raise DeviceError(f"vring {ring.vq.index}: started before its size/addresses were set")
        try:
            a = ring.addr
            qsize = ring.num
            desc = self.memory.uaddr_to_gpa(a.desc_user_addr, 16 * qsize)
            avail = self.memory.uaddr_to_gpa(a.avail_user_addr, 6 + 2 * qsize)
            used = self.memory.uaddr_to_gpa(a.used_user_addr, 6 + 8 * qsize)
            ring.vq.configure(
                size=qsize,
                desc_gpa=desc,
                avail_gpa=avail,
                used_gpa=used,
                event_idx=bool(self._acked & VIRTIO_RING_F_EVENT_IDX),
            )
            ring.vq.set_base(ring.base)
        except DmaError as e:
            ring.broken = True
            log.error("vring %d refused: %s; the queue stays stopped", ring.vq.index, e)
            raise DeviceError(f"vring {ring.vq.index}: {e}") from e
        worker = threading.Thread(
            target=self._serve_queue, args=(ring,), name=f"vq{ring.vq.index}", daemon=True
        )
        ring.worker = worker
        worker.start()

    def _stop(self, ring: _Ring) -> None:
        worker = ring.worker
        if worker is None:
            return
        ring.vq.stop()
        worker.join()
        ring.worker = None

    def _serve_queue(self, ring: _Ring) -> None:
        vq = ring.vq
        log.debug("queue %d: worker started (size %d)", vq.index, vq.size)
        try:
            while True:
                self._drain(ring)
                if ring.broken or not vq.wait_kick():
                    break
        except Exception:  # a bug, not guest input: log it and keep the daemon up
            log.exception("queue %d: worker failed; the queue is stopped", vq.index)
        log.debug("queue %d: worker stopped", vq.index)

    def _drain(self, ring: _Ring) -> None:
        """Serve every available chain, with notification suppression."""
        vq = ring.vq
        while True:
            vq.disable_notification()
            served = self._serve_available(ring)
            vq.enable_notification()
            # A chain made available after the last pop but before notifications
            # were re-enabled would otherwise wait for the next kick.
            if not served or not self._serve_available(ring):
                break
        vq.notify_if_needed()

    def _serve_available(self, ring: _Ring) -> int:
        vq = ring.vq
        served = 0
        while True:
            try:
                chain = vq.pop(salvage=_SALVAGE)
            except ChainError as e:
                log.error("queue %d: request %d refused: %s", vq.index, e.head, e.reason)
                if e.salvage is not None:
                    _fail_salvaged(vq.index, e.salvage)
                served += 1
                continue
            except QueueError as e:
                log.error("queue %d: ring unusable, queue stopped: %s", vq.index, e)
                ring.broken = True
                return served
            if chain is None:
                return served
            try:
                used = self.session.handle(chain)
            except Exception:
                log.exception("queue %d: request %d failed", vq.index, chain.head)
                used = 0
            chain.complete(min(used, chain.writable_len))
            served += 1
            if served % 64 == 0:
                vq.notify_if_needed()


#: Ask the queue for the FUSE headers of a chain refused only because some of
#: its buffers lie outside guest memory or the window (see _fail_salvaged).
_SALVAGE = (abi.IN_HEADER.size, abi.OUT_HEADER.size)
_NO_REPLY_OPCODES = frozenset({abi.Opcode.FORGET, abi.Opcode.BATCH_FORGET, abi.Opcode.INTERRUPT})


def _fail_salvaged(queue: int, chain: Chain) -> None:
    """Answer a request refused for its buffer addresses with ``-EIO``.

    The Linux virtio-fs driver ignores the used length and parses the reply
    header in the first writable buffer: completing with 0 would leave the
    guest reading a zero header (error 0) and handing unwritten buffers to
    the application as data.  ``chain`` holds only the request's fuse_in_header
    and the reply header slot, both inside the mapped memory; it is completed
    exactly once here.
    """
    used = 0
    try:
        hdr = abi.IN_HEADER.decode(chain.read(0, abi.IN_HEADER.size))
        if hdr.opcode not in _NO_REPLY_OPCODES:
            size = abi.OUT_HEADER.size
            chain.write(abi.OUT_HEADER.encode(abi.OutHeader(size, -errno.EIO, hdr.unique)))
            used = size
            log.error(
                "queue %d: request %d (unique %d) answered EIO", queue, chain.head, hdr.unique
            )
    except Exception:
        log.exception("queue %d: request %d: cannot write an error reply", queue, chain.head)
        used = 0
    finally:
        if not chain.completed:
            chain.complete(used)
