"""VirtQueue / Chain: ring walking, hostile chains, I/O, notifications, kicks."""

from __future__ import annotations

import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from pyvirtiofsd.dma import (
    Chain,
    ChainError,
    DmaError,
    GuestMemory,
    MemoryRegion,
    QueueError,
    VirtQueue,
)
from tests.support.splitq import (
    VRING_AVAIL_F_NO_INTERRUPT,
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    VRING_USED_F_NO_NOTIFY,
    GuestRam,
    SplitQueueBuilder,
)

MiB = 1 << 20
SIZE = 16
N, W, IND = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, VRING_DESC_F_INDIRECT


@dataclass
class Env:
    ram: GuestRam
    mem: GuestMemory
    vq: VirtQueue
    q: SplitQueueBuilder

    def pop(self) -> Chain:
        c = self.vq.pop()
        assert c is not None
        return c


def make_env(
    *, event_idx: bool = False, window: tuple[int, int] | None = None, ring_base: int = 0
) -> Env:
    ram = GuestRam(MiB)
    mem = GuestMemory(window=window)
    mem.add_region(ram.fd, ram.memory_region())
    vq = VirtQueue(mem, 0)
    q = SplitQueueBuilder.at(ram, ring_base, SIZE, event_idx)
    q.configure(vq)
    return Env(ram, mem, vq, q)


