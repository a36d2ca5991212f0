"""The ACPI power button powers the test guest off cleanly (one boot).

The guest kernel has no evdev, so the button reaches user space only as the
ACPI genetlink event; ``pva-acpid`` (vm/guest/acpi-powerd.c) answers it by
asking busybox init to power off, through the inittab ``::shutdown:`` actions.
QMP ``system_powerdown`` presses the button: QEMU exits by itself, the guest
first unmounted its virtiofs share (the daemon saw FUSE_DESTROY), and the
daemon exits once QEMU is gone, leaving no process behind.
"""

from __future__ import annotations

import time
from pathlib import Path

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.process import pid_exists
from pyvirtiofsd.vm.shares import Share

POWERDOWN_TIMEOUT = 90.0  # TCG on a loaded host: init's shutdown takes ~3 s idle


def test_system_powerdown_powers_guest_off_cleanly(
    share_dir: Path, no_leftover_processes: None
) -> None:
    share = Share(share_dir, "pdshare")
    with Machine(MachineConfig(shares=[share]), name="powerdown") as vm:
        assert vm.qemu_proc is not None and len(vm.daemons) == 1
        daemon = vm.daemons[0]
        vm.wait_in_guest("test -e /run/pva-acpid.listening", "pva-acpid to listen")
        vm.agent.run("echo before the button > /mnt/pdshare/written", check=True)
        pids = vm.pids()
        pressed = time.monotonic()
        vm.qmp_command("system_powerdown")
        rc = vm.qemu_proc.wait(POWERDOWN_TIMEOUT)
        console = vm.console_log.read_text(errors="replace")
        assert rc is not None, (
            f"the guest ignored the ACPI power button: QEMU still runs "
            f"{POWERDOWN_TIMEOUT:.0f} s after system_powerdown; console:\n{console[-3000:]}"
        )
        took = time.monotonic() - pressed
        print(f"\npower button to QEMU exit: {took:.1f} s")
        assert rc == 0, f"QEMU exited {rc}; console:\n{console[-3000:]}"
        # It was init's clean poweroff (not a crash, nor a reboot).
        assert "pva-acpid: power button: powering off" in console, console[-3000:]
        assert "reboot: Power down" in console, console[-3000:]
        # The daemon exits by itself once QEMU is gone, and exits cleanly.
        assert daemon.process.wait(30) == 0, daemon.process.log_tail()
        log = daemon.process.log_tail(200)
        assert "FUSE session destroyed" in log, f"the guest did not unmount the share:\n{log}"
    assert not [p for p in pids if pid_exists(p)]
    assert (share_dir / "written").read_text() == "before the button\n"
