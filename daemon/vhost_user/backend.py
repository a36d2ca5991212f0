"""The device interface the vhost-user handler drives.

The handler (``handler.py``) parses and validates every message, keeps all
protocol state -- the vrings' sizes, addresses, bases and enable state
included -- and only then calls one of these methods with typed values: a
device never sees bytes, never sees an out-of-range vring index, and never
sees a feature bit that was not offered.  A device is told when a ring
starts (:meth:`VhostUserDevice.start_vring`, with everything it needs) and
when it stops (:meth:`VhostUserDevice.stop_vring`, which reports where it
got to); it keeps only what it needs to serve the ring meanwhile (the
model is rust-vmm's ``VhostUserBackend``).

File descriptor ownership:

* ``set_mem_table`` / ``add_mem_region``: the device does **not** own the fds;
  it must ``mmap`` (or ``dup``) what it needs during the call.  The handler
  closes them after the call returns (or raises).
* ``set_vring_kick`` / ``set_vring_call`` / ``set_vring_err`` /
  ``set_backend_req_fd``: the device owns the fd **once the call returns
  normally**; it must close it when it is replaced, on ``reset()`` and when
  it stops needing it.  If the method raises, the handler closes the fd, so a
  device that raises must not keep (or close) it.

A device refuses a request by raising :class:`~.errors.DeviceError`; the
handler logs it, sends a failed REPLY_ACK when one was asked for, and keeps
serving.  Any other exception is treated the same way (and logged with its
traceback), so a device bug does not take the daemon down.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .errors import DeviceError
from .messages import MemoryRegionDesc, ProtocolFeature, VringAddr, protocol_feature_mask

__all__ = ["VhostUserDevice", "VhostUserDeviceBase", "VringConfig"]


@dataclass(frozen=True, slots=True)
class VringConfig:
    """What a device needs to serve one ring, from the handler's vring state."""

    index: int
    num: int  #: queue size (SET_VRING_NUM)
    addr: VringAddr  #: ring addresses in the front-end's virtual address space
    base: int  #: first avail index to serve (SET_VRING_BASE, or where it last stopped)


@runtime_checkable
class VhostUserDevice(Protocol):
    """What the vhost-user handler needs from a device (rust-vmm ``VhostUserBackend``-like)."""

    def num_queues(self) -> int:
        """Total queues (virtio-fs: 1 hiprio + N request queues)."""
        ...

    def max_queue_size(self) -> int:
        """Largest ring size accepted by SET_VRING_NUM (e.g. 1024)."""
        ...

    def features(self) -> int:
        """Virtio feature bits offered (VERSION_1, ACCESS_PLATFORM, ...).

        The handler adds ``VHOST_USER_F_PROTOCOL_FEATURES`` (bit 30) itself.
        """
        ...

    def protocol_features(self) -> int:
        """Protocol features the device supports; the handler offers these ANDed
        with the ones it implements itself."""
        ...

    def set_features(self, acked: int) -> None:
        """Virtio feature bits acked by the driver (bit 30 removed)."""
        ...

    def set_mem_table(self, regions: list[tuple[int, MemoryRegionDesc]]) -> None:
        """Replace the whole memory table with these (fd, region) pairs."""
        ...

    def add_mem_region(self, fd: int, region: MemoryRegionDesc) -> None:
        """Add one region (CONFIGURE_MEM_SLOTS)."""
        ...

    def remove_mem_region(self, region: MemoryRegionDesc) -> None:
        """Remove one region, as it was added (the handler looked it up)."""
        ...

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """The ring's kick eventfd (``None``: no fd, the ring must be polled).

        Only ever sent while the ring is stopped; the next start uses it.
        """
        ...

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """The call eventfd; may replace the one of a running ring."""
        ...

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """The eventfd a device signals when it cannot go on serving the ring."""
        ...

    def start_vring(self, config: VringConfig) -> None:
        """Serve the ring from ``config.base`` on (raise DeviceError to refuse)."""
        ...

    def stop_vring(self, index: int) -> int:
        """Stop serving the ring; returns the next avail index it would have served."""
        ...

    def set_backend_req_fd(self, fd: int) -> None: ...

    def set_status(self, status: int) -> None: ...

    def get_status(self) -> int: ...

    def reset(self) -> None:
        """RESET_OWNER / RESET_DEVICE / front-end gone: release everything
        (mappings, owned fds, ring state)."""
        ...


class VhostUserDeviceBase:
    """Defaults for the optional operations; subclass and override what you support.

    The required ones (queues, features, memory table, vring setup, reset)
    raise :class:`NotImplementedError`; the optional ones answer "unsupported"
    with :class:`DeviceError`, except ``set_vring_err``, which QEMU always
    sends and which a device may ignore (the fd is closed).
    """

    def num_queues(self) -> int:
        raise NotImplementedError

    def max_queue_size(self) -> int:
        return 1024

    def features(self) -> int:
        raise NotImplementedError

    def protocol_features(self) -> int:
        return protocol_feature_mask(ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK)

    def set_features(self, acked: int) -> None:
        raise NotImplementedError

    def set_mem_table(self, regions: list[tuple[int, MemoryRegionDesc]]) -> None:
        raise NotImplementedError

    def add_mem_region(self, fd: int, region: MemoryRegionDesc) -> None:
        raise DeviceError("ADD_MEM_REG is not supported by this device")

    def remove_mem_region(self, region: MemoryRegionDesc) -> None:
        raise DeviceError("REM_MEM_REG is not supported by this device")

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        raise NotImplementedError

    def set_vring_call(self, index: int, fd: int | None) -> None:
        raise NotImplementedError

    def set_vring_err(self, index: int, fd: int | None) -> None:
        if fd is not None:
            os.close(fd)

    def start_vring(self, config: VringConfig) -> None:
        raise NotImplementedError

    def stop_vring(self, index: int) -> int:
        raise NotImplementedError

    def set_backend_req_fd(self, fd: int) -> None:
        raise DeviceError("the backend request channel is not supported by this device")

    def set_status(self, status: int) -> None:
        raise DeviceError("SET_STATUS is not supported by this device")

    def get_status(self) -> int:
        raise DeviceError("GET_STATUS is not supported by this device")

    def reset(self) -> None:
        raise NotImplementedError
