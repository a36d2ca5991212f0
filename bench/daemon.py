"""``make bench SUITE=daemon``: the daemon alone, no guest, against its peers.

This process plays QEMU: it does the vhost-user handshake over the daemon's
real socket (features, memory table backed by a memfd, vrings, kick and call
eventfds; :mod:`pyvirtiofsd.bench.frontend`), and then its C request loop
(:mod:`pyvirtiofsd.bench.loadgen`) keeps ``depth`` FUSE requests in flight on
each request queue, re-posting pre-encoded requests as completions arrive and
checking every reply header, and counts completions over a fixed time.

Workloads (every request must succeed): GETATTR of the root, LOOKUP of one
name, READ 4 KiB, WRITE 4 KiB, READ 128 KiB (each slot its own offset),
CREATE+RELEASE+UNLINK (a per-slot sequence, distinct names, then the FORGET
a guest sends once the inode is evicted; counted in sequences), READDIRPLUS of
a 1,000-entry directory from offset 0 into a 4 KiB buffer, and a mix (READ,
GETATTR, READ, LOOKUP, WRITE per slot, slots out of phase). Each at depth 1
and 32, over 1 and 2 request queues; a daemon that offers fewer queues is
measured on what it offers, and the table says so.

Peers run in the same invocation, interleaved by rounds (A B C A B C ...):
each round starts each daemon afresh and measures every cell on it. Output
under ``<build>/bench/<stamp>/``: ``daemon.json`` (every round, every peer's
command line), ``daemon.md`` (the table, then the CPUs the daemon, this process and the
machine kept busy in each cell: :mod:`pyvirtiofsd.bench.cpu`),
``daemon-d<depth>-q<queues>.png`` and each daemon's log in ``logs/``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from pyvirtiofsd.daemon.vhost_user.messages import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    MemoryRegionDesc,
    ProtocolFeature,
    VringAddr,
)
from pyvirtiofsd.vm.process import ChildProcess

from . import fuse
from .cpu import CpuMeter, markdown_cpu_table
from .frontend import FakeFrontend
from .loadgen import GuestRam, LoadGenError, QueueDriver, RunResult, Step, run, run_per_queue
from .peers import PEERS, PeerUnavailable, peer_argv

__all__ = [
    "WORKLOADS",
    "Context",
    "Session",
    "Workload",
    "build_parser",
    "main",
    "prepare_share",
    "run_suite",
]

VIRTIO_F_VERSION_1 = 1 << 32
REQUEST_QUEUE_SIZE = 1024
HIPRIO_QUEUE_SIZE = 64
QUEUE_SPAN = 8 << 20  # guest RAM per request queue: rings and every buffer
HIPRIO_SPAN = 1 << 20
FILE_SIZE = 8 << 20
DIR_ENTRIES = 1000
SMALL_REPLY = 256
DIRENT_BUFFER = 4096


@dataclass(frozen=True)
class Context:
    """What the setup requests found: node ids and handles the workloads use."""

    file_node: int
    file_fh: int
    dir_node: int
    dir_fh: int


@dataclass(frozen=True)
class Workload:
    """A named way to fill a slot: ``program(ctx, queue, slot, depth)``."""

    name: str
    program: Callable[[Context, int, int, int], list[Step]]
    unit: str = "ops/s"
    scale: float = 1.0  # value = completions/s * scale
    finish: bool = False  # a started program always runs to its end (see QueueDriver)

    def value(self, ops_per_s: float) -> float:
        return ops_per_s * self.scale


def _getattr(ctx: Context, q: int, s: int, depth: int) -> Step:
    return Step(fuse.getattr_(), SMALL_REPLY, fuse.ReplySize.GETATTR)


def _lookup(ctx: Context, q: int, s: int, depth: int) -> Step:
    return Step(fuse.lookup("file.bin"), SMALL_REPLY, fuse.ReplySize.ENTRY)


def _read(size: int) -> Callable[[Context, int, int, int], Step]:
    def step(ctx: Context, q: int, s: int, depth: int) -> Step:
        offset = (q * depth + s) * size % FILE_SIZE
        room = fuse.OUT_HEADER.size + size
        return Step(fuse.read(ctx.file_node, ctx.file_fh, offset, size), room, room)

    return step


def _write(ctx: Context, q: int, s: int, depth: int) -> Step:
    offset = (q * depth + s) * 4096 % FILE_SIZE
    data = bytes([s & 0xFF]) * 4096
    req = fuse.write(ctx.file_node, ctx.file_fh, offset, data)
    return Step(req, fuse.ReplySize.WRITE, fuse.ReplySize.WRITE)


def _create_release_unlink(ctx: Context, q: int, s: int, depth: int) -> list[Step]:
    name = f"bench-q{q}-s{s}"
    nodeid_at = 16  # fuse_in_header.nodeid; CREATE's reply has fuse_entry_out.nodeid there
    return [
        Step(
            fuse.create(name),
            fuse.ReplySize.CREATE,
            fuse.ReplySize.CREATE,
            patches=(
                (1, nodeid_at, nodeid_at),
                (1, fuse.CREATE_FH_OFFSET, fuse.RELEASE_FH_OFFSET),
                (3, nodeid_at, nodeid_at),
            ),
        ),
        Step(fuse.release(0), SMALL_REPLY, fuse.ReplySize.EMPTY),
        Step(fuse.unlink(name), SMALL_REPLY, fuse.ReplySize.EMPTY),
        Step(fuse.forget(0), 0),  # the guest drops the evicted inode's lookup
    ]


def _readdirplus(ctx: Context, q: int, s: int, depth: int) -> Step:
    req = fuse.readdirplus(ctx.dir_node, ctx.dir_fh, DIRENT_BUFFER)
    return Step(req, fuse.OUT_HEADER.size + DIRENT_BUFFER)


_MIX = (_read(4096), _getattr, _read(4096), _lookup, _write)


def _mix(ctx: Context, q: int, s: int, depth: int) -> list[Step]:
    steps = [f(ctx, q, s, depth) for f in _MIX]
    k = s % len(steps)
    return steps[k:] + steps[:k]


def _one(f: Callable[[Context, int, int, int], Step]) -> Callable[..., list[Step]]:
    return lambda ctx, q, s, depth: [f(ctx, q, s, depth)]


WORKLOADS = {
    w.name: w
    for w in (
        Workload("getattr", _one(_getattr)),
        Workload("lookup", _one(_lookup)),
        Workload("read-4k", _one(_read(4096))),
        Workload("write-4k", _one(_write)),
        Workload("read-128k", _one(_read(128 << 10)), "GB/s", (128 << 10) / 1e9),
        Workload("create-release-unlink", _create_release_unlink, "seq/s", 1 / 4, finish=True),
        Workload("readdirplus-1000", _one(_readdirplus)),
        Workload("mix", _mix),
    )
}


def prepare_share(d: Path) -> None:
    """The shared directory: an 8 MiB file and a directory of 1,000 empty files."""
    d.mkdir(parents=True, exist_ok=True)
    f = d / "file.bin"
    if not f.exists() or f.stat().st_size != FILE_SIZE:
        f.write_bytes(os.urandom(FILE_SIZE))
    sub = d / "dir1000"
    sub.mkdir(exist_ok=True)
    for i in range(DIR_ENTRIES):
        (sub / f"entry-{i:04d}").touch()
    for stale in d.glob("bench-q*"):
        stale.unlink()


class SetupError(RuntimeError):
    """The handshake or a setup request failed."""


@dataclass
class Session:
    """One daemon process and this process playing its front-end."""

    peer: str
    argv: list[str]
    process: ChildProcess
    fe: FakeFrontend
    ram: GuestRam
    queues: list[QueueDriver]  # request queues (vring 1..n)
    queues_offered: int
    eventfds: list[int] = field(default_factory=list)
    ctx: Context | None = None

    async def call(self, step: Step) -> bytes:
        """One request on the first request queue; its reply (header included)."""
        q = self.queues[0]
        q.load_program([[step]])
        res = await trio.to_thread.run_sync(lambda: run([q], duration=3600, max_ops=1))
        try:
            res.check()
        except LoadGenError as e:
            raise SetupError(f"{self.peer}: setup opcode {step.request.opcode}: {e}") from e
        return q.reply(0, 0)

    async def setup(self) -> Context:
        await self.call(Step(fuse.init(), SMALL_REPLY))
        entry = await self.call(Step(fuse.lookup("file.bin"), SMALL_REPLY, fuse.ReplySize.ENTRY))
        file_node = int.from_bytes(entry[16:24], "little")
        opened = await self.call(Step(fuse.open_(file_node), SMALL_REPLY, fuse.ReplySize.OPEN))
        file_fh = int.from_bytes(opened[16:24], "little")
        entry = await self.call(Step(fuse.lookup("dir1000"), SMALL_REPLY, fuse.ReplySize.ENTRY))
        dir_node = int.from_bytes(entry[16:24], "little")
        opened = await self.call(Step(fuse.opendir(dir_node), SMALL_REPLY, fuse.ReplySize.OPEN))
        self.ctx = Context(file_node, file_fh, dir_node, int.from_bytes(opened[16:24], "little"))
        return self.ctx

    async def measure(
        self,
        workload: Workload,
        depth: int,
        nqueues: int,
        warmup: float,
        duration: float,
        *,
        per_queue_threads: bool = False,
    ) -> tuple[RunResult, int]:
        """Run one cell; returns the result and the number of queues used."""
        assert self.ctx is not None
        used = self.queues[:nqueues]
        for qi, q in enumerate(used):
            q.load_program([workload.program(self.ctx, qi, s, depth) for s in range(depth)],
                           finish=workload.finish)  # fmt: skip
        drive = run_per_queue if per_queue_threads and len(used) > 1 else run
        res = await trio.to_thread.run_sync(lambda: drive(used, warmup=warmup, duration=duration))
        return res, len(used)

    def close(self) -> None:
        self.fe.close()
        self.process.stop(grace=5.0)
        for fd in self.eventfds:
            os.close(fd)
        self.ram.close()


async def open_session(
    peer: str, share: Path, log_path: Path, want_queues: int, extra: Sequence[str] = ()
) -> Session:
    """Start ``peer`` on a listening socket it inherits, connect and set up its rings."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock_path = log_path.with_suffix(".sock")
    sock_path.unlink(missing_ok=True)
    try:
        listener.bind(str(sock_path))
        listener.listen(1)
        argv = peer_argv(peer, listener.fileno(), share, extra)
        process = ChildProcess(peer, argv, log_path, pass_fds=[listener.fileno()])
    finally:
        listener.close()
    eventfds: list[int] = []
    ram: GuestRam | None = None
    fe: FakeFrontend | None = None
    try:
        fe = await FakeFrontend.connect(sock_path)
        features = await fe.get_features()
        await fe.set_owner()
        proto = bool(features & VHOST_USER_F_PROTOCOL_FEATURES)
        offered_queues = 1
        if proto:
            pf = await fe.get_protocol_features()
            want = pf & (ProtocolFeature.MQ.mask | ProtocolFeature.REPLY_ACK.mask)
            await fe.set_protocol_features(want)
            if want & ProtocolFeature.MQ.mask:
                offered_queues = max(await fe.get_queue_num() - 1, 1)
        nreq = min(want_queues, offered_queues)
        await fe.set_features(VIRTIO_F_VERSION_1 | (VHOST_USER_F_PROTOCOL_FEATURES if proto else 0))
        ram = GuestRam(HIPRIO_SPAN + nreq * QUEUE_SPAN)
        region = MemoryRegionDesc(0, ram.size, ram.uaddr, 0)
        await fe.set_mem_table([(ram.fd, region)])
        drivers = []
        for index in range(1 + nreq):
            kick = os.eventfd(0, os.EFD_CLOEXEC)
            call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            eventfds += [kick, call]
            if index == 0:
                d = QueueDriver(ram, 0, HIPRIO_SPAN, HIPRIO_QUEUE_SIZE, kick, call)
            else:
                base = HIPRIO_SPAN + (index - 1) * QUEUE_SPAN
                d = QueueDriver(ram, base, QUEUE_SPAN, REQUEST_QUEUE_SIZE, kick, call)
                drivers.append(d)
            await fe.set_vring_num(index, d.size)
            await fe.set_vring_base(index, 0)
            await fe.set_vring_addr(VringAddr(index, 0, d.desc_addr, d.used_addr, d.avail_addr, 0))
            await fe.set_vring_kick(index, kick)
            await fe.set_vring_call(index, call)
            if proto:
                await fe.set_vring_enable(index, True)
        await fe.get_features()  # a round trip: every message above has been handled
    except BaseException as e:
        if fe is not None:
            fe.close()
        process.stop(grace=2.0)
        for fd in eventfds:
            os.close(fd)
        if ram is not None:
            ram.close()
        if isinstance(e, OSError | EOFError):
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-5:])
            raise SetupError(f"{peer}: vhost-user handshake failed ({e}); log {log_path}:\n"
                             f"{tail}") from e  # fmt: skip
        raise
    return Session(peer, argv, process, fe, ram, drivers, offered_queues, eventfds)


