"""The fd budget in a real guest: ``find`` and a stat of every file over more
inodes than the daemon's open-file limit (issue 10, CVE-2020-10717).

The daemon runs in its default sandbox (namespace, seccomp kill) with
``--rlimit-nofile 256`` and ``--inode-file-handles prefer`` (so at most 128
inode fds); the share holds 2,220 directories and files.  The guest lists
them (``find``: READDIRPLUS), then on a fresh mount stats every name (a
LOOKUP per name: nothing is cached yet) and on another reads every file
(LOOKUP, OPEN, READ).  With ``--cache auto`` the guest's dentry cache keeps
every inode it looked up, so the daemon knows far more inodes than it may
hold fds: it keeps them by file handle and reopens the evicted ones.
Everything must come back exactly as the host has it, and the daemon must
hold about its budget of O_PATH fds, not one per inode.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.process import children_of
from pyvirtiofsd.vm.shares import Share

TOP, SUB, FILES = 20, 10, 10  # 20 * 10 * 10 = 2,000 files in 220 directories
NOFILE = 256
O_PATH = 0o10000000


def make_tree(root: Path) -> None:
    for a in range(TOP):
        for b in range(SUB):
            d = root / f"a{a:02d}" / f"b{b}"
            d.mkdir(parents=True)
            for c in range(FILES):
                (d / f"f{c}").write_bytes(b"%d-%d-%d\n" % (a, b, c) * (c + 1))


def host_listing(root: Path, mount: str) -> list[str]:
    out = []
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = p.relative_to(root)
            out.append(f"{mount}/{rel}|{st.st_size}|{st.st_ino}")
    return sorted(out)


def o_path_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = int(f.read().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError):
            continue
        n += bool(flags & O_PATH)
    return n


def test_find_and_stat_over_more_files_than_the_fd_limit(
    tmp_path: Path, no_leftover_processes: None
) -> None:
    root = tmp_path / "share"
    root.mkdir()
    make_tree(root)
    files = TOP * SUB * FILES
    assert files + TOP + TOP * SUB > 8 * NOFILE
    args = ("--rlimit-nofile", str(NOFILE), "--inode-file-handles", "prefer", "--cache", "auto")
    share = Share(root, "fb", backend="pyvirtiofsd", daemon_args=args)
    mount = share.guest_mountpoint
    remount = f"umount {mount} && {share.mount_command()}"
    with Machine(MachineConfig(shares=[share]), name="fdbudget") as vm:
        # every name, as the guest's find lists it (READDIRPLUS)
        found = vm.agent.run(
            f"find {mount} -mindepth 1 > /tmp/names && cat /tmp/names", check=True, timeout=300
        )
        expected = host_listing(root, mount)
        assert sorted(found.text.split()) == sorted(line.split("|")[0] for line in expected)
        # a fresh mount, then a stat of every name: one LOOKUP per path
        # component the guest does not know yet, 2,220 in all, each inode kept
        # in the guest's dentry cache (cache=auto)
        fmt = "%n|%s|%i"
        stats = vm.agent.run(
            f"{remount} && stat -c '{fmt}' $(cat /tmp/names)", check=True, timeout=300
        )
        assert sorted(stats.text.split()) == expected
        # and every file's bytes after another fresh mount (LOOKUP, OPEN, READ)
        digest = vm.agent.run(
            f"{remount} && cd {mount} && cat $(find . -type f | sort) | md5sum",
            check=True,
            timeout=300,
        )
        host = hashlib.md5()
        for rel in sorted(
            str(Path(dp, n).relative_to(root)) for dp, _, fs in os.walk(root) for n in fs
        ):
            host.update((root / rel).read_bytes())
        assert digest.text.split()[0] == host.hexdigest()
        # the daemon (the sandbox's inner process) holds far fewer inode fds
        # than the guest knows inodes, and still serves
        (daemon,) = vm.daemons
        (inner,) = children_of(daemon.process.pid)  # the namespace sandbox's server
        held = o_path_fds(inner)
        print(f"daemon O_PATH fds at the end: {held} (guest knows {files + 220} inodes)")
        assert held <= NOFILE // 2 + 16, held
        again = vm.agent.run(f"stat -c '{fmt}' {mount}/a00/b0/f0", check=True)
        assert again.text.strip() in expected
