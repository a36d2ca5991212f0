"""pyvirtiofsd serving a real guest: mount, list, read, checksums match the host."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.process import pid_exists
from pyvirtiofsd.vm.shares import Share

SIZES = {"empty": 0, "one": 1, "page": 4096, "mib_plus_one": (1 << 20) + 1, "big": 64 << 20}


def make_tree(root: Path) -> dict[str, str]:
    """Nested directories and files of the sizes the issue names; returns rel path -> sha256."""
    sums: dict[str, str] = {}
    for i, (name, size) in enumerate(SIZES.items()):
        d = root / f"d{i}" / "nested" / "deeper" if i % 2 else root / f"d{i}"
        d.mkdir(parents=True, exist_ok=True)
        data = os.urandom(size)
        (d / f"{name}.bin").write_bytes(data)
        sums[str((d / f"{name}.bin").relative_to(root))] = hashlib.sha256(data).hexdigest()
    (root / "empty-dir").mkdir()
    os.symlink("d0/empty.bin", root / "link")
    return sums


def guest_sums(vm: Machine, mount: str) -> dict[str, str]:
    out = vm.agent.run(
        f"cd {mount} && find . -type f | sort | xargs sha256sum", timeout=600, check=True
    ).text
    sums = {}
    for line in out.splitlines():
        digest, path = line.split(maxsplit=1)
        sums[path.removeprefix("./")] = digest
    return sums


@pytest.mark.parametrize(
    ("variant", "share_kw", "kernel_args"),
    [
        ("plain", {}, ()),
        ("iommu-swiotlb-force", {"iommu_platform": True}, ("swiotlb=force",)),
        (
            "two-request-queues",
            {"num_request_queues": 2, "daemon_args": ("--log-level", "debug")},
            (),
        ),
    ],
)
def test_guest_reads_share(
    tmp_path: Path,
    no_leftover_processes: None,
    variant: str,
    share_kw: dict[str, object],
    kernel_args: tuple[str, ...],
) -> None:
    root = tmp_path / "share"
    root.mkdir()
    host = make_tree(root)
    share = Share(root, "pyfs", backend="pyvirtiofsd", **share_kw)  # type: ignore[arg-type]
    cfg = MachineConfig(shares=[share], kernel_args=kernel_args)
    with Machine(cfg, name=f"pyvirtiofsd-{variant}") as vm:
        mounts = vm.agent.run("cat /proc/mounts", check=True).text
        assert "pyfs /mnt/pyfs virtiofs" in mounts
        if kernel_args:
            cmdline = vm.agent.read_file("/proc/cmdline").decode()
            assert "swiotlb=force" in cmdline
        # directory listing: every directory and file, nested
        listing = vm.agent.run("cd /mnt/pyfs && find . | sort", check=True).text.split()
        expected = sorted(["."] + ["./" + str(p.relative_to(root)) for p in root.rglob("*")])
        assert listing == expected
        assert vm.agent.run("readlink /mnt/pyfs/link", check=True).text.strip() == "d0/empty.bin"
        sizes = vm.agent.run("stat -c '%s %n' /mnt/pyfs/d4/big.bin", check=True).text.split()
        assert sizes[0] == str(SIZES["big"])
        assert guest_sums(vm, "/mnt/pyfs") == host
        pids = vm.pids()
        daemon_log = vm.daemons[0].process.log_path
    if variant == "two-request-queues":
        # QEMU started hiprio + both request queues, each with its own runner
        text = daemon_log.read_text()
        for q in range(3):
            assert f"queue {q}: runner started" in text
    assert not any(pid_exists(p) for p in pids)


def test_hotplug_and_unplug_a_share(tmp_path: Path, no_leftover_processes: None) -> None:
    root = tmp_path / "hot"
    root.mkdir()
    (root / "f").write_bytes(b"hot-plugged\n")
    with Machine(MachineConfig(), name="hotplug") as vm:
        share = Share(root, "hot", backend="pyvirtiofsd", addr=0x6, iommu_platform=True)
        daemon = vm.hotplug(share, "hot0")
        assert vm.agent.run("cat /mnt/hot/f", check=True).stdout == b"hot-plugged\n"
        slots = vm.agent.run("ls /sys/bus/pci/devices", check=True).text.split()
        assert "0000:00:06.0" in slots
        vm.agent.run("umount /mnt/hot", check=True)
        vm.unplug("hot0")
        slots = vm.agent.run("ls /sys/bus/pci/devices", check=True).text.split()
        assert "0000:00:06.0" not in slots
        # the backend sees the front-end go away and exits by itself
        assert daemon.process.wait(30) == 0
        # and the slot can be used again
        vm.hotplug(Share(root, "hot", backend="pyvirtiofsd", addr=0x6), "hot1")
        assert vm.agent.run("cat /mnt/hot/f", check=True).stdout == b"hot-plugged\n"