def cells(
    workloads: Sequence[str], depths: Sequence[int], queues: Sequence[int]
) -> list[tuple[str, int, int]]:
    return [(w, d, q) for w in workloads for d in depths for q in queues]


def _failed(peer: str, rnd: int, cell: tuple[str, int, int], message: str) -> dict[str, Any]:
    name, depth, nq = cell
    return {"peer": peer, "round": rnd, "workload": name, "depth": depth, "queues": nq,
            "unit": WORKLOADS[name].unit, "failure": -1, "message": message}  # fmt: skip


def _peer_args(text: str) -> tuple[str, list[str]]:
    peer, sep, rest = text.partition("=")
    if not sep or peer not in PEERS:
        raise argparse.ArgumentTypeError(f"{text!r}: want PEER=ARGS, PEER one of {PEERS}")
    return peer, shlex.split(rest)


async def _round(
    peer: str,
    rnd: int,
    args: argparse.Namespace,
    share: Path,
    out: Path,
    meta: dict[str, Any],
) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    todo = cells(args.workloads, args.depths, args.queues)
    for stale in share.glob("bench-q*"):  # left by a round that failed mid-sequence
        stale.unlink()
    log = out / "logs" / f"{peer}-r{rnd}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        sess = await open_session(peer, share, log, max(args.queues), args.peer_args.get(peer, ()))
    except SetupError as e:
        print(f"[bench] {e}", file=sys.stderr)
        return [_failed(peer, rnd, c, str(e)) for c in todo]
    try:
        meta.setdefault(peer, {"argv": sess.argv, "request_queues_offered": sess.queues_offered})
        try:
            await sess.setup()
        except SetupError as e:
            print(f"[bench] {e}", file=sys.stderr)
            return [_failed(peer, rnd, c, str(e)) for c in todo]
        for name, depth, nq in todo:
            w = WORKLOADS[name]
            threads = args.generator == "per-queue"
            with CpuMeter(sess.process.pid) as cpu:
                res, used = await sess.measure(w, depth, nq, args.warmup, args.duration,
                                               per_queue_threads=threads)  # fmt: skip
            assert cpu.use is not None
            rec = {
                "peer": peer, "round": rnd, "workload": name, "depth": depth, "queues": nq,
                "queues_used": used, "unit": w.unit, "ops": res.ops, "total": res.total,
                "measured_s": res.measured_s, "ops_per_s": res.ops_per_s,
                "value": w.value(res.ops_per_s), "per_queue": list(res.per_queue),
                "kicks": res.kicks, "calls": res.calls, "loadgen_busy": res.busy,
                "unsignalled": res.unsignalled,
                "failure": res.failure,
                "message": res.message,
                **cpu.use.as_dict(),
            }  # fmt: skip
            records.append(rec)
            todo_left = todo[len(records) :]
            status = f"FAILED: {res.message}" if res.failure else f"{rec['value']:.4g} {w.unit}"
            print(f"  r{rnd} {peer:15s} {name:22s} d{depth:<2d} q{nq}"
                  f"{'' if used == nq else f'(used {used})'}: {status}",
                  file=sys.stderr, flush=True)  # fmt: skip
            if res.failure:
                # the rings may be in any state: the next round starts afresh
                records += [_failed(peer, rnd, c, "not run: an earlier cell failed")
                            for c in todo_left]  # fmt: skip
                break
    finally:
        sess.close()
    return records


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pyvirtiofsd-bench --suite daemon",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    g = ap.add_argument_group("daemon suite")
    g.add_argument("--duration", type=float, default=0.5, help="measured seconds per cell")
    g.add_argument("--warmup", type=float, default=0.2, help="unmeasured seconds before each")
    g.add_argument("--rounds", type=int, default=3, help="rounds (every peer once per round)")
    g.add_argument("--peers", type=lambda s: s.split(","), default=list(PEERS),
                   help=f"comma-separated, from {','.join(PEERS)}")  # fmt: skip
    g.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS),
                   help=f"comma-separated, from {','.join(WORKLOADS)}")  # fmt: skip
    g.add_argument("--peer-args", type=_peer_args, action="append", default=[],
                   metavar="PEER=ARGS",
                   help="extra command-line arguments for one peer (repeatable)")  # fmt: skip
    g.add_argument("--generator", choices=("one", "per-queue"), default="one",
                   help="one generator thread for every queue (default; the lightest on "
                   "a small machine), or one thread per request queue")  # fmt: skip
    g.add_argument("--depths", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32])
    g.add_argument("--queues", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    g.add_argument("--share-parent", type=Path, default=None, metavar="DIR",
                   help="where the shared directory is made (default: /dev/shm when it "
                   "is a tmpfs, else the output directory); the report names its fs")  # fmt: skip
    return ap


def fs_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on (/proc/self/mounts, longest match)."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1].replace("\\040", " ")
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, kind = mnt, fields[2]
    return kind


def share_parent(asked: Path | None, out: Path) -> Path:
    """``--share-parent``, else /dev/shm if it is a tmpfs, else ``out``.

    The daemons are measured, not the host filesystem: an ext4 without a
    journal (this project's VMs) scans every inode deleted in the last
    30 s on each create (``recently_deleted``), so CREATE+UNLINK there
    costs whatever the cells before it deleted."""
    if asked is not None:
        return asked
    shm = Path("/dev/shm")
    if shm.is_dir() and fs_type(shm) == "tmpfs" and os.access(shm, os.W_OK):
        return shm
    return out


def run_suite(args: argparse.Namespace, out: Path) -> str:
    """Run the suite into ``out``; returns the markdown table."""
    import json

    from .report import markdown_table, plot, summarize

    extra: dict[str, list[str]] = {}
    for peer, more in args.peer_args:
        extra.setdefault(peer, []).extend(more)
    args.peer_args = extra
    for w in args.workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for d in args.depths:
        if not 1 <= d <= 64:
            raise SystemExit(f"depth {d}: 1..64")
    peers = []
    for p in args.peers:
        if p not in PEERS:
            raise SystemExit(f"unknown peer {p!r}; choose from {', '.join(PEERS)}")
        try:
            peer_argv(p, 3, out)  # builds the Rust peer's root if needed
        except PeerUnavailable as e:
            print(f"[bench] skipping {p}: {e}", file=sys.stderr)
            continue
        peers.append(p)
    import tempfile

    parent = share_parent(args.share_parent, out)
    share = Path(tempfile.mkdtemp(prefix="pyvirtiofsd-bench-", dir=parent))
    prepare_share(share)
    share_fs = fs_type(share)
    meta: dict[str, Any] = {}
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    for rnd in range(args.rounds):
        for peer in peers:
            records += trio.run(_round, peer, rnd, args, share, out, meta)
    rows = summarize(records, peers)
    table = markdown_table(rows, peers)
    head = (f"daemon benchmark, {time.strftime('%Y-%m-%d %H:%M:%S')}, {platform.node()}, "
            f"{os.cpu_count()} CPUs; {args.rounds} rounds x {args.duration} s "
            f"(+{args.warmup} s warm-up), peers interleaved by round, "
            f"generator threads: {args.generator}; share on {share_fs} ({share.parent}); "
            "median (min-max)\n\n")  # fmt: skip
    table += "\n" + markdown_cpu_table(records, peers)
    (out / "daemon.md").write_text(head + table)
    (out / "daemon.json").write_text(json.dumps({
        "suite": "daemon", "peers": peers, "commands": meta,
        "args": {k: v for k, v in vars(args).items() if k in
                 ("duration", "warmup", "rounds", "workloads", "depths", "queues", "peer_args",
                  "generator")},
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
                 "share": str(share), "share_fs": share_fs},
        "wall_s": time.monotonic() - started, "records": records,
    }, indent=1))  # fmt: skip
    plots = plot(rows, peers, out, "daemon")
    shutil.rmtree(share)  # test data only; the logs stay
    print(f"[bench] daemon suite: {time.monotonic() - started:.0f} s; {out}/daemon.md, "
          f"daemon.json, {len(plots)} plots", file=sys.stderr)  # fmt: skip
    return head + table


def main(argv: list[str] | None = None) -> int:
    from pyvirtiofsd.vm.paths import build_dir

    ap = argparse.ArgumentParser(parents=[build_parser()], description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    args = ap.parse_args(argv)
    out = build_dir() / "bench" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    print(run_suite(args, out), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
