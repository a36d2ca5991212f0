"""The benches' CPU accounting: a process tree's CPU time and the CPU table."""

from __future__ import annotations

import subprocess
import sys

from pyvirtiofsd.bench.cpu import CpuMeter, markdown_cpu_table, tree_cpu_s, tree_pids

# A child that starts a grandchild; the grandchild burns CPU, says so, and
# waits for its stdin to close (the test's pipe), as does the child.
_GRANDCHILD = (
    "import sys\n"
    "n = 0\n"
    "for i in range(3_000_000): n += i\n"
    "print('burnt', flush=True)\n"
    "sys.stdin.read()\n"
)
_CHILD = (
    "import subprocess, sys\n"
    f"g = subprocess.Popen([sys.executable, '-c', {_GRANDCHILD!r}], stdout=subprocess.PIPE, "
    "stdin=subprocess.PIPE, text=True)\n"
    "print(g.pid, g.stdout.readline().strip(), flush=True)\n"
    "sys.stdin.read()\n"
    "g.stdin.close(); g.wait()\n"
)


def test_tree_cpu_counts_the_descendants() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        with CpuMeter(child.pid) as meter:
            gpid, word = child.stdout.readline().split()
        assert word == "burnt"
        assert int(gpid) in tree_pids(child.pid)
        # the grandchild's loop alone is tens of milliseconds of CPU
        assert tree_cpu_s(child.pid) >= tree_cpu_s(int(gpid)) > 0.02
        assert meter.use is not None and meter.use.daemon > 0
        assert 0 < meter.use.machine <= meter.use.cpus + 0.5
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(30)


def test_cpu_table_gives_the_median_per_cell_and_efficiency() -> None:
    base = {"workload": "getattr", "depth": 32, "queues": 1, "peer": "pyvirtiofsd", "cpus": 2}
    records = [
        {**base, "round": 0, "daemon_cpus": 0.5, "bench_cpus": 0.9, "machine_cpus": 1.5,
         "ops_per_s": 100_000.0},
        {**base, "round": 1, "daemon_cpus": 1.0, "bench_cpus": 1.0, "machine_cpus": 2.0,
         "ops_per_s": 200_000.0},
        {**base, "round": 2, "daemon_cpus": 1.5, "bench_cpus": 1.1, "machine_cpus": 1.9,
         "ops_per_s": 300_000.0},
        {**base, "peer": "rust-virtiofsd", "failure": "timeout", "daemon_cpus": 9.0},
    ]  # fmt: skip
    table = markdown_cpu_table(records, ["pyvirtiofsd", "rust-virtiofsd"])
    assert "the machine has 2" in table
    assert "| getattr | 32 | 1 | pyvirtiofsd | 1.00 | 1.00 | 1.90 | 200,000 |" in table
    assert "rust-virtiofsd" not in table.split("\n", 3)[3]  # the failed cell is left out
    assert markdown_cpu_table([], ["pyvirtiofsd"]) == ""
