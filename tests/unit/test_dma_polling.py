"""Adaptive polling of the avail ring before a queue runner sleeps.

A driver that respects VRING_USED_F_NO_NOTIFY (as Linux's virtio ring does)
kicks only when the device asked for it; while the runner polls, it has not,
so a request posted soon after the last completion is served without a kick
and without waking the runner.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Iterator

import pytest

from pyvirtiofsd.dma import GuestMemory, VirtQueue
from tests.support.splitq import VRING_USED_F_NO_NOTIFY, GuestRam, SplitQueueBuilder

MiB = 1 << 20
SIZE = 64
ROUND_TRIPS = 300
WAIT_S = 10.0  # a bound for a failure only: every wait ends on an event


class Rig:
    """A queue, a runner thread completing every chain, and a driver."""

    def __init__(self, poll_ns: int) -> None:
        self.ram = GuestRam(MiB)
        self.mem = GuestMemory()
        self.mem.add_region(self.ram.fd, self.ram.memory_region())
        self.vq = VirtQueue(self.mem, 1)
        self.q = SplitQueueBuilder.at(self.ram, 0, SIZE)
        self.q.configure(self.vq)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.vq.set_kick_fd(os.dup(self.kick))
        self.vq.set_call_fd(os.dup(self.call))
        self.vq.set_poll(poll_ns)
        self.errors: list[BaseException] = []
        self.kicks = 0
        self.runner = threading.Thread(target=self._run, name="runner")
        self.runner.start()

    def _run(self) -> None:
        try:
            while (chain := self.vq.run(None, None)) is not None:
                chain.complete(chain.writable_len, notify=True)
        except BaseException as e:
            self.errors.append(e)

    def round_trip(self) -> None:
        """Post one chain (kicking only if notifications are on) and await its completion."""
        q = self.q
        if q.free_descriptors == SIZE:
            q.rewind_data()
        before = q.used_idx
        q.add_chain([b"request!"], [16])
        if not q.used_flags & VRING_USED_F_NO_NOTIFY:
            self.kicks += 1
            os.eventfd_write(self.kick, 1)
        while q.used_idx == before:
            ready, _, _ = select.select([self.call], [], [], WAIT_S)
            assert ready, "the device never completed the request"
            os.eventfd_read(self.call)
        q.collect_used()

    def close(self) -> None:
        self.vq.stop()
        self.runner.join(WAIT_S)
        assert not self.runner.is_alive()
        assert self.errors == []
        self.vq.close()
        for fd in (self.kick, self.call):
            os.close(fd)
        self.ram.close()


@pytest.fixture
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(request.param)
    yield r
    r.close()


@pytest.mark.parametrize("rig", [1_000_000], indirect=True)
def test_requests_soon_after_a_completion_need_no_kick(rig: Rig) -> None:
    for _ in range(ROUND_TRIPS):
        rig.round_trip()
    hits, misses, window = rig.vq.poll_stats()
    # The window grows from 0 while requests come quicker than 1 ms apart;
    # from then on the runner is still looking (notifications off) when the
    # next one is posted.  Without polling nearly every request needs a kick.
    assert rig.kicks < ROUND_TRIPS // 2, (rig.kicks, hits, misses, window)
    assert hits + misses > 0 and 0 < window <= 1_000_000, (hits, misses, window)


@pytest.mark.parametrize("rig", [0], indirect=True)
def test_no_polling_when_switched_off(rig: Rig) -> None:
    for _ in range(50):
        rig.round_trip()
    assert rig.vq.poll_stats() == (0, 0, 0)
    assert rig.kicks > 0  # the runner slept on the kick eventfd


@pytest.mark.parametrize("rig", [1_000_000], indirect=True)
def test_switching_polling_off_takes_effect_on_a_running_queue(rig: Rig) -> None:
    for _ in range(50):
        rig.round_trip()
    assert sum(rig.vq.poll_stats()[:2]) > 0
    rig.vq.set_poll(0)
    for _ in range(3):  # a window already running ends; no new one starts
        rig.round_trip()
    windows = sum(rig.vq.poll_stats()[:2])
    for _ in range(20):
        rig.round_trip()
    assert sum(rig.vq.poll_stats()[:2]) == windows
    assert rig.vq.poll_stats()[2] == 0


def test_poll_window_outside_the_range_is_refused() -> None:
    with GuestRam(MiB) as ram:
        mem = GuestMemory()
        mem.add_region(ram.fd, ram.memory_region())
        vq = VirtQueue(mem, 1)
        with pytest.raises(ValueError, match="poll window"):
            vq.set_poll(-1)
        with pytest.raises(ValueError, match="poll window"):
            vq.set_poll(10**9)
        vq.close()
