"""A guest modifies a pyvirtiofsd share; the host sees exactly what the guest did."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.shares import Share


def test_guest_writes_are_visible_on_the_host(tmp_path: Path, no_leftover_processes: None) -> None:
    root = tmp_path / "share"
    root.mkdir()
    os.chmod(root, 0o777)
    (root / "victim").write_bytes(b"x" * 100)
    share = Share(root, "rw", backend="pyvirtiofsd")
    with Machine(MachineConfig(shares=[share]), name="pyvirtiofsd-rw") as vm:
        m = "/mnt/rw"
        r = vm.agent.run(
            f"set -e; mkdir -p {m}/a/b; "
            f"dd if=/dev/urandom of={m}/a/b/data bs=65536 count=40 2>/dev/null; "
            f"sha256sum {m}/a/b/data; "
            f"echo hello > {m}/a/hello; mv {m}/a/hello {m}/a/renamed; "
            f"ln -s renamed {m}/a/link; ln {m}/a/renamed {m}/a/hard; "
            f"chmod 0640 {m}/a/renamed; truncate -s 10 {m}/victim; "
            f"mkfifo {m}/fifo; rm {m}/a/hard; mkdir {m}/gone; rmdir {m}/gone; "
            f"printf abc >> {m}/a/renamed; sync",
            check=True,
        )
        guest_sum = r.text.split()[0]
        # a guest user's files belong to that user on the host
        vm.agent.run(f"su alice -c 'echo mine > {m}/alice-file'", check=True)
        denied = vm.agent.run(f"su bob -c 'echo no >> {m}/alice-file'")
        assert denied.status != 0
        listing = vm.agent.run(f"cd {m} && find . | sort", check=True).text.split()
    host_listing = sorted(["."] + ["./" + str(p.relative_to(root)) for p in root.rglob("*")])
    assert listing == host_listing
    data = (root / "a/b/data").read_bytes()
    assert len(data) == 40 * 65536 and hashlib.sha256(data).hexdigest() == guest_sum
    assert (root / "a/renamed").read_bytes() == b"hello\nabc"
    assert stat.S_IMODE((root / "a/renamed").stat().st_mode) == 0o640
    assert os.readlink(root / "a/link") == "renamed"
    assert (root / "a/renamed").stat().st_nlink == 1
    assert (root / "victim").read_bytes() == b"x" * 10
    assert stat.S_ISFIFO((root / "fifo").lstat().st_mode)
    assert not (root / "gone").exists()
    st = (root / "alice-file").stat()
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert (root / "alice-file").read_bytes() == b"mine\n"
