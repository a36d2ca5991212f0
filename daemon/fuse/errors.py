"""Errors of the FUSE layer.

The tree::

    FuseError                  root; carries the errno sent back to the guest
    +-- MalformedRequest       the guest sent bytes that do not parse (EINVAL)
    +-- NotInitialized         a request arrived before INIT / after DESTROY (EIO)
    +-- UnsupportedOperation   an opcode we do not implement (ENOSYS)
    +-- ProtocolVersionError   INIT with a major version we cannot speak (EPROTO)

Filesystem operations raise plain :class:`OSError`; the session turns both
kinds into an errno reply in one place (``FuseSession._dispatch``).  None of
these ever escapes :meth:`FuseSession.handle`.
"""

from __future__ import annotations

import errno

__all__ = [
    "FuseError",
    "MalformedRequest",
    "NotInitialized",
    "ProtocolVersionError",
    "UnsupportedOperation",
]


class FuseError(Exception):
    """A guest-caused failure of one request, answered with ``-errno``."""

    errno: int = errno.EIO

    def __init__(self, message: str, *, err: int | None = None) -> None:
        super().__init__(message)
        if err is not None:
            self.errno = err


class MalformedRequest(FuseError):
    """Short body, inconsistent lengths, a name without its NUL, a bad value."""

    errno = errno.EINVAL


class NotInitialized(FuseError):
    """Any request other than INIT before the session is initialised."""

    errno = errno.EIO


class UnsupportedOperation(FuseError):
    """An opcode that is unknown or not implemented (yet)."""

    errno = errno.ENOSYS


class ProtocolVersionError(FuseError):
    """INIT asked for a FUSE major version older than 7."""

    errno = errno.EPROTO
