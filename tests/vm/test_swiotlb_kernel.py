"""The guest kernel's per-device virtio swiotlb windows (kernel-config/<version>/patches).

The contract (DESIGN.md, "The swiotlb window contract"), guest side:

- ``virtio_swiotlb=<size>`` reserves one range below 4 GiB, published in
  ``/sys/bus/pci/drivers/virtio-pci/swiotlb_base`` ("0x<hex>") and
  ``swiotlb_size`` (decimal bytes); without it they read "0x0" and "0".
- ``swiotlb_assign`` takes "<BDF> <base> <size>" (base/size multiples of
  256 KiB, inside the range, no overlap, one window per BDF); "-<BDF>" or
  "<BDF> 0 0" removes one; reading lists them as written.
- A virtio-pci device probed at an assigned BDF bounces all its DMA (vrings
  included) through its own pool over exactly that window: debugfs
  ``swiotlb/virtio-<BDF>/{io_tlb_nslabs,io_tlb_used,io_tlb_used_hiwater}``
  and ``/sys/bus/pci/devices/<BDF>/swiotlb_{base,size}``.  Other devices keep
  the global pool (``swiotlb/io_tlb_*``, present with ``swiotlb=force``).

QEMU's virtio-9p-pci with ``iommu_platform=on`` stands in for a device
backend here: it is enough to exercise the guest side.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import time
from pathlib import Path

import pytest

from pyvirtiofsd.vm.machine import Machine, MachineConfig

DRV = "/sys/bus/pci/drivers/virtio-pci"
DBG = "/sys/kernel/debug/swiotlb"
MIB = 1024 * 1024
SEG = 256 * 1024  # IO_TLB_SEGSIZE * IO_TLB_SIZE
RANGE = 64 * MIB
WINDOW = 16 * MIB
NINEP = "trans=virtio,version=9p2000.L,msize=262144"


def sh(vm: Machine, cmd: str, timeout: float = 60) -> str:
    text: str = vm.agent.run(cmd, timeout=timeout, check=True).text
    return text


def read_int(vm: Machine, path: str) -> int:
    return int(sh(vm, f"cat {path}").strip(), 0)


def assign(vm: Machine, line: str) -> int:
    """Write one line to swiotlb_assign; the shell's exit status."""
    status: int = vm.agent.run(f"printf '%s\\n' {shlex.quote(line)} > {DRV}/swiotlb_assign").status
    return status


def plug_9p(vm: Machine, dev_id: str, fsdev: str, tag: str, slot: int) -> None:
    vm.qmp_command(
        "device_add",
        driver="virtio-9p-pci",
        id=dev_id,
        fsdev=fsdev,
        mount_tag=tag,
        addr=f"{slot:#x}",
        **{"disable-legacy": "on", "iommu_platform": "on"},
    )
    # ACPI hotplug is asynchronous: wait until 9p registered the tag.
    vm.wait_in_guest(
        f"grep -qx {tag} /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag",
        f"9p tag {tag} to register",
        timeout=60,
    )


def unplug(vm: Machine, dev_id: str, timeout: float = 60) -> None:
    """device_del and wait for QEMU to report that the guest let it go."""
    vm.qmp_command("device_del", id=dev_id)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no DEVICE_DELETED for {dev_id}"
        ev = vm.qmp.pull_event(wait=left)
        if ev and ev["event"] == "DEVICE_DELETED" and ev["data"].get("device") == dev_id:
            return


def mount_9p(vm: Machine, tag: str, where: str) -> None:
    sh(vm, f"mkdir -p {where} && mount -t 9p -o {NINEP} {tag} {where}")


def io_round_trip(vm: Machine, host_dir: Path, where: str, name: str) -> None:
    """Read a host file through the mount and write one back; check both."""
    payload = os.urandom(4 * MIB + 123)
    (host_dir / f"{name}.in").write_bytes(payload)
    got = sh(vm, f"sha256sum {where}/{name}.in").split()[0]
    assert got == hashlib.sha256(payload).hexdigest()
    guest_sum = sh(
        vm,
        f"dd if=/dev/urandom of=/tmp/{name}.out bs=1M count=3 2>/dev/null && "
        f"dd if=/tmp/{name}.out of={where}/{name}.out bs=1M 2>/dev/null && sync && "
        f"sha256sum /tmp/{name}.out",
    ).split()[0]
    written = (host_dir / f"{name}.out").read_bytes()
    assert len(written) == 3 * MIB
    assert hashlib.sha256(written).hexdigest() == guest_sum