@pytest.fixture
def env() -> Iterator[Env]:
    e = make_env()
    yield e
    e.vq.close()
    e.ram.close()


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def drained(fd: int) -> int:
    """The eventfd counter (0 if nothing was signalled), resetting it."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


# ------------------------------------------------------------------ basics


def test_pop_read_write_complete(env: Env) -> None:
    assert env.vq.pop() is None
    head = env.q.add_chain([b"request-header", b"-body"], [8, 32])
    c = env.pop()
    assert (c.head, c.readable_len, c.writable_len) == (head, 19, 40)
    assert c.read() == b"request-header-body"
    assert c.read(12, 4) == b"er-b"
    assert c.read(19) == b""
    c.write(b"reply-spans-two-descriptors", 3)
    c.complete(30)
    assert c.completed
    assert env.q.used_entries() == [(head, 30)]
    assert env.q.writable_data(head)[3:30] == b"reply-spans-two-descriptors"
    assert env.vq.pop() is None
    assert env.vq.last_avail_idx == 1


def test_chain_bounds_and_double_complete(env: Env) -> None:
    env.q.add_chain([b"abc"], [4])
    c = env.pop()
    with pytest.raises(ValueError):
        c.read(2, 2)
    with pytest.raises(ValueError):
        c.read(4)
    with pytest.raises(ValueError):
        c.write(b"12345")
    with pytest.raises(ValueError):
        c.write(b"12", 3)
    with pytest.raises(ValueError):
        c.complete(5)  # more than the writable part
    c.complete(4)
    with pytest.raises(DmaError):
        c.complete(4)
    with pytest.raises(DmaError):
        c.read()
    assert env.q.used_entries() == [(c.head, 4)]


def test_readable_only_and_writable_only(env: Env) -> None:
    env.q.add_chain([b"r1", b"r2", b"r3"], [])
    env.q.add_chain([], [7, 9])
    a, b = env.pop(), env.pop()
    assert (a.readable_len, a.writable_len, a.read()) == (6, 0, b"r1r2r3")
    assert (b.readable_len, b.writable_len) == (0, 16)
    b.write(bytes(range(16)))
    a.complete(0)
    b.complete(16)
    assert env.q.writable_data(b.head) == bytes(range(16))


def test_indirect_chain(env: Env) -> None:
    head = env.q.add_chain([b"in", b"direct"], [5, 6], indirect=True)
    c = env.pop()
    assert (c.head, c.read(), c.writable_len) == (head, b"indirect", 11)
    c.write(b"hello world")
    c.complete(11)
    assert env.q.writable_data(head) == b"hello world"
    assert env.q.used_entries() == [(head, 11)]


def test_direct_then_indirect(env: Env) -> None:
    """2.7.5.3.1: normal descriptors followed by one indirect descriptor."""
    q = env.q
    r = q.alloc_data(b"head")
    w = q.alloc(4)
    table = q.write_table([(r, 4, N, 1), (w, 4, W, 0)])
    g = q.alloc_data(b"first")
    q.write_desc(0, g, 5, N, 1)
    q.write_desc(1, table, 32, IND, 0)
    q.publish(0)
    c = env.pop()
    assert (c.read(), c.writable_len) == (b"firsthead", 4)
    c.complete(0)


def test_zero_length_descriptors_are_allowed(env: Env) -> None:
    q = env.q
    g = q.alloc_data(b"xyz")
    q.write_desc(0, g, 3, N, 1)
    q.write_desc(1, 0xDEAD_BEEF_0000, 0, N | W, 2)  # no bytes: address never used
    q.write_desc(2, q.alloc(2), 2, W, 0)
    q.publish(0)
    c = env.pop()
    assert (c.readable_len, c.writable_len) == (3, 2)
    c.complete(2)


def test_ring_wraps_many_times(env: Env) -> None:
    for i in range(5 * SIZE + 3):
        head = env.q.add_chain([struct.pack("<I", i)], [4])
        c = env.pop()
        assert c.read() == struct.pack("<I", i)
        c.write(struct.pack("<I", i * 3))
        c.complete(4)
        ((uid, ulen),) = env.q.collect_used()
        assert (uid, ulen) == (head, 4)
        assert env.q.writable_data(head) == struct.pack("<I", i * 3)
    assert env.vq.last_avail_idx == 5 * SIZE + 3


def test_batch_of_pops_then_completes_out_of_order(env: Env) -> None:
    heads = [env.q.add_chain([bytes([i])], [1]) for i in range(4)]
    chains = [env.pop() for _ in heads]
    assert env.vq.pop() is None
    for c in reversed(chains):
        c.complete(1)
    assert [h for h, _ in env.q.used_entries()] == list(reversed(heads))


# ------------------------------------------------------------ hostile chains


def good_chain_still_pops(env: Env) -> None:
    env.q.collect_used()
    head = env.q.add_chain([b"ok"], [2])
    c = env.pop()
    assert (c.head, c.read()) == (head, b"ok")
    c.complete(2)
    assert env.q.collect_used() == [(head, 2)]


def expect_failed(env: Env, head: int, reason: str) -> None:
    before = env.q.used_idx
    with pytest.raises(ChainError) as ei:
        env.vq.pop()
    assert ei.value.reason == reason
    assert ei.value.head == head
    assert isinstance(ei.value, DmaError)
    assert env.q.used_idx == (before + 1) & 0xFFFF
    assert env.q.used_entry(before) == (head, 0)
    good_chain_still_pops(env)


def _head_range(q: SplitQueueBuilder) -> int:
    q.publish(SIZE + 3)
    return SIZE + 3


def _next_range(q: SplitQueueBuilder) -> int:
    q.write_desc(0, q.alloc(8), 8, N, SIZE)
    q.publish(0)
    return 0


def _loop(q: SplitQueueBuilder) -> int:
    q.write_desc(0, q.alloc(8), 8, N, 1)
    q.write_desc(1, q.alloc(8), 8, N, 0)
    q.publish(0)
    return 0


def _self_loop(q: SplitQueueBuilder) -> int:
    q.write_desc(3, q.alloc(8), 8, N | W, 3)
    q.publish(3)
    return 3


def _indirect_loop(q: SplitQueueBuilder) -> int:
    b = q.alloc(4)
    table = q.write_table([(b, 4, N, 1), (b, 4, N, 0)])
    q.write_desc(0, table, 32, IND, 0)
    q.publish(0)
    return 0


def _outside_memory(q: SplitQueueBuilder) -> int:
    q.write_desc(0, MiB - 4, 8, 0, 0)
    q.publish(0)
    return 0


def _addr_overflow(q: SplitQueueBuilder) -> int:
    q.write_desc(0, 2**64 - 16, 32, W, 0)
    q.publish(0)
    return 0


def _outside_memory_later_desc(q: SplitQueueBuilder) -> int:
    q.write_desc(0, q.alloc(8), 8, N, 1)
    q.write_desc(1, 0x7000_0000, 8, W, 0)
    q.publish(0)
    return 0


def _read_after_write(q: SplitQueueBuilder) -> int:
    q.write_desc(0, q.alloc(8), 8, W | N, 1)
    q.write_desc(1, q.alloc(8), 8, 0, 0)
    q.publish(0)
    return 0


def _indirect_len(length: int) -> Callable[[SplitQueueBuilder], int]:
    def build(q: SplitQueueBuilder) -> int:
        q.write_desc(0, q.alloc(max(length, 16)), length, IND, 0)
        q.publish(0)
        return 0

    return build


def _nested_indirect(q: SplitQueueBuilder) -> int:
    inner = q.write_table([(q.alloc(4), 4, 0, 0)])
    outer = q.write_table([(inner, 16, IND, 0)])
    q.write_desc(0, outer, 16, IND, 0)
    q.publish(0)
    return 0


def _indirect_with_next(q: SplitQueueBuilder) -> int:
    table = q.write_table([(q.alloc(4), 4, 0, 0)])
    q.write_desc(0, table, 16, IND | N, 1)
    q.write_desc(1, q.alloc(4), 4, W, 0)
    q.publish(0)
    return 0


def _indirect_table_outside(q: SplitQueueBuilder) -> int:
    q.write_desc(0, MiB - 16, 32, IND, 0)
    q.publish(0)
    return 0


def _indirect_entry_outside(q: SplitQueueBuilder) -> int:
    table = q.write_table([(q.alloc(4), 4, N, 1), (2 * MiB, 4, W, 0)])
    q.write_desc(0, table, 32, IND, 0)
    q.publish(0)
    return 0


def _indirect_next_range(q: SplitQueueBuilder) -> int:
    table = q.write_table([(q.alloc(4), 4, N, 2), (q.alloc(4), 4, W, 0)])
    q.write_desc(0, table, 32, IND, 0)
    q.publish(0)
    return 0


HOSTILE: list[tuple[str, Callable[[SplitQueueBuilder], int], str]] = [
    ("head>=size", _head_range, "head index out of range"),
    ("next>=size", _next_range, "next index out of range"),
    ("loop", _loop, "descriptor loop or chain longer than the queue size"),
    ("self-loop", _self_loop, "descriptor loop or chain longer than the queue size"),
    ("indirect-loop", _indirect_loop, "descriptor loop or chain longer than the queue size"),
    ("outside-memory", _outside_memory, "descriptor buffer outside guest memory"),
    ("addr-overflow", _addr_overflow, "descriptor buffer outside guest memory"),
    ("later-desc-outside", _outside_memory_later_desc, "descriptor buffer outside guest memory"),
    (
        "read-after-write",
        _read_after_write,
        "device-readable descriptor after a device-writable one",
    ),
    ("indirect-len-17", _indirect_len(17), "bad indirect table length"),
    ("indirect-len-0", _indirect_len(0), "bad indirect table length"),
    ("indirect-too-big", _indirect_len(16 * 1025), "bad indirect table length"),
    ("nested-indirect", _nested_indirect, "nested indirect descriptor"),
    ("indirect+next", _indirect_with_next, "indirect descriptor with NEXT set"),
    ("indirect-table-outside", _indirect_table_outside, "indirect table outside guest memory"),
    ("indirect-entry-outside", _indirect_entry_outside, "descriptor buffer outside guest memory"),
    ("indirect-next-range", _indirect_next_range, "next index out of range"),
]


@pytest.mark.parametrize(("build", "reason"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_chain_fails_only_itself(
    env: Env, build: Callable[[SplitQueueBuilder], int], reason: str
) -> None:
    good_chain_still_pops(env)  # some traffic before
    head = build(env.q)
    expect_failed(env, head, reason)


def test_hostile_chain_between_good_ones(env: Env) -> None:
    first = env.q.add_chain([b"1"], [1])
    env.q.write_desc(10, env.q.alloc(8), 8, N, 11)
    env.q.write_desc(11, env.q.alloc(8), 8, N, 10)
    env.q.publish(10)
    third = env.q.add_chain([b"3"], [1])
    assert env.pop().head == first
    with pytest.raises(ChainError) as ei:
        env.vq.pop()
    assert ei.value.head == 10
    assert env.pop().head == third


def test_indirect_max_entries_ok(env: Env) -> None:
    q = env.q
    buf = q.alloc_data(b"x")
    entries = [(buf, 1, N, k + 1) for k in range(1023)] + [(q.alloc(1), 1, W, 0)]
    table = q.write_table(entries)
    q.write_desc(0, table, 16 * 1024, IND, 0)
    q.publish(0)
    c = env.pop()
    assert (c.readable_len, c.writable_len) == (1023, 1)
    assert c.read() == b"x" * 1023
    c.complete(1)


def test_total_length_over_4g() -> None:
    big = 3 << 30  # sparse memfd: nothing is touched
    ram = GuestRam(big)
    mem = GuestMemory()
    mem.add_region(ram.fd, ram.memory_region())
    vq = VirtQueue(mem, 1)
    q = SplitQueueBuilder.at(ram, 0, SIZE)
    q.configure(vq)
    q.write_desc(0, 0x100000, 0x9000_0000, N, 1)
    q.write_desc(1, 0x100000, 0x9000_0000, W, 0)
    q.publish(0)
    with pytest.raises(ChainError) as ei:
        vq.pop()
    assert ei.value.reason == "chain total length exceeds 4 GiB"
    assert q.used_entries() == [(0, 0)]
    q.collect_used()
    q.add_chain([b"fine"], [])
    c = vq.pop()
    assert c is not None and c.read() == b"fine"
    c.complete(0)
    vq.close()
    ram.close()


# -------------------------------------------------------------- ring defects


def test_avail_idx_jump_breaks_queue(env: Env) -> None:
    env.q.set_avail_idx(SIZE + 1)
    with pytest.raises(QueueError, match=r"avail\.idx"):
        env.vq.pop()
    with pytest.raises(QueueError):
        env.vq.pop()  # stays broken
    # the front-end re-initialises the ring: usable again
    env.q.set_avail_idx(0)
    env.q.configure(env.vq)
    env.q.add_chain([b"back"], [])
    assert env.pop().read() == b"back"


def test_avail_idx_exactly_size_is_fine(env: Env) -> None:
    for _ in range(SIZE):
        env.q.add_chain([b"z"], [])
    chains = [env.pop() for _ in range(SIZE)]
    assert env.vq.pop() is None
    for c in chains:
        c.complete(0)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"size": 12}, "power of two"),
        ({"size": 0}, "power of two"),
        ({"size": 2048}, "power of two"),
        ({"desc_gpa": 0x1008}, "misaligned"),
        ({"avail_gpa": 0x2001}, "misaligned"),
        ({"used_gpa": 0x3002}, "misaligned"),
        ({"desc_gpa": MiB - 16 * 8}, "outside guest memory"),
        ({"used_gpa": 2**64 - 4}, "outside guest memory"),
    ],
)
def test_configure_rejects(env: Env, kw: dict[str, int], match: str) -> None:
    args = {"size": 16, "desc_gpa": 0x1000, "avail_gpa": 0x2000, "used_gpa": 0x3000}
    args.update(kw)
    with pytest.raises(QueueError, match=match):
        env.vq.configure(event_idx=False, **args)
    assert env.vq.size == 0
    with pytest.raises(QueueError, match="not configured"):
        env.vq.pop()


def test_ring_unmapped_after_memory_removal(env: Env) -> None:
    env.mem.remove_region(env.ram.memory_region())
    with pytest.raises(QueueError, match="ring outside guest memory"):
        env.vq.pop()


def test_set_base_and_get_base(env: Env) -> None:
    env.vq.reset()
    assert (env.vq.size, env.vq.last_avail_idx) == (0, 0)
    # vhost-user order: SET_VRING_BASE before SET_VRING_ADDR
    env.vq.set_base(0xFFFE)
    env.q.set_avail_idx(0xFFFE)
    env.ram.write(env.q.used_gpa + 2, struct.pack("<H", 0xFFFE))
    env.q.configure(env.vq)
    heads = [env.q.add_chain([b"a"], [1]) for _ in range(3)]  # wraps the 16-bit index
    for h in heads:
        c = env.pop()
        assert c.head == h
        c.complete(1)
    assert env.vq.last_avail_idx == 1
    assert env.q.used_idx == 1
    assert [env.q.used_entry(n) for n in (0xFFFE, 0xFFFF, 0x10000)] == [(h, 1) for h in heads]


def test_set_base_while_configured_reads_used_idx(env: Env) -> None:
    env.ram.write(env.q.used_gpa + 2, struct.pack("<H", 7))
    env.vq.set_base(7)
    env.q.set_avail_idx(7)
    head = env.q.add_chain([b"q"], [])
    c = env.pop()
    c.complete(0)
    assert env.q.used_idx == 8
    assert env.q.used_entry(7) == (head, 0)


def test_complete_after_reset_is_dropped(env: Env) -> None:
    env.q.add_chain([b"x"], [1])
    c = env.pop()
    env.vq.reset()
    c.complete(1)  # silently dropped: the ring belongs to a previous configuration
    assert env.q.used_idx == 0


# --------------------------------------------------------------- window


def test_window_rings_and_descriptors() -> None:
    win = (0x80000, 0x40000)
    e = make_env(window=win, ring_base=0x80000)
    try:
        assert e.mem.mapped_bytes == 0x40000
        head = e.q.add_chain([b"in window"], [4])
        c = e.pop()
        assert c.read() == b"in window"
        c.complete(4)
        # descriptor outside the window (but inside guest memory)
        e.q.write_desc(0, 0x1000, 16, 0, 0)
        e.q.publish(0)
        expect_failed(e, 0, "descriptor buffer outside the swiotlb window")
        # straddling the window end
        e.q.write_desc(0, 0xC0000 - 8, 16, W, 0)
        e.q.publish(0)
        expect_failed(e, 0, "descriptor buffer outside the swiotlb window")
        # indirect table outside the window
        e.q.write_desc(0, 0x2000, 16, IND, 0)
        e.q.publish(0)
        expect_failed(e, 0, "indirect table outside the swiotlb window")
        # rings outside the window
        with pytest.raises(QueueError, match="window"):
            e.vq.configure(
                size=16, desc_gpa=0x1000, avail_gpa=0x90000, used_gpa=0x91000, event_idx=False
            )
        assert head >= 0
    finally:
        e.vq.close()
        e.ram.close()


# ------------------------------------------------------------------ I/O


@pytest.fixture
def datafile() -> Iterator[tuple[int, bytes]]:
    content = bytes((i * 7 + 3) & 0xFF for i in range(10000))
    with tempfile.TemporaryFile() as f:
        f.write(content)
        f.flush()
        yield f.fileno(), content


def test_preadv_into_several_writable_descriptors(env: Env, datafile: tuple[int, bytes]) -> None:
    fd, content = datafile
    head = env.q.add_chain([b"hdr"], [16, 100, 37, 2000])
    c = env.pop()
    assert c.writable_len == 2153
    c.write(b"H" * 16)
    n = c.preadv(fd, 5, 2137, 16)
    assert n == 2137
    c.complete(16 + n)
    assert env.q.writable_data(head) == b"H" * 16 + content[5 : 5 + 2137]


def test_preadv_short_at_eof(env: Env, datafile: tuple[int, bytes]) -> None:
    fd, content = datafile
    head = env.q.add_chain([], [50, 50, 50])
    c = env.pop()
    assert c.preadv(fd, 9900, 150, 0) == 100
    assert c.preadv(fd, 20000, 10, 140) == 0
    c.complete(100)
    assert env.q.writable_data(head)[:100] == content[9900:]


def test_pwritev_from_several_readable_descriptors(env: Env) -> None:
    env.q.add_chain([b"fuse-in-header:", b"payload-", b"spread", b"-over-four"], [8])
    c = env.pop()
    with tempfile.TemporaryFile() as f:
        n = c.pwritev(f.fileno(), 3, c.readable_len - 15, 15)
        assert n == 24
        f.seek(0)
        assert f.read() == b"\0\0\0payload-spread-over-four"
    c.complete(0)


def test_io_errors(env: Env) -> None:
    env.q.add_chain([b"data"], [4])
    c = env.pop()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError) as ei:
        c.preadv(r, 0, 4, 0)
    assert ei.value.errno == 9  # EBADF
    with pytest.raises(OSError):
        c.pwritev(w, 0, 4, 0)
    with pytest.raises(ValueError):
        c.preadv(0, 0, 5, 0)
    with pytest.raises(ValueError):
        c.pwritev(0, 0, 2, 3)
    c.complete(0)


def test_descriptor_crossing_region_boundary(datafile: tuple[int, bytes]) -> None:
    """One descriptor spanning two adjacent memory regions becomes two iovecs."""
    fd, content = datafile
    a, b = GuestRam(0x10000, name="a"), GuestRam(0x10000, gpa_base=0x10000, name="b")
    mem = GuestMemory()
    mem.add_region(a.fd, a.memory_region())
    mem.add_region(b.fd, b.memory_region())
    vq = VirtQueue(mem, 0)
    q = SplitQueueBuilder.at(a, 0, SIZE, data_gpa=0x8000, data_size=0x8000)
    q.configure(vq)
    q.write_desc(0, 0xFFF0, 32, W, 0)
    q.publish(0)
    c = vq.pop()
    assert c is not None and c.writable_len == 32
    assert c.preadv(fd, 0, 32, 0) == 32
    c.complete(32)
    assert a.read(0xFFF0, 16) + b.read(0x10000, 16) == content[:32]
    vq.close()
    a.close()
    b.close()


# -------------------------------------------------------- notifications


def test_event_idx_suppression() -> None:
    e = make_env(event_idx=True)
    call = eventfd()
    e.vq.set_call_fd(call)
    q = e.q

    def one() -> None:
        q.add_chain([b"x"], [])
        e.pop().complete(0)

    q.set_used_event(0)
    one()  # used idx 1; first notification is always sent
    assert e.vq.notify_if_needed() is True
    assert drained(call) == 1
    one()  # used idx 2; driver asked for an interrupt after entry 0 only
    assert e.vq.notify_if_needed() is False
    assert drained(call) == 0
    q.set_used_event(2)
    one()  # used idx 3 crosses used_event 2
    assert e.vq.notify_if_needed() is True
    assert drained(call) == 1
    assert e.vq.notify_if_needed() is False  # nothing new
    q.set_used_event(10)
    one()
    one()
    assert e.vq.notify_if_needed() is False
    e.vq.close()
    e.ram.close()


def test_event_idx_avail_event_follows_pops() -> None:
    e = make_env(event_idx=True)
    for _ in range(3):
        e.q.add_chain([b"x"], [])
        e.pop().complete(0)
    assert e.q.avail_event == 3
    e.vq.disable_notification()
    e.q.add_chain([b"y"], [])
    e.pop().complete(0)
    assert e.q.avail_event == 3  # not advanced while disabled
    e.vq.enable_notification()
    assert e.q.avail_event == 4
    assert e.q.used_flags == 0  # used.flags untouched with EVENT_IDX
    e.vq.close()
    e.ram.close()


def test_no_interrupt_flag_without_event_idx(env: Env) -> None:
    call = eventfd()
    env.vq.set_call_fd(call)
    assert env.vq.notify_if_needed() is True  # first call always signals
    assert drained(call) == 1
    assert env.vq.notify_if_needed() is False  # nothing new
    env.q.add_chain([b"x"], [])
    env.pop().complete(0)
    env.q.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    assert env.vq.notify_if_needed() is False
    assert drained(call) == 0
    env.q.set_avail_flags(0)
    env.q.add_chain([b"x"], [])
    env.pop().complete(0)
    assert env.vq.notify_if_needed() is True
    assert drained(call) == 1


def test_complete_with_notify_signals_in_the_same_call(env: Env) -> None:
    call = eventfd()
    env.vq.set_call_fd(call)
    env.q.add_chain([b"x"], [])
    env.pop().complete(0)
    assert drained(call) == 0  # plain complete() never signals
    env.q.add_chain([b"x"], [])
    env.pop().complete(0, notify=True)
    assert drained(call) == 1
    # suppression still applies: NO_INTERRUPT set, nothing signalled
    env.q.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT)
    env.q.add_chain([b"x"], [])
    env.pop().complete(0, notify=True)
    assert drained(call) == 0


def test_notify_without_call_fd(env: Env) -> None:
    env.q.add_chain([b"x"], [])
    env.pop().complete(0)
    assert env.vq.notify_if_needed() is False


def test_used_flags_no_notify(env: Env) -> None:
    env.vq.disable_notification()
    assert env.q.used_flags == VRING_USED_F_NO_NOTIFY
    env.vq.enable_notification()
    assert env.q.used_flags == 0


def test_failed_chain_counts_for_notification(env: Env) -> None:
    call = eventfd()
    env.vq.set_call_fd(call)
    env.vq.notify_if_needed()
    drained(call)
    env.q.publish(SIZE + 1)
    with pytest.raises(ChainError):
        env.vq.pop()
    assert env.vq.notify_if_needed() is True
    assert drained(call) == 1


# ----------------------------------------------------------------- kicks


def test_wait_kick_drains_counter(env: Env) -> None:
    kick = eventfd()
    env.vq.set_kick_fd(kick)
    assert env.vq.wait_kick(0) is False
    os.eventfd_write(kick, 1)
    os.eventfd_write(kick, 1)
    assert env.vq.wait_kick(0) is True
    assert env.vq.wait_kick(0) is False  # both kicks consumed by one wake-up


def test_wait_kick_from_other_thread(env: Env) -> None:
    kick = eventfd()
    env.vq.set_kick_fd(kick)
    started = threading.Event()
    result: list[bool] = []

    def waiter() -> None:
        started.set()
        result.append(env.vq.wait_kick(None))

    t = threading.Thread(target=waiter)
    t.start()
    assert started.wait(10)
    os.eventfd_write(kick, 1)
    t.join(10)
    assert not t.is_alive()
    assert result == [True]


def test_stop_wakes_waiter_and_sticks_until_reset(env: Env) -> None:
    env.vq.set_kick_fd(eventfd())
    started = threading.Event()
    result: list[bool] = []

    def waiter() -> None:
        started.set()
        result.append(env.vq.wait_kick())

    t = threading.Thread(target=waiter)
    t.start()
    assert started.wait(10)
    env.vq.stop()
    t.join(10)
    assert not t.is_alive()
    assert result == [False]
    assert env.vq.wait_kick() is False  # still stopped: returns at once
    env.vq.reset()
    assert env.vq.wait_kick(0) is False  # timeout, not stopped
    kick = eventfd()
    env.vq.set_kick_fd(kick)  # reset kept fds; replace anyway
    os.eventfd_write(kick, 1)
    assert env.vq.wait_kick() is True


def test_wait_kick_without_kick_fd_times_out(env: Env) -> None:
    assert env.vq.wait_kick(0.001) is False


def test_fd_ownership(env: Env) -> None:
    k1, k2, c1 = eventfd(), eventfd(), eventfd()
    env.vq.set_kick_fd(k1)
    env.vq.set_kick_fd(k2)
    with pytest.raises(OSError):
        os.fstat(k1)
    env.vq.set_call_fd(c1)
    env.vq.reset()
    os.fstat(k2)  # reset keeps the fds
    env.vq.close()
    for fd in (k2, c1):
        with pytest.raises(OSError):
            os.fstat(fd)
    env.vq.set_kick_fd(None)
    with pytest.raises(ValueError):
        env.vq.set_call_fd(-5)


# ------------------------------------------------------ memory replacement


def _maps_of(name: str) -> int:
    """How many mappings of the memfd called name this process has."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if f"/memfd:{name} " in line)


