"""Property tests: random (hostile) descriptor tables never crash the device.

Every pop must either return a chain that matches a pure-Python reference walk
of the same table, or raise ChainError with the reference's reason, with the
head already returned to the used ring with len 0.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtiofsd.dma import Chain, ChainError, GuestMemory, QueueError, VirtQueue
from tests.support.splitq import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    GuestRam,
    SplitQueueBuilder,
)

RAM = 0x10000
SIZE = 8
TABLE_GPA = 0x8000  # a second, random descriptor table for INDIRECT to point at
TABLE_ENTRIES = 16
U32 = 0xFFFFFFFF

Desc = tuple[int, int, int, int]

addrs = st.one_of(
    st.sampled_from([0x9000, 0xA000, 0xFFF0, RAM - 8, RAM, TABLE_GPA, 2**64 - 8, 2**63]),
    st.integers(0, 2**64 - 1),
)
lens = st.one_of(
    st.sampled_from([0, 1, 8, 15, 16, 32, 48, 256, 4096, RAM, U32]),
    st.integers(0, U32),
)
descs = st.tuples(addrs, lens, st.integers(0, 7), st.integers(0, 2 * SIZE))
table_descs = st.tuples(addrs, lens, st.integers(0, 7), st.integers(0, TABLE_ENTRIES + 2))


def reference(ram: bytes, table: list[Desc], head: int) -> tuple[int, int] | str:
    """Pure-Python model of the chain validation; (rlen, wlen) or a reason."""

    def inside(addr: int, n: int) -> bool:
        return addr + n <= RAM

    if head >= SIZE:
        return "head index out of range"
    cur, n, ttl, indirect, i = table, SIZE, SIZE, False, head
    rlen = wlen = 0
    wseen = False
    while True:
        if ttl == 0:
            return "descriptor loop or chain longer than the queue size"
        ttl -= 1
        addr, length, flags, nxt = cur[i]
        if flags & VRING_DESC_F_INDIRECT:
            if indirect:
                return "nested indirect descriptor"
            if flags & VRING_DESC_F_NEXT:
                return "indirect descriptor with NEXT set"
            if length == 0 or length % 16 or length // 16 > 1024:
                return "bad indirect table length"
            if not inside(addr, length):
                return "indirect table outside guest memory"
            cur = [struct.unpack_from("<QIHH", ram, addr + 16 * k) for k in range(length // 16)]
            n = ttl = length // 16
            indirect, i = True, 0
            continue
        if length:
            if flags & VRING_DESC_F_WRITE:
                wseen = True
                wlen += length
            else:
                if wseen:
                    return "device-readable descriptor after a device-writable one"
                rlen += length
            if rlen + wlen > U32:
                return "chain total length exceeds 4 GiB"
            if not inside(addr, length):
                return "descriptor buffer outside guest memory"
        elif flags & VRING_DESC_F_WRITE:
            wseen = True
        elif wseen:
            return "device-readable descriptor after a device-writable one"
        if not flags & VRING_DESC_F_NEXT:
            return (rlen, wlen)
        if nxt >= n:
            return "next index out of range"
        i = nxt


def load_queue(
    ram: GuestRam,
    mem: GuestMemory,
    ring: list[Desc],
    table: list[Desc],
    heads: list[int],
    payload: bytes,
) -> tuple[VirtQueue, SplitQueueBuilder]:
    """A queue over ``ram`` with ``ring`` as its descriptor table, ``table``
    at TABLE_GPA for indirect descriptors to point at, ``payload`` at 0x9000
    and ``heads`` made available in that order."""
    vq = VirtQueue(mem, 0)
    q = SplitQueueBuilder(ram, 0x0, 0x1000, 0x2000, SIZE)
    q.configure(vq)
    for i, d in enumerate(ring):
        q.write_desc(i, *d)
    ram.write(TABLE_GPA, b"".join(q.pack_desc(*d) for d in table))
    ram.write(0x9000, payload)
    for h in heads:
        q.publish(h)
    return vq, q


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ring=st.lists(descs, min_size=SIZE, max_size=SIZE),
    table=st.lists(table_descs, min_size=TABLE_ENTRIES, max_size=TABLE_ENTRIES),
    heads=st.lists(st.integers(0, 2 * SIZE), min_size=1, max_size=SIZE),
)
def test_random_descriptor_tables(ring: list[Desc], table: list[Desc], heads: list[int]) -> None:
    with GuestRam(RAM) as ram:
        mem = GuestMemory()
        mem.add_region(ram.fd, ram.memory_region())
        vq, q = load_queue(ram, mem, ring, table, heads, bytes(range(256)) * 16)
        snapshot = ram.read(0, RAM)
        for n, h in enumerate(heads):
            expected = reference(snapshot, ring, h)
            try:
                c = vq.pop()
            except ChainError as e:
                assert e.reason == expected, (e.reason, expected)
                assert e.head == h
                assert q.used_entry(n) == (h, 0)
                continue
            assert c is not None
            assert (c.readable_len, c.writable_len) == expected
            assert c.head == h
            data = c.read(0, min(c.readable_len, 64))
            assert len(data) == min(c.readable_len, 64)
            c.complete(0)
            assert q.used_entry(n) == (h, 0)
        assert vq.pop() is None
        assert q.used_idx == len(heads)
        vq.close()


@settings(max_examples=150, deadline=None)
@given(
    avail_idx=st.integers(0, 0xFFFF),
    ring_entries=st.lists(st.integers(0, 0xFFFF), min_size=SIZE, max_size=SIZE),
    ring=st.lists(descs, min_size=SIZE, max_size=SIZE),
)
def test_random_avail_ring_never_crashes(
    avail_idx: int, ring_entries: list[int], ring: list[Desc]
) -> None:
    with GuestRam(RAM) as ram:
        mem = GuestMemory()
        mem.add_region(ram.fd, ram.memory_region())
        vq = VirtQueue(mem, 0)
        q = SplitQueueBuilder(ram, 0x0, 0x1000, 0x2000, SIZE)
        q.configure(vq)
        for i, d in enumerate(ring):
            q.write_desc(i, *d)
        for i, e in enumerate(ring_entries):
            ram.write(0x1000 + 4 + 2 * i, struct.pack("<H", e))
        q.set_avail_idx(avail_idx)
        popped = 0
        try:
            while (c := _pop(vq)) is not None:
                if isinstance(c, Chain):
                    c.complete(0)
                popped += 1
        except QueueError:
            assert avail_idx > SIZE
            assert popped == 0
        else:
            assert avail_idx <= SIZE
            assert popped == avail_idx == q.used_idx
        vq.close()


def _pop(vq: VirtQueue) -> Chain | str | None:
    try:
        return vq.pop()
    except ChainError:
        return "failed"