@pytest.fixture
def two_dirs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "win", tmp_path / "glob"
    a.mkdir()
    b.mkdir()
    return a, b


def test_per_device_windows(two_dirs: tuple[Path, Path], no_leftover_processes: None) -> None:
    win_dir, glob_dir = two_dirs
    cfg = MachineConfig(
        kernel_args=(f"virtio_swiotlb={RANGE // MIB}M", "swiotlb=force"),
        extra_qemu_args=(
            "-fsdev", f"local,id=f1,path={win_dir},security_model=none",
            "-fsdev", f"local,id=f2,path={glob_dir},security_model=none",
        ),
    )  # fmt: skip
    with Machine(cfg, name="swiotlb-windows") as vm:
        # -- the range ---------------------------------------------------------
        base = read_int(vm, f"{DRV}/swiotlb_base")
        size = read_int(vm, f"{DRV}/swiotlb_size")
        assert sh(vm, f"cat {DRV}/swiotlb_base") == f"{base:#x}\n"
        assert size == RANGE
        assert base > 0 and base % SEG == 0 and base + size <= 1 << 32

        # -- assignments the kernel must refuse --------------------------------
        bad = [
            "garbage",
            "",
            f"0000:00:06.0 {base:#x}",  # no size
            f"0000:00:06.0 {base:#x} {WINDOW} extra",
            f"0000:00:20.0 {base:#x} {WINDOW}",  # slot > 0x1f
            f"0000:00:06.8 {base:#x} {WINDOW}",  # function > 7
            f"0000:00:06.0 {base:#x} 16M",  # size is decimal or 0x-hex bytes
            f"0000:00:06.0 zz {WINDOW}",
            f"0000:00:06.0 {base:#x} 0",  # empty
            f"0000:00:06.0 {base - SEG:#x} {WINDOW}",  # starts below the range
            f"0000:00:06.0 {base + size - SEG:#x} {2 * SEG}",  # ends past it
            f"0000:00:06.0 {base:#x} {size + SEG}",  # bigger than it
            f"0000:00:06.0 {base + 4096:#x} {WINDOW}",  # base not 256 KiB aligned
            f"0000:00:06.0 {base:#x} {WINDOW + 4096}",  # size not a 256 KiB multiple
            f"0000:00:06.0 {base:#x} {SEG // 2}",
            "-0000:00:09.0",  # removing what is not there
        ]
        for line in bad:
            assert assign(vm, line) != 0, f"accepted {line!r}"
        assert sh(vm, f"cat {DRV}/swiotlb_assign") == ""

        # -- a valid one, then overlap / duplicate / removal --------------------
        assert assign(vm, f"0000:00:06.0 {base:#x} {WINDOW}") == 0
        assert assign(vm, f"0000:00:07.0 {base + WINDOW - SEG:#x} {WINDOW}") != 0  # overlap
        assert assign(vm, f"0000:00:06.0 {base + WINDOW:#x} {WINDOW}") != 0  # same BDF
        assert assign(vm, f"0000:00:08.0 {base + 2 * WINDOW:#x} {WINDOW:#x}") == 0
        assert sh(vm, f"cat {DRV}/swiotlb_assign") == (
            f"0000:00:06.0 {base:#x} {WINDOW}\n0000:00:08.0 {base + 2 * WINDOW:#x} {WINDOW}\n"
        )
        assert assign(vm, "-0000:00:08.0") == 0
        assert assign(vm, f"0000:00:08.0 {(base + 2 * WINDOW):x} {WINDOW}") == 0  # 0x optional
        assert assign(vm, "0000:00:08.0 0 0") == 0
        assert sh(vm, f"cat {DRV}/swiotlb_assign") == f"0000:00:06.0 {base:#x} {WINDOW}\n"

        # -- a device at the assigned address gets its own pool ----------------
        pool = f"{DBG}/virtio-0000:00:06.0"
        plug_9p(vm, "p1", "f1", "win", 0x6)
        dev = "/sys/bus/pci/devices/0000:00:06.0"
        assert sh(vm, f"cat {dev}/swiotlb_base") == f"{base:#x}\n"
        assert read_int(vm, f"{dev}/swiotlb_size") == WINDOW
        assert read_int(vm, f"{pool}/io_tlb_nslabs") == WINDOW // 2048
        assert read_int(vm, f"{pool}/io_tlb_used") > 0  # the vring lives in the window
        sh(vm, f"echo 0 > {DBG}/io_tlb_used_hiwater")
        global_used = read_int(vm, f"{DBG}/io_tlb_used")
        mount_9p(vm, "win", "/mnt/win")
        io_round_trip(vm, win_dir, "/mnt/win", "a")
        assert read_int(vm, f"{pool}/io_tlb_used_hiwater") > 0
        assert read_int(vm, f"{DBG}/io_tlb_used_hiwater") == 0  # the global pool: untouched
        assert read_int(vm, f"{DBG}/io_tlb_used") == global_used

        # -- a device without a window bounces through the global pool ---------
        plug_9p(vm, "p2", "f2", "glob", 0x7)
        assert vm.agent.run("test -e /sys/bus/pci/devices/0000:00:07.0/swiotlb_base").status != 0
        assert vm.agent.run(f"test -e {DBG}/virtio-0000:00:07.0").status != 0
        sh(vm, f"echo 0 > {pool}/io_tlb_used_hiwater")
        mount_9p(vm, "glob", "/mnt/glob")
        io_round_trip(vm, glob_dir, "/mnt/glob", "b")
        assert read_int(vm, f"{DBG}/io_tlb_used_hiwater") > 0
        # the window's pool saw nothing of that beyond its idle vring
        assert read_int(vm, f"{pool}/io_tlb_used_hiwater") <= read_int(vm, f"{pool}/io_tlb_used")

        # -- a window in use cannot be taken away ------------------------------
        assert assign(vm, "-0000:00:06.0") != 0

        # -- unplug releases the pool, keeps the assignment; re-plug works ----
        sh(vm, "umount /mnt/win")
        unplug(vm, "p1")
        assert vm.agent.run(f"test -e {dev}").status != 0
        assert vm.agent.run(f"test -e {pool}").status != 0
        assert sh(vm, f"cat {DRV}/swiotlb_assign") == f"0000:00:06.0 {base:#x} {WINDOW}\n"
        plug_9p(vm, "p1b", "f1", "win", 0x6)
        assert sh(vm, f"cat {dev}/swiotlb_base") == f"{base:#x}\n"
        mount_9p(vm, "win", "/mnt/win")
        sh(vm, f"echo 0 > {DBG}/io_tlb_used_hiwater")
        io_round_trip(vm, win_dir, "/mnt/win", "c")
        assert read_int(vm, f"{pool}/io_tlb_used_hiwater") > 0
        assert read_int(vm, f"{DBG}/io_tlb_used_hiwater") == 0

        # -- after unplug the assignment can go, and the range is free again ---
        sh(vm, "umount /mnt/win")
        unplug(vm, "p1b")
        assert assign(vm, "-0000:00:06.0") == 0
        assert assign(vm, f"0000:00:05.0 {base:#x} {size}") == 0  # the whole range
        assert "swiotlb buffer is full" not in sh(vm, "dmesg")


