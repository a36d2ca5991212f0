"""``make bench``: guest-side throughput of pyvirtiofsd against its peers.

One guest, one run, three shares of the same host directory: pyvirtiofsd,
the C virtiofsd shipped with QEMU (``/usr/lib/qemu/virtiofsd``) and QEMU's own
virtio-9p. Each is read with ``dd`` from inside the guest, caches dropped
before every pass, several passes interleaved so that noise on a shared
machine hits every peer alike. The result is reported as ratios to the peers
measured in the same run (absolute numbers are printed for reference only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .machine import Machine, MachineConfig
from .paths import build_dir
from .shares import Share

PEERS = (("pyvirtiofsd", "py"), ("virtiofsd", "cvfs"), ("9p", "ninep"))


@dataclass
class Result:
    backend: str
    seconds: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def make_data(size_mib: int) -> Path:
    d = build_dir() / "bench-data"
    d.mkdir(parents=True, exist_ok=True)
    f = d / f"read-{size_mib}M.bin"
    if not f.exists() or f.stat().st_size != size_mib << 20:
        tmp = f.with_suffix(".tmp")
        with tmp.open("wb") as out:
            for _ in range(size_mib):
                out.write(os.urandom(1 << 20))
        tmp.rename(f)
    return f


def timed_read(vm: Machine, path: str, bs: str) -> float:
    """Seconds the guest needs to read ``path`` cold (guest caches dropped)."""
    vm.agent.run("sync; echo 3 > /proc/sys/vm/drop_caches", check=True)
    # the agent times the command in the guest (CLOCK_MONOTONIC, fork to exit)
    r = vm.agent.run(f"dd if={path} of=/dev/null bs={bs} 2>/dev/null", timeout=600, check=True)
    return r.elapsed


def run_bench(size_mib: int, passes: int, bs: str, accel: str) -> dict[str, Result]:
    data = make_data(size_mib)
    shares = [Share(data.parent, tag, backend=backend) for backend, tag in PEERS]
    results = {backend: Result(backend, []) for backend, _ in PEERS}
    with Machine(MachineConfig(shares=shares, accel=accel), name="bench") as vm:
        for _ in range(passes):
            for backend, tag in PEERS:
                secs = timed_read(vm, f"/mnt/{tag}/{data.name}", bs)
                results[backend].seconds.append(secs)
    return results


def report(results: dict[str, Result], size_mib: int) -> str:
    py = results["pyvirtiofsd"]
    lines = [
        f"guest dd read of a {size_mib} MiB file, caches dropped, "
        f"{len(py.seconds)} interleaved passes (best / median seconds):",
    ]
    for r in results.values():
        lines.append(
            f"  {r.backend:12s} best {r.best:7.3f} s ({size_mib / r.best:8.1f} MiB/s)"
            f"   median {r.median:7.3f} s"
        )
    for peer in ("virtiofsd", "9p"):
        ratio = results[peer].best / py.best
        lines.append(
            f"  pyvirtiofsd throughput / {peer}: {ratio:.2f}x (best), "
            f"{results[peer].median / py.median:.2f}x (median)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="pyvirtiofsd-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--bs", default="1M")
    ap.add_argument("--accel", default="auto")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    results = run_bench(args.size_mib, args.passes, args.bs, args.accel)
    text = report(results, args.size_mib)
    print(text)
    out = build_dir() / "bench"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"read-{stamp}.json").write_text(
        json.dumps(
            {k: v.seconds for k, v in results.items()} | {"size_mib": args.size_mib}, indent=2
        )
    )
    print(f"(raw results in {out}; {time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