def test_replace_memory_while_chain_alive() -> None:
    old = GuestRam(MiB, name="pvd-old-ram")
    mem = GuestMemory()
    mem.add_region(old.fd, old.memory_region())
    vq = VirtQueue(mem, 0)
    q = SplitQueueBuilder.at(old, 0, SIZE)
    q.configure(vq)
    head = q.add_chain([b"old request"], [16])
    c = vq.pop()
    assert c is not None
    # SET_MEM_TABLE: a copy of the guest RAM (same GPAs, different backing).
    new = GuestRam(MiB, name="pvd-new-ram")
    new.write(0, old.read(0, MiB))
    mem.replace([(new.fd, new.memory_region())])
    assert _maps_of("pvd-old-ram") == 2  # python's mmap + the chain's pinned snapshot
    assert c.read() == b"old request"  # still translated against the old snapshot
    c.write(b"answer-old-map!!")
    c.complete(16)
    # the used ring is written through the new table ...
    assert struct.unpack("<H", new.read(q.used_gpa + 2, 2)) == (1,)
    assert struct.unpack("<II", new.read(q.used_gpa + 4, 8)) == (head, 16)
    assert q.used_idx == 0  # ... not the old one
    assert old.read(q.record(head).writable[0][0], 16) == b"answer-old-map!!"
    assert _maps_of("pvd-old-ram") == 1  # unmapped once the last user let go
    vq.close()
    old.close()
    new.close()


