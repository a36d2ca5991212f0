"""Per-device swiotlb windows inside the guest's published bounce-buffer range.

The guest reserves one contiguous range below 4 GiB (``swiotlb_base`` /
``swiotlb_size`` under ``/sys/bus/pci/drivers/virtio-pci/``); the host gives
every virtio device its own :class:`Window` inside it, writes
:meth:`Window.assign_line` to the guest's ``swiotlb_assign`` and starts the
backend with ``--swiotlb`` :meth:`Window.swiotlb_arg`.

The allocator lives in C (``dma/src/window_alloc.c``): first fit in address
order over a sorted list of windows, one mutex, overflow-checked u64
arithmetic.  Rules, from the guest's swiotlb:

* a window's base is aligned to ``align`` (a power of two >= :data:`SLAB`,
  default :data:`SEGMENT`) and never less than a page;
* its size is rounded *up* to a multiple of :data:`SEGMENT` (128 slabs of
  2 KiB: a pool is a whole number of segments); the window returned carries
  the actual size.

Errors::

    DmaError
     └── WindowError          bad range / owner / size / alignment, duplicate or unknown owner
          ├── WindowExhausted  fewer bytes free than the (rounded) request
          └── WindowFragmented enough bytes free, but no free extent fits
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._core import ffi, lib  # type: ignore[import-not-found, unused-ignore]
from .errors import DmaError

__all__ = [
    "FOUR_GIB",
    "OWNER_MAX",
    "PAGE",
    "SEGMENT",
    "SLAB",
    "Window",
    "WindowAllocator",
    "WindowError",
    "WindowExhausted",
    "WindowFragmented",
]

SLAB: int = lib.PVD_WIN_SLAB  # IO_TLB_SIZE: 2 KiB
SEGMENT: int = lib.PVD_WIN_SEGMENT  # IO_TLB_SEGSIZE * IO_TLB_SIZE: 256 KiB
PAGE: int = lib.PVD_WIN_PAGE
OWNER_MAX: int = lib.PVD_WIN_OWNER_MAX - 1  # bytes, without the NUL
FOUR_GIB = 1 << 32
_U64_MAX = (1 << 64) - 1


class WindowError(DmaError):
    """A window request or range was refused (see the message)."""


class _NoRoom(WindowError):
    """Shared shape of the two "does not fit" errors: the numbers at failure time."""

    requested: int
    free_bytes: int
    largest_free: int
    largest_fit: int

    def __init__(
        self, message: str, requested: int, free_bytes: int, largest_free: int, largest_fit: int
    ) -> None:
        super().__init__(message)
        self.requested = requested
        self.free_bytes = free_bytes
        self.largest_free = largest_free
        self.largest_fit = largest_fit

    def __reduce__(self) -> tuple[type[_NoRoom], tuple[str, int, int, int, int]]:
        return (
            type(self),
            (str(self), self.requested, self.free_bytes, self.largest_free, self.largest_fit),
        )


class WindowExhausted(_NoRoom):
    """Fewer bytes are free in the whole range than the (rounded-up) request."""


class WindowFragmented(_NoRoom):
    """Enough bytes are free in total, but no single aligned free extent is large enough."""


@dataclass(frozen=True)
class Window:
    """One device's window: ``[base, base + size)`` in guest-physical memory."""

    owner: str
    base: int
    size: int

    @property
    def end(self) -> int:
        """First address after the window."""
        return self.base + self.size

    def swiotlb_arg(self) -> str:
        """The ``0x<base>,<size>`` form ``pyvirtiofsd --swiotlb`` takes (size in bytes)."""
        return f"{self.base:#x},{self.size}"

    def assign_line(self) -> str:
        """``<owner> 0x<base> <size>``: the line for the guest's ``swiotlb_assign``."""
        return f"{self.owner} {self.base:#x} {self.size}"


def _strerror(code: int) -> str:
    return str(ffi.string(lib.pvd_walloc_strerror(code)).decode())