def test_without_parameter_nothing_changes(share_dir: Path, no_leftover_processes: None) -> None:
    cfg = MachineConfig(
        extra_qemu_args=(
            "-fsdev", f"local,id=f1,path={share_dir},security_model=none",
            "-device", "virtio-9p-pci,id=p1,fsdev=f1,mount_tag=plain,addr=0x6,"
                       "disable-legacy=on,iommu_platform=on",
        ),
    )  # fmt: skip
    with Machine(cfg, name="swiotlb-none") as vm:
        assert sh(vm, f"cat {DRV}/swiotlb_base") == "0x0\n"
        assert sh(vm, f"cat {DRV}/swiotlb_size") == "0\n"
        assert sh(vm, f"cat {DRV}/swiotlb_assign") == ""
        assert assign(vm, "0000:00:06.0 0x4000000 16777216") != 0
        assert vm.agent.run("test -e /sys/bus/pci/devices/0000:00:06.0/swiotlb_base").status != 0
        assert sh(vm, f"ls {DBG}") == ""  # no global pool (1 GiB guest), no device pools
        mount_9p(vm, "plain", "/mnt/plain")
        io_round_trip(vm, share_dir, "/mnt/plain", "p")


def test_invalid_parameter_is_ignored(no_leftover_processes: None) -> None:
    with Machine(MachineConfig(kernel_args=("virtio_swiotlb=64Mjunk",)), name="swiotlb-bad") as vm:
        assert sh(vm, f"cat {DRV}/swiotlb_size") == "0\n"
        assert "ignoring invalid virtio_swiotlb=64Mjunk" in sh(vm, "dmesg")