def test_chain_garbage_collected_releases_snapshot() -> None:
    old = GuestRam(MiB, name="pvd-gc-ram")
    mem = GuestMemory()
    mem.add_region(old.fd, old.memory_region())
    vq = VirtQueue(mem, 0)
    q = SplitQueueBuilder.at(old, 0, SIZE)
    q.configure(vq)
    q.add_chain([b"r"], [1])
    c = vq.pop()
    mem.clear()
    with pytest.raises(QueueError):
        vq.pop()  # rings gone
    assert _maps_of("pvd-gc-ram") == 2
    del c
    assert _maps_of("pvd-gc-ram") == 1
    vq.close()
    old.close()


def test_concurrent_replace_while_worker_pops() -> None:
    """Worker thread pops (GIL released in C) while the control plane swaps tables."""
    ram = GuestRam(MiB)
    mem = GuestMemory()
    region: MemoryRegion = ram.memory_region()
    mem.add_region(ram.fd, region)
    vq = VirtQueue(mem, 0)
    kick = eventfd()
    vq.set_kick_fd(os.dup(kick))
    q = SplitQueueBuilder.at(ram, 0, 256)
    q.configure(vq)
    total = 3000
    seen: list[int] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            while len(seen) < total:
                c = vq.pop()
                if c is None:
                    if not vq.wait_kick():
                        return
                    continue
                seen.append(int.from_bytes(c.read(), "little"))
                c.write(c.read()[::-1])
                c.complete(c.writable_len)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    produced = 0
    while produced < total and t.is_alive():
        q.collect_used()
        if q.free_descriptors == 256:
            q.rewind_data()  # every earlier buffer has been completed
        while produced < total and q.free_descriptors >= 2 and q.data_left > 64:
            q.add_chain([produced.to_bytes(4, "little")], [4])
            produced += 1
        mem.replace([(ram.fd, region)])  # same contents, new snapshot each time
        os.eventfd_write(kick, 1)
    t.join(60)
    if t.is_alive():
        vq.stop()
        t.join(10)
    assert errors == []
    assert seen == list(range(total))
    vq.close()
    os.close(kick)
    ram.close()


