"""C core of the device: guest memory, swiotlb windows, virtqueues (cffi).

The data path (ring walks, validation, preadv/pwritev into guest memory) runs
in C with the GIL released; Python never sees a host address.
"""

from .errors import ChainError, DmaError, GuestMemoryError, QueueError
from .fastpath import FastPath, FastPathStats, SlowQueue
from .memory import MAX_REGIONS, GuestMemory, MemoryRegion
from .virtqueue import Chain, QueueStats, VirtQueue
from .windows import Window, WindowAllocator, WindowError, WindowExhausted, WindowFragmented

__all__ = [
    "MAX_REGIONS",
    "Chain",
    "ChainError",
    "DmaError",
    "FastPath",
    "FastPathStats",
    "GuestMemory",
    "GuestMemoryError",
    "MemoryRegion",
    "QueueError",
    "QueueStats",
    "SlowQueue",
    "VirtQueue",
    "Window",
    "WindowAllocator",
    "WindowError",
    "WindowExhausted",
    "WindowFragmented",
]
