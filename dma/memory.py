"""Guest memory: the vhost-user memory table, optionally limited to a swiotlb window.

The table lives in C as an immutable, reference-counted snapshot.  Every
mutation (:meth:`GuestMemory.add_region`, :meth:`~GuestMemory.remove_region`,
:meth:`~GuestMemory.replace`, :meth:`~GuestMemory.clear`) builds a new
snapshot and swaps it in atomically; queues and popped chains keep the
snapshot they translated against, so a mapping is unmapped only when the last
chain using it has been completed or garbage collected.  Python never sees a
host address: :meth:`GuestMemory.read` / :meth:`GuestMemory.write` are the
checked accessors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._core import ffi, lib  # type: ignore[import-not-found, unused-ignore]
from .errors import GuestMemoryError

__all__ = ["MAX_REGIONS", "GuestMemory", "MemoryRegion"]

MAX_REGIONS: int = lib.PVD_MAX_REGIONS
U64_MAX = (1 << 64) - 1


# -- helpers shared with virtqueue.py (private) ---------------------------------


def strerror(code: int) -> str:
    return str(ffi.string(lib.pvd_strerror(code)).decode())


def check_u64(name: str, value: int, exc: type[Exception]) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= U64_MAX:
        raise exc(f"{name} must be an integer in 0..2**64-1, got {value!r}")


def as_buffer(data: bytes | bytearray | memoryview) -> Any:
    """A cffi char buffer over data, copying only non-contiguous memoryviews."""
    if isinstance(data, memoryview) and not data.c_contiguous:
        data = data.tobytes()
    return ffi.from_buffer(data)


def buffer_len(data: bytes | bytearray | memoryview) -> int:
    return memoryview(data).nbytes


@dataclass(frozen=True)
class MemoryRegion:
    """One region of the front-end's memory table (VHOST_USER_SET_MEM_TABLE entry)."""

    guest_phys_addr: int
    size: int
    user_addr: int
    mmap_offset: int


def _region_info(region: MemoryRegion) -> Any:
    check_u64("guest_phys_addr", region.guest_phys_addr, GuestMemoryError)
    check_u64("size", region.size, GuestMemoryError)
    check_u64("user_addr", region.user_addr, GuestMemoryError)
    check_u64("mmap_offset", region.mmap_offset, GuestMemoryError)
    return {
        "gpa": region.guest_phys_addr,
        "size": region.size,
        "uaddr": region.user_addr,
        "mmap_offset": region.mmap_offset,
    }


def _raise(code: int, what: str, err: int = 0) -> None:
    msg = f"{what}: {strerror(code)}"
    if code == lib.PVD_E_MMAP and err:
        import os

        msg += f" ({os.strerror(err)})"
    raise GuestMemoryError(msg)