# ------------------------------------------------------ salvaging a refused chain

IN_HDR = bytes(range(1, 41))  # stands for a 40-byte fuse_in_header
WIN = (0x80000, 0x40000)


def _payload_outside_window(e: Env) -> tuple[int, int, int]:
    """Header and reply slot in the window, body and payload outside: (head, out, payload)."""
    q = e.q
    out = q.alloc(16)
    payload = 0x2000  # guest memory, below the window
    e.ram.write(out, b"\xaa" * 16)
    e.ram.write(payload, b"\xbb" * 64)
    q.write_desc(0, q.alloc_data(IN_HDR), 40, N, 1)
    q.write_desc(1, 0x1000, 24, N, 2)  # request body outside
    q.write_desc(2, out, 16, W | N, 3)
    q.write_desc(3, payload, 4096, W, 0)
    q.publish(0)
    return 0, out, payload


@pytest.fixture
def wenv() -> Iterator[Env]:
    e = make_env(window=WIN, ring_base=0x80000)
    yield e
    e.vq.close()
    e.ram.close()


def test_salvage_chain_gets_header_and_reply_slot(wenv: Env) -> None:
    head, out, payload = _payload_outside_window(wenv)
    before = wenv.q.used_idx
    with pytest.raises(ChainError) as ei:
        wenv.vq.pop(salvage=(40, 16))
    e = ei.value
    assert (e.head, e.reason) == (head, "descriptor buffer outside the swiotlb window")
    assert not e.completed
    s = e.salvage
    assert s is not None and not s.completed
    assert wenv.q.used_idx == before  # not completed by the core
    assert (s.head, s.readable_len, s.writable_len) == (head, 40, 16)
    assert s.read() == IN_HDR
    with pytest.raises(ValueError):
        s.write(bytes(17))
    s.write(b"R" * 16)
    s.complete(16)
    assert s.completed
    assert wenv.q.used_idx == (before + 1) & 0xFFFF
    assert wenv.q.used_entry(before) == (head, 16)
    assert wenv.ram.read(out, 16) == b"R" * 16
    assert wenv.ram.read(payload, 64) == b"\xbb" * 64  # nothing written outside
    with pytest.raises(DmaError):
        s.complete(0)
    good_chain_still_pops(wenv)


