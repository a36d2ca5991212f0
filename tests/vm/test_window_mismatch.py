"""The device is held to its window: a daemon whose --swiotlb window does not
match the guest's assignment refuses what lies outside, logs why, keeps
running, and the guest gets errors, never wrong data."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pyvirtiofsd.dma import Window
from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.shares import Share

SEG = 256 * 1024


def start_mismatched(vm: Machine, root: Path, daemon_window: Window) -> tuple[str, Share]:
    """Assign the guest a 16 MiB window at slot 8 but give the daemon another."""
    assert vm.dma is not None
    address, _guest_window = vm.dma.assign(8, 16 << 20)
    share = Share(
        root,
        "mm",
        backend="pyvirtiofsd",
        addr=8,
        iommu_platform=True,
        daemon_args=("--swiotlb", daemon_window.swiotlb_arg()),
    )
    vm.hotplug(share, "mm0", mount=False)
    vm.wait_for_virtio(address)
    return address, share


def test_buffers_outside_the_daemons_window_fail_with_an_error(
    tmp_path: Path, no_leftover_processes: None
) -> None:
    root = tmp_path / "s"
    root.mkdir()
    data = os.urandom(4 << 20)
    (root / "big.bin").write_bytes(data)
    (root / "small").write_bytes(b"ok\n")
    with Machine(MachineConfig(dma_mode="per-device"), name="mismatch-buffers") as vm:
        assert vm.dma is not None
        base = vm.dma.allocator.base
        # the daemon sees only the first 512 KiB of the guest's 16 MiB window:
        # the vrings (allocated first) fit, most bounce buffers do not
        _address, share = start_mismatched(vm, root, Window("x", base, 2 * SEG))
        vm.mount_when_ready(share)
        r = vm.agent.run("dd if=/mnt/mm/big.bin of=/tmp/out bs=1M 2>&1; echo rc=$?", timeout=120)
        ok = r.text.strip().endswith("rc=0")
        if ok:  # whatever got through must be the real data, never zeros
            got = vm.agent.run("sha256sum /tmp/out", check=True).text.split()[0]
            assert got == hashlib.sha256(data).hexdigest()
        else:
            assert "error" in r.text.lower()
        daemon = vm.daemons[-1]
        assert daemon.process.alive()
        log = daemon.process.log_path.read_text()
        assert "outside" in log and "window" in log
        assert not ok, "a 4 MiB read cannot fit in 512 KiB of window: it must fail"


def test_rings_outside_the_daemons_window_are_refused(
    tmp_path: Path, no_leftover_processes: None
) -> None:
    root = tmp_path / "s"
    root.mkdir()
    with Machine(MachineConfig(dma_mode="per-device"), name="mismatch-rings") as vm:
        assert vm.dma is not None
        base = vm.dma.allocator.base
        # a window far from the guest's one: the rings are out of reach
        address, _share = start_mismatched(vm, root, Window("x", base + (32 << 20), 16 << 20))
        daemon = vm.daemons[-1]
        log_path = daemon.process.log_path
        # QEMU starts the vhost rings while handling the guest's DRIVER_OK write,
        # synchronously (REPLY_ACK): once the guest sees DRIVER_OK set, the
        # daemon has answered (and logged) the ring set-up.
        status = f"/sys/bus/pci/devices/{address}/virtio*/status"
        vm.wait_in_guest(
            f"s=$(cat {status}); [ $((s & 4)) -ne 0 ]", "the guest driver to set DRIVER_OK"
        )
        assert daemon.process.alive()
        assert vm.status() == "running"
        log = log_path.read_text()
        assert "ring outside the swiotlb window" in log
        assert "mapped 16777216 bytes" in log
