"""The benchmark's C request loop: it completes what it is asked and catches bad replies.

First against a tiny fake device (a thread answering from the rings, so each
kind of bad reply can be produced on purpose), then against pyvirtiofsd
itself started as the benchmark starts it: a short run, counts asserted.
No timing is asserted anywhere.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from pyvirtiofsd.bench import fuse
from pyvirtiofsd.bench.daemon import WORKLOADS, Session, open_session, prepare_share
from pyvirtiofsd.bench.loadgen import GuestRam, QueueDriver, Step, run, run_per_queue

# ------------------------------------------------------------------ fake device

Reply = Callable[[int, bytes], tuple[int, bytes]]  # (head, request) -> (used id, reply)


class FakeDevice:
    """Answers every chain of ``q`` with ``reply(head, request)``: what goes in the
    used ring (id) and the bytes written to the chain's writable buffer."""

    def __init__(
        self, q: QueueDriver, kick: int, call: int, reply: Reply, *, signal: bool = True
    ) -> None:
        self.q, self.kick, self.call, self.reply = q, kick, call, reply
        self.signal = signal
        self.stop = False
        self.seen = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _u16(self, gpa: int) -> int:
        return int(struct.unpack("<H", self.q.ram.read(gpa, 2))[0])

    def _desc(self, i: int) -> tuple[int, int, int, int]:
        return struct.unpack("<QIHH", self.q.ram.read(self.q.desc_gpa + 16 * i, 16))

    def _serve(self) -> None:
        q, ram = self.q, self.q.ram
        last_avail = used_idx = 0
        while True:
            os.eventfd_read(self.kick)  # blocks until the driver kicks
            if self.stop:
                return
            while last_avail != self._u16(q.avail_gpa + 2):
                head = self._u16(q.avail_gpa + 4 + 2 * (last_avail % q.size))
                last_avail = (last_avail + 1) & 0xFFFF
                addr, n, flags, nxt = self._desc(head)
                request = ram.read(addr, n)
                while flags & 1:  # find the first writable buffer
                    addr, n, flags, nxt = self._desc(nxt)
                    if flags & 2:
                        break
                used_id, data = self.reply(head, request)
                ram.write(addr, data)
                slot = q.used_gpa + 4 + 8 * (used_idx % q.size)
                ram.write(slot, struct.pack("<II", used_id, len(data)))
                used_idx = (used_idx + 1) & 0xFFFF
                ram.write(q.used_gpa + 2, struct.pack("<H", used_idx))
                self.seen += 1
            if self.signal:
                os.eventfd_write(self.call, 1)

    def close(self) -> None:
        self.stop = True
        os.eventfd_write(self.kick, 1)
        self.thread.join(timeout=10)


def good_reply(head: int, request: bytes) -> tuple[int, bytes]:
    unique = struct.unpack_from("<Q", request, 8)[0]
    return head, struct.pack("<IiQ", 16, 0, unique)


@pytest.fixture
def fake_queue() -> object:
    ram = GuestRam(1 << 20)
    kick = os.eventfd(0, os.EFD_CLOEXEC)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    q = QueueDriver(ram, 0, 1 << 20, 64, kick, call)
    yield q, kick, call
    os.close(kick)
    os.close(call)
    ram.close()


def release_steps(depth: int) -> list[list[Step]]:
    return [[Step(fuse.release(7), 64, fuse.ReplySize.EMPTY)] for _ in range(depth)]


def test_completes_exactly_max_ops(fake_queue: tuple[QueueDriver, int, int]) -> None:
    q, kick, call = fake_queue
    q.load_program(release_steps(4))
    dev = FakeDevice(q, kick, call, good_reply)
    try:
        res = run([q], duration=60, max_ops=1000).check()
    finally:
        dev.close()
    assert (res.total, res.ops, dev.seen) == (1000, 1000, 1000)
    assert res.unsignalled == 0
    assert res.per_queue == (1000,)
    # a second run on the same ring carries on from where the first stopped
    q.load_program(release_steps(2))
    dev = FakeDevice(q, kick, call, good_reply)
    try:
        assert run([q], duration=60, max_ops=10).check().total == 10
    finally:
        dev.close()


def test_completions_without_a_call_are_counted(
    fake_queue: tuple[QueueDriver, int, int],
) -> None:
    q, kick, call = fake_queue
    q.load_program(release_steps(1))
    dev = FakeDevice(q, kick, call, good_reply, signal=False)
    try:
        res = run([q], duration=60, max_ops=3).check()
    finally:
        dev.close()
    # no reply is signalled; those the loop finds after a bounded wait ran out
    # are counted as unsignalled (on a loaded host the device may answer one
    # before the loop gets to wait, so not necessarily all three)
    assert (res.total, res.calls) == (3, 0)
    assert 1 <= res.unsignalled <= 3