def test_salvage_takes_only_the_requested_prefix(wenv: Env) -> None:
    # first readable / writable descriptors longer than needed, straddling the window end
    q = wenv.q
    end = WIN[0] + WIN[1]
    wenv.ram.write(end - 40, IN_HDR)
    q.write_desc(0, end - 40, 80, N, 1)
    q.write_desc(1, end - 16, 32, W, 0)
    q.publish(0)
    with pytest.raises(ChainError) as ei:
        wenv.vq.pop(salvage=(40, 16))
    s = ei.value.salvage
    assert s is not None
    assert s.read() == IN_HDR
    s.write(b"W" * 16)
    s.complete(16)
    assert wenv.q.collect_used() == [(0, 16)]
    assert wenv.ram.read(end, 16) == bytes(16)


def test_without_salvage_the_same_chain_is_completed_with_zero(wenv: Env) -> None:
    head, out, _ = _payload_outside_window(wenv)
    with pytest.raises(ChainError) as ei:
        wenv.vq.pop()
    assert ei.value.salvage is None and ei.value.completed
    assert wenv.q.collect_used() == [(head, 0)]
    assert wenv.ram.read(out, 16) == b"\xaa" * 16


def _reply_slot_outside(e: Env) -> None:
    e.q.write_desc(0, e.q.alloc_data(IN_HDR), 40, N, 1)
    e.q.write_desc(1, 0x1000, 16, W, 0)
    e.q.publish(0)


