"""The FUSE protocol layer: wire format (:mod:`.abi`), errors, and the session."""

from .errors import (
    FuseError,
    MalformedRequest,
    NotInitialized,
    ProtocolVersionError,
    UnsupportedOperation,
)
from .session import DEFAULT_INIT_FLAGS, FuseSession, RequestChain

__all__ = [
    "DEFAULT_INIT_FLAGS",
    "FuseError",
    "FuseSession",
    "MalformedRequest",
    "NotInitialized",
    "ProtocolVersionError",
    "RequestChain",
    "UnsupportedOperation",
]
