"""Per-device swiotlb windows end to end: pyvirtiofsd shares and a virtio-net
device, each with its own window, proven from the guest's own counters; the
same data-integrity workload in all three DMA modes."""

from __future__ import annotations

import hashlib
import itertools
import os
from pathlib import Path

import pytest

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.shares import Share

DBG = "/sys/kernel/debug/swiotlb"
NETDEV = ("-netdev", "user,id=n0,restrict=on")  # no route anywhere: loopback-only user net


def counters(vm: Machine, bdf: str | None) -> tuple[int, int]:
    """(used, high-water) slabs of a device's pool, or of the global pool."""
    d = f"{DBG}/virtio-{bdf}" if bdf else DBG
    used = int(vm.agent.read_file(f"{d}/io_tlb_used").decode())
    hiwater = int(vm.agent.read_file(f"{d}/io_tlb_used_hiwater").decode())
    return used, hiwater


def reset_hiwater(vm: Machine, bdf: str | None) -> None:
    d = f"{DBG}/virtio-{bdf}" if bdf else DBG
    vm.agent.run(f"echo 0 > {d}/io_tlb_used_hiwater", check=True)


def load(vm: Machine, tag: str, host_dir: Path) -> None:
    """Write 8 MiB through a share and read a 4 MiB file the guest never saw
    (cold, so it crosses the device); both checked against the host.

    No drop_caches or sync: they send FORGET/SYNCFS to every FUSE mount, i.e.
    DMA on the other devices too; fsync touches only this file."""
    m = f"/mnt/{tag}"
    cold = os.urandom(4 << 20)
    name = f"cold-{os.urandom(4).hex()}.bin"
    (host_dir / name).write_bytes(cold)
    r = vm.agent.run(
        f"dd if=/dev/urandom of={m}/load.bin bs=1M count=8 conv=fsync 2>/dev/null && "
        f"sha256sum {m}/load.bin {m}/{name}",
        timeout=300,
        check=True,
    )
    sums = [line.split()[0] for line in r.text.splitlines()]
    assert sums[0] == hashlib.sha256((host_dir / "load.bin").read_bytes()).hexdigest()
    assert sums[1] == hashlib.sha256(cold).hexdigest()


def test_each_device_bounces_through_its_own_window(
    tmp_path: Path, no_leftover_processes: None
) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    shares = [
        Share(dirs[0], "a", backend="pyvirtiofsd", addr=0x8),
        Share(dirs[1], "b", backend="pyvirtiofsd", addr=0x9),
    ]
    cfg = MachineConfig(
        shares=shares,
        dma_mode="per-device",
        # swiotlb=force creates the global pool too, so its counters can be watched
        kernel_args=("swiotlb=force",),
        extra_qemu_args=NETDEV,
    )
    with Machine(cfg, name="per-device") as vm:
        assert vm.dma is not None
        att = {a.share.tag: a for a in vm.dma.devices.values() if a.share is not None}
        assert {att["a"].address, att["b"].address} == {"0000:00:08.0", "0000:00:09.0"}
        net = vm.attach_net_window("net0", 0xA, "n0")
        windows = [att["a"].window, att["b"].window, net.window]
        # disjoint windows, inside the guest's range, as the guest reports them
        spans = sorted((w.base, w.base + w.size) for w in windows)
        assert all(e1 <= s2 for (_, e1), (s2, _) in itertools.pairwise(spans))
        daemons = {d.share.tag: d for d in vm.daemons}
        for tag in ("a", "b"):
            text = daemons[tag].process.log_path.read_text()
            # the daemon maps only its window of guest RAM
            assert f"mapped {att[tag].window.size} bytes" in text
        bdfs = {"a": att["a"].address, "b": att["b"].address, "net": net.address}

        def snapshot() -> dict[str, tuple[int, int]]:
            snap = {k: counters(vm, b) for k, b in bdfs.items()}
            snap["global"] = counters(vm, None)
            return snap

        for tag in ("a", "b"):
            for b in [*bdfs.values(), None]:
                reset_hiwater(vm, b)
            before = snapshot()
            load(vm, tag, tmp_path / tag)
            after = snapshot()
            # the loaded device's pool grew beyond its resting use (the vrings)...
            assert after[tag][1] > before[tag][0], (tag, before, after)
            # ...and no other pool did: not the other share's, not the NIC's,
            # not the global pool (high-water was reset to 0 before the load)
            for other in {"a", "b", "net", "global"} - {tag}:
                assert after[other][1] <= before[other][0], (tag, other, before, after)
        # the NIC's own pool moves when the NIC is used
        reset_hiwater(vm, net.address)
        idle = counters(vm, net.address)
        vm.agent.run("ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0", check=True)
        vm.agent.run("ping -c 3 -W 1 10.0.2.2 >/dev/null 2>&1; true", timeout=30)
        assert counters(vm, net.address)[1] > idle[0]

        # hot-unplug frees the window on both sides; the slot and window are reusable
        a_window = att["a"].window
        vm.detach_window_device(att["a"].device_id)
        assert vm.dma.allocator.get("0000:00:08.0") is None
        assigned = vm.agent.read_file("/sys/bus/pci/drivers/virtio-pci/swiotlb_assign").decode()
        assert "0000:00:08.0" not in assigned
        again = vm.attach_share_window(shares[0], "fs-again", 0x8)
        assert again.window == a_window
        load(vm, "a", tmp_path / "a")


@pytest.mark.parametrize("mode", ["off", "shared", "per-device"])
def test_data_integrity_in_every_dma_mode(
    tmp_path: Path, mode: str, no_leftover_processes: None
) -> None:
    root = tmp_path / "s"
    root.mkdir()
    payload = os.urandom(5 * 1024 * 1024 + 3)
    (root / "in.bin").write_bytes(payload)
    share = Share(root, "s", backend="pyvirtiofsd")
    with Machine(MachineConfig(shares=[share], dma_mode=mode), name=f"dma-{mode}") as vm:
        cmdline = vm.agent.read_file("/proc/cmdline").decode()
        assert ("swiotlb=force" in cmdline) == (mode == "shared")
        assert ("virtio_swiotlb=" in cmdline) == (mode == "per-device")
        r = vm.agent.run("sha256sum /mnt/s/in.bin", check=True)
        assert r.text.split()[0] == hashlib.sha256(payload).hexdigest()
        load(vm, "s", root)
