"""The FUSE protocol layer: wire format (:mod:`.abi`), errors, the session, and
the typed interface a filesystem implements (:mod:`.filesystem`)."""

from .errors import (
    FuseError,
    MalformedRequest,
    NotInitialized,
    ProtocolVersionError,
    UnsupportedOperation,
)
from .filesystem import DirEntry, Filesystem, RequestContext
from .session import SUPPORTED_INIT_FLAGS, FuseSession, RequestChain

__all__ = [
    "SUPPORTED_INIT_FLAGS",
    "DirEntry",
    "Filesystem",
    "FuseError",
    "FuseSession",
    "MalformedRequest",
    "NotInitialized",
    "ProtocolVersionError",
    "RequestChain",
    "RequestContext",
    "UnsupportedOperation",
]
