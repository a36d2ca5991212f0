"""GuestMemory: regions, swiotlb window, translation, checked accessors."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pyvirtiofsd.dma import MAX_REGIONS, DmaError, GuestMemory, GuestMemoryError, MemoryRegion
from tests.support.splitq import GuestRam

MiB = 1 << 20
PAGE = 4096


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    r = GuestRam(MiB)
    yield r
    r.close()


def region(gpa: int, size: int, uaddr: int | None = None, off: int = 0) -> MemoryRegion:
    return MemoryRegion(
        guest_phys_addr=gpa,
        size=size,
        user_addr=0x7F00_0000_0000 + gpa if uaddr is None else uaddr,
        mmap_offset=off,
    )


def test_error_hierarchy() -> None:
    assert issubclass(GuestMemoryError, DmaError)


def test_add_read_write_roundtrip(ram: GuestRam) -> None:
    mem = GuestMemory()
    mem.add_region(ram.fd, ram.memory_region())
    assert mem.regions == [ram.memory_region()]
    assert mem.mapped_bytes == MiB
    assert mem.window is None
    ram.write(0x1234, b"hello guest")
    assert mem.read(0x1234, 11) == b"hello guest"
    mem.write(0x8000, bytearray(b"from host"))
    assert ram.read(0x8000, 9) == b"from host"
    mem.write(0x9000, memoryview(b"abcdef")[::2])  # non-contiguous view
    assert ram.read(0x9000, 3) == b"ace"
    assert mem.read(MiB - 4, 4) == bytes(4)
    assert mem.read(0, 0) == b""


def test_caller_may_close_fd_right_after_add() -> None:
    ram = GuestRam(64 * 1024)
    fd = os.dup(ram.fd)
    mem = GuestMemory()
    mem.add_region(fd, ram.memory_region())
    os.close(fd)
    ram.write(100, b"still here")
    assert mem.read(100, 10) == b"still here"
    ram.close()


def test_read_write_outside_memory(ram: GuestRam) -> None:
    mem = GuestMemory()
    mem.add_region(ram.fd, ram.memory_region())
    with pytest.raises(GuestMemoryError):
        mem.read(MiB - 4, 8)
    with pytest.raises(GuestMemoryError):
        mem.read(MiB, 1)
    with pytest.raises(GuestMemoryError):
        mem.write(MiB - 1, b"xy")
    with pytest.raises(GuestMemoryError):
        mem.read(2**64 - 2, 4)  # wraps
    assert ram.read(MiB - 1, 1) == b"\0"  # failed write changed nothing


def test_unaligned_mmap_offset() -> None:
    ram = GuestRam(4 * PAGE)
    ram.write(PAGE + 100, b"offset data")
    mem = GuestMemory()
    mem.add_region(ram.fd, region(0x10000, 2 * PAGE, off=PAGE + 100))
    assert mem.read(0x10000, 11) == b"offset data"
    mem.write(0x10000 + 2 * PAGE - 3, b"end")
    assert ram.read(PAGE + 100 + 2 * PAGE - 3, 3) == b"end"
    ram.close()


def test_span_two_adjacent_regions() -> None:
    a, b = GuestRam(PAGE, name="a"), GuestRam(PAGE, name="b")
    mem = GuestMemory()
    mem.add_region(b.fd, region(PAGE, PAGE))
    mem.add_region(a.fd, region(0, PAGE))
    assert [r.guest_phys_addr for r in mem.regions] == [0, PAGE]  # sorted
    mem.write(PAGE - 2, b"wxyz")
    assert a.read(PAGE - 2, 2) == b"wx"
    assert b.read(0, 2) == b"yz"
    assert mem.read(PAGE - 2, 4) == b"wxyz"
    a.close()
    b.close()


@pytest.mark.parametrize(
    ("new", "why"),
    [
        (region(0x80000, 0x100000), "overlap"),
        (region(0xFFFFF, 1), "overlap (last byte)"),
        (region(0x200000, 0), "size zero"),
        (region(2**64 - PAGE, 2 * PAGE), "gpa overflow"),
        (region(0x200000, PAGE, uaddr=2**64 - 16), "uaddr overflow"),
        (region(0x200000, PAGE, off=2**64 - 16), "offset overflow"),
    ],
)
def test_add_region_rejects(ram: GuestRam, new: MemoryRegion, why: str) -> None:
    mem = GuestMemory()
    mem.add_region(ram.fd, region(0, MiB))
    with pytest.raises(GuestMemoryError):
        mem.add_region(ram.fd, new)
    assert mem.regions == [region(0, MiB)], why


def test_add_region_rejects_out_of_range_ints(ram: GuestRam) -> None:
    mem = GuestMemory()
    with pytest.raises(GuestMemoryError):
        mem.add_region(ram.fd, region(-1, PAGE))
    with pytest.raises(GuestMemoryError):
        mem.add_region(ram.fd, region(2**64, PAGE))


def test_add_region_bad_fd_reports_mmap_error() -> None:
    mem = GuestMemory()
    r, w = os.pipe()
    with pytest.raises(GuestMemoryError, match="mmap"):
        mem.add_region(r, region(0, PAGE))
    os.close(r)
    os.close(w)
    assert mem.regions == []


def test_region_limit() -> None:
    ram = GuestRam((MAX_REGIONS + 1) * PAGE)
    mem = GuestMemory()
    for i in range(MAX_REGIONS):
        mem.add_region(ram.fd, region(i * PAGE, PAGE, off=i * PAGE))
    assert len(mem.regions) == MAX_REGIONS == 509
    with pytest.raises(GuestMemoryError, match="too many"):
        mem.add_region(ram.fd, region(MAX_REGIONS * PAGE, PAGE, off=MAX_REGIONS * PAGE))
    # one read across every region
    assert mem.read(0, MAX_REGIONS * PAGE) == bytes(MAX_REGIONS * PAGE)
    too_many = [(ram.fd, region(i * PAGE, PAGE)) for i in range(MAX_REGIONS + 1)]
    with pytest.raises(GuestMemoryError):
        mem.replace(too_many)
    mem.clear()
    ram.close()


def test_remove_region(ram: GuestRam) -> None:
    other = GuestRam(PAGE)
    mem = GuestMemory()
    mem.add_region(ram.fd, region(0, MiB))
    mem.add_region(other.fd, region(2 * MiB, PAGE))
    with pytest.raises(GuestMemoryError, match="no such"):
        mem.remove_region(region(0, MiB, uaddr=0x1234))  # user_addr must match too
    with pytest.raises(GuestMemoryError, match="no such"):
        mem.remove_region(region(0, PAGE))
    mem.remove_region(region(0, MiB))
    assert mem.regions == [region(2 * MiB, PAGE)]
    assert mem.mapped_bytes == PAGE
    with pytest.raises(GuestMemoryError):
        mem.read(0, 1)
    other.write(0, b"ok")
    assert mem.read(2 * MiB, 2) == b"ok"
    other.close()


def test_replace_is_atomic(ram: GuestRam) -> None:
    other = GuestRam(2 * PAGE)
    other.write(0, b"new table")
    mem = GuestMemory()
    mem.add_region(ram.fd, region(0, MiB))
    mem.replace([(other.fd, region(0x4000, 2 * PAGE)), (ram.fd, region(0x100000, PAGE))])
    assert mem.regions == [region(0x4000, 2 * PAGE), region(0x100000, PAGE)]
    assert mem.read(0x4000, 9) == b"new table"
    with pytest.raises(GuestMemoryError):
        mem.read(0, 1)
    # A failing replacement (overlap) leaves the current table untouched.
    with pytest.raises(GuestMemoryError, match="overlap"):
        mem.replace([(ram.fd, region(0, MiB)), (other.fd, region(0x1000, PAGE))])
    assert mem.regions == [region(0x4000, 2 * PAGE), region(0x100000, PAGE)]
    assert mem.read(0x4000, 9) == b"new table"
    mem.replace([])
    assert mem.regions == []
    assert mem.mapped_bytes == 0
    other.close()


def test_clear(ram: GuestRam) -> None:
    mem = GuestMemory()
    mem.add_region(ram.fd, region(0, MiB))
    mem.clear()
    assert mem.regions == []
    assert mem.mapped_bytes == 0
    with pytest.raises(GuestMemoryError):
        mem.read(0, 1)


def test_uaddr_to_gpa(ram: GuestRam) -> None:
    mem = GuestMemory()
    mem.add_region(ram.fd, region(0x100000, MiB, uaddr=0x7F12_0000_0000))
    assert mem.uaddr_to_gpa(0x7F12_0000_0000, 16) == 0x100000
    assert mem.uaddr_to_gpa(0x7F12_0000_1230, 0x100) == 0x101230
    assert mem.uaddr_to_gpa(0x7F12_0000_0000 + MiB - 8, 8) == 0x100000 + MiB - 8
    with pytest.raises(GuestMemoryError):
        mem.uaddr_to_gpa(0x7F12_0000_0000 + MiB - 8, 9)
    with pytest.raises(GuestMemoryError):
        mem.uaddr_to_gpa(0x7F11_FFFF_FFF0, 16)
    with pytest.raises(GuestMemoryError):
        mem.uaddr_to_gpa(2**64 - 1, 2)


# ---------------------------------------------------------------- swiotlb window


def test_window_maps_only_intersection(ram: GuestRam) -> None:
    mem = GuestMemory(window=(0x40000, 0x10000))
    assert mem.window == (0x40000, 0x10000)
    mem.add_region(ram.fd, region(0, MiB))
    assert mem.mapped_bytes == 0x10000
    assert mem.regions == [region(0, MiB)]  # the region is known in full
    ram.write(0x40000, b"inside")
    assert mem.read(0x40000, 6) == b"inside"
    mem.write(0x4FFFC, b"last")
    assert ram.read(0x4FFFC, 4) == b"last"
    for gpa, n in [(0x3FFFF, 2), (0x4FFFF, 2), (0x0, 1), (0x50000, 1), (0x80000, 16)]:
        with pytest.raises(GuestMemoryError, match="window"):
            mem.read(gpa, n)
    # the guest address map is still complete for SET_VRING_ADDR translation
    assert mem.uaddr_to_gpa(0x7F00_0000_0000 + 0x100, 8) == 0x100


def test_window_across_two_regions_and_one_outside() -> None:
    a, b, c = GuestRam(0x20000), GuestRam(0x20000), GuestRam(0x20000)
    mem = GuestMemory(window=(0x18000, 0x10000))  # 0x18000..0x27fff
    mem.add_region(a.fd, region(0x0, 0x20000))
    mem.add_region(b.fd, region(0x20000, 0x20000))
    mem.add_region(c.fd, region(0x100000, 0x20000))  # entirely outside: not mapped
    assert mem.mapped_bytes == 0x8000 + 0x8000
    assert len(mem.regions) == 3
    mem.write(0x1FFFE, b"span")
    assert a.read(0x1FFFE, 2) == b"sp"
    assert b.read(0, 2) == b"an"
    with pytest.raises(GuestMemoryError):
        mem.read(0x100000, 1)
    for r in (a, b, c):
        r.close()


def test_window_unaligned_region_offset() -> None:
    ram = GuestRam(0x20000)
    mem = GuestMemory(window=(0x10000, 0x1000))
    # region GPA 0x8000 starts 0x123 bytes into the file: window byte 0x10000 is file 0x8123
    mem.add_region(ram.fd, region(0x8000, 0x10000, off=0x123))
    ram.write(0x8123, b"abc")
    ram.write(0x8123 + 0xFFD, b"end")
    assert mem.read(0x10000, 3) == b"abc"
    assert mem.read(0x10FFD, 3) == b"end"
    assert mem.mapped_bytes == 0x2000  # the unaligned 4 KiB span touches two pages
    ram.close()


@pytest.mark.parametrize("window", [(0, 0), (2**64 - 16, 32), (-1, 10)])
def test_bad_window(window: tuple[int, int]) -> None:
    with pytest.raises(GuestMemoryError):
        GuestMemory(window=window)


def test_window_at_top_of_address_space() -> None:
    mem = GuestMemory(window=(2**64 - PAGE, PAGE))
    assert mem.window == (2**64 - PAGE, PAGE)
    with pytest.raises(GuestMemoryError):
        mem.read(2**64 - PAGE, 1)