def test_wrong_unique_is_caught(fake_queue: tuple[QueueDriver, int, int]) -> None:
    q, kick, call = fake_queue
    q.load_program(release_steps(1))

    def off_by_two(head: int, request: bytes) -> tuple[int, bytes]:
        unique = struct.unpack_from("<Q", request, 8)[0]
        return head, struct.pack("<IiQ", 16, 0, unique + 2)

    dev = FakeDevice(q, kick, call, off_by_two)
    try:
        res = run([q], duration=60, max_ops=5)
    finally:
        dev.close()
    assert res.failure == 4 and "unique" in res.message
    assert dev.seen == 1  # nothing is posted after a bad reply


def test_unknown_used_id_is_caught(fake_queue: tuple[QueueDriver, int, int]) -> None:
    q, kick, call = fake_queue
    q.load_program(release_steps(1))
    dev = FakeDevice(q, kick, call, lambda head, req: (head + 1, good_reply(head, req)[1]))
    try:
        res = run([q], duration=60, max_ops=5)
    finally:
        dev.close()
    assert res.failure == 1 and "not in flight" in res.message


def test_short_reply_is_caught(fake_queue: tuple[QueueDriver, int, int]) -> None:
    q, kick, call = fake_queue
    q.load_program([[Step(fuse.getattr_(), 256, fuse.ReplySize.GETATTR)]])
    dev = FakeDevice(q, kick, call, good_reply)  # a bare header where an attr_out belongs
    try:
        res = run([q], duration=60, max_ops=5)
    finally:
        dev.close()
    assert res.failure == 2 and "expected 120" in res.message


def test_a_silent_device_times_out(fake_queue: tuple[QueueDriver, int, int]) -> None:
    q, _kick, _call = fake_queue
    q.load_program(release_steps(3))
    res = run([q], duration=0.05, drain_timeout=0.1)  # nobody answers
    assert res.failure == 5 and "3 requests still in flight" in res.message


# ------------------------------------------------------------------ pyvirtiofsd


@asynccontextmanager
async def pyvirtiofsd(tmp_path: Path, queues: int = 1) -> AsyncIterator[Session]:
    share = tmp_path / "share"
    prepare_share(share)
    sess = await open_session("pyvirtiofsd", share, tmp_path / "daemon.log", queues)
    try:
        await sess.setup()
        yield sess
    finally:
        sess.close()


def programs(name: str, sess: Session, qi: int, depth: int) -> list[list[Step]]:
    assert sess.ctx is not None
    return [WORKLOADS[name].program(sess.ctx, qi, s, depth) for s in range(depth)]


async def test_pyvirtiofsd_answers_n_requests_on_two_queues(tmp_path: Path) -> None:
    async with pyvirtiofsd(tmp_path, queues=2) as sess:
        assert sess.queues_offered >= 2 and len(sess.queues) == 2
        for qi, q in enumerate(sess.queues):
            q.load_program(programs("mix", sess, qi, 8))
        res = await trio.to_thread.run_sync(lambda: run(sess.queues, duration=60, max_ops=2000))
        res.check()
        assert res.total == res.ops == 2000
        assert sum(res.per_queue) == 2000 and min(res.per_queue) > 0
        # the last READ of slot 0 brought the file's bytes
        q = sess.queues[0]
        reply = q.reply(0, 0)
        assert reply[16:] == (tmp_path / "share/file.bin").read_bytes()[:4096]


async def test_pyvirtiofsd_create_sequences_finish(tmp_path: Path) -> None:
    async with pyvirtiofsd(tmp_path) as sess:
        q = sess.queues[0]
        q.load_program(programs("create-release-unlink", sess, 0, 4), finish=True)
        res = await trio.to_thread.run_sync(lambda: run([q], duration=60, max_ops=41))
        res.check()
        # every CREATE started ran on to its UNLINK and FORGET: whole sequences only
        assert res.total % 4 == 0 and res.total >= 41
        assert not list((tmp_path / "share").glob("bench-*"))


async def test_pyvirtiofsd_wrong_error_is_caught(tmp_path: Path) -> None:
    async with pyvirtiofsd(tmp_path) as sess:
        q = sess.queues[0]
        q.load_program([[Step(fuse.lookup("missing"), 256, fuse.ReplySize.ENTRY)]] * 2)
        res = await trio.to_thread.run_sync(lambda: run([q], duration=60, max_ops=100))
        assert res.failure == 3 and "reply error -2, expected 0" in res.message
        assert res.total <= 2  # stopped at the first bad reply


async def test_pyvirtiofsd_one_generator_thread_per_queue(tmp_path: Path) -> None:
    async with pyvirtiofsd(tmp_path, queues=2) as sess:
        for qi, q in enumerate(sess.queues):
            q.load_program(programs("getattr", sess, qi, 4))
        res = await trio.to_thread.run_sync(lambda: run_per_queue(sess.queues, duration=0.2))
        res.check()
        # both threads counted, every request they started completed (the drain)
        assert len(res.per_queue) == 2 and min(res.per_queue) > 0
        assert res.total >= res.ops == sum(res.per_queue)
