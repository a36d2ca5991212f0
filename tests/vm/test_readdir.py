"""Directory listings in a real guest: READDIR streamed with the host's cookies.

The guest's getdents buffer (busybox ``ls``/``find``) fills in the middle of
a FUSE reply again and again, so its kernel keeps resuming from a cookie
inside the previous reply: every entry must still come exactly once.
"""

from __future__ import annotations

import os
from pathlib import Path

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.shares import Share

FILES = 3000


def test_guest_lists_a_big_directory_exactly(tmp_path: Path, no_leftover_processes: None) -> None:
    root = tmp_path / "share"
    big = root / "big"
    big.mkdir(parents=True)
    names = [f"file-{i:05d}-{'n' * (i % 50)}" for i in range(FILES)]
    for name in names:
        (big / name).touch()
    for d in range(20):
        (root / "tree" / f"d{d}" / "e").mkdir(parents=True)
    share = Share(root, "rd", backend="pyvirtiofsd")
    with Machine(MachineConfig(shares=[share]), name="readdir") as vm:
        listed = vm.agent.run("ls -1a /mnt/rd/big", check=True, timeout=300).text.split("\n")
        listed = [n for n in listed if n]
        assert len(listed) == len(set(listed)) == FILES + 2
        assert set(listed) == set(names) | {".", ".."}
        # readdirplus through find, and a rewind: listed twice in one process
        found = vm.agent.run("find /mnt/rd | sort", check=True, timeout=300).text.split()
        expected = sorted(
            ["/mnt/rd"]
            + [
                "/mnt/rd/" + str(Path(dirpath, n).relative_to(root))
                for dirpath, dirs, files in os.walk(root)
                for n in dirs + files
            ]
        )
        assert found == expected
        # after removals through the share: no entry twice, every survivor once
        script = (
            "cd /mnt/rd/big && ls -1f > /tmp/before &&"
            " for f in $(head -n 100 /tmp/before); do"
            " [ $f = . ] || [ $f = .. ] || rm $f; done; ls -1f | sort | uniq -d | wc -l"
        )
        assert vm.agent.run(script, check=True, timeout=300).text.strip() == "0"
        left = vm.agent.run("ls -1a /mnt/rd/big | wc -l", check=True).text.strip()
        assert int(left) == len(os.listdir(big)) + 2