def _header_outside(e: Env) -> None:
    e.q.write_desc(0, 0x1000, 40, N, 1)
    e.q.write_desc(1, e.q.alloc(16), 16, W, 0)
    e.q.publish(0)


def _header_too_short(e: Env) -> None:
    e.q.write_desc(0, e.q.alloc_data(IN_HDR[:39]), 39, N, 1)
    e.q.write_desc(1, 0x1000, 1, N, 2)
    e.q.write_desc(2, e.q.alloc(16), 16, W, 0)
    e.q.publish(0)


def _reply_slot_too_short(e: Env) -> None:
    e.q.write_desc(0, e.q.alloc_data(IN_HDR), 40, N, 1)
    e.q.write_desc(1, e.q.alloc(8), 8, W | N, 2)
    e.q.write_desc(2, 0x1000, 8, W, 0)
    e.q.publish(0)


def _no_writable(e: Env) -> None:
    e.q.write_desc(0, e.q.alloc_data(IN_HDR), 40, N, 1)
    e.q.write_desc(1, 0x1000, 8, 0, 0)
    e.q.publish(0)


def _address_then_structural(e: Env) -> None:
    # header and reply slot fine, a buffer outside, then a readable after writable
    e.q.write_desc(0, e.q.alloc_data(IN_HDR), 40, N, 1)
    e.q.write_desc(1, 0x1000, 8, N, 2)
    e.q.write_desc(2, e.q.alloc(16), 16, W | N, 3)
    e.q.write_desc(3, e.q.alloc(8), 8, 0, 0)
    e.q.publish(0)


