"""The harness end to end: boot, agent, QMP, a share served by the C virtiofsd."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pyvirtiofsd.vm.agent import GuestCommandError
from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.process import pid_exists
from pyvirtiofsd.vm.shares import Share


def test_agent_runs_commands_and_reports_status(no_leftover_processes: None) -> None:
    with Machine(MachineConfig(), name="agent") as vm:
        assert vm.status() == "running"
        r = vm.agent.run("echo out; echo err >&2; exit 7")
        assert (r.status, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
        # stdin reaches the command and binary output survives the channel
        blob = os.urandom(300_000)
        r = vm.agent.run("cat", input=blob)
        assert r.status == 0 and r.stdout == blob
        # the guest is the kernel we built, with our init
        assert vm.agent.run("cat /proc/1/comm", check=True).text.strip() == "init"
        assert vm.agent.kernel_release is not None
        assert vm.agent.kernel_release.startswith("6.1")
        with pytest.raises(GuestCommandError):
            vm.agent.run("false", check=True)
        # a command over its time limit is killed, and the agent keeps serving
        r = vm.agent.run("sleep 100", timeout=2)
        assert r.status == -9
        assert r.elapsed >= 2.0  # the guest-side clock of the command
        vm.agent.ping()
        # file transfer both ways
        vm.agent.write_file("/tmp/x", b"\x00\x01abc", mode=0o600)
        assert vm.agent.read_file("/tmp/x") == b"\x00\x01abc"
        assert vm.agent.run("stat -c %a /tmp/x", check=True).text.strip() == "600"
        with pytest.raises(FileNotFoundError):
            vm.agent.read_file("/nonexistent")
        pids = vm.pids()
    assert pids and not any(pid_exists(p) for p in pids)


def test_virtiofsd_share_round_trip(share_dir: Path, no_leftover_processes: None) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    (share_dir / "from-host.bin").write_bytes(payload)
    (share_dir / "sub").mkdir()
    share = Share(share_dir, "hostshare", backend="virtiofsd")
    with Machine(MachineConfig(shares=[share]), name="virtiofsd") as vm:
        assert len(vm.daemons) == 1
        mounts = vm.agent.run("cat /proc/mounts", check=True).text
        assert "hostshare /mnt/hostshare virtiofs" in mounts
        # host -> guest
        r = vm.agent.run("sha256sum /mnt/hostshare/from-host.bin", check=True)
        assert r.text.split()[0] == hashlib.sha256(payload).hexdigest()
        # guest -> host: the guest writes random bytes, both sides hash them
        r = vm.agent.run(
            "dd if=/dev/urandom of=/mnt/hostshare/sub/from-guest.bin bs=4096 count=300 "
            "2>/dev/null && sync && sha256sum /mnt/hostshare/sub/from-guest.bin",
            check=True,
        )
        guest_sum = r.text.split()[0]
        pids = vm.pids()
    written = (share_dir / "sub" / "from-guest.bin").read_bytes()
    assert len(written) == 300 * 4096
    assert hashlib.sha256(written).hexdigest() == guest_sum
    assert not any(pid_exists(p) for p in pids)


def test_boot_failure_is_reported_and_cleaned_up(
    tmp_path: Path, no_leftover_processes: None
) -> None:
    # A guest that panics at once (no init) must fail fast with the console in the error.
    from pyvirtiofsd.vm.machine import MachineError

    cfg = MachineConfig(
        kernel_args=("rdinit=/does-not-exist", "init=/does-not-exist"), boot_timeout=60
    )
    vm = Machine(cfg, name="panic")
    with pytest.raises(MachineError, match=r"(?s)agent not ready.*console"), vm:
        pass
    assert not any(pid_exists(p) for p in vm.pids())


def test_agent_survives_a_command_stuck_in_the_kernel(
    share_dir: Path, no_leftover_processes: None
) -> None:
    """A command blocked uninterruptibly (a FUSE request its daemon never answers)
    cannot be killed; the agent abandons it instead of hanging the harness."""
    import signal

    (share_dir / "f").write_bytes(b"data\n")
    share = Share(share_dir, "s", backend="pyvirtiofsd")
    with Machine(MachineConfig(shares=[share]), name="stuck") as vm:
        # mount returns before the daemon answers INIT, and a request waiting for
        # INIT is killable: have one request answered first (it leaves f uncached)
        assert vm.agent.run("ls /mnt/s", check=True).stdout == b"f\n"
        daemon = vm.daemons[0].process
        # the serving process: the daemon itself, or its child in the namespace sandbox
        with open(f"/proc/{daemon.pid}/task/{daemon.pid}/children") as f:
            pids = [daemon.pid, *map(int, f.read().split())]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            r = vm.agent.run("cat /mnt/s/f", timeout=2)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert r.status == -9
        assert b"abandoned" in r.stderr
        vm.agent.ping()
        assert vm.agent.run("cat /mnt/s/f", check=True).stdout == b"data\n"
