"""Exceptions raised by :mod:`pyvirtiofsd.dma`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .virtqueue import Chain

__all__ = ["ChainError", "DmaError", "GuestMemoryError", "QueueError"]


class DmaError(Exception):
    """Root of this package's errors."""


class GuestMemoryError(DmaError):
    """Bad region, or a translation outside guest memory or outside the window."""


class QueueError(DmaError):
    """Ring-level defect: the queue can no longer be used until it is reconfigured."""


class ChainError(DmaError):
    """One descriptor chain is malformed.

    Usually (``completed`` True) the chain's head has already been returned
    to the used ring with used length 0; the caller only logs it and keeps
    popping.  With ``VirtQueue.pop(salvage=...)`` a chain refused only for
    buffer addresses may instead come back as ``salvage``: a Chain holding
    just the start of its first readable and first writable descriptors,
    not yet completed (``completed`` False); the caller must complete it
    exactly once (for instance with an error reply).
    """

    head: int
    reason: str
    salvage: Chain | None
    completed: bool

    def __init__(
        self,
        head: int,
        reason: str,
        salvage: Chain | None = None,
        completed: bool | None = None,
    ) -> None:
        super().__init__(f"descriptor chain {head}: {reason}")
        self.head = head
        self.reason = reason
        self.salvage = salvage
        self.completed = salvage is None if completed is None else completed

    def __reduce__(self) -> tuple[type[ChainError], tuple[int, str, None, bool]]:
        # A salvage chain cannot cross a process boundary; ``completed`` says
        # whether the head still awaits completion.
        return (type(self), (self.head, self.reason, None, self.completed))
