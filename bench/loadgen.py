"""The load generator: rings in shared "guest RAM", driven by a C loop.

Python lays everything out once per measurement (:class:`QueueDriver`): the
split ring, one descriptor chain per (slot, step), the pre-encoded requests
and the reply buffers. :func:`run` then hands the queues to ``pvb_run``
(``bench/src/loadgen.c``), which keeps every slot's request in flight and
checks every reply header, with the GIL released: Python is not in the loop.

The C module is compiled with cffi on first use into
``<build>/bench/lib/<hash of the sources>/`` (the package ships only its
sources), so an edit of the C file rebuilds it and nothing else does.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import mmap
import os
import re
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from pyvirtiofsd.vm.paths import build_dir

from .fuse import OUT_HEADER, Request

__all__ = [
    "FAILURES",
    "GuestRam",
    "LoadGenError",
    "QueueDriver",
    "RunResult",
    "Step",
    "load",
    "run",
    "run_per_queue",
]

SRC = Path(__file__).resolve().parent / "src"
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
_DESC = struct.Struct("<QIHH")
MAX_PATCHES = 4  # PVB_MAX_PATCHES
_DEFINE = re.compile(r"^#define\s+([A-Z_][A-Z0-9_]*)\s+(-?\d+)\s*$")

#: ``pvb_result.failure`` codes and what they mean.
FAILURES = {
    0: "ok",
    1: "used element for a descriptor not in flight",
    2: "wrong reply length",
    3: "wrong reply error",
    4: "wrong reply unique",
    5: "requests did not complete in time",
    6: "eventfd or poll failed",
}


class LoadGenError(RuntimeError):
    """The load generator could not be built or set up."""


def _cdef(header: str) -> str:
    out = []
    for line in header.splitlines():
        if line.startswith("#"):
            m = _DEFINE.match(line)
            if m and not m.group(1).endswith("_H"):
                out.append(f"#define {m.group(1)} {m.group(2)}")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


_module: ModuleType | None = None


def load() -> ModuleType:
    """The compiled loop (``.ffi`` and ``.lib``), built into the build directory if needed."""
    global _module
    if _module is not None:
        return _module
    header = (SRC / "loadgen.h").read_text()
    source = (SRC / "loadgen.c").read_text()
    digest = hashlib.sha256(f"{header}\0{source}\0{sys.version}".encode()).hexdigest()[:16]
    name = f"_pvb_loadgen_{digest}"
    out = build_dir() / "bench" / "lib" / digest
    out.mkdir(parents=True, exist_ok=True)
    with (out / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = sorted(out.glob(f"{name}*.so"))
        if not built:
            from cffi import FFI

            ffibuilder = FFI()
            ffibuilder.cdef(_cdef(header))
            ffibuilder.set_source(
                name,
                '#include "loadgen.h"\n',
                sources=[str(SRC / "loadgen.c")],
                include_dirs=[str(SRC)],
                extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"],
            )
            try:
                ffibuilder.compile(tmpdir=str(out), verbose=False)
            except Exception as e:
                raise LoadGenError(f"cannot compile the load generator: {e}") from e
            built = sorted(out.glob(f"{name}*.so"))
        if not built:
            raise LoadGenError(f"cffi left no {name}*.so in {out}")
    spec = importlib.util.spec_from_file_location(name, built[0])
    if spec is None or spec.loader is None:
        raise LoadGenError(f"cannot load {built[0]}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _module = module
    return module


class GuestRam:
    """``size`` bytes of memfd-backed "guest RAM", guest-physical address 0 up.

    The front-end shares the memfd with the daemon (SET_MEM_TABLE) and gives
    ring addresses as its own virtual addresses, as QEMU does: :attr:`uaddr`
    is where this process has the RAM mapped.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("bench-guest-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.map = mmap.mmap(
                self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(self.fd)
            raise
        self.ffi: Any = load().ffi
        self.base: Any = self.ffi.from_buffer("uint8_t[]", self.map)
        self.uaddr = int(self.ffi.cast("uintptr_t", self.base))

    def ptr(self, gpa: int) -> Any:
        return self.base + gpa

    def write(self, gpa: int, data: bytes) -> None:
        self.map[gpa : gpa + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.map[gpa : gpa + n])

    def close(self) -> None:
        self.ffi.release(self.base)
        self.map.close()
        os.close(self.fd)


def _align(v: int, a: int) -> int:
    return (v + a - 1) // a * a


@dataclass(frozen=True)
class Step:
    """One request of a slot's program and what its reply must be."""

    request: Request
    reply_room: int  # writable bytes: out header + payload room; 0: no reply (FORGET)
    reply_len: int = 0  # exact out.len expected, 0: any (>= 16, <= reply_room)
    error: int = 0  # expected out.error
    # (to step, reply offset, request offset): 8 bytes copied after the reply
    patches: tuple[tuple[int, int, int], ...] = ()


class QueueDriver:
    """The driver side of one split ring at ``[base, base + span)`` of ``ram``.

    The ring indices live in the C ``pvb_queue`` and carry over from one
    :meth:`load_program` to the next; the chains and buffers are laid out
    anew each time (every request is then complete: nothing in flight).
    """

    def __init__(
        self, ram: GuestRam, base: int, span: int, size: int, kick_fd: int, call_fd: int
    ) -> None:
        if size & (size - 1) or not 0 < size <= 32768:
            raise ValueError(f"queue size {size} is not a power of two <= 32768")
        self.ram = ram
        self.size = size
        self.desc_gpa = _align(base, 4096)
        self.avail_gpa = self.desc_gpa + 16 * size
        self.used_gpa = _align(self.avail_gpa + 6 + 2 * size, 4096)
        self.data_gpa = _align(self.used_gpa + 6 + 8 * size, 4096)
        self.end = base + span
        if self.data_gpa >= self.end:
            raise ValueError("queue span too small for its rings")
        ram.write(self.desc_gpa, bytes(self.data_gpa - self.desc_gpa))
        ffi = ram.ffi
        self._keep: list[Any] = []
        q = self.q = ffi.new("struct pvb_queue *")
        q.desc = ram.ptr(self.desc_gpa)
        q.avail = ram.ptr(self.avail_gpa)
        q.used = ram.ptr(self.used_gpa)
        q.size = size
        q.kick_fd = kick_fd
        q.call_fd = call_fd
        q.next_unique = 2
        self.head_slot = ffi.new("int16_t[]", size)
        q.head_slot = self.head_slot
        self.programs: list[list[Step]] = []
        self._reply_gpas: list[list[int]] = []

    @property
    def desc_addr(self) -> int:
        return self.ram.uaddr + self.desc_gpa

    @property
    def avail_addr(self) -> int:
        return self.ram.uaddr + self.avail_gpa

    @property
    def used_addr(self) -> int:
        return self.ram.uaddr + self.used_gpa

    def load_program(self, programs: Sequence[Sequence[Step]], *, finish: bool = False) -> None:
        """One slot per program; slot ``i`` cycles through ``programs[i]``.

        ``finish``: a program once started always runs to its last step, also
        past the deadline or ``max_ops`` (so a CREATE is always UNLINKed)."""
        ffi = self.ram.ffi
        ndesc = sum(len(_descs(s)) for p in programs for s in p)
        if ndesc > self.size:
            raise ValueError(f"{ndesc} descriptors do not fit a ring of {self.size}")
        for i in range(self.size):
            self.head_slot[i] = -1
        slots = ffi.new("struct pvb_slot[]", len(programs))
        keep: list[Any] = [slots]
        next_desc = 0
        cursor = self.data_gpa
        self.programs = [list(p) for p in programs]
        self._reply_gpas = []
        for si, program in enumerate(programs):
            if not program:
                raise ValueError(f"slot {si} has no steps")
            steps = ffi.new("struct pvb_step[]", len(program))
            keep.append(steps)
            replies = []
            for ti, step in enumerate(program):
                bufs: list[tuple[int, int, int]] = []  # (gpa, length, flags)
                for kind, n, data in _descs(step):
                    if not (bufs and bufs[-1][2] == kind == VRING_DESC_F_WRITE):
                        cursor = _align(cursor, 64)  # the payload follows the out header
                    if cursor + n > self.end:
                        raise ValueError("queue data area exhausted")
                    if data:
                        self.ram.write(cursor, data)
                    bufs.append((cursor, n, kind))
                    cursor += n
                head = next_desc
                for k, (gpa, n, kind) in enumerate(bufs):
                    idx = next_desc + k
                    last = k + 1 == len(bufs)
                    flags = kind | (0 if last else VRING_DESC_F_NEXT)
                    self.ram.write(
                        self.desc_gpa + 16 * idx,
                        _DESC.pack(gpa, n, flags, 0 if last else idx + 1),
                    )
                next_desc += len(bufs)
                self.head_slot[head] = si
                reply_gpa = next((g for g, _n, kind in bufs if kind == VRING_DESC_F_WRITE), 0)
                replies.append(reply_gpa)
                st = steps[ti]
                st.head = head
                st.reply_room = step.reply_room
                st.req = self.ram.ptr(bufs[0][0])
                st.reply = self.ram.ptr(reply_gpa)
                st.reply_len = step.reply_len
                st.error = step.error
                if len(step.patches) > MAX_PATCHES:
                    raise ValueError(f"at most {MAX_PATCHES} patches per step")
                for k in range(MAX_PATCHES):
                    if k < len(step.patches):
                        to, frm, dst = step.patches[k]
                        if not 0 <= to < len(program):
                            raise ValueError(f"patch into step {to} of {len(program)}")
                        st.patch_step[k], st.patch_from[k], st.patch_to[k] = to, frm, dst
                    else:
                        st.patch_step[k] = -1
            slots[si].steps = steps
            slots[si].nsteps = len(program)
            slots[si].finish = int(finish)
            self._reply_gpas.append(replies)
        self.q.slots = slots
        self.q.nslots = len(programs)
        self._keep = keep

    def reply(self, slot: int, step: int) -> bytes:
        """The reply (out header and payload) step ``step`` of ``slot`` last received."""
        gpa = self._reply_gpas[slot][step]
        if not gpa:
            return b""
        n = OUT_HEADER.unpack(self.ram.read(gpa, OUT_HEADER.size))[0]
        room = self.programs[slot][step].reply_room
        return self.ram.read(gpa, min(max(n, OUT_HEADER.size), room))

    @property
    def completed(self) -> int:
        return int(self.q.completed)

    @property
    def kicks(self) -> int:
        return int(self.q.kicks)

    @property
    def calls(self) -> int:
        return int(self.q.calls)


def _descs(step: Step) -> list[tuple[int, int, bytes]]:
    """(flags, length, initial bytes) of each buffer of the step's chain.

    As a Linux guest does: the request header and body in one buffer, WRITE
    data in its own; the out header in one writable buffer, the reply
    payload (if any) in the next, laid out right after it so the C loop sees
    the reply contiguous.
    """
    out = [(0, len(step.request.head), step.request.head)]
    if step.request.data:
        out.append((0, len(step.request.data), step.request.data))
    if step.reply_room == 0:
        return out  # FORGET: the device answers nothing
    if step.reply_room < OUT_HEADER.size:
        raise ValueError("reply room smaller than the out header")
    out.append((VRING_DESC_F_WRITE, OUT_HEADER.size, b""))
    if step.reply_room > OUT_HEADER.size:
        out.append((VRING_DESC_F_WRITE, step.reply_room - OUT_HEADER.size, b""))
    return out


@dataclass(frozen=True)
class RunResult:
    """What one :func:`run` measured."""

    ops: int  # completions inside the measured window
    total: int  # all completions
    measured_s: float
    per_queue: tuple[int, ...]
    kicks: int
    calls: int
    failure: int
    message: str
    busy: float = 0.0  # the loop's CPU time / wall time: near 1, it set the pace
    unsignalled: int = 0  # completions the loop found without a call notification

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.measured_s if self.measured_s > 0 else 0.0

    def check(self) -> RunResult:
        if self.failure:
            raise LoadGenError(f"{FAILURES.get(self.failure, self.failure)}: {self.message}")
        return self


def run(
    queues: Sequence[QueueDriver],
    *,
    warmup: float = 0.0,
    duration: float = 1.0,
    max_ops: int = 0,
    drain_timeout: float = 10.0,
) -> RunResult:
    """Drive ``queues`` (blocking; the GIL is released while the C loop runs)."""
    mod = load()
    ffi, lib = mod.ffi, mod.lib
    # The layouts must all sit in one RAM mapping the C side can see.
    arr = ffi.new("struct pvb_queue *[]", [q.q for q in queues])
    res = ffi.new("struct pvb_result *")
    lib.pvb_run(arr, len(queues), int(warmup * 1e9), int(duration * 1e9), max_ops,
                int(drain_timeout * 1e9), res)  # fmt: skip
    return RunResult(
        ops=int(res.ops),
        total=int(res.total),
        measured_s=res.measured_ns / 1e9,
        per_queue=tuple(q.completed for q in queues),
        kicks=sum(q.kicks for q in queues),
        calls=sum(q.calls for q in queues),
        failure=int(res.failure),
        message=ffi.string(res.message).decode(errors="replace"),
        busy=res.cpu_ns / res.wall_ns if res.wall_ns > 0 else 0.0,
        unsignalled=int(res.unsignalled),
    )


def run_per_queue(
    queues: Sequence[QueueDriver],
    *,
    warmup: float = 0.0,
    duration: float = 1.0,
    drain_timeout: float = 10.0,
) -> RunResult:
    """:func:`run` with one generator thread per queue (as one guest vCPU per queue
    would be), started together; their counts are summed.

    Each thread's window starts when it does, so they overlap to within
    thread start-up; ``measured_s`` is the mean window.
    """
    results: list[RunResult | None] = [None] * len(queues)

    def one(i: int) -> None:
        results[i] = run([queues[i]], warmup=warmup, duration=duration,
                         drain_timeout=drain_timeout)  # fmt: skip

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(queues))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [r for r in results if r is not None]
    if len(done) != len(queues):
        raise LoadGenError("a generator thread died")
    failed = next((r for r in done if r.failure), None)
    return RunResult(
        ops=sum(r.ops for r in done),
        total=sum(r.total for r in done),
        measured_s=sum(r.measured_s for r in done) / len(done),
        per_queue=tuple(r.ops for r in done),
        kicks=sum(r.kicks for r in done),
        calls=sum(r.calls for r in done),
        failure=failed.failure if failed else 0,
        message=failed.message if failed else "",
        busy=max(r.busy for r in done),
        unsignalled=sum(r.unsignalled for r in done),
    )
