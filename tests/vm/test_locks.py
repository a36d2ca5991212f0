"""Host-visible locks in a real guest (`--posix-lock --flock`): a blocking wait.

One guest process holds an exclusive lock; another waits for it in a
blocking ``fcntl(F_SETLKW)`` (then ``flock(LOCK_EX)``), while the holder
keeps writing and reading on the same share without delay: the wait holds
up no other request.  The waiter is granted the lock once the holder
releases it, never before, and never with EDEADLK.  Then a lock held in the
guest is seen by a host process, and freed for it when the guest releases.
The guest side is ``locktool.c`` (static, copied into the guest's tmpfs).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import subprocess
from pathlib import Path

import pytest

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.shares import Share

TOOL = Path(__file__).with_name("locktool.c")
#: Each write+read pair while the other process waits must take less than
#: this (TCG guest, one vCPU): the wait must not hold up other requests.
IO_WORST_MS = 2000.0


@pytest.fixture(scope="module")
def locktool(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("locktool") / "locktool"
    cmd = ["cc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(TOOL)]
    subprocess.run(cmd, check=True)
    return out.read_bytes()


def test_setlkw_waits_while_the_share_keeps_serving(
    tmp_path: Path, locktool: bytes, no_leftover_processes: None
) -> None:
    root = tmp_path / "share"
    root.mkdir()
    share = Share(root, "lk", backend="pyvirtiofsd", daemon_args=("--posix-lock", "--flock"))
    with Machine(MachineConfig(shares=[share]), name="locks") as vm:
        vm.agent.write_file("/tmp/locktool", locktool, mode=0o755)
        for mode in ("posix", "flock"):
            lockfile, iofile = f"/mnt/lk/{mode}.lock", f"/mnt/lk/{mode}.io"
            r = vm.agent.run(f"/tmp/locktool {mode} {lockfile} {iofile} 200", timeout=400)
            line = r.text.strip()
            print(line)
            assert r.status == 0, (line, r.stderr)
            fields = dict(re.findall(r"(\w+)=(\S+)", line))
            assert fields["still_waiting"] == "1" and fields["child_errno"] == "0"
            assert fields["granted_after_release"] == "1"
            assert float(fields["io_worst_ms"]) < IO_WORST_MS, line

        # the guest's locks are host locks: hold each in the guest, try on the host
        vm.agent.run("mkfifo /tmp/go", check=True)
        for mode in ("posix", "flock"):
            lockfile = root / f"{mode}.held"
            vm.agent.run(
                f"/tmp/locktool hold-{mode} /mnt/lk/{mode}.held /tmp/held /tmp/go"
                " </dev/null >/dev/null 2>&1 &",
                check=True,
            )
            vm.wait_in_guest("[ -e /tmp/held ]", f"the guest to hold its {mode} lock")
            fd = os.open(lockfile, os.O_RDWR)
            try:
                with pytest.raises(OSError) as info:
                    host_lock(fd, mode)
                assert info.value.errno in (errno.EAGAIN, errno.EACCES)
                vm.agent.run("echo go > /tmp/go", check=True, timeout=60)
                vm.wait_in_guest("[ ! -e /tmp/held ]", f"the guest to release its {mode} lock")
                host_lock(fd, mode)  # free on the host once the guest released it
            finally:
                os.close(fd)


def host_lock(fd: int, mode: str) -> None:
    if mode == "posix":
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
