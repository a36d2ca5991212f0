"""A fast plain-random fuzz driver for the three harnesses, with counts and coverage.

hypothesis (``test_*_fuzz.py``) shrinks and replays well but draws slowly;
this driver feeds the same targets, with the same invariants, from a seeded
``random.Random`` in a tight loop so that a long run reaches 10^6 inputs per
harness.  ``scripts/fuzz.sh`` runs it under ASan + UBSan (the C core built
with both); ``make fuzz`` calls that.

    python -m tests.fuzz.driver HARNESS [--inputs N] [--seconds S] [--seed N]
                                [--coverage N] [--json PATH]

Harnesses (an *input* is what the target decodes once):

* ``vhost-user``: one vhost-user message (header, payload, 0-3 real fds,
  sometimes oversize) to :class:`VhostUserHandler`, in sequences of 1-25 on
  one handler (half after a valid handshake, the device sometimes failing or
  raising); a quarter of the sequences are a raw 12+ byte message.  The
  handler never raises, answers well-formed replies, closes or hands on
  every fd, and a disconnect resets the device.
* ``dma``: one random descriptor table (8 entries, plus a 16-entry table an
  INDIRECT may point at) with 1-8 published heads, popped by the C core.
  Each pop matches a pure-Python reference walk (lengths and the bytes
  read back) or fails with the reference's reason, the head already
  returned; chain I/O (read, write, pwritev, preadv) on every chain whose
  writable buffers lie outside the rings moves exactly the right bytes.
* ``fuse``: one FUSE request to :class:`FuseSession` over a share beside an
  ``outside/`` tree, in episodes of 400 on one filesystem (INIT first, most
  of the time); bodies structured per opcode (node ids and handles taken
  from earlier replies, hostile names), corpus seeds with flipped bytes, or
  random.  Every reply is well-formed and within its room; after each
  episode nothing outside the share changed and no fd is left.

Coverage is line coverage of the target modules' functions and methods
(module and class bodies, run at import, are left out), measured with a
``sys.settrace`` tracer over the first ``--coverage`` inputs (the tracer
costs ~10x; the rest of the run is untraced).  A failed invariant or an
exception is a crash: the input is written to ``build/fuzz/crashes/`` and the
exit status is 1.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import logging
import os
import random
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
CRASH_DIR = Path(os.environ.get("PYVIRTIOFSD_BUILD_DIR", ROOT / "build")) / "fuzz" / "crashes"

U32 = 0xFFFF_FFFF
U64 = 0xFFFF_FFFF_FFFF_FFFF


def rint(rng: random.Random, specials: tuple[int, ...], hi: int) -> int:
    return rng.choice(specials) if rng.random() < 0.5 else rng.randint(0, hi)


def rbytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(rng.randint(0, n))


# -- coverage ------------------------------------------------------------------


class LineCoverage:
    """Executed / executable lines of some source files, via sys.settrace."""

    def __init__(self, files: Iterable[Path]) -> None:
        self.files = {str(f.resolve()) for f in files}
        self.executable: dict[str, set[int]] = {}
        for f in self.files:
            code = compile(Path(f).read_text(), f, "exec")
            self.executable[f] = self._lines(code)
        self.hit: dict[str, set[int]] = {f: set() for f in self.files}
        self._real: dict[str, str | None] = {}

    @classmethod
    def _lines(cls, code: CodeType) -> set[int]:
        # function and method bodies only: module and class bodies run at
        # import, which may have happened before the tracer started
        out = set()
        if code.co_flags & inspect.CO_OPTIMIZED:
            out = {line for _, _, line in code.co_lines() if line is not None}
        for c in code.co_consts:
            if isinstance(c, CodeType):
                out |= cls._lines(c)
        return out

    def _target(self, co_filename: str) -> str | None:
        """The target a code object's file is (sanitize.sh imports through symlinks)."""
        try:
            return self._real[co_filename]
        except KeyError:
            real = os.path.realpath(co_filename)
            self._real[co_filename] = real if real in self.files else None
            return self._real[co_filename]

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            self.hit[self._real[frame.f_code.co_filename]].add(frame.f_lineno)  # type: ignore[index]
        return self._local

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        target = self._target(frame.f_code.co_filename)
        if target is not None:
            self.hit[target].add(frame.f_lineno)
            return self._local
        return None

    def start(self) -> None:
        sys.settrace(self._global)

    def stop(self) -> None:
        sys.settrace(None)

    def summary(self) -> dict[str, Any]:
        per = {}
        total = hit = 0
        for f in sorted(self.files):
            ex = self.executable[f]
            h = len(self.hit[f] & ex)
            per[os.path.relpath(f, ROOT)] = f"{h}/{len(ex)}"
            total += len(ex)
            hit += h
        return {"lines": f"{hit}/{total}", "percent": round(100 * hit / max(total, 1), 1),
                "files": per}  # fmt: skip