def _u64(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= _U64_MAX:
        raise WindowError(f"{name} must be in 0..2**64-1, got {value!r}")
    return int(value)


def _owner(owner: str) -> bytes:
    if not isinstance(owner, str):
        raise TypeError(f"owner must be a str, got {type(owner).__name__}")
    raw = owner.encode("ascii", "replace")
    ok = 0 < len(raw) <= OWNER_MAX and owner.isascii() and all(0x21 <= c <= 0x7E for c in raw)
    if not ok:
        raise WindowError(f"bad owner id {owner!r}: {_strerror(lib.PVD_E_WIN_OWNER)}")
    return raw


def _window(w: Any) -> Window:
    return Window(owner=ffi.string(w.owner).decode("ascii"), base=int(w.base), size=int(w.size))


class WindowAllocator:
    """Hands out per-device windows inside the guest range ``[base, base + size)``.

    The range must be non-empty, page aligned and end at or below 4 GiB; its
    base need not be segment aligned (windows start at the first suitably
    aligned address inside it).  All methods are thread safe.
    """

    def __init__(self, base: int, size: int) -> None:
        base = _u64("base", base)
        size = _u64("size", size)
        err = ffi.new("int *")
        ptr = lib.pvd_walloc_new(base, size, err)
        if ptr == ffi.NULL:
            if err[0] == lib.PVD_E_NOMEM:
                raise MemoryError("cannot allocate the window allocator")
            raise WindowError(f"swiotlb range {base:#x}+{size:#x}: {_strerror(err[0])}")
        self._base = base
        self._size = size
        self._w: Any = ffi.gc(ptr, lib.pvd_walloc_destroy)

    def __repr__(self) -> str:
        return f"WindowAllocator(base={self._base:#x}, size={self._size:#x})"

    @property
    def base(self) -> int:
        return self._base

    @property
    def size(self) -> int:
        return self._size

    def _stats(self, align: int = PAGE, granule: int = SEGMENT) -> Any:
        st = ffi.new("struct pvd_walloc_stats *")
        lib.pvd_walloc_stats(self._w, align, granule, st)
        return st

    @property
    def free_bytes(self) -> int:
        """Bytes not covered by any window (alignment gaps included)."""
        return int(self._stats().free_bytes)

    @property
    def largest_free(self) -> int:
        """Largest free extent, in bytes, before any alignment."""
        return int(self._stats().largest_free)

    def largest_fit(self, align: int = SEGMENT) -> int:
        """Largest window :meth:`allocate` could return right now with this alignment."""
        return int(self._stats(_u64("align", align)).largest_fit)

    def allocate(self, owner: str, size: int, align: int = SEGMENT) -> Window:
        """Reserve a window of at least ``size`` bytes for ``owner`` (first fit, lowest address).

        The returned size is ``size`` rounded up to :data:`SEGMENT`; the base is
        a multiple of ``max(align, PAGE)``.
        """
        raw = _owner(owner)
        size = _u64("size", size)
        align = _u64("align", align)
        out = ffi.new("struct pvd_window *")
        st = ffi.new("struct pvd_walloc_stats *")
        rc = lib.pvd_walloc_alloc(self._w, raw, size, align, SEGMENT, out, st)
        if rc == lib.PVD_OK:
            return _window(out)
        what = f"window of {size:#x} bytes (align {align:#x}) for {owner!r}"
        if rc in (lib.PVD_E_WIN_EXHAUSTED, lib.PVD_E_WIN_FRAGMENTED):
            free, largest, fit = int(st.free_bytes), int(st.largest_free), int(st.largest_fit)
            numbers = (
                f"{free:#x} bytes free, largest free extent {largest:#x} bytes "
                f"({fit:#x} usable at this alignment)"
            )
            cls = WindowExhausted if rc == lib.PVD_E_WIN_EXHAUSTED else WindowFragmented
            raise cls(f"{what}: {_strerror(rc)}: {numbers}", size, free, largest, fit)
        if rc == lib.PVD_E_NOMEM:
            raise MemoryError(f"{what}: {_strerror(rc)}")
        raise WindowError(f"{what}: {_strerror(rc)}")

    def free(self, owner: str) -> Window:
        """Release ``owner``'s window and return it; :class:`WindowError` if it has none."""
        raw = _owner(owner)
        out = ffi.new("struct pvd_window *")
        rc = lib.pvd_walloc_release(self._w, raw, out)
        if rc:
            raise WindowError(f"free {owner!r}: {_strerror(rc)}")
        return _window(out)

    def get(self, owner: str) -> Window | None:
        """``owner``'s window, or None."""
        raw = _owner(owner)
        out = ffi.new("struct pvd_window *")
        rc = lib.pvd_walloc_lookup(self._w, raw, out)
        if rc < 0:  # pragma: no cover - _owner already validated
            raise WindowError(f"lookup {owner!r}: {_strerror(rc)}")
        return _window(out) if rc else None

    def windows(self) -> list[Window]:
        """Every window, sorted by base."""
        n = 0
        while True:
            buf = ffi.new("struct pvd_window[]", max(n, 1))
            count = int(lib.pvd_walloc_list(self._w, buf, n))
            if count <= n:
                return [_window(buf[i]) for i in range(count)]
            n = count + 8  # grew between the calls (other threads): try again

    def __len__(self) -> int:
        return int(self._stats().count)

    def __contains__(self, owner: object) -> bool:
        if not isinstance(owner, str):
            return False
        try:
            return self.get(owner) is not None
        except WindowError:
            return False
