"""``make bench SUITE=guest``: guest-side throughput of pyvirtiofsd against its peers.

Part 1, peers: one guest, one run, four shares of the same host directory:
pyvirtiofsd, the C virtiofsd shipped with QEMU (``/usr/lib/qemu/virtiofsd``),
the Rust virtiofsd of Debian 13 (``--thread-pool-size 0``; see
:mod:`pyvirtiofsd.bench.peers`) and QEMU's own virtio-9p. Each is read (a
file the guest has not cached: caches dropped first) and written
(``conv=fsync``) with ``dd`` from inside the guest, several passes
interleaved so that noise on a shared machine hits every peer alike.

Part 2, DMA modes: pyvirtiofsd alone, the same workload in each of the three
DMA modes (``off``, ``shared`` = swiotlb=force, ``per-device`` windows), one
guest per mode, run back to back. One device at a time cannot show contention
for bounce memory; ``make bench SUITE=dma`` (:mod:`pyvirtiofsd.bench.dma`)
loads two shares and a NIC at once.

Results are ratios to the peers (or to mode ``off``) measured in the same run;
absolute numbers are printed for reference only. Times are measured in the
guest by the agent (CLOCK_MONOTONIC around the command).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .machine import Machine, MachineConfig
from .paths import build_dir
from .shares import Share
from .swiotlb import DMA_MODES

PEERS = (
    ("pyvirtiofsd", "py"),
    ("virtiofsd", "cvfs"),
    ("rust-virtiofsd", "rust"),
    ("9p", "ninep"),
)


@dataclass
class Result:
    name: str
    read: list[float] = field(default_factory=list)
    write: list[float] = field(default_factory=list)


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
    r = vm.agent.run(f"dd if={path} of=/dev/null bs={bs} 2>/dev/null", timeout=600, check=True)
    return r.elapsed


def timed_write(vm: Machine, path: str, size_mib: int) -> float:
    """Seconds the guest needs to write ``size_mib`` MiB to ``path`` and fsync it."""
    r = vm.agent.run(
        f"dd if=/dev/zero of={path} bs=1M count={size_mib} conv=fsync 2>/dev/null && rm {path}",
        timeout=600,
        check=True,
    )
    return r.elapsed


def run_peers(size_mib: int, passes: int, bs: str, accel: str) -> dict[str, Result]:
    data = make_data(size_mib)
    # The C and the Rust virtiofsd serve one request queue (libvhost-user's
    # virtiofsd panics on a second); pyvirtiofsd gets one per vCPU.
    shares = [
        Share(data.parent, tag, backend=b, num_request_queues=None if b == "pyvirtiofsd" else 1)
        for b, tag in PEERS
    ]
    results = {backend: Result(backend) for backend, _ in PEERS}
    with Machine(MachineConfig(shares=shares, accel=accel), name="bench-peers") as vm:
        for _ in range(passes):
            for backend, tag in PEERS:
                res = results[backend]
                res.read.append(timed_read(vm, f"/mnt/{tag}/{data.name}", bs))
                res.write.append(timed_write(vm, f"/mnt/{tag}/w-{backend}.bin", size_mib))
    return results


def run_modes(size_mib: int, passes: int, bs: str, accel: str) -> dict[str, Result]:
    data = make_data(size_mib)
    results = {}
    for mode in DMA_MODES:
        res = results[mode] = Result(mode)
        share = Share(data.parent, "py", backend="pyvirtiofsd")
        cfg = MachineConfig(shares=[share], accel=accel, dma_mode=mode)
        with Machine(cfg, name=f"bench-{mode}") as vm:
            for _ in range(passes):
                res.read.append(timed_read(vm, f"/mnt/py/{data.name}", bs))
                res.write.append(timed_write(vm, "/mnt/py/w-mode.bin", size_mib))
    return results


def _line(r: Result, size_mib: int) -> str:
    rb, wb = min(r.read), min(r.write)
    return (
        f"  {r.name:14s} read  best {rb:6.3f} s ({size_mib / rb:7.1f} MiB/s) "
        f"median {statistics.median(r.read):6.3f} s | "
        f"write best {wb:6.3f} s ({size_mib / wb:7.1f} MiB/s) "
        f"median {statistics.median(r.write):6.3f} s"
    )


def _ratio(a: Result, b: Result) -> str:
    """Throughput of ``a`` relative to ``b`` (best and median), reads and writes."""
    return (
        f"read {min(b.read) / min(a.read):.2f}x best, "
        f"{statistics.median(b.read) / statistics.median(a.read):.2f}x median; "
        f"write {min(b.write) / min(a.write):.2f}x best, "
        f"{statistics.median(b.write) / statistics.median(a.write):.2f}x median"
    )


def report(peers: dict[str, Result], modes: dict[str, Result], size_mib: int) -> str:
    lines = []
    if peers:
        n = len(peers["pyvirtiofsd"].read)
        lines.append(f"peers: {size_mib} MiB dd, {n} interleaved passes, same guest:")
        lines += [_line(r, size_mib) for r in peers.values()]
        for peer in ("virtiofsd", "rust-virtiofsd", "9p"):
            lines.append(f"  pyvirtiofsd / {peer}: {_ratio(peers['pyvirtiofsd'], peers[peer])}")
    if modes:
        n = len(modes["off"].read)
        lines.append(f"pyvirtiofsd by DMA mode: {size_mib} MiB dd, {n} passes per guest:")
        lines += [_line(r, size_mib) for r in modes.values()]
        for mode in ("shared", "per-device"):
            lines.append(f"  {mode} / off: {_ratio(modes[mode], modes['off'])}")
        lines.append(f"  per-device / shared: {_ratio(modes['per-device'], modes['shared'])}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pyvirtiofsd-bench --suite guest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    g = ap.add_argument_group("guest suite")
    g.add_argument("--size-mib", type=int, default=64)
    g.add_argument("--passes", type=int, default=3)
    g.add_argument("--bs", default="1M")
    g.add_argument("--accel", default="auto")
    g.add_argument("--only", choices=("peers", "modes"), default=None)
    return ap


def run_suite(args: argparse.Namespace, out: Path) -> str:
    """Run the guest suite; results go to ``out/guest.json`` and ``out/guest.txt``."""
    t0 = time.monotonic()
    peers: dict[str, Result] = {}
    modes: dict[str, Result] = {}
    if args.only in (None, "peers"):
        peers = run_peers(args.size_mib, args.passes, args.bs, args.accel)
    if args.only in (None, "modes"):
        modes = run_modes(args.size_mib, args.passes, args.bs, args.accel)
    text = report(peers, modes, args.size_mib)
    out.mkdir(parents=True, exist_ok=True)
    raw = {k: {"read": v.read, "write": v.write} for k, v in {**peers, **modes}.items()}
    (out / "guest.json").write_text(
        json.dumps({"suite": "guest", "size_mib": args.size_mib, "results": raw}, indent=2)
    )
    (out / "guest.txt").write_text(text + "\n")
    print(f"(guest suite: raw results in {out}; {time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return text + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(parents=[build_parser()], description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    args = ap.parse_args(argv)
    out = build_dir() / "bench" / time.strftime("%Y%m%d-%H%M%S")
    print(run_suite(args, out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
