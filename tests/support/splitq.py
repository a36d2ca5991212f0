"""Pure-Python split virtqueue driver side, for tests.

``GuestRam`` is a memfd-backed block of "guest RAM" (what QEMU shares with a
vhost-user backend).  ``SplitQueueBuilder`` plays the guest driver: it lays
out a split ring (virtio 1.2 section 2.7) in that RAM, allocates buffers,
builds well-formed chains (direct or indirect) and offers raw accessors for
hostile ones, and reads the used ring back.

Nothing here touches pyvirtiofsd.dma except the optional
``GuestRam.memory_region()`` convenience.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyvirtiofsd.dma import MemoryRegion

__all__ = [
    "VRING_AVAIL_F_NO_INTERRUPT",
    "VRING_DESC_F_INDIRECT",
    "VRING_DESC_F_NEXT",
    "VRING_DESC_F_WRITE",
    "VRING_USED_F_NO_NOTIFY",
    "ChainRecord",
    "GuestRam",
    "SplitQueueBuilder",
    "ring_layout",
]

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1

_DESC = struct.Struct("<QIHH")


def _align(v: int, a: int) -> int:
    return (v + a - 1) // a * a


class GuestRam:
    """``size`` bytes of memfd-backed RAM seen by the guest at ``gpa_base``."""

    def __init__(self, size: int, gpa_base: int = 0, name: str = "guest-ram") -> None:
        self.size = size
        self.gpa_base = gpa_base
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    def _off(self, gpa: int, n: int) -> int:
        off = gpa - self.gpa_base
        if off < 0 or n < 0 or off + n > self.size:
            raise ValueError(f"{gpa:#x}+{n:#x} outside guest RAM")
        return off

    def read(self, gpa: int, n: int) -> bytes:
        off = self._off(gpa, n)
        return bytes(self.mmap[off : off + n])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        b = bytes(data)
        off = self._off(gpa, len(b))
        self.mmap[off : off + len(b)] = b

    def memory_region(
        self, user_addr: int | None = None, mmap_offset: int = 0, size: int | None = None
    ) -> MemoryRegion:
        """A MemoryRegion describing this RAM (user_addr defaults to a fake 0x7f00... address)."""
        from pyvirtiofsd.dma import MemoryRegion

        return MemoryRegion(
            guest_phys_addr=self.gpa_base + mmap_offset,
            size=self.size - mmap_offset if size is None else size,
            user_addr=0x7F00_0000_0000 + self.gpa_base + mmap_offset
            if user_addr is None
            else user_addr,
            mmap_offset=mmap_offset,
        )

    def close(self) -> None:
        self.mmap.close()
        os.close(self.fd)

    def __enter__(self) -> GuestRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ring_layout(base: int, size: int, event_idx: bool = False) -> tuple[int, int, int, int]:
    """(desc_gpa, avail_gpa, used_gpa, end) of a legacy-style contiguous layout at base."""
    desc = _align(base, 16)
    avail = desc + 16 * size
    avail_end = avail + 4 + 2 * size + (2 if event_idx else 0)
    used = _align(avail_end, 4096)
    end = used + 4 + 8 * size + (2 if event_idx else 0)
    return desc, avail, used, end


@dataclass
class ChainRecord:
    """What the driver put in one chain (for reading results back)."""

    head: int
    descs: list[int]
    readable: list[tuple[int, int]] = field(default_factory=list)  # (gpa, len)
    writable: list[tuple[int, int]] = field(default_factory=list)
    freed: bool = False


class SplitQueueBuilder:
    """Driver side of one split ring living in ``ram``."""

    def __init__(
        self,
        ram: GuestRam,
        desc_gpa: int,
        avail_gpa: int,
        used_gpa: int,
        size: int,
        event_idx: bool = False,
        data_gpa: int | None = None,
        data_size: int | None = None,
    ) -> None:
        self.ram = ram
        self.desc_gpa = desc_gpa
        self.avail_gpa = avail_gpa
        self.used_gpa = used_gpa
        self.size = size
        self.event_idx = event_idx
        ends = [
            desc_gpa + 16 * size,
            avail_gpa + 6 + 2 * size,
            used_gpa + 6 + 8 * size,
        ]
        self.data_gpa = _align(max(ends), 4096) if data_gpa is None else data_gpa
        self.data_end = ram.gpa_base + ram.size if data_size is None else self.data_gpa + data_size
        self._next_data = self.data_gpa
        self.avail_idx = 0
        self._free = list(range(size))
        self._used_seen = 0
        self.chains: dict[int, ChainRecord] = {}
        # Zero the rings.
        ram.write(desc_gpa, bytes(16 * size))
        ram.write(avail_gpa, bytes(6 + 2 * size))
        ram.write(used_gpa, bytes(6 + 8 * size))

    @classmethod
    def at(
        cls, ram: GuestRam, base: int, size: int, event_idx: bool = False, **kw: int
    ) -> SplitQueueBuilder:
        desc, avail, used, _ = ring_layout(base, size, event_idx)
        return cls(ram, desc, avail, used, size, event_idx, **kw)

    def configure(self, vq: object) -> None:
        """Call ``vq.configure(...)`` with this ring's layout."""
        vq.configure(  # type: ignore[attr-defined]
            size=self.size,
            desc_gpa=self.desc_gpa,
            avail_gpa=self.avail_gpa,
            used_gpa=self.used_gpa,
            event_idx=self.event_idx,
        )

    # -- buffers ---------------------------------------------------------------

    def alloc(self, n: int, align: int = 16) -> int:
        """Bump-allocate n bytes of buffer space; returns its GPA."""
        gpa = _align(self._next_data, align)
        if gpa + n > self.data_end:
            raise MemoryError("splitq data area exhausted")
        self._next_data = gpa + max(n, 1)
        return gpa

    def rewind_data(self) -> None:
        """Reuse the data area from its start (buffers of completed chains)."""
        self._next_data = self.data_gpa

    @property
    def data_left(self) -> int:
        return self.data_end - self._next_data

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    def alloc_data(self, data: bytes) -> int:
        gpa = self.alloc(len(data))
        self.ram.write(gpa, data)
        return gpa

    # -- raw ring access (hostile tests) ---------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        """Raw descriptor-table write (no checks on the values)."""
        self.ram.write(self.desc_gpa + 16 * i, _DESC.pack(addr, length, flags, next))

    def read_desc(self, i: int) -> tuple[int, int, int, int]:
        return _DESC.unpack(self.ram.read(self.desc_gpa + 16 * i, 16))

    @staticmethod
    def pack_desc(addr: int, length: int, flags: int = 0, next: int = 0) -> bytes:
        return _DESC.pack(addr, length, flags, next)

    def write_table(self, entries: list[tuple[int, int, int, int]]) -> int:
        """Allocate and write an indirect table of (addr, len, flags, next); returns its GPA."""
        data = b"".join(_DESC.pack(*e) for e in entries)
        return self.alloc_data(data)

    def take_desc(self) -> int:
        """Take a free descriptor index."""
        if not self._free:
            raise RuntimeError("no free descriptors (complete and collect_used() first)")
        return self._free.pop(0)

    def publish(self, head: int) -> None:
        """Put head into the next avail ring slot and bump avail.idx."""
        slot = self.avail_idx % self.size
        self.ram.write(self.avail_gpa + 4 + 2 * slot, struct.pack("<H", head & 0xFFFF))
        self.set_avail_idx((self.avail_idx + 1) & 0xFFFF)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.ram.write(self.avail_gpa + 2, struct.pack("<H", self.avail_idx))

    def set_avail_flags(self, flags: int) -> None:
        self.ram.write(self.avail_gpa, struct.pack("<H", flags))

    def set_used_event(self, idx: int) -> None:
        """EVENT_IDX: the driver's used_event (interrupt me after used.idx passes idx)."""
        self.ram.write(self.avail_gpa + 4 + 2 * self.size, struct.pack("<H", idx & 0xFFFF))

    @property
    def avail_event(self) -> int:
        """EVENT_IDX: the device's avail_event (kick me when avail.idx passes it)."""
        return int(struct.unpack("<H", self.ram.read(self.used_gpa + 4 + 8 * self.size, 2))[0])

    @property
    def used_flags(self) -> int:
        return int(struct.unpack("<H", self.ram.read(self.used_gpa, 2))[0])

    @property
    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.ram.read(self.used_gpa + 2, 2))[0])

    def used_entry(self, n: int) -> tuple[int, int]:
        """(id, len) of the n-th used element ever (ring slot n % size)."""
        off = self.used_gpa + 4 + 8 * (n % self.size)
        return struct.unpack("<II", self.ram.read(off, 8))

    def used_entries(self) -> list[tuple[int, int]]:
        """All used elements published so far (assumes fewer than size since the start)."""
        idx = self.used_idx
        return [self.used_entry(n) for n in range(idx - self.size if idx > self.size else 0, idx)]

    def collect_used(self) -> list[tuple[int, int]]:
        """Used elements published since the last call; frees their descriptors."""
        idx = self.used_idx
        out = []
        while self._used_seen != idx:
            ent = self.used_entry(self._used_seen)
            out.append(ent)
            rec = self.chains.get(ent[0])
            if rec is not None and not rec.freed:
                rec.freed = True
                self._free.extend(rec.descs)
            self._used_seen = (self._used_seen + 1) & 0xFFFF
        return out

    # -- well-formed chains ----------------------------------------------------

    def add_chain(
        self,
        readable: list[bytes],
        writable_sizes: list[int],
        indirect: bool = False,
        publish: bool = True,
    ) -> int:
        """Build a chain (readable buffers then writable ones); returns its head."""
        rec = ChainRecord(head=-1, descs=[])
        entries: list[tuple[int, int, int]] = []  # addr, len, flags (without NEXT)
        for data in readable:
            gpa = self.alloc_data(data)
            rec.readable.append((gpa, len(data)))
            entries.append((gpa, len(data), 0))
        for n in writable_sizes:
            gpa = self.alloc(n)
            self.ram.write(gpa, bytes(n))
            rec.writable.append((gpa, n))
            entries.append((gpa, n, VRING_DESC_F_WRITE))
        if not entries:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            table = []
            for k, (a, n, f) in enumerate(entries):
                last = k + 1 == len(entries)
                table.append((a, n, f | (0 if last else VRING_DESC_F_NEXT), 0 if last else k + 1))
            tgpa = self.write_table(table)
            head = self.take_desc()
            rec.descs.append(head)
            self.write_desc(head, tgpa, 16 * len(entries), VRING_DESC_F_INDIRECT, 0)
        else:
            idxs = [self.take_desc() for _ in entries]
            rec.descs.extend(idxs)
            for k, (a, n, f) in enumerate(entries):
                last = k + 1 == len(entries)
                flags = f | (0 if last else VRING_DESC_F_NEXT)
                self.write_desc(idxs[k], a, n, flags, 0 if last else idxs[k + 1])
            head = idxs[0]
        rec.head = head
        self.chains[head] = rec
        if publish:
            self.publish(head)
        return head

    def writable_data(self, head: int) -> bytes:
        """Concatenated content of the chain's writable buffers."""
        rec = self.chains[head]
        return b"".join(self.ram.read(g, n) for g, n in rec.writable)

    def record(self, head: int) -> ChainRecord:
        return self.chains[head]
