"""Multi-queue virtio-fs against a real driver: a 6.12 guest with 2 vCPUs and
2 request queues puts the requests of a task pinned to each CPU on that CPU's
queue, and the daemon's two queue workers serve them at the same time.

Evidence comes from the daemon's stats file (``--stats-file``), read on the
host while the device runs: per-queue request counts (queue 0 is hiprio,
1.. the request queues) and ``busy_max``, the most queue workers that were
draining their rings at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.shares import Share

MIB = 1 << 20
FILE_MIB = 48


def stats(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def requests(snapshot: dict[str, Any]) -> dict[int, int]:
    return {int(q): int(v["requests"]) for q, v in snapshot["queues"].items()}


def test_each_cpu_uses_its_own_request_queue_and_both_are_served_at_once(
    tmp_path: Path, no_leftover_processes: None
) -> None:
    share_dir = tmp_path / "share"
    share_dir.mkdir()
    for cpu in (0, 1):
        (share_dir / f"cpu{cpu}.bin").write_bytes(os.urandom(FILE_MIB * MIB))
    stats_file = tmp_path / "stats.json"
    share = Share(
        share_dir,
        "mq",
        backend="pyvirtiofsd",
        num_request_queues=2,
        daemon_args=("--stats-file", str(stats_file)),
    )
    cfg = MachineConfig(shares=[share], cpus=2, kernel_version="6.12")
    with Machine(cfg, name="request-queues") as vm:
        mqs = vm.agent.run("cat /sys/fs/virtiofs/*/mqs/*/cpu_list", check=True).text.split("\n")
        assert [line.replace(" ", "") for line in mqs if line] == ["0,1", "0", "1"]
        before = stats(stats_file)
        # One cold sequential read per CPU, pinned, both at once: READs are
        # submitted from the reading task, so on its CPU's queue.
        vm.agent.run(
            "for c in 0 1; do taskset -c $c dd if=/mnt/mq/cpu$c.bin of=/dev/null bs=1M "
            "2>/dev/null & done; wait",
            timeout=300,
            check=True,
        )
    after = stats(stats_file)  # written once more when the device stopped
    moved = {q: n - requests(before).get(q, 0) for q, n in requests(after).items()}
    reads = FILE_MIB * MIB // (128 << 10)  # at least this many READs per file
    assert moved[1] >= reads and moved[2] >= reads, (before, after)
    # Nothing on hiprio during the reads, so the overlap is the request queues'.
    assert moved.get(0, 0) == 0, (before, after)
    assert after["busy_max"] >= 2, after
