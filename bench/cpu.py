"""CPU time of a process tree, of this process and of the machine, for the benches.

A benchmark cell is only a statement about the daemon when the daemon, not
the load generator or the machine, is what ran out. :class:`CpuMeter`
samples three clocks around a cell: the daemon's process tree (every
descendant too: pyvirtiofsd's sandbox serves from a child of the process
the bench started), this process (the generator's threads run in it), and
the machine (``/proc/stat``), each as CPUs busy over the interval.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuMeter", "CpuUse", "machine_busy_s", "tree_cpu_s", "tree_pids"]

_TICK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants now alive (from ``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = list((_PROC / str(p) / "task").iterdir())
        except OSError:
            continue  # gone meanwhile
        for t in tasks:
            try:
                todo += [int(c) for c in (t / "children").read_text().split()]
            except OSError:
                continue
    return out


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces
    return (int(fields[11]) + int(fields[12])) / _TICK  # fields 14 and 15 of stat(5)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its living descendants."""
    return sum(_proc_cpu_s(p) for p in tree_pids(pid))


def machine_busy_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the machine since boot, from ``/proc/stat``."""
    first = (_PROC / "stat").read_text().splitlines()[0].split()
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(ticks)
    return (total - ticks[3] - ticks[4]) / _TICK, total / _TICK


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return ru.ru_utime + ru.ru_stime


@dataclass(frozen=True)
class CpuUse:
    """CPUs busy on average over an interval."""

    daemon: float
    bench: float
    machine: float
    cpus: int

    def as_dict(self) -> dict[str, float]:
        return {"daemon_cpus": self.daemon, "bench_cpus": self.bench,
                "machine_cpus": self.machine, "cpus": self.cpus}  # fmt: skip


class CpuMeter:
    """``with CpuMeter(pid) as m: ...``; then ``m.use``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.use: CpuUse | None = None

    def __enter__(self) -> CpuMeter:
        self._t = time.monotonic()
        self._daemon = tree_cpu_s(self.pid)
        self._self = _self_cpu_s()
        self._busy, self._total = machine_busy_s()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(time.monotonic() - self._t, 1e-9)
        busy, total = machine_busy_s()
        cpus = os.cpu_count() or 1
        machine = (busy - self._busy) / max(total - self._total, 1e-9) * cpus
        self.use = CpuUse(
            daemon=(tree_cpu_s(self.pid) - self._daemon) / wall,
            bench=(_self_cpu_s() - self._self) / wall,
            machine=machine,
            cpus=cpus,
        )


def markdown_cpu_table(records: list[dict[str, object]], peers: list[str]) -> str:
    """Median CPUs busy per cell (daemon tree / this bench process / machine), markdown.

    Records lacking the figures (failed cells) are left out.
    """
    import statistics

    cells: dict[tuple[str, int, int, str], list[dict[str, object]]] = {}
    for r in records:
        if r.get("failure") or "daemon_cpus" not in r:
            continue
        key = (str(r["workload"]), int(r["depth"]), int(r["queues"]), str(r["peer"]))  # type: ignore[call-overload]
        cells.setdefault(key, []).append(r)
    if not cells:
        return ""
    cpus = next(iter(cells.values()))[0]["cpus"]
    lines = [
        f"CPUs busy during each cell (median over rounds; the machine has {cpus}): "
        "daemon = its whole process tree, bench = this process (the load generator's "
        "threads), machine = /proc/stat\n",
        "| workload | depth | queues | peer | daemon | bench | machine | ops per daemon CPU-s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = {p: i for i, p in enumerate(peers)}
    for (w, d, q, p), rs in sorted(
        cells.items(), key=lambda kv: (kv[0][:3], order.get(kv[0][3], 99))
    ):
        med = {k: statistics.median(float(r[k]) for r in rs)  # type: ignore[arg-type]
               for k in ("daemon_cpus", "bench_cpus", "machine_cpus", "ops_per_s")}  # fmt: skip
        eff = med["ops_per_s"] / med["daemon_cpus"] if med["daemon_cpus"] > 0 else 0.0
        dcpu, bcpu, mcpu = med["daemon_cpus"], med["bench_cpus"], med["machine_cpus"]
        lines.append(
            f"| {w} | {d} | {q} | {p} | {dcpu:.2f} | {bcpu:.2f} | {mcpu:.2f} | {eff:,.0f} |"
        )
    return "\n".join(lines) + "\n"