# -- the harnesses ---------------------------------------------------------------


class Crash(Exception):
    def __init__(self, what: str, data: object) -> None:
        super().__init__(what)
        self.data = data


@dataclass
class Harness:
    name: str
    targets: list[Path]
    # runs one batch (a sequence, a table, an episode); returns inputs done
    batch: Callable[[random.Random], int]
    close: Callable[[], None] = lambda: None
    extra: dict[str, int] = field(default_factory=dict)


def vhost_user_harness() -> Harness:
    from pyvirtiofsd.daemon.vhost_user import VhostUserHandler
    from pyvirtiofsd.daemon.vhost_user.connection import RawMessage
    from pyvirtiofsd.daemon.vhost_user.messages import (
        HEADER_SIZE,
        FrontendReq,
        Header,
        HeaderFlags,
        MemoryRegionDesc,
        MemoryTable,
        MemRegionMsg,
        VringAddr,
        VringFd,
        VringState,
    )
    from pyvirtiofsd.daemon.vhost_user.messages import U64 as U64Msg
    from tests.unit.test_vhost_user_handler import _check_reply, _handshake
    from tests.unit.test_vhost_user_server import RecordingDevice

    codes = [int(c) for c in FrontendReq]
    good_flags = (0x1, 0x1 | HeaderFlags.NEED_REPLY)
    u64s = (0, 1, 0xF, 1 << 30, 1 << 63, U64, 0x1000, 0xFFFF_F000)
    stats = {"sequences": 0, "raw": 0}

    def region(rng: random.Random) -> Any:
        return MemoryRegionDesc(rint(rng, (0, 0x1000, 1 << 20), U64), rint(rng, (0, 0x1000), U64),
                                rint(rng, (0, 1 << 30), U64), rint(rng, (0,), U64))  # fmt: skip

    def payload(rng: random.Random) -> bytes:
        k = rng.randrange(8)
        if k == 0:
            return b""
        if k == 1:
            return U64Msg(rint(rng, u64s, U64)).pack()
        if k == 2:
            return VringState(rng.randint(0, 4), rint(rng, (0, 1, 256, 1024, 2048), U32)).pack()
        if k == 3:
            return VringAddr(rng.randint(0, 4), rng.randint(0, 3),
                             *(rint(rng, u64s, U64) for _ in range(4))).pack()  # fmt: skip
        if k == 4:
            return VringFd(rng.randint(0, 255), rng.random() < 0.5).pack()
        if k == 5:
            return MemRegionMsg(region(rng)).pack()
        if k == 6:
            return MemoryTable(tuple(region(rng) for _ in range(rng.randint(0, 8)))).pack()
        return rbytes(rng, 300)

    def deliver(handler: Any, header: Any, body: bytes, nfds: int, oversize: bool) -> None:
        fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
        msg = RawMessage(header, b"" if oversize else body, list(fds), oversize=oversize)
        try:
            reply = handler.handle(msg)
            _check_reply(reply, header)
        except Exception as e:
            raise Crash(f"{type(e).__name__}: {e}", (header, body, nfds, oversize)) from e
        finally:
            leaked = []
            for fd in fds:
                try:
                    os.fstat(fd)
                except OSError:
                    continue
                leaked.append(fd)
                os.close(fd)
        if msg.fds or leaked:
            raise Crash(f"fds left: {msg.fds} {leaked}", (header, body, nfds, oversize))

    # the kept corpus: a front-end's start-up and teardown, and a few refusals
    seeds = [p.read_bytes() for p in sorted((CORPUS / "vhost-user").glob("*.bin"))]
    fd_requests = ("SET_MEM_TABLE", "ADD_MEM_REG", "SET_VRING_KICK", "SET_VRING_CALL",
                   "SET_VRING_ERR", "SET_BACKEND_REQ_FD")  # fmt: skip
    with_fd = {int(FrontendReq[name]) for name in fd_requests}
    replayed = [False]

    def seed_message(data: bytes) -> tuple[Any, bytes, int]:
        request, flags, _ = struct.unpack_from("<III", data)
        body = data[HEADER_SIZE:]
        return Header(request, flags, len(body)), body, int(request in with_fd)

    def batch(rng: random.Random) -> int:
        if not replayed[0]:  # the corpus first, in order, on one handler
            replayed[0] = True
            handler = VhostUserHandler(RecordingDevice())
            for data in seeds:
                deliver(handler, *seed_message(data), False)
            handler.disconnected()
            return len(seeds)
        device = RecordingDevice()
        mode = rng.choice(("ok", "ok", "fail", "crash"))
        if mode != "ok":
            methods = {"set_vring_kick", "set_mem_table", "add_mem_region", "set_features"}
            getattr(device, mode).update(methods)
        handler = VhostUserHandler(device)
        if rng.random() < 0.25:  # raw bytes, after a handshake
            _handshake(handler)
            if seeds and rng.random() < 0.5:  # a corpus message with flipped bytes
                data = bytearray(rng.choice(seeds))
                for _ in range(rng.randint(1, 4)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                header, body, nfds = seed_message(bytes(data))
                deliver(handler, header, body, nfds, False)
            else:
                data = rng.randbytes(rng.randint(HEADER_SIZE, 400))
                request, flags, _ = struct.unpack_from("<III", data)
                body = data[HEADER_SIZE:]
                deliver(handler, Header(request, flags, len(body)), body, 0, False)
            stats["raw"] += 1
            n = 1
        else:
            if rng.random() < 0.5:
                _handshake(handler)
            n = rng.randint(1, 25)
            for _ in range(n):
                code = rng.choice(codes) if rng.random() < 0.9 else rng.randint(0, U32)
                flags = rng.choice(good_flags) if rng.random() < 0.8 else rng.randint(0, U32)
                body = payload(rng)
                deliver(handler, Header(code, flags, len(body)), body, rng.randint(0, 3),
                        rng.randrange(21) == 0)  # fmt: skip
        handler.disconnected()
        if device.calls[-1] != ("reset",):
            raise Crash("disconnect did not reset the device", device.calls[-3:])
        stats["sequences"] += 1
        return n

    return Harness("vhost-user", TARGETS["vhost-user"], batch, extra=stats)


def dma_harness() -> Harness:
    from pyvirtiofsd.dma import Chain, ChainError, GuestMemory
    from tests.support.splitq import GuestRam
    from tests.unit.test_dma_fuzz import RAM, SIZE, TABLE_ENTRIES, TABLE_GPA, load_queue, reference

    ram = GuestRam(RAM)
    mem = GuestMemory()
    mem.add_region(ram.fd, ram.memory_region())
    sink = os.memfd_create("fuzz-sink", os.MFD_CLOEXEC)
    source = os.memfd_create("fuzz-source", os.MFD_CLOEXEC)
    pattern = bytes(range(256)) * 256
    os.write(source, pattern)
    addr_specials = (0x9000, 0xA000, 0xFFF0, RAM - 8, RAM, TABLE_GPA, 2**64 - 8, 2**63, 0x3000)
    len_specials = (0, 1, 8, 15, 16, 32, 48, 256, 4096, RAM, U32)
    stats = {"tables": 0, "chains": 0, "chain_errors": 0, "chain_io": 0}
    safe = [(0x3000, TABLE_GPA), (TABLE_GPA + 16 * TABLE_ENTRIES, RAM)]  # not rings, not tables

    def desc(rng: random.Random, next_hi: int) -> tuple[int, int, int, int]:
        if rng.random() < 0.6:  # plausible: inside guest memory, NEXT/WRITE, a near next
            if rng.random() < 0.1:
                return (TABLE_GPA, 16 * rng.randint(1, TABLE_ENTRIES), 4, 0)
            addr = rng.choice((0x3000, 0x4000, 0x9000, 0xA000, 0xC000, 0xE000)) + rng.randrange(64)
            length = rng.choice((0, 1, 16, 40, 256, 4096, rng.randint(1, 0x2000)))
            return (addr, length, rng.randint(0, 3), rng.randint(0, next_hi // 2))
        return (rint(rng, addr_specials, U64), rint(rng, len_specials, U32),
                rng.randint(0, 7), rng.randint(0, next_hi))  # fmt: skip

    def segments(table: list[tuple[int, int, int, int]], head: int) -> list[tuple[int, int, bool]]:
        """(addr, len, writable) of a chain the reference accepted."""
        snap = ram.read(0, RAM)
        out, cur, i = [], table, head
        while True:
            addr, length, flags, nxt = cur[i]
            if flags & 4:
                cur = [
                    struct.unpack_from("<QIHH", snap, addr + 16 * k) for k in range(length // 16)
                ]
                i = 0
                continue
            if length:
                out.append((addr, length, bool(flags & 2)))
            if not flags & 1:
                return out
            i = nxt

    def chain_io(rng: random.Random, c: Any, segs: list[tuple[int, int, bool]]) -> int:
        readable = b"".join(ram.read(a, n) for a, n, w in segs if not w)
        n = min(len(readable), 4096)
        if c.read(0, n) != readable[:n]:
            raise Crash("chain read differs from guest memory", segs)
        os.ftruncate(sink, 0)
        done = c.pwritev(sink, 0, n, 0)
        if done != n or os.pread(sink, n, 0) != readable[:n]:
            raise Crash("pwritev wrote other bytes", segs)
        for bad in (c.readable_len + 1, -1):
            try:
                c.read(max(bad, 0) if bad > 0 else 0, bad if bad < 0 else None)
            except ValueError:
                pass
            else:
                raise Crash(f"read({bad}) outside the readable part accepted", segs)
        wsegs = [(a, m) for a, m, w in segs if w]
        inside = all(any(lo <= a and a + m <= hi for lo, hi in safe) for a, m in wsegs)
        spans = sorted(wsegs)
        disjoint = all(a + m <= b for (a, m), (b, _) in itertools.pairwise(spans))
        if not (inside and disjoint) or c.writable_len == 0:
            return 0
        m = min(c.writable_len, 8192)
        off = rng.randint(0, c.writable_len - m) if c.writable_len > m else 0
        data = rng.randbytes(m)
        c.write(data, off)
        writable = b"".join(ram.read(a, k) for a, k in wsegs)
        if writable[off : off + m] != data:
            raise Crash("chain write landed elsewhere", segs)
        got = c.preadv(source, 0, m, off)
        writable = b"".join(ram.read(a, k) for a, k in wsegs)
        if got != m or writable[off : off + m] != pattern[:m]:
            raise Crash("preadv landed elsewhere", segs)
        try:
            c.write(b"x", c.writable_len)
        except ValueError:
            pass
        else:
            raise Crash("write past the writable part accepted", segs)
        return 1

    # the kept corpus (each check's failure, and a regression of this harness)
    seeds = json.loads((CORPUS / "dma" / "tables.json").read_text())

    def batch(rng: random.Random) -> int:
        if seeds:  # the corpus first, one table per input
            case = seeds.pop(0)
            ring = [tuple(d) for d in case["ring"]]
            table = [tuple(d) for d in case["table"]]
            heads = list(case["heads"])
        else:
            ring = [desc(rng, 2 * SIZE) for _ in range(SIZE)]
            table = [desc(rng, TABLE_ENTRIES + 2) for _ in range(TABLE_ENTRIES)]
            heads = [rng.randint(0, 2 * SIZE) for _ in range(rng.randint(1, SIZE))]
        ram.write(0, bytes(0x3000))
        vq, q = load_queue(ram, mem, ring, table, heads, pattern[:4096])
        try:
            for n, h in enumerate(heads):
                # live memory: an earlier chain's writes may have changed a table
                expected = reference(ram.read(0, RAM), ring, h)
                try:
                    c = vq.pop()
                except ChainError as e:
                    if e.reason != expected or e.head != h or q.used_entry(n) != (h, 0):
                        raise Crash(f"pop failed with {e.reason!r}, expected {expected!r}",
                                    (ring, table, heads)) from e  # fmt: skip
                    stats["chain_errors"] += 1
                    continue
                if not isinstance(c, Chain) or (c.readable_len, c.writable_len) != expected:
                    raise Crash(f"popped {c!r}, expected {expected!r}", (ring, table, heads))
                stats["chains"] += 1
                stats["chain_io"] += chain_io(rng, c, segments(ring, h))
                c.complete(0)
                if q.used_entry(n) != (h, 0):
                    raise Crash("used entry wrong", (ring, table, heads))
            if vq.pop() is not None or q.used_idx != len(heads):
                raise Crash("queue not drained", (ring, table, heads))
        finally:
            vq.close()
        stats["tables"] += 1
        return 1

    def close() -> None:
        os.close(sink)
        os.close(source)
        ram.close()

    return Harness("dma", TARGETS["dma"], batch, close, stats)


def fuse_harness() -> Harness:
    from pyvirtiofsd.daemon.fuse.session import FuseSession
    from pyvirtiofsd.daemon.passthrough import PassthroughFs
    from tests.fuzz.test_fuse_fuzz import (
        HOSTILE_NAMES,
        OPCODES,
        SEEDS,
        check_reply,
        fd_set,
        flip,
        make_tree,
        no_blocking_wait,
        snapshot,
    )
    from tests.support.fakechain import FakeChain, init_body, request

    stats = {"episodes": 0, "ok_replies": 0, "error_replies": 0}
    real_ops = [o for o in OPCODES if o <= 52]
    rooms = (0, 15, 16, 120, 4096, 4096, 4096, 1 << 17)
    node_specials = (0, 1, 1, 1, 2, 3, 1 << 63, U64)

    def name(rng: random.Random) -> bytes:
        return rng.choice(HOSTILE_NAMES) if rng.random() < 0.7 else rbytes(rng, 40)

    def body(rng: random.Random, op: int, fhs: list[int], nodes: list[int]) -> bytes:
        fh = rng.choice(fhs) if fhs and rng.random() < 0.8 else rint(rng, (0, 1, U64), U64)
        nm = name(rng) + b"\0"
        mode = rng.choice((0o100644, 0o40755, 0o120777, 0o10644, 0o20644, 0o140755, 0o4755))
        off = rint(rng, (0, 1, 4095, 4096, 1 << 40, (1 << 63) - 1), U64)
        size = rint(rng, (0, 1, 4096, 1 << 17, U32), U32)
        node = rng.choice(nodes) if nodes else 1
        if op in (1, 10, 11, 24):  # LOOKUP UNLINK RMDIR REMOVEXATTR
            return nm if op != 24 else rng.choice((b"user.a\0", b"trusted.x\0", nm))
        if op == 9:
            return struct.pack("<II", mode, rng.choice((0, 0o22))) + nm
        if op == 8:
            return struct.pack("<IIII", mode, rng.randint(0, 0xFFFF), 0o22, 0) + nm
        if op == 35:
            flags = rng.choice((os.O_RDWR, os.O_WRONLY | os.O_TRUNC, os.O_RDWR | os.O_EXCL, 0))
            return struct.pack("<IIII", flags, mode, 0o22, 0) + nm
        if op == 6:
            return nm + name(rng) + b"\0"
        if op == 13:
            return struct.pack("<Q", node) + nm
        if op in (12, 45):
            head = struct.pack("<Q", node) + (
                struct.pack("<II", rng.randint(0, 7), 0) if op == 45 else b""
            )
            return head + nm + name(rng) + b"\0"
        if op in (14, 27):
            flags = rng.choice((os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND, os.O_DIRECTORY,
                                os.O_RDWR | os.O_TRUNC, rng.randint(0, U32)))  # fmt: skip
            return struct.pack("<II", flags, 0)
        if op in (15, 28, 44):
            return struct.pack("<QQIIQII", fh, off, size, 0, 0, 0, 0)
        if op == 16:
            data = rbytes(rng, 9000)
            return struct.pack("<QQIIQII", fh, off % (1 << 24), len(data), 0, 0, 0, 0) + data
        if op in (18, 29, 25):
            return struct.pack("<QIIQ", fh, 0, rng.randint(0, 3), rng.randint(0, 3))
        if op in (20, 30):
            return struct.pack("<QII", fh, rng.randint(0, 1), 0)
        if op == 3:
            return struct.pack("<IIQ", rng.randint(0, 1), 0, fh)
        if op == 4:
            return (
                struct.pack("<II", rng.randint(0, 0xFFFF), 0)
                + struct.pack("<QQQ", fh, off % (1 << 30), 0)
                + rng.randbytes(64)
            )
        if op == 21:
            value = rbytes(rng, 64)
            xn = rng.choice((b"user.a\0", b"trusted.x\0", b"security.capability\0", nm))
            return struct.pack("<IIII", len(value), rng.randint(0, 3), 0, 0) + xn + value
        if op in (22, 23):
            return struct.pack("<II", rng.choice((0, 4, 4096)), 0) + (
                b"user.a\0" if op == 22 else b""
            )
        if op in (31, 32, 33):
            return struct.pack(
                "<QQQQIIII",
                fh,
                rng.randint(0, 3),
                off % 4096,
                rng.choice((0, 10, U64)),
                rng.randint(0, 2),
                rng.randint(0, 100),
                rng.randint(0, 1),
                0,
            )
        if op == 34:
            return struct.pack("<II", rng.randint(0, 7), 0)
        if op == 43:
            return struct.pack(
                "<QQQII", fh, off % (1 << 20), rng.randint(0, 1 << 20), rng.randint(0, 3), 0
            )
        if op == 46:
            return struct.pack("<QQII", fh, off, rng.randint(0, 4), 0)
        if op == 47:
            return struct.pack("<QQQQQQQ", fh, off % (1 << 20), node, fh, 0, size, 0)
        if op == 2:
            return struct.pack("<Q", rng.randint(0, 3))
        if op == 42:
            n = rng.randint(0, 4)
            return struct.pack("<II", n, 0) + b"".join(
                struct.pack("<QQ", rng.choice(nodes or [1]), rng.randint(0, 2)) for _ in range(n)
            )
        if op == 26:
            return init_body()
        return rbytes(rng, 64)

    def one(rng: random.Random, fhs: list[int], nodes: list[int]) -> tuple[bytes, int]:
        k = rng.random()
        if k < 0.15 and SEEDS:
            seed = rng.choice(SEEDS)
            raw = flip(
                seed,
                [(rng.randint(0, 4096), rng.randint(0, 255)) for _ in range(rng.randint(1, 4))],
            )
            if rng.random() < 0.2:
                raw = raw[: rng.randint(0, len(raw))]
        else:
            structured = k < 0.8
            op = rng.choice(real_ops) if structured else rng.choice(OPCODES)
            b = body(rng, op, fhs, nodes) if structured else rbytes(rng, 300)
            node = rng.choice(nodes) if nodes and rng.random() < 0.7 else rng.choice(node_specials)
            raw = request(op, node, b, unique=rng.randint(0, U64),
                          uid=rng.choice((0, 0, 1000, U32)), gid=rng.choice((0, 1000)))  # fmt: skip
            if rng.random() < 0.05:  # lie about the length
                raw = struct.pack("<I", rng.randint(0, U32)) + raw[4:]
        return no_blocking_wait(clamp(raw)), rng.choice(rooms)

    def clamp(raw: bytes) -> bytes:
        """FALLOCATE of up to 1 MiB: a random length would fill the host's disk."""
        if len(raw) >= 40 + 24 and struct.unpack_from("<I", raw, 4)[0] == 43:
            (length,) = struct.unpack_from("<Q", raw, 40 + 16)
            raw = raw[:56] + struct.pack("<Q", length % (1 << 20)) + raw[64:]
        return raw

    def learn(raw: bytes, chain: Any, used: int, fhs: list[int], nodes: list[int]) -> None:
        if used < 16:
            return
        err = struct.unpack_from("<i", chain.writable, 4)[0]
        if err:
            stats["error_replies"] += 1
            return
        stats["ok_replies"] += 1
        op = struct.unpack_from("<I", raw, 4)[0] if len(raw) >= 8 else 0
        if op in (1, 6, 8, 9, 13, 35) and used >= 24:
            nodes.append(struct.unpack_from("<Q", chain.writable, 16)[0])
        if op in (14, 27) and used >= 24:
            fhs.append(struct.unpack_from("<Q", chain.writable, 16)[0])
        if op == 35 and used >= 16 + 128 + 8:
            fhs.append(struct.unpack_from("<Q", chain.writable, 16 + 128)[0])
        del nodes[:-64], fhs[:-64]

    def batch(rng: random.Random) -> int:
        before_fds = fd_set()
        n = 0
        with tempfile.TemporaryDirectory(prefix="fuzz-") as top:
            share, outside = make_tree(Path(top))
            outside_before = snapshot(outside)
            fs = PassthroughFs(share, xattr=True, posix_locks=True, flock=True)
            session = FuseSession(fs)
            fhs: list[int] = []
            nodes: list[int] = [1]
            try:
                if rng.random() < 0.9:
                    chain = FakeChain(request(26, 0, init_body()), 4096)
                    check_reply(chain.read(), chain, session.handle(chain))
                for _ in range(400):
                    raw, room = one(rng, fhs, nodes)
                    chain = FakeChain(raw, room)
                    try:
                        used = session.handle(chain)
                        check_reply(raw, chain, used)
                    except (Exception, AssertionError) as e:
                        raise Crash(f"{type(e).__name__}: {e}", (raw, room)) from e
                    learn(raw, chain, used, fhs, nodes)
                    n += 1
            finally:
                fs.close()
            if snapshot(outside) != outside_before:
                raise Crash("the tree outside the share changed", None)
        leaked = fd_set() - before_fds
        if leaked:
            raise Crash(f"fds left after close: {leaked}", None)
        stats["episodes"] += 1
        return n

    return Harness("fuse", TARGETS["fuse"], batch, extra=stats)


def _modules(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((ROOT / d).glob("*.py")) if p.name != "__init__.py"]


# the modules whose line coverage each harness reports
TARGETS = {
    "vhost-user": [ROOT / "daemon/vhost_user/handler.py", ROOT / "daemon/vhost_user/messages.py"],
    "dma": [ROOT / "dma/virtqueue.py", ROOT / "dma/memory.py"],
    "fuse": _modules("daemon/fuse", "daemon/passthrough"),
}
HARNESSES = {"vhost-user": vhost_user_harness, "dma": dma_harness, "fuse": fuse_harness}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("harness", choices=sorted(HARNESSES))
    ap.add_argument("--inputs", type=int, default=1_000_000, help="stop after this many inputs")
    ap.add_argument("--seconds", type=float, default=3600.0, help="stop after this long")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--coverage", type=int, default=20_000,
                    help="measure line coverage over the first N inputs (0: none)")  # fmt: skip
    ap.add_argument("--json", type=Path, help="write the figures here as well")
    args = ap.parse_args(argv)

    logging.disable(logging.CRITICAL)  # the targets log every refusal
    try:
        return _run(args)
    finally:
        logging.disable(logging.NOTSET)


def _run(args: argparse.Namespace) -> int:
    cov = LineCoverage(TARGETS[args.harness]) if args.coverage else None
    if cov is not None:  # what the targets run while the harness sets up counts too
        cov.start()
    h = HARNESSES[args.harness]()
    if cov is not None:
        cov.stop()
    rng = random.Random(args.seed)
    done = crashes = 0
    started = time.monotonic()
    deadline = started + args.seconds
    traced_s = 0.0
    last_report = started
    try:
        while done < args.inputs and time.monotonic() < deadline:
            tracing = cov is not None and done < args.coverage
            t0 = time.monotonic()
            if tracing:
                cov.start()  # type: ignore[union-attr]
            try:
                done += h.batch(rng)
            except Exception as e:  # a Crash, or anything the target let out
                crashes += 1
                CRASH_DIR.mkdir(parents=True, exist_ok=True)
                out = CRASH_DIR / f"{h.name}-seed{args.seed}-{crashes}.txt"
                data = e.data if isinstance(e, Crash) else None
                out.write_text(f"{e}\n{data!r}\n{traceback.format_exc()}")
                print(f"CRASH: {e} (input in {out})", file=sys.stderr, flush=True)
                done += 1
                if crashes >= 10:
                    break
            finally:
                if tracing:
                    cov.stop()  # type: ignore[union-attr]
                    traced_s += time.monotonic() - t0
            now = time.monotonic()
            if now - last_report > 30:
                last_report = now
                print(
                    f"[{h.name}] {done} inputs, {now - started:.0f} s", file=sys.stderr, flush=True
                )
    finally:
        h.close()
    elapsed = time.monotonic() - started
    untraced = max(elapsed - traced_s, 1e-9)
    traced_inputs = min(done, args.coverage) if cov else 0
    figures = {
        "harness": h.name,
        "seed": args.seed,
        "inputs": done,
        "seconds": round(elapsed, 1),
        "inputs_per_s_untraced": round((done - traced_inputs) / untraced)
        if done > traced_inputs
        else None,
        "crashes": crashes,
        "coverage": cov.summary() if cov else None,
        "coverage_over_inputs": traced_inputs,
        # which C core ran: sanitize.sh's ASan + UBSan build or the plain one
        "c_core": os.path.relpath(sys.modules["pyvirtiofsd.dma._core"].__file__ or "?", ROOT)
        if "pyvirtiofsd.dma._core" in sys.modules
        else None,
        **h.extra,
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
