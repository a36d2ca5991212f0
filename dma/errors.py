"""Exceptions raised by :mod:`pyvirtiofsd.dma`."""

from __future__ import annotations

__all__ = ["ChainError", "DmaError", "GuestMemoryError", "QueueError"]


class DmaError(Exception):
    """Root of this package's errors."""


class GuestMemoryError(DmaError):
    """Bad region, or a translation outside guest memory or outside the window."""


class QueueError(DmaError):
    """Ring-level defect: the queue can no longer be used until it is reconfigured."""


class ChainError(DmaError):
    """One descriptor chain is malformed.

    By the time this is raised the chain's head has already been returned to
    the used ring with used length 0; the caller only logs it and keeps popping.
    """

    head: int
    reason: str

    def __init__(self, head: int, reason: str) -> None:
        super().__init__(f"descriptor chain {head}: {reason}")
        self.head = head
        self.reason = reason

    def __reduce__(self) -> tuple[type[ChainError], tuple[int, str]]:
        return (type(self), (self.head, self.reason))
