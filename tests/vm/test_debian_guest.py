"""The Debian userland in the test guest: its tools run against our shares."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.shares import Share


def test_debian_tools_read_a_pyvirtiofsd_share(tmp_path: Path, no_leftover_processes: None) -> None:
    root = tmp_path / "share"
    root.mkdir()
    data = os.urandom(8 << 20)
    (root / "data.bin").write_bytes(data)
    share = Share(root, "pyfs", backend="pyvirtiofsd")
    with Machine(MachineConfig(shares=[share], debian=True), name="debian") as vm:
        r = vm.debian_run("python3 -c 'import sys; print(sys.version_info[:2])'", check=True)
        assert r.text.strip() == "(3, 11)"
        found = vm.debian_run(
            "for t in fio stress-ng dbench; do command -v $t; done", check=True
        ).text.split()
        assert [Path(p).name for p in found] == ["fio", "stress-ng", "dbench"]
        # python3 in the guest hashes the file through virtio-fs
        r = vm.debian_run(
            'python3 -c "import hashlib; '
            "print(hashlib.sha256(open('/mnt/pyfs/data.bin','rb').read()).hexdigest())\"",
            check=True,
        )
        assert r.text.strip() == hashlib.sha256(data).hexdigest()
        # fio: random reads of the whole file over the share, no errors
        r = vm.debian_run(
            "fio --name=rr --filename=/mnt/pyfs/data.bin --rw=randread --bs=4k "
            "--size=8M --ioengine=psync --readonly --minimal",
            check=True,
        )
        fields = r.text.strip().split(";")
        assert fields[4] == "0"  # fio's total error count for the job