class GuestMemory:
    """The guest's RAM as mapped into this process.

    ``window=(base_gpa, size)`` restricts everything to that guest-physical
    range: only the part of each region inside it is mmapped, and every
    translation (rings, descriptors, :meth:`read`, :meth:`write`) must lie
    entirely inside it.
    """

    def __init__(self, window: tuple[int, int] | None = None) -> None:
        if window is None:
            ptr = lib.pvd_mem_new(0, 0, 0)
        else:
            base, size = window
            check_u64("window base", base, GuestMemoryError)
            check_u64("window size", size, GuestMemoryError)
            if size == 0 or base + size - 1 > U64_MAX:
                raise GuestMemoryError(f"invalid window {base:#x}+{size:#x}")
            ptr = lib.pvd_mem_new(1, base, size)
        if ptr == ffi.NULL:
            raise MemoryError("cannot allocate the guest memory table")
        self._window = None if window is None else (int(window[0]), int(window[1]))
        self._mem: Any = ffi.gc(ptr, lib.pvd_mem_free)

    @property
    def window(self) -> tuple[int, int] | None:
        return self._window

    def add_region(self, fd: int, region: MemoryRegion) -> None:
        """mmap ``fd`` (MAP_SHARED, read/write) as ``region``; the caller keeps ``fd``."""
        info = ffi.new("struct pvd_region_info *", _region_info(region))
        err = ffi.new("int *")
        rc = lib.pvd_mem_add(self._mem, fd, info, err)
        if rc:
            _raise(rc, f"add region {region.guest_phys_addr:#x}+{region.size:#x}", err[0])

    def remove_region(self, region: MemoryRegion) -> None:
        """Drop the region matching guest_phys_addr, size and user_addr.

        The unmap is deferred while queues or chains still use the old table.
        """
        info = ffi.new("struct pvd_region_info *", _region_info(region))
        rc = lib.pvd_mem_remove(self._mem, info)
        if rc:
            _raise(rc, f"remove region {region.guest_phys_addr:#x}+{region.size:#x}")

    def replace(self, regions: list[tuple[int, MemoryRegion]]) -> None:
        """Atomically swap the whole table (VHOST_USER_SET_MEM_TABLE).

        On error the previous table stays in place.  The caller keeps the fds.
        """
        n = len(regions)
        if n > MAX_REGIONS:
            raise GuestMemoryError(f"replace: {strerror(lib.PVD_E_TOO_MANY_REGIONS)}")
        fds = ffi.new("int[]", [fd for fd, _ in regions] or [0])
        infos = ffi.new("struct pvd_region_info[]", [_region_info(r) for _, r in regions] or [{}])
        err = ffi.new("int *")
        rc = lib.pvd_mem_replace(self._mem, n, fds, infos, err)
        if rc:
            _raise(rc, "replace memory table", err[0])

    def clear(self) -> None:
        rc = lib.pvd_mem_clear(self._mem)
        if rc:
            _raise(rc, "clear memory table")

    @property
    def regions(self) -> list[MemoryRegion]:
        buf = ffi.new("struct pvd_region_info[]", MAX_REGIONS)
        n = lib.pvd_mem_regions(self._mem, buf, MAX_REGIONS)
        return [
            MemoryRegion(
                guest_phys_addr=int(buf[i].gpa),
                size=int(buf[i].size),
                user_addr=int(buf[i].uaddr),
                mmap_offset=int(buf[i].mmap_offset),
            )
            for i in range(min(n, MAX_REGIONS))
        ]

    @property
    def mapped_bytes(self) -> int:
        """Bytes actually mmapped (page-rounded); with a window only the window's pages."""
        return int(lib.pvd_mem_mapped_bytes(self._mem))

    def uaddr_to_gpa(self, user_addr: int, length: int) -> int:
        """Front-end virtual address range -> guest-physical address (one region)."""
        check_u64("user_addr", user_addr, GuestMemoryError)
        check_u64("length", length, GuestMemoryError)
        out = ffi.new("uint64_t *")
        rc = lib.pvd_mem_uaddr_to_gpa(self._mem, user_addr, length, out)
        if rc:
            raise GuestMemoryError(
                f"user address {user_addr:#x}+{length:#x} is not inside one memory region"
            )
        return int(out[0])

    def read(self, gpa: int, length: int) -> bytes:
        check_u64("gpa", gpa, GuestMemoryError)
        if length < 0:
            raise ValueError("negative length")
        buf = ffi.new("uint8_t[]", length or 1)
        rc = lib.pvd_mem_read(self._mem, gpa, buf, length)
        if rc:
            _raise(rc, f"read {gpa:#x}+{length:#x}")
        return bytes(ffi.buffer(buf, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        check_u64("gpa", gpa, GuestMemoryError)
        n = buffer_len(data)
        rc = lib.pvd_mem_write(self._mem, gpa, as_buffer(data), n)
        if rc:
            _raise(rc, f"write {gpa:#x}+{n:#x}")

    def _c_handle(self) -> Any:
        """The C table handle, for VirtQueue only (keeps this object alive)."""
        return self._mem

    def __repr__(self) -> str:
        w = "" if self._window is None else f" window={self._window[0]:#x}+{self._window[1]:#x}"
        return f"<GuestMemory regions={len(self.regions)}{w} mapped={self.mapped_bytes}>"
