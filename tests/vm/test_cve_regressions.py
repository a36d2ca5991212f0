"""virtiofsd's CVE classes in a real guest, with the daemon in its default
sandbox (namespace, seccomp kill).  Unit-level coverage of every opcode and
the other classes: ``tests/unit/test_cve_regressions.py``; fd exhaustion in a
guest: ``tests/vm/test_fd_budget.py``.

CVE-2020-35517, special files in the share stay the guest's.  A FIFO and
a character device node live in the share; on the host a reader waits in
``open(2)`` on the FIFO (an open for writing by the daemon would release
it).  The guest stats, lists, chmods and touches both, pipes data through
the FIFO and writes to the device: its kernel opens special files itself (a
FUSE FIFO is a local pipe, a device node the guest's own device), so the
host reader must still be waiting and the daemon (the sandbox's inner
process) must hold no fd on either but O_PATH ones.

CVE-2021-20263, a remapped ``security.capability`` is dropped on write.
With ``--xattrmap`` moving every guest name under ``user.virtiofs.``, the
file capabilities the guest sees live on the host as
``user.virtiofs.security.capability``, which the host kernel does not clear
when the file is written: the daemon must, in the sandbox, under seccomp.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.process import children_of
from pyvirtiofsd.vm.shares import Share

O_PATH = 0o10000000


def fds_on(pid: int, path: Path) -> list[tuple[int, bool]]:
    """(fd, is O_PATH) of process ``pid`` on ``path``'s inode."""
    st = os.stat(path)
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fst = os.stat(f"/proc/{pid}/fd/{fd}")
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = int(f.read().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError):
            continue
        if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
            out.append((int(fd), bool(flags & O_PATH)))
    return out


CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # v2: cap_net_raw
MAPPED = "user.virtiofs.security.capability"


def test_cve_2021_20263_guest_write_drops_a_remapped_capability(
    tmp_path: Path, no_leftover_processes: None
) -> None:
    root = tmp_path / "share"
    root.mkdir()
    prog = root / "prog"
    prog.write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(prog, 0o755)
    os.setxattr(prog, MAPPED, CAP)
    share = Share(root, "cap", backend="pyvirtiofsd",
                  daemon_args=("--xattrmap", ":prefix:all::user.virtiofs.:"))  # fmt: skip
    mp = share.guest_mountpoint
    with Machine(MachineConfig(shares=[share]), name="cve-cap") as vm:
        vm.agent.run(f"cat {mp}/prog > /dev/null && echo '# changed' >> {mp}/prog", check=True)
        assert prog.read_bytes().endswith(b"# changed\n")
        assert MAPPED not in os.listxattr(prog), "the guest still sees file capabilities"
        (daemon,) = vm.daemons
        assert children_of(daemon.process.pid), "the sandboxed daemon died (seccomp?)"
        assert vm.agent.run(f"cat {mp}/prog", check=True).text.startswith("#!/bin/sh")


def test_cve_2020_35517_guest_use_of_a_fifo_and_a_device_never_opens_them_on_the_host(
    tmp_path: Path, no_leftover_processes: None
) -> None:
    root = tmp_path / "share"
    root.mkdir()
    fifo, dev = root / "fifo", root / "full"
    os.mkfifo(fifo, 0o666)
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    released = threading.Event()
    reader_fds: list[int] = []

    def reader() -> None:
        reader_fds.append(os.open(fifo, os.O_RDONLY))  # until someone opens it to write
        released.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    share = Share(root, "sp", backend="pyvirtiofsd", daemon_args=("--xattr",))
    mp = share.guest_mountpoint
    try:
        with Machine(MachineConfig(shares=[share]), name="special") as vm:
            script = (
                f"stat -c '%F' {mp}/fifo {mp}/full && ls -l {mp} > /dev/null"
                f" && chmod 0660 {mp}/fifo {mp}/full && touch {mp}/fifo {mp}/full"
                f" && (echo through-the-guest > {mp}/fifo &) && cat {mp}/fifo"
                f" && (echo x > {mp}/full; echo status $?)"
            )
            out = vm.agent.run(script, check=True, timeout=120).text.split("\n")
            assert out[:2] == ["fifo", "character special file"]
            assert "through-the-guest" in out  # a guest-local pipe
            assert "status 1" in out  # the guest's own /dev/full: ENOSPC
            (daemon,) = vm.daemons
            inner = children_of(daemon.process.pid) or [daemon.process.pid]
            for path in (fifo, dev):
                assert [fd for fd, o_path in fds_on(inner[0], path) if not o_path] == [], path
            assert not released.is_set(), "the daemon opened the host FIFO"
            assert stat.S_IMODE(os.stat(fifo).st_mode) == 0o660  # SETATTR did reach the host
    finally:
        if not released.is_set():
            os.close(os.open(fifo, os.O_WRONLY))  # release the reader ourselves
        t.join(30)
        for fd in reader_fds:
            os.close(fd)
