"""Benchmark results: min/median/max over rounds, ratios, a markdown table, plots.

Pure functions over the raw records the suites write to JSON, so a table can
be redrawn from an old run (``python -m pyvirtiofsd.bench.report RUN.json``).
A record is one measurement: one peer, one workload cell, one round.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BASELINE",
    "Cell",
    "Row",
    "Stats",
    "fmt_value",
    "markdown_table",
    "plot",
    "ratio",
    "summarize",
]

#: The daemon every ratio is about.
BASELINE = "pyvirtiofsd"
#: A load generator busier than this (CPU / wall time) may be what limits a cell.
SATURATED = 0.9


@dataclass(frozen=True, order=True)
class Cell:
    """One line of the table: a workload at a depth over a number of queues."""

    workload: str
    depth: int
    queues: int


@dataclass(frozen=True)
class Stats:
    min: float
    median: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("no values")
        return cls(min(values), statistics.median(values), max(values), len(values))


@dataclass(frozen=True)
class Row:
    cell: Cell
    unit: str
    stats: Mapping[str, Stats | None]  # peer -> stats (None: every round failed)
    queues_used: Mapping[str, int]  # peer -> fewest request queues it was measured on
    failures: Mapping[str, int]  # peer -> rounds that failed
    busy: Mapping[str, float] = field(default_factory=dict)  # peer -> median loadgen_busy


def summarize(records: Iterable[Mapping[str, Any]], peers: Sequence[str]) -> list[Row]:
    """Group records by cell and peer, in the order cells first appear."""
    order: list[Cell] = []
    values: dict[tuple[Cell, str], list[float]] = {}
    used: dict[tuple[Cell, str], int] = {}
    failed: dict[tuple[Cell, str], int] = {}
    units: dict[Cell, str] = {}
    busy: dict[tuple[Cell, str], list[float]] = {}
    for rec in records:
        cell = Cell(str(rec["workload"]), int(rec["depth"]), int(rec["queues"]))
        if cell not in units:
            order.append(cell)
            units[cell] = str(rec["unit"])
        key = (cell, str(rec["peer"]))
        if rec.get("failure"):
            failed[key] = failed.get(key, 0) + 1
            continue
        values.setdefault(key, []).append(float(rec["value"]))
        if "loadgen_busy" in rec:
            busy.setdefault(key, []).append(float(rec["loadgen_busy"]))
        q = int(rec.get("queues_used", cell.queues))
        used[key] = min(used.get(key, q), q)
    rows = []
    for cell in order:
        stats = {p: Stats.of(values[cell, p]) if (cell, p) in values else None for p in peers}
        rows.append(
            Row(
                cell,
                units[cell],
                stats,
                {p: used.get((cell, p), cell.queues) for p in peers},
                {p: failed.get((cell, p), 0) for p in peers},
                {p: statistics.median(busy[cell, p]) for p in peers if (cell, p) in busy},
            )
        )
    return rows


def ratio(row: Row, peer: str, baseline: str = BASELINE) -> float | None:
    """Median of ``baseline`` over median of ``peer`` (None when either is missing)."""
    a, b = row.stats.get(baseline), row.stats.get(peer)
    if a is None or b is None or b.median == 0:
        return None
    return a.median / b.median


def _num(v: float, unit: str) -> str:
    if unit == "GB/s":
        return f"{v:.2f}"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.0f}K"
    if v >= 1e3:
        return f"{v / 1e3:.1f}K"
    return f"{v:.0f}"


def fmt_value(s: Stats | None, unit: str) -> str:
    """``median (min-max)``, or ``-`` when there is nothing."""
    if s is None:
        return "-"
    if s.n == 1:
        return _num(s.median, unit)
    return f"{_num(s.median, unit)} ({_num(s.min, unit)}-{_num(s.max, unit)})"


def markdown_table(rows: Sequence[Row], peers: Sequence[str], baseline: str = BASELINE) -> str:
    """The table: one line per cell, median (min-max) per peer, then the ratios."""
    others = [p for p in peers if p != baseline]
    head = ["workload", "depth", "queues", "unit", *peers, *(f"py / {p}" for p in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes: set[str] = set()
    for row in rows:
        cells = [row.cell.workload, str(row.cell.depth), str(row.cell.queues), row.unit]
        for p in peers:
            text = fmt_value(row.stats[p], row.unit)
            if row.queues_used[p] < row.cell.queues:
                text += f" [{row.queues_used[p]}q]"
                notes.add(f"[{row.queues_used[p]}q]: the daemon offers only "
                          f"{row.queues_used[p]} request queue(s), measured on those")  # fmt: skip
            if row.busy.get(p, 0.0) >= SATURATED:
                text += " *"
                notes.add(f"*: the load generator's thread was busy >= {SATURATED:.0%} of "
                          "the time (median over rounds): its ceiling, maybe not the "
                          "daemon's")  # fmt: skip
            if row.failures[p]:
                text += f" ({row.failures[p]} failed)"
            cells.append(text)
        for p in others:
            r = ratio(row, p, baseline)
            cells.append("-" if r is None else f"{r:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines.append("")
        lines += [f"{n}." for n in sorted(notes)]
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], peers: Sequence[str], out_dir: Path, prefix: str) -> list[Path]:
    """One PNG per (depth, queues): each workload's medians relative to its best peer,
    min-max as error bars. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[int, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.cell.depth, row.cell.queues), []).append(row)
    written = []
    for (depth, queues), group in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(group)), 4.0))
        width = 0.8 / max(len(peers), 1)
        for k, peer in enumerate(peers):
            xs, ys, lo, hi = [], [], [], []
            for i, row in enumerate(group):
                s = row.stats[peer]
                best = max((t.median for t in row.stats.values() if t is not None), default=0.0)
                if s is None or best <= 0:
                    continue
                xs.append(i + (k - (len(peers) - 1) / 2) * width)
                ys.append(s.median / best)
                lo.append((s.median - s.min) / best)
                hi.append((s.max - s.median) / best)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=peer)
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels([r.cell.workload for r in group], rotation=20, ha="right")
        ax.set_ylabel("median / best peer's median")
        ax.set_title(f"depth {depth}, {queues} request queue(s)")
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{prefix}-d{depth}-q{queues}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Redraw the table of a daemon run from its JSON."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pyvirtiofsd.bench.report RUN.json", file=sys.stderr)
        return 2
    data = json.loads(Path(args[0]).read_text())
    print(markdown_table(summarize(data["records"], data["peers"]), data["peers"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
