"""Split virtqueue (device side) and popped descriptor chains.

All ring walking, validation and I/O into guest memory run in C with the GIL
released.  A typical worker::

    while vq.wait_kick():
        while True:
            vq.disable_notification()
            try:
                chain = vq.pop()
            except ChainError as e:
                log(e)            # already completed with used len 0
                continue          # (see pop(salvage=...) for the exception)
            if chain is None:
                vq.enable_notification()
                if (chain := vq.pop()) is None:   # re-check after enabling
                    break
            handle(chain); chain.complete(n)
        vq.notify_if_needed()

Threading: one worker thread per queue calls pop / Chain methods /
notify_if_needed; the control plane may concurrently replace the memory table
(ring and chain translations hold their own snapshot of it).  Reconfiguring a
queue (configure / set_base / reset) while its worker runs is safe but
completions of chains popped before are then dropped.  A Chain is used by one
thread at a time.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

from ._core import ffi, lib  # type: ignore[import-not-found, unused-ignore]
from .errors import ChainError, DmaError, QueueError
from .memory import GuestMemory, as_buffer, buffer_len, check_u64, strerror

__all__ = ["Chain", "QueueStats", "VirtQueue"]

_INT_MAX = (1 << 31) - 1


def _queue_error(code: int, what: str) -> QueueError:
    return QueueError(f"{what}: {strerror(code)}")


class QueueStats(NamedTuple):
    """Chains of one queue since it was created (see :meth:`VirtQueue.stats`)."""

    fast: int  #: answered in place by the C fast path
    slow: int  #: handed to Python
    defects: int  #: refused as malformed (completed with an error or length 0)

    @property
    def requests(self) -> int:
        return self.fast + self.slow + self.defects


class VirtQueue:
    """One split virtqueue.

    File descriptors: the queue owns the kick and call eventfds it is given
    (the previous one is closed on replacement, both on :meth:`close`).
    :meth:`reset` keeps them (vhost-user sends new ones explicitly when it
    wants to change them) but forgets the ring configuration and indices.
    The stop state set by :meth:`stop` is cleared by :meth:`reset` and
    :meth:`configure`.
    """

    def __init__(self, memory: GuestMemory, index: int, max_size: int = 1024) -> None:
        if not 1 <= max_size <= lib.PVD_MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"max_size must be a power of two in 1..32768, got {max_size}")
        if not 0 <= index <= 0xFFFF:
            raise ValueError(f"queue index out of range: {index}")
        ptr = lib.pvd_vq_new(memory._c_handle(), max_size, index)
        if ptr == ffi.NULL:
            raise OSError("cannot create virtqueue (out of memory or eventfd)")
        self._memory = memory  # keeps the C memory object alive
        self._vq: Any = ffi.gc(ptr, lib.pvd_vq_free)
        self.index = index
        self.max_size = max_size

    @property
    def memory(self) -> GuestMemory:
        return self._memory

    # -- configuration ---------------------------------------------------------

    def configure(
        self, *, size: int, desc_gpa: int, avail_gpa: int, used_gpa: int, event_idx: bool
    ) -> None:
        """Set the ring layout (guest-physical addresses); validates size, alignment, placement.

        On QueueError the queue is left unconfigured.  Clears the stop state.
        """
        for name, v in (("desc_gpa", desc_gpa), ("avail_gpa", avail_gpa), ("used_gpa", used_gpa)):
            check_u64(name, v, QueueError)
        if not isinstance(size, int) or not 0 < size <= self.max_size:
            size = 0  # rejected by the C side, which also leaves the queue unconfigured
        rc = lib.pvd_vq_configure(self._vq, size, desc_gpa, avail_gpa, used_gpa, int(event_idx))
        if rc:
            raise _queue_error(rc, f"queue {self.index}")

    def set_base(self, last_avail_idx: int) -> None:
        """VHOST_USER_SET_VRING_BASE; the used idx shadow is re-read from the ring if configured."""
        if not 0 <= last_avail_idx <= 0xFFFF:
            raise ValueError(f"last_avail_idx out of range: {last_avail_idx}")
        lib.pvd_vq_set_base(self._vq, last_avail_idx)

    @property
    def last_avail_idx(self) -> int:
        return int(lib.pvd_vq_last_avail_idx(self._vq))

    @property
    def size(self) -> int:
        """Configured queue size (0 when unconfigured)."""
        return int(lib.pvd_vq_size(self._vq))

    def set_kick_fd(self, fd: int | None) -> None:
        lib.pvd_vq_set_kick_fd(self._vq, self._check_fd(fd))

    def set_call_fd(self, fd: int | None) -> None:
        lib.pvd_vq_set_call_fd(self._vq, self._check_fd(fd))

    @staticmethod
    def _check_fd(fd: int | None) -> int:
        if fd is None:
            return -1
        if not isinstance(fd, int) or fd < 0 or fd > _INT_MAX:
            raise ValueError(f"invalid file descriptor {fd!r}")
        return fd

    # -- data path -------------------------------------------------------------

    def pop(self, *, salvage: tuple[int, int] | None = None) -> Chain | None:
        """Next available chain, or None.

        Raises ChainError for a malformed chain (already completed with used
        len 0: log and pop again) and QueueError when the ring itself is
        unusable (the queue stays broken until reconfigured).

        ``salvage=(rlen, wlen)`` (both > 0): a chain refused only because
        some of its buffers lie outside guest memory or the window (its
        structure otherwise valid) is not completed when the first ``rlen``
        bytes of its first readable descriptor and the first ``wlen`` bytes
        of its first writable descriptor are inside.  The ChainError then
        carries them as ``salvage``, a Chain (``completed`` is False) the
        caller must complete exactly once, typically after writing an error
        reply; a lost salvage chain never returns its head to the guest.
        """
        rlen, wlen = self._salvage(salvage)
        out = ffi.new("struct pvd_chain **")
        bad = ffi.new("uint32_t *")
        rc = lib.pvd_vq_pop(self._vq, out, bad, rlen, wlen)
        if rc == 1:
            return Chain._wrap(self, ffi.gc(out[0], lib.pvd_chain_free))
        if rc == 0:
            return None
        self._raise_pop_error(rc, out, bad)
        raise AssertionError("unreachable")

    @staticmethod
    def _salvage(salvage: tuple[int, int] | None) -> tuple[int, int]:
        if salvage is None:
            return 0, 0
        rlen, wlen = salvage
        if not (0 < rlen <= 0xFFFF_FFFF and 0 < wlen <= 0xFFFF_FFFF):
            raise ValueError(f"salvage sizes must be in 1..2**32-1, got {salvage!r}")
        return rlen, wlen

    def _raise_pop_error(self, rc: int, out: Any, bad: Any) -> None:
        if rc <= lib.PVD_C_FIRST:
            chain = None
            if out[0] != ffi.NULL:
                chain = Chain._wrap(self, ffi.gc(out[0], lib.pvd_chain_free))
            raise ChainError(int(bad[0]), strerror(rc), salvage=chain)
        raise _queue_error(rc, f"queue {self.index}")

    def run(
        self,
        fast: Any = None,
        slow: Any = None,
        *,
        salvage: tuple[int, int] | None = None,
    ) -> Chain | None:
        """Serve the queue in C until something needs Python (GIL released).

        Waits for kicks, pops every available chain, answers the requests
        ``fast`` (a :class:`~.fastpath.FastPath`) can serve in place, queues
        the others on ``slow`` (a :class:`~.fastpath.SlowQueue`) or, without
        one, returns them.  Returns None when stopped (:meth:`stop`) or when
        the kick fd fails; raises ChainError / QueueError exactly as
        :meth:`pop` (then call again to go on).  One runner per queue.
        """
        rlen, wlen = self._salvage(salvage)
        out = ffi.new("struct pvd_chain **")
        bad = ffi.new("uint32_t *")
        fs = ffi.NULL if fast is None else fast._c_handle()
        q = ffi.NULL if slow is None else slow._c_handle()
        rc = lib.pvd_vq_run(self._vq, fs, q, out, bad, rlen, wlen)
        if rc == 1:
            return Chain._wrap(self, ffi.gc(out[0], lib.pvd_chain_free))
        if rc == 0:
            return None
        self._raise_pop_error(rc, out, bad)
        raise AssertionError("unreachable")

    def set_poll(self, max_ns: int) -> None:
        """Poll the avail ring for up to ``max_ns`` before :meth:`run` sleeps
        (adaptive, see ``pvd_vq_set_poll``); 0 never polls.  Any thread."""
        if not 0 <= max_ns <= lib.PVD_POLL_MAX_NS:
            raise ValueError(f"poll window {max_ns} outside 0..{lib.PVD_POLL_MAX_NS} ns")
        lib.pvd_vq_set_poll(self._vq, max_ns)

    def poll_stats(self) -> tuple[int, int, int]:
        """(windows that found a chain, windows that did not, current window ns)."""
        h = ffi.new("uint64_t *")
        m = ffi.new("uint64_t *")
        w = ffi.new("uint64_t *")
        lib.pvd_vq_poll_stats(self._vq, h, m, w)
        return int(h[0]), int(m[0]), int(w[0])

    def stats(self) -> QueueStats:
        f = ffi.new("uint64_t *")
        s = ffi.new("uint64_t *")
        d = ffi.new("uint64_t *")
        lib.pvd_vq_stats(self._vq, f, s, d)
        return QueueStats(int(f[0]), int(s[0]), int(d[0]))

    def notify_if_needed(self) -> bool:
        """Signal the call eventfd unless suppressed (EVENT_IDX / NO_INTERRUPT).

        Call after completing a batch; returns whether the eventfd was written.
        """
        rc = lib.pvd_vq_notify(self._vq)
        if rc < 0:
            if rc == lib.PVD_E_NOT_CONFIGURED:
                return False
            raise _queue_error(rc, f"queue {self.index}")
        return bool(rc)

    def enable_notification(self) -> None:
        self._set_notification(True)

    def disable_notification(self) -> None:
        self._set_notification(False)

    def _set_notification(self, enable: bool) -> None:
        rc = lib.pvd_vq_set_notification(self._vq, int(enable))
        if rc and rc != lib.PVD_E_NOT_CONFIGURED:
            raise _queue_error(rc, f"queue {self.index}")

    def wait_kick(self, timeout: float | None = None) -> bool:
        """Block until kicked (True, counter drained), stopped or timed out (False)."""
        ms = -1 if timeout is None else min(_INT_MAX, max(0, math.ceil(timeout * 1000)))
        return bool(lib.pvd_vq_wait_kick(self._vq, ms))

    def stop(self) -> None:
        """Wake any wait_kick() now; later waits return False until reset()/configure()."""
        lib.pvd_vq_stop(self._vq)

    def reset(self) -> None:
        """Back to unconfigured with indices 0; keeps the kick/call fds; clears stop."""
        lib.pvd_vq_reset(self._vq)

    def close(self) -> None:
        """stop(), then close the kick and call eventfds."""
        lib.pvd_vq_close(self._vq)

    def __repr__(self) -> str:
        return f"<VirtQueue {self.index} size={self.size} last_avail={self.last_avail_idx}>"


class Chain:
    """One popped descriptor chain: a device-readable part then a device-writable part.

    Offsets are relative to the start of each part; the parts may span many
    descriptors and memory regions.  The chain pins the memory-table snapshot
    it was translated against until :meth:`complete` (or garbage collection).
    """

    __slots__ = ("_c", "_done", "_vq", "head", "opcode", "readable_len", "unique", "writable_len")

    head: int
    readable_len: int
    writable_len: int
    #: fuse_in_header opcode and unique as the queue runner read them (0 if it did not)
    opcode: int
    unique: int
    _c: Any
    _vq: VirtQueue
    _done: bool

    def __init__(self) -> None:
        raise TypeError("chains come from VirtQueue.pop()")

    @classmethod
    def _wrap(cls, vq: VirtQueue, c: Any) -> Chain:
        self = object.__new__(cls)
        out = ffi.new("uint64_t[5]")
        lib.pvd_chain_summary(c, out)  # one call: this runs for every request Python serves
        self.head, self.readable_len, self.writable_len, self.opcode, self.unique = out
        self._c = c
        self._vq = vq
        self._done = False
        return self

    @staticmethod
    def _queue_index(c: Any) -> int:
        opcode = ffi.new("uint32_t *")
        unique = ffi.new("uint64_t *")
        queue = ffi.new("uint32_t *")
        lib.pvd_chain_request(c, opcode, unique, queue)
        return int(queue[0])

    @property
    def queue(self) -> VirtQueue:
        return self._vq

    def _check(self, rc: int) -> None:
        if rc == lib.PVD_E_RANGE:
            raise ValueError(strerror(rc))
        if rc:
            raise DmaError(f"chain {self.head}: {strerror(rc)}")

    def _live(self) -> None:
        if self._done:
            raise DmaError(f"chain {self.head}: {strerror(lib.PVD_E_COMPLETED)}")

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes from the readable part (ValueError when out of range)."""
        self._live()
        if offset < 0 or offset > self.readable_len:
            raise ValueError(f"offset {offset} outside readable part ({self.readable_len})")
        if length is None:
            length = self.readable_len - offset
        if length < 0 or offset + length > self.readable_len:
            raise ValueError(f"{offset}+{length} outside readable part ({self.readable_len})")
        buf = ffi.new("uint8_t[]", length or 1)
        self._check(lib.pvd_chain_read(self._c, offset, buf, length))
        return bytes(ffi.buffer(buf, length))

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        """Copy data into the writable part at offset (ValueError if it does not fit)."""
        self._live()
        n = buffer_len(data)
        if offset < 0 or offset + n > self.writable_len:
            raise ValueError(f"{offset}+{n} does not fit the writable part ({self.writable_len})")
        self._check(lib.pvd_chain_write(self._c, offset, as_buffer(data), n))

    def _io(
        self, fn: Any, part_len: int, fd: int, file_offset: int, length: int, offset: int
    ) -> int:
        self._live()
        if file_offset < 0 or length < 0 or offset < 0 or offset + length > part_len:
            raise ValueError(f"{offset}+{length} outside the chain part ({part_len})")
        err = ffi.new("int *")
        rc = int(fn(self._c, fd, file_offset, length, offset, err))
        if rc == lib.PVD_E_IO:
            raise OSError(err[0], os.strerror(err[0]))
        if rc < 0:
            self._check(rc)
        return rc

    def preadv(self, fd: int, file_offset: int, length: int, offset: int) -> int:
        """Read from fd straight into the writable part at offset.

        Loops on short reads until ``length`` bytes or EOF; returns the byte
        count.  OSError when the first read fails (a later failure returns the
        partial count).
        """
        return self._io(lib.pvd_chain_preadv, self.writable_len, fd, file_offset, length, offset)

    def pwritev(self, fd: int, file_offset: int, length: int, offset: int) -> int:
        """Write to fd straight from the readable part at offset; returns bytes written."""
        return self._io(lib.pvd_chain_pwritev, self.readable_len, fd, file_offset, length, offset)

    def complete(self, used_len: int, *, notify: bool = False) -> None:
        """Publish to the used ring (release ordering), exactly once.

        ``used_len`` is the number of bytes written into the writable part.
        If the queue was reset or reconfigured since this chain was popped the
        completion is silently dropped.  ``notify``: also signal the call
        eventfd unless suppressed (as :meth:`VirtQueue.notify_if_needed`), in
        the same C call, so that a thread waiting for the GIL cannot delay
        the guest's interrupt behind a completion it can already see.
        """
        self._live()
        if not 0 <= used_len <= self.writable_len:
            raise ValueError(f"used_len {used_len} outside 0..{self.writable_len}")
        self._done = True
        fn = lib.pvd_chain_complete_notify if notify else lib.pvd_chain_complete
        rc = fn(self._vq._vq, self._c, used_len)
        if rc in (0, lib.PVD_E_STALE):
            return
        raise _queue_error(rc, f"queue {self._vq.index}")

    @property
    def completed(self) -> bool:
        return self._done

    def __repr__(self) -> str:
        return (
            f"<Chain head={self.head} readable={self.readable_len} "
            f"writable={self.writable_len}{' done' if self._done else ''}>"
        )