def _address_then_loop(e: Env) -> None:
    e.q.write_desc(0, e.q.alloc_data(IN_HDR), 40, N, 1)
    e.q.write_desc(1, e.q.alloc(16), 16, W | N, 2)
    e.q.write_desc(2, 0x1000, 8, W | N, 1)
    e.q.publish(0)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (_reply_slot_outside, "descriptor buffer outside the swiotlb window"),
        (_header_outside, "descriptor buffer outside the swiotlb window"),
        (_header_too_short, "descriptor buffer outside the swiotlb window"),
        (_reply_slot_too_short, "descriptor buffer outside the swiotlb window"),
        (_no_writable, "descriptor buffer outside the swiotlb window"),
        (_address_then_structural, "device-readable descriptor after a device-writable one"),
        (_address_then_loop, "descriptor loop or chain longer than the queue size"),
    ],
    ids=[
        "reply-outside",
        "header-outside",
        "header-short",
        "reply-short",
        "no-writable",
        "then-read-after-write",
        "then-loop",
    ],
)
def test_unsalvageable_chain_is_completed_with_zero(
    wenv: Env, build: Callable[[Env], None], reason: str
) -> None:
    before = wenv.q.used_idx
    build(wenv)
    with pytest.raises(ChainError) as ei:
        wenv.vq.pop(salvage=(40, 16))
    assert ei.value.reason == reason
    assert ei.value.salvage is None and ei.value.completed
    assert wenv.q.used_entry(before) == (0, 0)
    good_chain_still_pops(wenv)


@pytest.mark.parametrize(("build", "reason"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_chains_unchanged_with_salvage(
    env: Env, build: Callable[[SplitQueueBuilder], int], reason: str
) -> None:
    head = build(env.q)
    before = env.q.used_idx
    with pytest.raises(ChainError) as ei:
        env.vq.pop(salvage=(1, 1))
    assert (ei.value.head, ei.value.reason) == (head, reason)
    assert ei.value.salvage is None and ei.value.completed
    assert env.q.used_entry(before) == (head, 0)
    good_chain_still_pops(env)


def test_salvage_outside_guest_memory_through_indirect_table(env: Env) -> None:
    q = env.q
    hdr = q.alloc_data(IN_HDR)
    out = q.alloc(16)
    table = q.write_table([(hdr, 40, N, 1), (out, 16, W | N, 2), (2 * MiB, 4096, W, 0)])
    q.write_desc(0, table, 48, IND, 0)
    q.publish(0)
    with pytest.raises(ChainError) as ei:
        env.vq.pop(salvage=(40, 16))
    assert ei.value.reason == "descriptor buffer outside guest memory"
    s = ei.value.salvage
    assert s is not None and s.read() == IN_HDR
    s.write(b"x" * 16)
    s.complete(16)
    assert q.collect_used() == [(0, 16)]
    assert env.ram.read(out, 16) == b"x" * 16


def test_salvage_completion_after_reset_is_dropped(wenv: Env) -> None:
    _payload_outside_window(wenv)
    with pytest.raises(ChainError) as ei:
        wenv.vq.pop(salvage=(40, 16))
    s = ei.value.salvage
    assert s is not None
    wenv.vq.set_base(0)
    s.complete(0)  # stale: silently dropped
    assert wenv.q.used_idx == 0


@pytest.mark.parametrize("bad", [(0, 16), (40, 0), (-1, 16), (40, 2**32)])
def test_salvage_sizes_are_checked(env: Env, bad: tuple[int, int]) -> None:
    env.q.add_chain([b"x"], [1])
    with pytest.raises(ValueError):
        env.vq.pop(salvage=bad)
    assert env.pop().read() == b"x"


def test_chain_error_pickles_without_its_salvage(wenv: Env) -> None:
    import pickle

    _payload_outside_window(wenv)
    with pytest.raises(ChainError) as ei:
        wenv.vq.pop(salvage=(40, 16))
    e = pickle.loads(pickle.dumps(ei.value))
    assert (e.head, e.reason, e.salvage, e.completed) == (0, ei.value.reason, None, False)
    assert ei.value.salvage is not None
    ei.value.salvage.complete(0)
    assert pickle.loads(pickle.dumps(ChainError(3, "x"))).completed
