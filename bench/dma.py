"""``make bench SUITE=dma``: the seed's scenario, contention between devices for bounce memory.

One guest (2 vCPUs, the Debian userland for fio) with three DMA devices loaded
at the same time for ``--dma-duration`` seconds:

- share A (pyvirtiofsd): streaming, fio sequential 1 MiB reads and writes
  (``direct=1``, so every byte crosses the device);
- share B (pyvirtiofsd): small random I/O, fio 4 KiB 50/50 random read/write
  (``direct=1``), its completion-latency p50 and p99;
- a virtio-net NIC on QEMU user networking with ``restrict=on``: the guest
  opens one TCP connection to ``10.0.2.100:9``, which QEMU forwards
  (``guestfwd``) to a listener of this process on ``127.0.0.1``, and
  nothing else is reachable. The guest sends zeros, this process sends zeros
  back; the NIC's byte counters in the guest give the throughput.

Three DMA modes (:mod:`pyvirtiofsd.vm.swiotlb`): ``off`` (no bouncing, the
reference), ``shared`` (``swiotlb=force``: the three devices share the one
global pool) and ``per-device`` (each device its own window). The bounce
memory is equal: the shared pool is sized (``swiotlb=<slabs>``) to the sum of
the three windows (``virtio_swiotlb=<sum>``), a power of two because Linux
rounds its pool up to one; the windows are whole 256 KiB segments, as equal as
they go (64 MiB: 21.5 / 21.25 / 21.25 MiB).

Parts (``--dma-parts``):

- ``contention``: every mode at ``--dma-bounce-mib``, ``--dma-rounds`` rounds,
  modes interleaved (a fresh guest per mode and round, the order rotated each
  round). Reported: per-device throughput and the aggregate, share B's
  p50/p99, the guest's "swiotlb buffer is full" messages (printed plus
  rate-limit-suppressed: a lower bound) and virtio-fs enqueue failures, fio
  errors, and every pool's high-water mark (the mark is reset before the
  load, so it is the load's).
- ``shrink``: the bounce memory halved from ``--dma-bounce-mib`` (or the sizes
  in ``--dma-shrink-mib``), shared and per-device each once per size, until
  the shared mode fails (``--dma-shrink-until both``: until both fail). A run
  *fails* when a workload sees errors (fio errors, enqueue failures, a dead
  or silent NIC, a guest that does not finish); it *degrades* when the guest
  reports a full bounce pool or the aggregate falls below
  ``DEGRADED`` x that mode's aggregate at the largest size.
- ``queues``: one share, no bouncing, fio 4 KiB randread then randwrite, 4
  jobs, ``direct=1``, over 1 and 2 request queues (interleaved rounds); the
  daemon's per-queue request counts show which queues carried the load.

Output in ``<build>/bench/<stamp>/``: ``dma.json`` (every run's record),
``dma.md`` (the tables), ``dma-*.png``. Numbers are medians (min-max) over
rounds, compared as ratios measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import select
import shlex
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .report import Stats

MODES = ("off", "shared", "per-device")
BOUNCE_MODES = ("shared", "per-device")
PARTS = ("contention", "shrink", "queues")
DEVICES = ("a", "b", "net")  # the three loaded devices, each one window in per-device mode
SLOTS = {"a": 0x8, "b": 0x9, "net": 0xA}
SEGMENT = 256 << 10  # one swiotlb segment: window sizes are multiples of it
SLAB = 2048  # one swiotlb slot (IO_TLB_SIZE)
MIB = 1 << 20
#: A run whose aggregate falls below this fraction of the mode's largest-size aggregate degraded.
DEGRADED = 0.8
FWD_ADDR = "10.0.2.100"  # the guest-side address QEMU forwards to this host's loopback
FWD_PORT = 9
GUEST_NET = "10.0.2.15/24"
DBG = "/sys/kernel/debug/swiotlb"
DATA_MIB = 32  # size of each fio file


# -- bounce memory ------------------------------------------------------------
def windows_for(total: int) -> dict[str, int]:
    """Split ``total`` bytes of bounce memory into one window per device:
    whole segments, as equal as they go (the spare segments to share A, then B).

    ``total`` must be a power of two: Linux 6.12 rounds the global pool up to
    a power of two slots (``round_up_default_nslabs()``; with 2 CPUs it has 2
    areas), so only then does the shared pool hold exactly the windows' sum.
    """
    if total <= 0 or total & (total - 1) or total % SEGMENT:
        raise ValueError(
            f"{total} bytes of bounce memory: want a power of two of at least "
            f"{len(DEVICES) * SEGMENT >> 10} KiB (the guest rounds its shared pool "
            "up to a power of two, and each window is whole 256 KiB segments)"
        )
    segs = total // SEGMENT
    if segs < len(DEVICES):
        raise ValueError(
            f"{total} bytes of bounce memory is less than one {SEGMENT >> 10} KiB "
            f"segment per device ({len(DEVICES)} devices)"
        )
    base, spare = divmod(segs, len(DEVICES))
    return {d: (base + (i < spare)) * SEGMENT for i, d in enumerate(DEVICES)}


def bounce_kernel_args(mode: str, total: int) -> tuple[str, ...]:
    """Kernel arguments sizing ``mode``'s bounce memory to ``total`` bytes.

    They come after the mode's own (``swiotlb=force``, ``virtio_swiotlb=64M``):
    a second ``swiotlb=<slabs>`` sets the pool's size and keeps ``force``, a
    second ``virtio_swiotlb=`` replaces the range's size (the range then holds
    exactly the windows).
    """
    windows_for(total)  # checked
    if mode == "off":
        return ()
    if mode == "shared":
        return (f"swiotlb={total // SLAB}",)
    if mode == "per-device":
        return (f"virtio_swiotlb={total}",)
    raise ValueError(f"unknown DMA mode {mode!r}; choose from {', '.join(MODES)}")


#: The smallest total: 4 segments (share A 512 KiB, B and the NIC 256 KiB each).
FLOOR = 1 << 20


def shrink_sizes(start: int, floor: int = FLOOR) -> list[int]:
    """Total bounce sizes from ``start`` (rounded down to a power of two)
    halving down to ``floor``."""
    if start < floor:
        return []
    total = 1 << (start.bit_length() - 1)
    sizes = []
    while total >= floor:
        sizes.append(total)
        total //= 2
    return sizes


def mib_to_total(mib: float) -> int:
    """``--dma-*-mib`` values as bytes, checked (ValueError)."""
    total = int(mib * MIB)
    windows_for(total)
    return total


def _windows_text(total: int) -> str:
    w = windows_for(total)
    return " / ".join(f"{d.upper() if d != 'net' else 'NIC'} {w[d] / MIB:g}" for d in DEVICES)


# -- what the guest reports -----------------------------------------------------
_FULL = re.compile(r"(\S+ [0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.\d): swiotlb buffer is full")
_SUPPRESSED = re.compile(r"swiotlb_tbl_map_single: (\d+) callbacks suppressed")
_ENQUEUE = re.compile(r"virtio_fs_enqueue_req\(\) failed")


def count_full(dmesg: str) -> dict[str, int]:
    """Count "swiotlb buffer is full" messages per device (``virtio-pci 0000:00:08.0``
    -> its BDF), plus ``suppressed`` (rate-limited away, any device) and
    ``enqueue_failed`` (virtio-fs requests failed because a mapping failed)."""
    out: dict[str, int] = {}
    for m in _FULL.finditer(dmesg):
        bdf = m.group(1).split()[-1]
        out[bdf] = out.get(bdf, 0) + 1
    out["suppressed"] = sum(int(n) for n in _SUPPRESSED.findall(dmesg))
    out["enqueue_failed"] = len(_ENQUEUE.findall(dmesg))
    return out


def total_full(counts: Mapping[str, int]) -> int:
    """Every "buffer is full" event the guest logged (printed or suppressed)."""
    return sum(v for k, v in counts.items() if k != "enqueue_failed")


@dataclass(frozen=True)
class FioJob:
    name: str
    read_bytes: int
    write_bytes: int
    runtime_s: float
    iops: float
    p50_us: float | None
    p99_us: float | None
    errors: int

    @property
    def mib_s(self) -> float:
        return (
            (self.read_bytes + self.write_bytes) / MIB / self.runtime_s if self.runtime_s else 0.0
        )


def _percentile(side: Mapping[str, Any], p: str) -> float | None:
    pct = side.get("clat_ns", {}).get("percentile") or {}
    v = pct.get(p)
    return None if v is None else float(v) / 1000.0


def parse_fio(text: str) -> list[FioJob]:
    """fio's ``--output-format=json`` (text before the JSON is skipped).

    Latency: the ``mixed`` side when fio reported read and write together
    (``--unified_rw_reporting=mixed``), else the side that moved more bytes.
    Errors: ``total_err`` with ``--continue_on_error``, else ``error != 0``.
    """
    start = text.find("{")
    if start < 0:
        raise ValueError("no JSON in fio's output")
    data = json.loads(text[start:])
    jobs = []
    for j in data["jobs"]:
        rd, wr = j.get("read", {}), j.get("write", {})
        mixed = j.get("mixed")
        if mixed is not None:
            lat_side = mixed
            rbytes = int(mixed.get("io_bytes", 0))
            wbytes = 0
            iops = float(mixed.get("iops", 0.0))
        else:
            rbytes, wbytes = int(rd.get("io_bytes", 0)), int(wr.get("io_bytes", 0))
            lat_side = rd if rbytes >= wbytes else wr
            iops = float(rd.get("iops", 0.0)) + float(wr.get("iops", 0.0))
        errors = int(j["total_err"]) if "total_err" in j else int(j.get("error", 0) != 0)
        jobs.append(
            FioJob(
                name=str(j.get("jobname", "")),
                read_bytes=rbytes,
                write_bytes=wbytes,
                runtime_s=float(j.get("job_runtime", 0)) / 1000.0,
                iops=iops,
                p50_us=_percentile(lat_side, "50.000000"),
                p99_us=_percentile(lat_side, "99.000000"),
                errors=errors,
            )
        )
    return jobs


# -- verdicts and the shrink search ---------------------------------------------
def aggregate(rec: Mapping[str, Any]) -> float:
    """MiB/s over the three devices (share B's 4 KiB IOPS counted as bytes)."""
    return float(rec["a_mib_s"]) + float(rec["b_mib_s"]) + float(rec["net_mib_s"])


def verdict(rec: Mapping[str, Any], reference: float | None) -> str:
    """``fail``, ``degraded`` or ``ok`` for one run (see the module docstring)."""
    if rec.get("failure"):
        return "fail"
    errs = rec["errors"]
    if errs["a"] or errs["b"] or rec["full"].get("enqueue_failed", 0) or not rec["net_mib_s"]:
        return "fail"
    if total_full(rec["full"]) > 0:
        return "degraded"
    if reference and aggregate(rec) < DEGRADED * reference:
        return "degraded"
    return "ok"


Probe = Callable[[str, int], Mapping[str, Any]]


def shrink_search(
    sizes: Sequence[int],
    probe: Probe,
    modes: Sequence[str] = BOUNCE_MODES,
    until: str = "shared",
    references: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Run ``probe(mode, size)`` at each size, largest first, modes interleaved
    (order rotated per size). A mode's reference aggregate is ``references``'
    or its first successful run's. Stops after the size at which ``until``
    (a mode, or ``both``) failed; a mode that failed is not run again.
    Returns the records, each with its ``verdict``."""
    if until != "both" and until not in modes:
        raise ValueError(f"until={until!r}: want 'both' or one of {', '.join(modes)}")
    refs = dict(references or {})
    failed: set[str] = set()
    records: list[dict[str, Any]] = []
    for step, size in enumerate(sorted(sizes, reverse=True)):
        active = [m for m in modes if m not in failed]
        k = step % len(active) if active else 0
        for mode in active[k:] + active[:k]:
            rec = dict(probe(mode, size))
            v = verdict(rec, refs.get(mode))
            rec["verdict"] = v
            if v != "fail" and mode not in refs:
                refs[mode] = aggregate(rec)
            if v == "fail":
                failed.add(mode)
            records.append(rec)
        if (until == "both" and failed >= set(modes)) or until in failed:
            break
    return records


def breakpoints(records: Iterable[Mapping[str, Any]], modes: Sequence[str] = BOUNCE_MODES
                ) -> dict[str, dict[str, int | None]]:  # fmt: skip
    """Per mode: the largest size at which it degraded and at which it failed
    (None: never, down to the smallest size it was run at), and that smallest size."""
    out: dict[str, dict[str, int | None]] = {
        m: {"degrades": None, "fails": None, "smallest": None} for m in modes
    }
    for rec in records:
        m, size, v = rec["mode"], int(rec["total_bytes"]), rec["verdict"]
        if m not in out:
            continue
        b = out[m]
        b["smallest"] = size if b["smallest"] is None else min(b["smallest"], size)
        if v in ("degraded", "fail") and (b["degrades"] is None or size > b["degrades"]):
            b["degrades"] = size
        if v == "fail" and (b["fails"] is None or size > b["fails"]):
            b["fails"] = size
    return out


# -- tables ----------------------------------------------------------------------
#: The contention table's lines: (label, record key or function, unit).
def _full_sum(r: Mapping[str, Any]) -> float:
    return float(total_full(r["full"]))


def _errors(r: Mapping[str, Any]) -> float:
    return float(r["errors"]["a"] + r["errors"]["b"] + r["full"].get("enqueue_failed", 0))


METRICS: tuple[tuple[str, Callable[[Mapping[str, Any]], float | None], str], ...] = (
    ("share A stream (MiB/s)", lambda r: r["a_mib_s"], "MiB/s"),
    ("share B 4k rand (IOPS)", lambda r: r["b_iops"], "IOPS"),
    ("share B p50 (us)", lambda r: r["b_p50_us"], "us"),
    ("share B p99 (us)", lambda r: r["b_p99_us"], "us"),
    ("NIC TCP (MiB/s)", lambda r: r["net_mib_s"], "MiB/s"),
    ("aggregate (MiB/s)", aggregate, "MiB/s"),
    ('"buffer is full"', _full_sum, "count"),
    ("I/O errors", _errors, "count"),
)


def _stats(values: Iterable[float | None]) -> Stats | None:
    vs = [float(v) for v in values if v is not None]
    return Stats.of(vs) if vs else None


def _fmt(s: Stats | None, unit: str = "") -> str:
    """``median (min-max)``; counts and values from 100 up without decimals."""
    if s is None:
        return "-"

    def num(v: float) -> str:
        if unit == "count" or abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.1f}" if abs(v) >= 1 else f"{v:.3g}"

    if s.n == 1 or s.min == s.max:
        return num(s.median)
    return f"{num(s.median)} ({num(s.min)}-{num(s.max)})"


def _ratio(a: Stats | None, b: Stats | None) -> str:
    if a is None or b is None or b.median == 0:
        return "-"
    return f"{a.median / b.median:.2f}x"


def contention_table(records: Sequence[Mapping[str, Any]], modes: Sequence[str] = MODES) -> str:
    """One line per metric: median (min-max) per mode, then per-device / shared
    and shared / off. Failed runs count in the failures line only."""
    ok = [r for r in records if not r.get("failure")]
    by_mode = {m: [r for r in ok if r["mode"] == m] for m in modes}
    head = ["metric", *modes]
    ratios = [(a, b) for a, b in (("per-device", "shared"), ("shared", "off")) if
              a in modes and b in modes]  # fmt: skip
    head += [f"{a} / {b}" for a, b in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, fn, unit in METRICS:
        st = {m: _stats(fn(r) for r in by_mode[m]) for m in modes}
        cells = [label, *(_fmt(st[m], unit) for m in modes)]
        cells += [_ratio(st[a], st[b]) for a, b in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    # high-water per pool: slots used at most / slots in the pool
    pools = sorted({p for r in ok for p in r["hiwater"]})
    for pool in pools:
        cells = [f"high-water {pool} (slots)"]
        for m in modes:
            hw = _stats(r["hiwater"][pool] for r in by_mode[m] if pool in r["hiwater"])
            n = [r["nslabs"][pool] for r in by_mode[m] if pool in r.get("nslabs", {})]
            cells.append("-" if hw is None else f"{_fmt(hw, 'count')} / {max(n) if n else '?'}")
        cells += ["" for _ in ratios]
        lines.append("| " + " | ".join(cells) + " |")
    failed = {m: sum(1 for r in records if r["mode"] == m and r.get("failure")) for m in modes}
    runs = {m: sum(1 for r in records if r["mode"] == m) for m in modes}
    cells = ["runs (failed)", *(f"{runs[m]} ({failed[m]})" for m in modes), *("" for _ in ratios)]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / MIB:g} MiB"


def shrink_table(records: Sequence[Mapping[str, Any]], modes: Sequence[str] = BOUNCE_MODES) -> str:
    """One line per size: per mode its verdict, aggregate (and each device's
    part: a failed device's partner may run faster for it), "buffer is full"
    count and I/O errors; then where each mode degraded and failed."""
    sizes = sorted({int(r["total_bytes"]) for r in records}, reverse=True)
    head = ["bounce total", "windows (MiB)", *modes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sizes:
        cells = [_mib(size), _windows_text(size)]
        for m in modes:
            rs = [r for r in records if r["mode"] == m and int(r["total_bytes"]) == size]
            if not rs:
                cells.append("(not run)")
                continue
            r = rs[0]
            if r.get("failure"):
                cells.append(f"**fail**: {r['failure'][:60]}")
                continue
            v = r["verdict"]
            text = (f"{'**' + v + '**' if v != 'ok' else v}: {aggregate(r):.1f} MiB/s "
                    f"(A {r.get('a_read_mib_s', 0):.0f} r + {r.get('a_write_mib_s', 0):.0f} w, "
                    f"B {r['b_iops']:.0f} IOPS p99 {_fmt(_stats([r['b_p99_us']]))} us, "
                    f"NIC {r['net_mib_s']:.1f}), full {total_full(r['full'])}, "
                    f"errors {int(_errors(r))}")  # fmt: skip
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for m, b in breakpoints(records, modes).items():
        lines.append(
            f"- {m}: degrades at {_mib(b['degrades']) if b['degrades'] else 'no size run'}, "
            f"fails at {_mib(b['fails']) if b['fails'] else 'no size run'} "
            f"(smallest run: {_mib(b['smallest'])})"
        )
    return "\n".join(lines) + "\n"


def request_shares(counts: Sequence[Mapping[str, int]]) -> str:
    """``q1 52%, q2 48%``: each request queue's median share of the requests
    (hiprio, queue 0, left out); ``-`` without counts."""
    counts = [c for c in counts if any(int(k) > 0 and v for k, v in c.items())]
    if not counts:
        return "-"
    qs = sorted({int(k) for c in counts for k in c if int(k) > 0})
    parts = []
    for q in qs:
        fracs = [c.get(str(q), 0) / sum(v for k, v in c.items() if int(k) > 0) for c in counts]
        parts.append(f"q{q} {statistics.median(fracs):.0%}")
    return ", ".join(parts)


def queues_table(records: Sequence[Mapping[str, Any]]) -> str:
    """fio 4k randread / randwrite IOPS over 1 and 2 request queues, 2q / 1q,
    and the median share of requests per request queue."""
    ok = [r for r in records if not r.get("failure")]
    workloads = list(dict.fromkeys(r["workload"] for r in ok))
    head = [
        "workload (4 jobs)",
        "1 queue IOPS",
        "2 queues IOPS",
        "2q / 1q",
        "2q: requests per queue",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in workloads:
        st = {q: _stats(r["iops"] for r in ok if r["workload"] == w and r["queues"] == q)
              for q in (1, 2)}  # fmt: skip
        share = request_shares(
            [r["queue_counts"] for r in ok if r["workload"] == w and r["queues"] == 2]
        )
        lines.append(f"| {w} | {_fmt(st[1])} | {_fmt(st[2])} | {_ratio(st[2], st[1])} | {share} |")
    failed = [r for r in records if r.get("failure")]
    if failed:
        lines.append("")
        lines += [f"- failed: {r['workload']} {r['queues']}q round {r['round']}: "
                  f"{r['failure'][:100]}" for r in failed]  # fmt: skip
    return "\n".join(lines) + "\n"


# -- plots -----------------------------------------------------------------------
def plot(result: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """``dma-contention.png`` (each metric relative to the shared mode's median,
    min-max bars), ``dma-shrink.png`` (aggregate vs bounce memory per mode,
    failures marked), ``dma-queues.png`` (IOPS by request queues)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(out_dir / name)

    cont = [r for r in result.get("contention", []) if not r.get("failure")]
    if cont:
        metrics = [m for m in METRICS if m[2] != "count"]
        modes = [m for m in MODES if any(r["mode"] == m for r in cont)]
        fig, ax = plt.subplots(figsize=(8.0, 4.0))
        width = 0.8 / max(len(modes), 1)
        for k, mode in enumerate(modes):
            xs, ys, lo, hi = [], [], [], []
            for i, (_label, fn, _u) in enumerate(metrics):
                ref = _stats(fn(r) for r in cont if r["mode"] == "shared")
                s = _stats(fn(r) for r in cont if r["mode"] == mode)
                if s is None or ref is None or ref.median == 0:
                    continue
                xs.append(i + (k - (len(modes) - 1) / 2) * width)
                ys.append(s.median / ref.median)
                lo.append((s.median - s.min) / ref.median)
                hi.append((s.max - s.median) / ref.median)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=mode)
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels([m[0] for m in metrics], rotation=20, ha="right", fontsize="small")
        ax.set_ylabel("median / shared mode's median")
        ax.set_title("three devices loaded at once (latency: lower is better)")
        ax.axhline(1.0, color="grey", linewidth=0.5)
        ax.legend(fontsize="small")
        save(fig, "dma-contention.png")
    shrink = result.get("shrink", [])
    if shrink:
        fig, ax = plt.subplots(figsize=(7.0, 4.0))
        for mode in BOUNCE_MODES:
            rs = sorted((r for r in shrink if r["mode"] == mode), key=lambda r: r["total_bytes"])
            if not rs:
                continue
            xs = [r["total_bytes"] / MIB for r in rs]
            ys = [0.0 if r.get("failure") else aggregate(r) for r in rs]
            (line,) = ax.plot(xs, ys, marker="o", label=mode)
            bad = [i for i, r in enumerate(rs) if r["verdict"] == "fail"]
            if bad:
                ax.scatter([xs[i] for i in bad], [ys[i] for i in bad], marker="x", s=80,
                           color=line.get_color())  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("total bounce memory (MiB), equal in both modes")
        ax.set_ylabel("aggregate MiB/s (x: failed)")
        ax.set_title("shrinking the bounce memory")
        ax.legend(fontsize="small")
        save(fig, "dma-shrink.png")
    queues = [r for r in result.get("queues", []) if not r.get("failure")]
    if queues:
        workloads = list(dict.fromkeys(r["workload"] for r in queues))
        fig, ax = plt.subplots(figsize=(6.0, 4.0))
        for k, q in enumerate((1, 2)):
            xs, ys, lo, hi = [], [], [], []
            for i, w in enumerate(workloads):
                s = _stats(r["iops"] for r in queues if r["workload"] == w and r["queues"] == q)
                if s is None:
                    continue
                xs.append(i + (k - 0.5) * 0.4)
                ys.append(s.median)
                lo.append(s.median - s.min)
                hi.append(s.max - s.median)
            ax.bar(xs, ys, 0.4, yerr=[lo, hi], capsize=2, label=f"{q} request queue(s)")
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads)
        ax.set_ylabel("IOPS (median, min-max)")
        ax.set_title("fio 4k, 4 jobs, one share")
        ax.legend(fontsize="small")
        save(fig, "dma-queues.png")
    return written


# -- arguments -------------------------------------------------------------------
def _mib_list(text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: want comma-separated MiB, e.g. 6,3,1.5") from e
    if not vals or any(not math.isfinite(v) or v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: want positive MiB values")
    return vals


def _parts(text: str) -> list[str]:
    parts = [p for p in text.split(",") if p]
    for p in parts:
        if p not in PARTS:
            raise argparse.ArgumentTypeError(f"unknown part {p!r}; choose from {', '.join(PARTS)}")
    return parts


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from e
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{text!r}: want > 0")
        return v

    return parse


#: ``--dma-quick``: what one of the suite's own runs on a busy 2-core machine uses.
QUICK: dict[str, Any] = {"dma_duration": 8.0, "dma_rounds": 1, "dma_shrink_mib": [4.0, 2.0, 1.0]}
#: Without it (an option given explicitly wins over either).
DEFAULTS: dict[str, Any] = {"dma_duration": 20.0, "dma_rounds": 3, "dma_shrink_mib": None}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pyvirtiofsd-bench --suite dma",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    g = ap.add_argument_group("dma suite")
    g.add_argument("--dma-parts", type=_parts, default=list(PARTS),
                   help=f"comma-separated, from {','.join(PARTS)} (default: all)")  # fmt: skip
    g.add_argument("--dma-duration", type=_positive(float), default=None,
                   help="seconds each load runs (default 20)")  # fmt: skip
    g.add_argument("--dma-rounds", type=_positive(int), default=None,
                   help="rounds of the contention and queues parts, modes interleaved "
                   "(default 3)")  # fmt: skip
    g.add_argument("--dma-bounce-mib", type=_positive(float), default=64.0,
                   help="total bounce memory of the contention part, a power of two: "
                   "3 windows (whole segments, near equal) or one shared pool of the "
                   "same size (default 64, Linux's default pool)")  # fmt: skip
    g.add_argument("--dma-shrink-mib", type=_mib_list, default=None,
                   help="the shrink part's sizes, powers of two (default: halving from "
                   "half of --dma-bounce-mib down to 1 MiB)")  # fmt: skip
    g.add_argument("--dma-shrink-until", choices=("shared", "both"), default="shared",
                   help="stop shrinking once the shared mode failed (default) or both")  # fmt: skip
    g.add_argument("--dma-accel", default="auto")
    g.add_argument("--dma-daemon-args", type=shlex.split, default=[], metavar="ARGS",
                   help="extra pyvirtiofsd arguments for every share, e.g. "
                   "'--thread-pool-size 2'")  # fmt: skip
    g.add_argument("--dma-quick", action="store_true",
                   help="a short run: --dma-duration 8 --dma-rounds 1 "
                   "--dma-shrink-mib 4,2,1")  # fmt: skip
    return ap


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Apply ``--dma-quick`` and check the sizes; raises SystemExit with a message."""
    for k, v in (QUICK if args.dma_quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    try:
        mib_to_total(args.dma_bounce_mib)
        if args.dma_shrink_mib is not None:
            for s in args.dma_shrink_mib:
                mib_to_total(s)
    except ValueError as e:
        raise SystemExit(f"dma suite: {e}") from e
    return args


# -- the guest side (needs QEMU, the guest kernel and the Debian userland) ---------
class LoopbackPeer:
    """The NIC's far end: one TCP connection on 127.0.0.1, made by QEMU's
    ``guestfwd`` when it starts; everything read is discarded, zeros are
    written back as fast as the guest takes them."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = int(self.listener.getsockname()[1])
        self.received = 0
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="loopback-peer", daemon=True)
        self._thread.start()

    def netdev(self) -> str:
        """The ``-netdev`` value: user networking reaching nothing but this peer."""
        return (f"user,id=n0,restrict=on,"
                f"guestfwd=tcp:{FWD_ADDR}:{FWD_PORT}-tcp:127.0.0.1:{self.port}")  # fmt: skip

    def _serve(self) -> None:
        self.listener.settimeout(1.0)
        conn = None
        while conn is None and not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
        if conn is None:
            return
        zeros = bytes(64 << 10)
        with conn:
            conn.setblocking(False)
            while not self._stop.is_set():
                r, w, _ = select.select([conn], [conn], [], 0.2)
                try:
                    if r:
                        data = conn.recv(1 << 16)
                        if not data:
                            return
                        self.received += len(data)
                    if w:
                        self.sent += conn.send(zeros)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.listener.close()


def _fio_cmd(args: str, out: str) -> str:
    return (f"fio --output-format=json --output={out} --ioengine=psync --direct=1 "
            f"--time_based --continue_on_error=all {args}")  # fmt: skip


def _prepare(d: Path, names: Sequence[str], mib: int = DATA_MIB) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for n in names:
        f = d / n
        if not f.exists() or f.stat().st_size != mib * MIB:
            with f.open("wb") as out:
                for _ in range(mib):
                    out.write(os.urandom(MIB))


def run_scenario(mode: str, total: int, duration: float, work: Path, accel: str,
                 name: str, daemon_args: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    """One guest in ``mode`` with ``total`` bytes of bounce memory, the three
    devices loaded for ``duration`` s; returns the run's record."""
    from pyvirtiofsd.vm import debian
    from pyvirtiofsd.vm.errors import VmError
    from pyvirtiofsd.vm.machine import Machine, MachineConfig
    from pyvirtiofsd.vm.shares import Share
    from pyvirtiofsd.vm.swiotlb import bdf

    windows = windows_for(total)
    rec: dict[str, Any] = {"mode": mode, "total_bytes": total, "window_bytes": windows,
                           "duration_s": duration}  # fmt: skip
    _prepare(work / "a", ["stream-r.bin", "stream-w.bin"])
    _prepare(work / "b", ["rand.bin"])
    shares = {t: Share(work / t, t, backend="pyvirtiofsd", addr=SLOTS[t],
                       daemon_args=tuple(daemon_args)) for t in ("a", "b")}  # fmt: skip
    peer = LoopbackPeer()
    qemu_args = ["-netdev", peer.netdev()]
    if mode != "per-device":
        nic = f"virtio-net-pci,netdev=n0,addr={SLOTS['net']:#x}"
        if mode == "shared":
            nic += ",disable-legacy=on,iommu_platform=on"
        qemu_args += ["-device", nic]
    cfg = MachineConfig(
        shares=list(shares.values()) if mode != "per-device" else [],
        cpus=2,
        accel=accel,
        debian=True,
        dma_mode=mode,
        kernel_args=bounce_kernel_args(mode, total),
        extra_qemu_args=tuple(qemu_args),
    )
    started = time.monotonic()
    try:
        with Machine(cfg, name=f"bench-dma-{name}") as vm:
            rec["boot_s"] = vm.boot_seconds
            if mode == "per-device":
                for i, t in enumerate(("a", "b")):
                    vm.attach_share_window(shares[t], f"fs{i}", SLOTS[t], size=windows[t])
                    vm.agent.run(debian.bind_share_script(t), check=True)
                vm.attach_net_window("net0", SLOTS["net"], "n0", size=windows["net"])
            nic_bdf = bdf(SLOTS["net"])
            iface = vm.agent.run(f"ls /sys/bus/pci/devices/{nic_bdf}/virtio*/net/",
                                 check=True).text.split()[0]  # fmt: skip
            vm.agent.run(f"ip link set {iface} up && ip addr add {GUEST_NET} dev {iface}",
                         check=True)  # fmt: skip
            pools = {t: f"{DBG}/virtio-{bdf(SLOTS[t])}" for t in DEVICES}
            if mode == "shared":
                pools = {"global": DBG}
            if mode == "off":
                pools = {}
            # The mark is reset to 0 and rises only when a mapping is made, so
            # the slots held at rest (vrings, the NIC's posted receive buffers)
            # are read first: high-water = max(mark, resting use).
            resting = {}
            for pool, path in pools.items():
                resting[pool] = int(vm.agent.read_file(f"{path}/io_tlb_used").decode())
                vm.agent.run(f"echo 0 > {path}/io_tlb_used_hiwater", check=True)
            vm.agent.run("dmesg -c > /dev/null", check=True)
            d = f"{duration:g}"
            fio_a = _fio_cmd(
                f"--runtime={d} --bs=1M --size={DATA_MIB}M "
                "--name=seqread --rw=read --filename=/mnt/a/stream-r.bin "
                "--name=seqwrite --rw=write --filename=/mnt/a/stream-w.bin",
                "/tmp/a.json",
            )
            fio_b = _fio_cmd(
                f"--runtime={d} --bs=4k --size={DATA_MIB}M --name=rand --rw=randrw "
                "--rwmixread=50 --unified_rw_reporting=mixed --filename=/mnt/b/rand.bin",
                "/tmp/b.json")  # fmt: skip
            st = f"/sys/class/net/{iface}/statistics"
            script = "; ".join([
                f"n0=\"$(cat {st}/tx_bytes) $(cat {st}/rx_bytes)\"",
                f"{debian.chroot_command(fio_a)} >/dev/null 2>/tmp/a.err & pa=$!",
                f"{debian.chroot_command(fio_b)} >/dev/null 2>/tmp/b.err & pb=$!",
                f"timeout {math.ceil(duration)} nc {FWD_ADDR} {FWD_PORT} </dev/zero "
                ">/dev/null 2>/tmp/nc.err & pn=$!",
                "wait $pa; ea=$?; wait $pb; eb=$?; wait $pn",
                f"echo $ea $eb $n0 $(cat {st}/tx_bytes) $(cat {st}/rx_bytes)",
            ])  # fmt: skip
            r = vm.agent.run(script, timeout=duration + 300)
            fields = r.text.split()
            if r.status != 0 or len(fields) != 6:
                raise RuntimeError(f"load script: status {r.status}, {r.text!r} "
                                   f"{r.stderr.decode(errors='replace')[-300:]!r}")  # fmt: skip
            ea, eb, tx0, rx0, tx1, rx1 = (int(x) for x in fields)
            rec["net_tx_bytes"], rec["net_rx_bytes"] = tx1 - tx0, rx1 - rx0
            rec["net_mib_s"] = (tx1 - tx0 + rx1 - rx0) / MIB / duration
            rec["host_peer"] = {"received": peer.received, "sent": peer.sent}
            jobs = {}
            for part, code in (("a", ea), ("b", eb)):
                text = vm.agent.read_file(f"{debian.GUEST_ROOT}/tmp/{part}.json").decode()
                try:
                    jobs[part] = parse_fio(text)
                except (ValueError, KeyError) as e:
                    err = vm.agent.read_file(f"/tmp/{part}.err").decode(errors="replace")
                    raise RuntimeError(f"fio on share {part} (exit {code}): {e}; {err[-300:]}"
                                       ) from e  # fmt: skip
                rec[f"fio_{part}_exit"] = code
            rec["a_read_mib_s"] = sum(j.read_bytes for j in jobs["a"]) / MIB / duration
            rec["a_write_mib_s"] = sum(j.write_bytes for j in jobs["a"]) / MIB / duration
            rec["a_mib_s"] = sum(j.mib_s for j in jobs["a"])
            b = jobs["b"][0]
            rec["b_iops"], rec["b_mib_s"] = b.iops, b.mib_s
            rec["b_p50_us"], rec["b_p99_us"] = b.p50_us, b.p99_us
            rec["errors"] = {"a": sum(j.errors for j in jobs["a"]) + (ea != 0),
                             "b": b.errors + (eb != 0)}  # fmt: skip
            rec["full"] = count_full(vm.agent.run("dmesg", check=True).text)
            rec["hiwater"], rec["nslabs"], rec["resting"] = {}, {}, resting
            for pool, path in pools.items():
                mark = int(vm.agent.read_file(f"{path}/io_tlb_used_hiwater").decode())
                rec["hiwater"][pool] = max(mark, resting[pool])
                rec["nslabs"][pool] = int(vm.agent.read_file(f"{path}/io_tlb_nslabs").decode())
    except (VmError, RuntimeError, OSError, ValueError) as e:
        rec["failure"] = f"{type(e).__name__}: {e}"
    finally:
        peer.close()
    rec["wall_s"] = time.monotonic() - started
    return rec


def _queue_requests(stats_file: Path) -> dict[int, int]:
    """Requests per queue so far, from the daemon's ``--stats-file``."""
    if not stats_file.exists():  # written first 0.2 s after the first ring starts
        return {}
    data = json.loads(stats_file.read_text())
    return {int(q): int(v["requests"]) for q, v in data["queues"].items()}


def queue_delta(before: Mapping[int, int], after: Mapping[int, int]) -> dict[str, int]:
    """Requests each queue served between two stats snapshots (JSON keys:
    the queue index as text; 0 is hiprio). The file lags by at most its
    0.2 s rewrite period. Queues that never served a request are left out
    (the stats file lists every queue the daemon offers)."""
    return {str(q): n - before.get(q, 0) for q, n in sorted(after.items()) if n}


def run_queues(queues: int, duration: float, work: Path, accel: str, rnd: int,
               daemon_args: Sequence[str] = ()) -> list[dict[str, Any]]:  # fmt: skip
    """One guest, one share over ``queues`` request queues: fio 4k randread,
    then randwrite, 4 jobs; one record per workload, with the requests each
    queue served during it (the daemon's stats file before and after)."""
    from pyvirtiofsd.vm import debian
    from pyvirtiofsd.vm.errors import VmError
    from pyvirtiofsd.vm.machine import Machine, MachineConfig
    from pyvirtiofsd.vm.shares import Share

    names = [f"f{i}" for i in range(4)]
    _prepare(work / "q", names, 16)
    stats = work / f"q{queues}-stats.json"
    share = Share(work / "q", "q", backend="pyvirtiofsd", num_request_queues=queues,
                  daemon_args=(*daemon_args, "--stats-file", str(stats)))  # fmt: skip
    cfg = MachineConfig(shares=[share], cpus=2, accel=accel, debian=True)
    recs: list[dict[str, Any]] = []
    base = {"queues": queues, "round": rnd, "duration_s": duration}
    try:
        with Machine(cfg, name=f"bench-dma-q{queues}") as vm:
            for w in ("randread", "randwrite"):
                cmd = _fio_cmd(
                    f"--runtime={duration:g} --bs=4k --size=16M --numjobs=4 "
                    f"--group_reporting --name={w} --rw={w} --directory=/mnt/q "
                    "--filename_format='f$jobnum'", "/tmp/q.json")  # fmt: skip
                before = _queue_requests(stats)
                r = vm.agent.run(debian.chroot_command(cmd), timeout=duration + 300)
                after = _queue_requests(stats)
                text = vm.agent.read_file(f"{debian.GUEST_ROOT}/tmp/q.json").decode()
                job = parse_fio(text)[0]
                recs.append({**base, "workload": w, "iops": job.iops, "fio_exit": r.status,
                             "errors": job.errors, "p99_us": job.p99_us,
                             "queue_counts": queue_delta(before, after)})  # fmt: skip
    except (VmError, RuntimeError, OSError, ValueError, KeyError, IndexError) as e:
        done = {r["workload"] for r in recs}
        recs += [{**base, "workload": w, "failure": f"{type(e).__name__}: {e}"}
                 for w in ("randread", "randwrite") if w not in done]  # fmt: skip
    return recs


def _log(msg: str) -> None:
    print(f"[bench dma] {msg}", file=sys.stderr, flush=True)


def _summary(rec: Mapping[str, Any]) -> str:
    if rec.get("failure"):
        return f"FAILED {rec['failure'][:200]}"
    return (f"A {rec['a_mib_s']:.1f} MiB/s, B {rec['b_iops']:.0f} IOPS p99 "
            f"{rec['b_p99_us'] or 0:.0f} us, NIC {rec['net_mib_s']:.1f} MiB/s, full "
            f"{total_full(rec['full'])}, errors {rec['errors']}, "
            f"hiwater {rec['hiwater']}")  # fmt: skip


def run_suite(args: argparse.Namespace, out: Path) -> str:
    """Run the suite into ``out``; returns the markdown text."""
    args = resolve_args(args)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "dma-data"
    started = time.monotonic()
    total = mib_to_total(args.dma_bounce_mib)
    result: dict[str, Any] = {"suite": "dma", "contention": [], "shrink": [], "queues": []}
    n = 0

    def scenario(mode: str, size: int, rnd: int) -> dict[str, Any]:
        nonlocal n
        n += 1
        _log(f"{mode}, {size / MIB:g} MiB bounce, round {rnd} ...")
        rec = run_scenario(mode, size, args.dma_duration, work, args.dma_accel, f"{n}-{mode}",
                           args.dma_daemon_args)  # fmt: skip
        rec["round"] = rnd
        _log(f"  {mode}: {_summary(rec)} ({rec['wall_s']:.0f} s)")
        return rec

    if "contention" in args.dma_parts:
        for rnd in range(args.dma_rounds):
            k = rnd % len(MODES)
            for mode in MODES[k:] + MODES[:k]:
                result["contention"].append(scenario(mode, total, rnd))
    if "shrink" in args.dma_parts:
        if args.dma_shrink_mib is not None:
            sizes = sorted({mib_to_total(s) for s in args.dma_shrink_mib}, reverse=True)
        else:
            sizes = shrink_sizes(total // 2)
        refs = {}
        for m in BOUNCE_MODES:
            good = [aggregate(r) for r in result["contention"] if r["mode"] == m and
                    verdict(r, None) != "fail"]  # fmt: skip
            if good:
                refs[m] = statistics.median(good)
        result["shrink"] = shrink_search(
            sizes, lambda m, s: scenario(m, s, 0), until=args.dma_shrink_until, references=refs
        )
    if "queues" in args.dma_parts:
        for rnd in range(args.dma_rounds):
            for q in (1, 2) if rnd % 2 == 0 else (2, 1):
                _log(f"queues {q}, round {rnd} ...")
                recs = run_queues(q, args.dma_duration, work, args.dma_accel, rnd,
                                  args.dma_daemon_args)  # fmt: skip
                _log("  " + "; ".join(f"{r['workload']} {r.get('iops', 0):.0f} IOPS "
                                      f"{r.get('failure', '')}" for r in recs))  # fmt: skip
                result["queues"] += recs
    wall = time.monotonic() - started
    head = (f"DMA contention benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')}, "
            f"{platform.node()}, {os.cpu_count()} host CPUs (shared with other work: "
            f"expect noise); guest 2 vCPUs; {args.dma_rounds} round(s) x "
            f"{args.dma_duration:g} s, modes interleaved; median (min-max); "
            f"{wall:.0f} s\n")  # fmt: skip
    text = [head]
    if result["contention"]:
        text += [f"\n## Three devices at once, {total / MIB:g} MiB of bounce memory "
                 f"(windows {_windows_text(total)} MiB, or one pool of "
                 f"{total / MIB:g} MiB)\n\n", contention_table(result["contention"])]  # fmt: skip
    if result["shrink"]:
        text += ["\n## Shrinking the bounce memory\n\n", shrink_table(result["shrink"])]
    if result["queues"]:
        text += ["\n## Request queues (one share, DMA off)\n\n", queues_table(result["queues"])]
    md = "".join(text)
    result.update(
        args={k: v for k, v in vars(args).items() if k.startswith("dma_")},
        host={"node": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release()},
        wall_s=wall,
    )
    (out / "dma.md").write_text(md)
    (out / "dma.json").write_text(json.dumps(result, indent=1))
    plots = plot(result, out)
    if work.exists():
        import shutil

        shutil.rmtree(work)
    _log(f"{wall:.0f} s; {out}/dma.md, dma.json, {len(plots)} plots")
    return md


def main(argv: list[str] | None = None) -> int:
    from pyvirtiofsd.vm.paths import build_dir

    ap = argparse.ArgumentParser(parents=[build_parser()], description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    args = ap.parse_args(argv)
    out = build_dir() / "bench" / time.strftime("%Y%m%d-%H%M%S")
    print(run_suite(args, out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
