"""The guest<->host swiotlb window contract, host side (see DESIGN.md).

Three DMA modes, selectable everywhere (harness API, ``make run``, bench):

- ``off``: no VIRTIO_F_ACCESS_PLATFORM, the guest hands out guest-physical
  addresses directly (plain virtio-fs);
- ``shared``: ``iommu_platform=on`` and the guest's ``swiotlb=force``: every
  device bounces through the one global pool (the "before");
- ``per-device``: the guest boots with ``virtio_swiotlb=<size>`` and reserves a
  range below 4 GB; the host gives each device its own window inside it.

Per-device flow for one device, in this order: read the range -> allocate a
window (``pyvirtiofsd.dma.WindowAllocator``) -> write the assignment into the
guest -> start the backend with ``--swiotlb 0x<base>,<size>`` -> QMP
``device_add ...,iommu_platform=on,addr=<slot>`` -> read the device's sysfs
files back and fail loudly on a mismatch -> mount. Unplug frees the window on
both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvirtiofsd.dma import Window, WindowAllocator

from .agent import GuestAgent

if TYPE_CHECKING:
    from .machine import Machine
    from .shares import Share

DMA_MODES = ("off", "shared", "per-device")
DRIVER_SYSFS = "/sys/bus/pci/drivers/virtio-pci"
DEFAULT_RANGE = 64 << 20  # virtio_swiotlb= reserved at boot
DEFAULT_WINDOW = 16 << 20  # one device's window


class SwiotlbError(RuntimeError):
    """The guest and the host disagree about a window, or the guest refused one."""


def kernel_args(mode: str, range_size: int = DEFAULT_RANGE) -> tuple[str, ...]:
    if mode == "off":
        return ()
    if mode == "shared":
        return ("swiotlb=force",)
    if mode == "per-device":
        return (f"virtio_swiotlb={range_size}",)
    raise ValueError(f"unknown DMA mode {mode!r}; choose from {', '.join(DMA_MODES)}")


def bdf(slot: int) -> str:
    """PCI address of a device in ``slot`` of the root bus."""
    if not 0 < slot < 32:
        raise ValueError(f"PCI slot {slot} out of range 1..31")
    return f"0000:00:{slot:02x}.0"


def _read(agent: GuestAgent, path: str) -> str:
    return agent.read_file(path).decode().strip()


def read_range(agent: GuestAgent) -> tuple[int, int]:
    """The range the guest reserved at boot: (base, size)."""
    try:
        base = int(_read(agent, f"{DRIVER_SYSFS}/swiotlb_base"), 16)
        size = int(_read(agent, f"{DRIVER_SYSFS}/swiotlb_size"), 0)
    except (OSError, ValueError) as e:
        raise SwiotlbError(
            f"the guest publishes no virtio swiotlb range ({e}); "
            "was it booted with virtio_swiotlb=<size> on a patched kernel?"
        ) from e
    if size == 0:
        raise SwiotlbError("the guest reserved no virtio swiotlb range (size 0)")
    return base, size


def write_assignment(agent: GuestAgent, line: str) -> None:
    r = agent.run(f"echo '{line}' > {DRIVER_SYSFS}/swiotlb_assign")
    if r.status != 0:
        why = r.stderr.decode(errors="replace").strip()
        raise SwiotlbError(f"guest refused swiotlb assignment {line!r}: {why}")


def device_window(agent: GuestAgent, address: str) -> tuple[int, int]:
    """The window the guest gave the device at ``address``, from its sysfs files."""
    base = int(_read(agent, f"/sys/bus/pci/devices/{address}/swiotlb_base"), 16)
    size = int(_read(agent, f"/sys/bus/pci/devices/{address}/swiotlb_size"), 0)
    return base, size


@dataclass
class Attached:
    device_id: str
    address: str
    window: Window
    share: Share | None


class PerDeviceDma:
    """Host side of per-device windows for one running guest."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        base, size = read_range(vm.agent)
        self.allocator = WindowAllocator(base, size)
        self.devices: dict[str, Attached] = {}

    def _assign(self, slot: int, size: int) -> tuple[str, Window]:
        address = bdf(slot)
        window = self.allocator.allocate(address, size)
        try:
            write_assignment(self.vm.agent, window.assign_line())
        except BaseException:
            self.allocator.free(address)
            raise
        return address, window

    def _check(self, address: str, window: Window) -> None:
        got = device_window(self.vm.agent, address)
        if got != (window.base, window.size):
            raise SwiotlbError(
                f"{address}: the guest reports window {got[0]:#x}+{got[1]:#x}, "
                f"the host assigned {window.base:#x}+{window.size:#x}"
            )

    def attach_share(self, share: Share, device_id: str, slot: int,
                     size: int = DEFAULT_WINDOW) -> Attached:  # fmt: skip
        """The full per-device flow for one virtio-fs share."""
        from dataclasses import replace

        address, window = self._assign(slot, size)
        try:
            strict = replace(
                share,
                addr=slot,
                iommu_platform=True,
                daemon_args=(*share.daemon_args, "--swiotlb", window.swiotlb_arg()),
            )
            self.vm.hotplug(strict, device_id, mount=False)
            self.vm.wait_for_virtio(address)
            self._check(address, window)
            self.vm.mount_when_ready(strict)
        except BaseException:
            self.allocator.free(address)
            raise
        att = Attached(device_id, address, window, strict)
        self.devices[device_id] = att
        return att

    def attach_net(self, device_id: str, slot: int, netdev: str,
                   size: int = DEFAULT_WINDOW) -> Attached:  # fmt: skip
        """A QEMU virtio-net device (netdev must exist) with its own window."""
        address, window = self._assign(slot, size)
        try:
            self.vm.qmp_command(
                "device_add",
                driver="virtio-net-pci",
                id=device_id,
                netdev=netdev,
                addr=f"{slot:#x}",
                **{"disable-legacy": "on", "iommu_platform": True},
            )
            self.vm.wait_for_virtio(address)
            self._check(address, window)
        except BaseException:
            self.allocator.free(address)
            raise
        att = Attached(device_id, address, window, None)
        self.devices[device_id] = att
        return att

    def detach(self, device_id: str) -> None:
        """Unmount (shares), unplug, and free the window on both sides."""
        att = self.devices.pop(device_id)
        if att.share is not None:
            self.vm.agent.run(f"umount {att.share.guest_mountpoint}", check=True)
        self.vm.unplug(device_id, remove_chardev=att.share is not None)
        write_assignment(self.vm.agent, f"-{att.address}")
        self.allocator.free(att.address)
