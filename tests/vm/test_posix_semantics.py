"""POSIX semantics random sequences reach poorly, checked in a real guest over
virtio-fs as different users: sticky and setgid directories, permissions,
O_APPEND, O_EXCL, link counts, rename over an open file, name lengths."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.shares import Share

M = "/mnt/px"


def test_posix_semantics_across_users(tmp_path: Path, no_leftover_processes: None) -> None:
    root = tmp_path / "share"
    root.mkdir()
    os.chmod(root, 0o755)
    with Machine(
        MachineConfig(shares=[Share(root, "px", backend="pyvirtiofsd")]), name="posix"
    ) as vm:

        def sh(cmd: str, user: str | None = None) -> tuple[int, str]:
            full = f"su {user} -c {cmd!r}" if user else cmd
            r = vm.agent.run(full, timeout=60)
            return r.status, (r.stdout + r.stderr).decode(errors="replace")

        # sticky directory: bob may not remove alice's file, alice may
        assert sh(f"mkdir {M}/sticky && chmod 1777 {M}/sticky")[0] == 0
        assert sh(f"echo a > {M}/sticky/alice", "alice")[0] == 0
        status, out = sh(f"rm -f {M}/sticky/alice", "bob")
        assert status != 0 and ("not permitted" in out or "ermission" in out)  # EPERM/EACCES
        assert (root / "sticky/alice").exists()
        assert sh(f"rm {M}/sticky/alice", "alice")[0] == 0
        assert not (root / "sticky/alice").exists()

        # setgid directory: new entries take the directory's group
        assert sh(f"mkdir {M}/sg && chgrp 2000 {M}/sg && chmod 2777 {M}/sg")[0] == 0
        assert sh(f"echo x > {M}/sg/f && mkdir {M}/sg/d", "alice")[0] == 0
        assert (root / "sg/f").stat().st_gid == 2000
        assert (root / "sg/f").stat().st_uid == 1000
        d = (root / "sg/d").stat()
        assert d.st_gid == 2000 and d.st_mode & stat.S_ISGID

        # permissions: bob cannot read or write alice's private file
        assert sh(f"echo secret > {M}/sg/private && chmod 600 {M}/sg/private", "alice")[0] == 0
        assert sh(f"cat {M}/sg/private", "bob")[0] != 0
        assert sh(f"echo x >> {M}/sg/private", "bob")[0] != 0
        assert (root / "sg/private").read_bytes() == b"secret\n"

        # O_APPEND from two openers, O_EXCL (noclobber) on an existing name
        assert sh(f"echo a >> {M}/app; echo b >> {M}/app; echo c >> {M}/app")[0] == 0
        assert (root / "app").read_bytes() == b"a\nb\nc\n"
        status, _ = sh(f"set -C; echo again > {M}/app")
        assert status != 0 and (root / "app").read_bytes() == b"a\nb\nc\n"

        # hard-link counts as the guest and the host see them
        assert sh(f"ln {M}/app {M}/app2 && ln {M}/app {M}/app3")[0] == 0
        assert sh(f"stat -c %h {M}/app")[1].strip() == "3"
        assert (root / "app").stat().st_nlink == 3
        assert sh(f"rm {M}/app2 && stat -c %h {M}/app")[1].strip() == "2"

        # rename over a file that is still open: the open fd keeps the old data
        assert sh(f"echo old > {M}/victim && echo new > {M}/replacement")[0] == 0
        status, out = sh(
            f"exec 3<{M}/victim; mv {M}/replacement {M}/victim; cat <&3; cat {M}/victim"
        )
        assert status == 0 and out == "old\nnew\n"

        # name lengths: 255 bytes is fine, 256 is ENAMETOOLONG
        assert sh(f"touch {M}/{'n' * 255}")[0] == 0
        assert (root / ("n" * 255)).exists()
        status, out = sh(f"touch {M}/{'n' * 256}")
        assert status != 0 and "too long" in out.lower()
