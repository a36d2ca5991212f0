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
both sides. This module holds the contract's steps (``PerDeviceDma``); the
flow itself is ``Machine.attach_share_window`` / ``attach_net_window`` /
``detach_window_device``, the one place that also drives QEMU and daemons.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvirtiofsd.dma import Window, WindowAllocator, WindowError

from .agent import GuestAgent
from .errors import VmError

if TYPE_CHECKING:
    from .shares import Share

DMA_MODES = ("off", "shared", "per-device")
DRIVER_SYSFS = "/sys/bus/pci/drivers/virtio-pci"
DEFAULT_RANGE = 64 << 20  # virtio_swiotlb= reserved at boot
DEFAULT_WINDOW = 16 << 20  # one device's window


class SwiotlbError(VmError):
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


def assignment_command(line: str) -> str:
    """The guest shell command writing ``line`` to ``swiotlb_assign``."""
    return f"printf '%s\\n' {shlex.quote(line)} > {DRIVER_SYSFS}/swiotlb_assign"


def write_assignment(agent: GuestAgent, line: str) -> None:
    r = agent.run(assignment_command(line))
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
    """The window table of one running guest, host side.

    It speaks the guest's sysfs contract through the agent (assign, verify,
    release) and keeps the host's allocator and the devices holding windows;
    it knows nothing of QEMU or daemons. ``Machine`` runs the per-device flow
    (``attach_share_window``, ``attach_net_window``, ``detach_window_device``)
    around these steps.
    """

    def __init__(self, agent: GuestAgent) -> None:
        self.agent = agent
        base, size = read_range(agent)
        try:
            self.allocator = WindowAllocator(base, size)
        except WindowError as e:
            raise SwiotlbError(f"the guest's range {base:#x}+{size:#x} is unusable: {e}") from e
        self.devices: dict[str, Attached] = {}

    def assign(self, slot: int, size: int) -> tuple[str, Window]:
        """Allocate a window for the device in ``slot`` and tell the guest."""
        address = bdf(slot)
        try:
            window = self.allocator.allocate(address, size)
        except WindowError as e:
            raise SwiotlbError(f"no {size:#x}-byte window for {address}: {e}") from e
        try:
            write_assignment(self.agent, window.assign_line())
        except BaseException:
            self.allocator.free(address)
            raise
        return address, window

    def verify(self, address: str, window: Window) -> None:
        """Fail loudly unless the guest gave the device at ``address`` ``window``."""
        try:
            got = device_window(self.agent, address)
        except (OSError, ValueError) as e:
            raise SwiotlbError(f"{address}: the guest reports no window ({e})") from e
        if got != (window.base, window.size):
            raise SwiotlbError(
                f"{address}: the guest reports window {got[0]:#x}+{got[1]:#x}, "
                f"the host assigned {window.base:#x}+{window.size:#x}"
            )

    def record(self, att: Attached) -> None:
        self.devices[att.device_id] = att

    def abandon(self, address: str) -> None:
        """Undo ``assign`` after a failed plug: free the host side, and the
        guest's assignment unless a device still holds it."""
        self.allocator.free(address)
        self.agent.run(assignment_command(f"-{address}"))

    def release(self, device_id: str) -> Attached:
        """Forget an unplugged device: remove its assignment, free its window."""
        att = self.devices.pop(device_id)
        write_assignment(self.agent, f"-{att.address}")
        self.allocator.free(att.address)
        return att
