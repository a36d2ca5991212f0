"""The virtio-fs device: vhost-user requests in, queue runners and FUSE out.

:class:`FsDevice` is what the vhost-user handler drives (it implements
:class:`~.vhost_user.backend.VhostUserDevice`). It owns the guest memory map
and one :class:`~pyvirtiofsd.dma.VirtQueue` per virtqueue (queue 0 is the
high-priority queue, 1..N the request queues).

Serving (see DESIGN.md, "Threading"):

* Each started and enabled queue has a *runner* thread that lives in C
  (:meth:`VirtQueue.run`, GIL released): it waits for kicks, pops chains and
  answers GETATTR, READ and WRITE in place from the C fast path's mirror of
  the passthrough tables (:class:`~pyvirtiofsd.dma.FastPath`).
* Before a runner sleeps on its kick eventfd it polls the avail ring for a
  while (``poll_max_ns``, adaptive as QEMU's iothread polling; request
  queues only): at low queue depth the next request is then found without
  waiting to be woken (see DESIGN.md for what EVENT_IDX changes).
* Metadata requests (``INLINE_OPCODES``) the runner hands back to its own
  thread, which serves them in Python and resumes.
* Every other request goes to a :class:`~pyvirtiofsd.dma.SlowQueue` shared by
  the device's Python workers (``thread_pool_size`` of them), which run the
  :class:`~.fuse.session.FuseSession` and complete the chain themselves,
  in whatever order they finish: virtio lets a device complete out of
  order.  With ``thread_pool_size=0`` the runner hands requests back to its
  own thread instead (the Rust virtiofsd's default).
* A request that may block indefinitely (SETLKW) runs on a thread of its
  own, so no queue or worker waits behind it.

Strict window mode (``window=(base, size)``): only that range of guest
memory is mapped, and a ring or descriptor outside the window fails that
request (or that queue) with a logged error; the device keeps serving.
VIRTIO_F_ACCESS_PLATFORM is offered (QEMU demands it for iommu_platform=on)
but cannot be required in SET_FEATURES: QEMU strips it there when the
machine has no vIOMMU.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyvirtiofsd.dma import (
    Chain,
    ChainError,
    DmaError,
    FastPath,
    GuestMemory,
    MemoryRegion,
    QueueError,
    QueueStats,
    SlowQueue,
    VirtQueue,
)

from .config import DEFAULT_THREAD_POOL_SIZE, MAX_REQUEST_QUEUES, MAX_THREAD_POOL_SIZE
from .fuse import abi
from .fuse.session import FuseSession
from .vhost_user.backend import VhostUserDeviceBase, VringConfig
from .vhost_user.errors import DeviceError
from .vhost_user.messages import MemoryRegionDesc, ProtocolFeature

log = logging.getLogger("pyvirtiofsd.device")

# virtio feature bits (virtio 1.2, section 6)
VIRTIO_RING_F_INDIRECT_DESC = 1 << 28
VIRTIO_RING_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_F_ACCESS_PLATFORM = 1 << 33

DEVICE_FEATURES = (
    VIRTIO_F_VERSION_1
    | VIRTIO_RING_F_INDIRECT_DESC
    | VIRTIO_RING_F_EVENT_IDX
    | VIRTIO_F_ACCESS_PLATFORM
)

#: QEMU refuses iommu_platform=on unless REPLY_ACK and BACKEND_REQ are offered.
PROTOCOL_FEATURES = (
    ProtocolFeature.MQ.mask
    | ProtocolFeature.REPLY_ACK.mask
    | ProtocolFeature.BACKEND_REQ.mask
    | ProtocolFeature.CONFIGURE_MEM_SLOTS.mask
    | ProtocolFeature.STATUS.mask
)

MAX_QUEUE_SIZE = 1024
#: Most requests blocked at once in a wait of their own (SETLKW); past it a
#: wait occupies a pool worker.
MAX_BLOCKING_WAITS = 64
#: Requests the runner serves on the queue's own thread even with a pool:
#: metadata operations, which do no data I/O, wait for nothing the guest
#: controls and finish in tens of microseconds on a local filesystem.
#: Handing one to a worker costs a cross-thread wake-up and GIL hand-offs
#: that cost more than the request (daemon bench, 2 CPUs: CREATE+RELEASE+
#: UNLINK at depth 32 1.6K seq/s through a pool of 4, 3.1K served inline).
#: Everything else (READ/WRITE off the fast path, FSYNC, FLUSH, FALLOCATE,
#: COPY_FILE_RANGE, LSEEK, SYNCFS, locks, INIT/DESTROY, unknown opcodes)
#: goes to the pool, so that a slow one never holds up the queue.
INLINE_OPCODES = frozenset(
    {
        abi.Opcode.LOOKUP,
        abi.Opcode.FORGET,
        abi.Opcode.BATCH_FORGET,
        abi.Opcode.GETATTR,
        abi.Opcode.SETATTR,
        abi.Opcode.READLINK,
        abi.Opcode.SYMLINK,
        abi.Opcode.MKNOD,
        abi.Opcode.MKDIR,
        abi.Opcode.UNLINK,
        abi.Opcode.RMDIR,
        abi.Opcode.RENAME,
        abi.Opcode.RENAME2,
        abi.Opcode.LINK,
        abi.Opcode.CREATE,
        abi.Opcode.RELEASE,
        abi.Opcode.RELEASEDIR,
        abi.Opcode.OPENDIR,
        abi.Opcode.READDIR,
        abi.Opcode.READDIRPLUS,
        abi.Opcode.STATFS,
        abi.Opcode.ACCESS,
        abi.Opcode.GETXATTR,
        abi.Opcode.LISTXATTR,
        abi.Opcode.SETXATTR,
        abi.Opcode.REMOVEXATTR,
        abi.Opcode.INTERRUPT,
    }
)
#: How long stopping a ring waits for its requests still in Python workers.
DRAIN_TIMEOUT = 5.0
#: Period of the stats file rewrite.
STATS_PERIOD = 0.2


@dataclass
class _Ring:
    """What the device needs to serve one virtqueue.

    The protocol state of the ring (size, addresses, base, enabled) belongs
    to the vhost-user handler, which hands it over in :meth:`FsDevice.start_vring`.
    """

    vq: VirtQueue
    broken: bool = False
    runner: threading.Thread | None = None
    err_fd: int | None = None
    #: chains of this ring completed by Python (vq.stats().slow counts those handed over)
    slow_done: int = 0
    lock: threading.Condition = field(default_factory=threading.Condition)


class FsDevice(VhostUserDeviceBase):
    """A vhost-user-fs device serving one FUSE session."""

    def __init__(
        self,
        session: FuseSession,
        *,
        num_request_queues: int = 16,
        window: tuple[int, int] | None = None,
        thread_pool_size: int = DEFAULT_THREAD_POOL_SIZE,
        poll_max_ns: int = 0,
        fast: FastPath | None = None,
        stats_file: Path | None = None,
    ) -> None:
        # ServiceConfig checked these at start-up; this is the device's own guard
        if not 1 <= num_request_queues <= MAX_REQUEST_QUEUES:
            raise ValueError(f"num_request_queues must be 1..{MAX_REQUEST_QUEUES}")
        if not 0 <= thread_pool_size <= MAX_THREAD_POOL_SIZE:
            raise ValueError(f"thread_pool_size must be 0..{MAX_THREAD_POOL_SIZE}")
        self.session = session
        self.window = window
        self.memory = GuestMemory(window=window)
        self._rings = [
            _Ring(VirtQueue(self.memory, i, MAX_QUEUE_SIZE)) for i in range(1 + num_request_queues)
        ]
        for ring in self._rings[1:]:  # the hiprio queue carries FORGETs: not worth a core
            ring.vq.set_poll(poll_max_ns)
        self._acked = 0
        self._status = 0
        self._backend_req_fd: int | None = None
        #: the C fast path's mirror (the filesystem publishes into it, the
        #: session switches it on and off, the runners serve from it)
        self.fast = fast
        self._pool_size = thread_pool_size
        self._slow = SlowQueue() if thread_pool_size else None
        if self._slow is not None:
            self._slow.serve_inline(INLINE_OPCODES)
        self._pool: list[threading.Thread] = []
        self._waits = threading.BoundedSemaphore(MAX_BLOCKING_WAITS)
        self._stats_file = stats_file
        self._stats_stop = threading.Event()
        self._stats_thread: threading.Thread | None = None
        self._logged_counts: list[QueueStats] = []

    # -- features ------------------------------------------------------------
    def num_queues(self) -> int:
        return len(self._rings)

    def max_queue_size(self) -> int:
        return MAX_QUEUE_SIZE

    def features(self) -> int:
        return DEVICE_FEATURES

    def protocol_features(self) -> int:
        return int(PROTOCOL_FEATURES)

    def set_features(self, acked: int) -> None:
        if self.window is not None and not acked & VIRTIO_F_ACCESS_PLATFORM:
            # QEMU strips ACCESS_PLATFORM from SET_FEATURES when the machine has
            # no vIOMMU (vhost_dev_set_features), even with iommu_platform=on,
            # so its absence here proves nothing. The window itself is the
            # guard: rings and buffers outside it are refused.
            log.debug("ACCESS_PLATFORM not in SET_FEATURES (no vIOMMU); window enforced")
        self._acked = acked
        log.debug("driver acked features %#x", acked)

    # -- memory --------------------------------------------------------------
    @staticmethod
    def _region(r: MemoryRegionDesc) -> MemoryRegion:
        return MemoryRegion(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)

    def set_mem_table(self, regions: list[tuple[int, MemoryRegionDesc]]) -> None:
        try:
            self.memory.replace([(fd, self._region(r)) for fd, r in regions])
        except DmaError as e:
            raise DeviceError(f"memory table refused: {e}") from e
        self._log_memory()

    def add_mem_region(self, fd: int, region: MemoryRegionDesc) -> None:
        try:
            self.memory.add_region(fd, self._region(region))
        except DmaError as e:
            raise DeviceError(f"memory region refused: {e}") from e
        self._log_memory()

    def remove_mem_region(self, region: MemoryRegionDesc) -> None:
        try:
            self.memory.remove_region(self._region(region))
        except DmaError as e:
            raise DeviceError(f"memory region removal refused: {e}") from e
        self._log_memory()

    def _log_memory(self) -> None:
        regions = self.memory.regions
        total = sum(r.size for r in regions)
        where = (
            f" (window {self.window[0]:#x}+{self.window[1]:#x})" if self.window is not None else ""
        )
        log.info(
            "guest memory: %d region(s), %d MiB; mapped %d bytes%s",
            len(regions),
            total >> 20,
            self.memory.mapped_bytes,
            where,
        )

    # -- vrings --------------------------------------------------------------
    def _ring(self, index: int) -> _Ring:
        if not 0 <= index < len(self._rings):
            raise DeviceError(f"vring index {index} out of range")
        return self._rings[index]

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._ring(index).vq.set_kick_fd(fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._ring(index).vq.set_call_fd(fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        ring = self._ring(index)
        old, ring.err_fd = ring.err_fd, fd
        if old is not None:
            os.close(old)

    def start_vring(self, config: VringConfig) -> None:
        ring = self._ring(config.index)
        if ring.runner is not None:
            raise DeviceError(f"vring {config.index} is already running")
        if config.num > MAX_QUEUE_SIZE:
            raise DeviceError(f"vring {config.index}: size {config.num} above {MAX_QUEUE_SIZE}")
        try:
            a, qsize = config.addr, config.num
            desc = self.memory.uaddr_to_gpa(a.desc_user_addr, 16 * qsize)
            avail = self.memory.uaddr_to_gpa(a.avail_user_addr, 6 + 2 * qsize)
            used = self.memory.uaddr_to_gpa(a.used_user_addr, 6 + 8 * qsize)
            ring.vq.configure(
                size=qsize,
                desc_gpa=desc,
                avail_gpa=avail,
                used_gpa=used,
                event_idx=bool(self._acked & VIRTIO_RING_F_EVENT_IDX),
            )
            ring.vq.set_base(config.base & 0xFFFF)
        except DmaError as e:
            log.error("vring %d refused: %s; the queue stays stopped", config.index, e)
            raise DeviceError(f"vring {config.index}: {e}") from e
        ring.broken = False
        self._start_workers()
        runner = threading.Thread(
            target=self._run_queue, args=(ring,), name=f"vq{config.index}", daemon=True
        )
        ring.runner = runner
        runner.start()

    def stop_vring(self, index: int) -> int:
        ring = self._ring(index)
        self._stop(ring)
        base = ring.vq.last_avail_idx
        ring.vq.reset()  # later completions of its requests are dropped
        return base

    def set_backend_req_fd(self, fd: int) -> None:
        if self._backend_req_fd is not None:
            os.close(self._backend_req_fd)
        self._backend_req_fd = fd

    def set_status(self, status: int) -> None:
        self._status = status

    def get_status(self) -> int:
        return self._status

    def reset(self) -> None:
        # Lock waits end first (EIO): a SETLKW blocked in a worker would
        # otherwise hold every ring's drain for DRAIN_TIMEOUT.
        self.session.fs.reset_locks()
        for ring in self._rings:
            self._stop(ring)
            ring.vq.reset()
            ring.vq.set_kick_fd(None)
            ring.vq.set_call_fd(None)
            ring.broken = False
            if ring.err_fd is not None:
                os.close(ring.err_fd)
                ring.err_fd = None
        self._log_queue_stats()
        self.memory.clear()
        if self._backend_req_fd is not None:
            os.close(self._backend_req_fd)
            self._backend_req_fd = None
        self._acked = 0
        self._status = 0
        self.session.reset()

    def close(self) -> None:
        """Reset, then release the queues' fds, the workers and the filesystem (root included)."""
        self.reset()
        if self._slow is not None:
            self._slow.close()
        for worker in self._pool:
            worker.join()
        self._pool.clear()
        self._stats_stop.set()
        if self._stats_thread is not None:
            self._stats_thread.join()
            self._stats_thread = None
        self._write_stats()
        for ring in self._rings:
            ring.vq.close()
        self.session.close()

    # -- runners and workers ---------------------------------------------------
    def _start_workers(self) -> None:
        """The Python pool and the stats writer, once, at the first ring start."""
        while self._slow is not None and len(self._pool) < self._pool_size:
            worker = threading.Thread(
                target=self._pool_worker, name=f"fuse{len(self._pool)}", daemon=True
            )
            self._pool.append(worker)
            worker.start()
        if self._stats_file is not None and self._stats_thread is None:
            self._stats_thread = threading.Thread(
                target=self._stats_writer, name="stats", daemon=True
            )
            self._stats_thread.start()

    def _stop(self, ring: _Ring) -> None:
        """Stop the runner and let Python finish the ring's requests in progress."""
        runner = ring.runner
        if runner is None:
            return
        ring.vq.stop()
        runner.join()
        ring.runner = None
        self._drain_python(ring)

    def _drain_python(self, ring: _Ring) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT
        with ring.lock:
            while (pending := ring.vq.stats().slow - ring.slow_done) > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "queue %d stopped with %d request(s) still in progress; "
                        "their replies will be dropped",
                        ring.vq.index,
                        pending,
                    )
                    return
                ring.lock.wait(left)

    def _run_queue(self, ring: _Ring) -> None:
        vq = ring.vq
        log.debug("queue %d: runner started (size %d)", vq.index, vq.size)
        try:
            while not ring.broken:
                try:
                    chain = vq.run(self.fast, self._slow, salvage=_SALVAGE)
                except ChainError as e:
                    log.error("queue %d: request %d refused: %s", vq.index, e.head, e.reason)
                    if e.salvage is not None:
                        _fail_salvaged(vq.index, e.salvage)
                        vq.notify_if_needed()
                    continue
                except QueueError as e:
                    log.error("queue %d: ring unusable, queue stopped: %s", vq.index, e)
                    ring.broken = True
                    self._signal_error(ring)
                    break
                if chain is None:
                    break  # stopped
                # no pool (thread_pool_size 0), or an INLINE_OPCODES request
                self._serve(chain)
        except Exception:  # a bug, not guest input: log it, tell the front-end
            log.exception("queue %d: runner failed; the queue is stopped", vq.index)
            self._signal_error(ring)
        log.debug("queue %d: runner stopped", vq.index)

    def _signal_error(self, ring: _Ring) -> None:
        """VHOST_USER_SET_VRING_ERR: the front-end learns that this queue is dead."""
        if ring.err_fd is not None:
            try:
                os.write(ring.err_fd, (1).to_bytes(8, "little"))
            except OSError as e:
                log.warning("queue %d: cannot signal the error eventfd: %s", ring.vq.index, e)

    def _queue(self, index: int) -> VirtQueue:
        return self._rings[index].vq

    def _pool_worker(self) -> None:
        assert self._slow is not None
        try:
            while (chain := self._slow.take(self._queue)) is not None:
                self._serve(chain)
        except Exception:
            log.exception("FUSE worker failed; the remaining workers go on")

    def _serve(self, chain: Chain) -> None:
        """Run one request in Python and complete it (any thread)."""
        if chain.opcode == abi.Opcode.SETLKW and self._waits.acquire(blocking=False):
            waiter = threading.Thread(
                target=self._serve_blocking, args=(chain,), name="lockwait", daemon=True
            )
            try:
                waiter.start()
                return
            except RuntimeError:  # no thread: serve it here after all
                self._waits.release()
        self._serve_now(chain)

    def _serve_blocking(self, chain: Chain) -> None:
        try:
            self._serve_now(chain)
        finally:
            self._waits.release()

    def _serve_now(self, chain: Chain) -> None:
        vq = chain.queue
        try:
            used = self.session.handle(chain)
        except Exception:
            log.exception("queue %d: request %d failed", vq.index, chain.head)
            used = 0
        ring = self._rings[vq.index]
        try:
            chain.complete(min(used, chain.writable_len), notify=True)
        except DmaError as e:
            log.error("queue %d: request %d not completed: %s", vq.index, chain.head, e)
        finally:
            with ring.lock:
                ring.slow_done += 1
                ring.lock.notify_all()

    # -- statistics ---------------------------------------------------------------
    def queue_stats(self) -> dict[str, object]:
        """Per-queue request counts and fast-path figures (the stats file's content)."""
        queues = {}
        for ring in self._rings:
            st = ring.vq.stats()
            hits, misses, window = ring.vq.poll_stats()
            queues[str(ring.vq.index)] = {
                "requests": st.requests,
                "fast": st.fast,
                "slow": st.slow,
                "defects": st.defects,
                "running": ring.runner is not None,
                "poll": {"hits": hits, "misses": misses, "window_ns": window},
            }
        out: dict[str, object] = {"pid": os.getpid(), "queues": queues}
        if self.fast is not None:
            fp = self.fast.stats()
            out["fast_path"] = {
                "getattr": fp.getattr,
                "read": fp.read,
                "write": fp.write,
                "lookup": fp.lookup,
                "readdirplus": fp.readdirplus,
                "unlink": fp.unlink,
                "readdir": fp.readdir,
            }
            out["busy_now"] = fp.busy_now
            out["busy_max"] = fp.busy_max
        return out

    def _write_stats(self) -> None:
        """Rewrite the stats file atomically (a temporary file renamed over it).

        Through the directory's fd (openat/renameat): what the seccomp
        allowlist permits, as the passthrough's own calls.
        """
        if self._stats_file is None:
            return
        name = self._stats_file.name
        tmp = f".{name}.tmp"
        data = (json.dumps(self.queue_stats(), sort_keys=True) + "\n").encode()
        try:
            dir_fd = os.open(self._stats_file.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644,
                             dir_fd=dir_fd)  # fmt: skip
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            log.warning("cannot write the stats file %s: %s", self._stats_file, e)

    def _stats_writer(self) -> None:
        while not self._stats_stop.wait(STATS_PERIOD):
            self._write_stats()

    def _log_queue_stats(self) -> None:
        counts = [r.vq.stats() for r in self._rings]
        if counts == self._logged_counts:
            return  # reset() then close(): said once
        self._logged_counts = counts
        parts = [
            f"q{i}={st.requests} ({st.fast} fast, {st.defects} refused)"
            for i, st in enumerate(counts)
            if st.requests
        ]
        if not parts:
            return
        log.info("requests per queue: %s", ", ".join(parts))
        self._write_stats()


