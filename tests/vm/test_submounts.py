"""--announce-submounts: a host mount point inside the share is its own
filesystem in the guest too (its own st_dev), and only with the option."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.shares import Share


@pytest.mark.parametrize("announce", [False, True])
def test_host_mount_points_become_guest_submounts(
    tmp_path: Path, announce: bool, no_leftover_processes: None
) -> None:
    root = tmp_path / "share"
    (root / "plain").mkdir(parents=True)
    mnt = root / "sub"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "pva-sub", str(mnt)], check=True)
    try:
        (mnt / "inside").write_bytes(b"in the submount\n")
        args = ("--announce-submounts",) if announce else ()
        share = Share(root, "sm", backend="pyvirtiofsd", daemon_args=args)
        with Machine(MachineConfig(shares=[share]), name=f"submounts-{announce}") as vm:
            # busybox stat is lstat: "/." makes the path walk cross (and trigger)
            # the automount point
            devs = vm.agent.run(
                "stat -c %d /mnt/sm/. /mnt/sm/plain/. /mnt/sm/sub/.", check=True
            ).text.split()
            assert devs[0] == devs[1]
            assert (devs[2] != devs[0]) == announce
            assert vm.agent.run("cat /mnt/sm/sub/inside", check=True).stdout == (
                b"in the submount\n"
            )
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