#: Ask the queue for the FUSE headers of a chain refused only because some of
#: its buffers lie outside guest memory or the window (see _fail_salvaged).
_SALVAGE = (abi.IN_HEADER.size, abi.OUT_HEADER.size)
_NO_REPLY_OPCODES = frozenset({abi.Opcode.FORGET, abi.Opcode.BATCH_FORGET, abi.Opcode.INTERRUPT})


def _fail_salvaged(queue: int, chain: Chain) -> None:
    """Answer a request refused for its buffer addresses with ``-EIO``.

    The Linux virtio-fs driver ignores the used length and parses the reply
    header in the first writable buffer: completing with 0 would leave the
    guest reading a zero header (error 0) and handing unwritten buffers to
    the application as data.  ``chain`` holds only the request's fuse_in_header
    and the reply header slot, both inside the mapped memory; it is completed
    exactly once here.
    """
    used = 0
    try:
        hdr = abi.IN_HEADER.decode(chain.read(0, abi.IN_HEADER.size))
        if hdr.opcode not in _NO_REPLY_OPCODES:
            size = abi.OUT_HEADER.size
            chain.write(abi.OUT_HEADER.encode(abi.OutHeader(size, -errno.EIO, hdr.unique)))
            used = size
            log.error(
                "queue %d: request %d (unique %d) answered EIO", queue, chain.head, hdr.unique
            )
    except Exception:
        log.exception("queue %d: request %d: cannot write an error reply", queue, chain.head)
        used = 0
    finally:
        if not chain.completed:
            chain.complete(used)
