"""Errors of the vhost-user transport.

The tree::

    VhostUserError                  root of everything raised by this package
    ├── ProtocolError               a malformed message (wrong shape on the wire)
    │   ├── HeaderError             bad version or flag bits in the header
    │   ├── PayloadSizeError        payload size wrong for the request type, or oversize
    │   ├── FdCountError            wrong number of fds for the request type
    │   ├── UnknownRequestError     request code this backend does not know
    │   └── FramingError            the byte stream can no longer be parsed (fatal)
    ├── RequestRefused              well-formed, but refused in the current state
    │   ├── UnsupportedRequestError known request this backend does not implement
    │   ├── NotNegotiatedError      needs a (protocol) feature that was not negotiated
    │   ├── StateError              wrong session state (e.g. no SET_OWNER yet)
    │   └── InvalidParameterError   a value out of range (vring index, unoffered bits...)
    ├── DeviceError                 the device refused a request (raised by devices)
    └── PeerDisconnected            the front-end hung up in the middle of a message (fatal)

Every error carries ``fatal``: ``True`` when the connection cannot go on
(the stream is out of sync or gone), ``False`` when the handler can refuse the
one message and keep serving.
"""

from __future__ import annotations

__all__ = [
    "DeviceError",
    "FdCountError",
    "FramingError",
    "HeaderError",
    "InvalidParameterError",
    "NotNegotiatedError",
    "PayloadSizeError",
    "PeerDisconnected",
    "ProtocolError",
    "RequestRefused",
    "StateError",
    "UnknownRequestError",
    "UnsupportedRequestError",
    "VhostUserError",
]


class VhostUserError(Exception):
    """Root of all vhost-user transport errors."""

    #: The connection must be closed (the stream is out of sync or gone).
    fatal: bool = False


class ProtocolError(VhostUserError):
    """A message with the wrong shape: it is refused, the connection goes on."""


class HeaderError(ProtocolError):
    """Header version is not 1, or reply/reserved flag bits are set on a request."""


class PayloadSizeError(ProtocolError):
    """The payload size does not match the request type (or exceeds the maximum)."""


class FdCountError(ProtocolError):
    """The number of file descriptors does not match the request type."""


class UnknownRequestError(ProtocolError):
    """A front-end request code that the vhost-user spec does not define."""


class FramingError(ProtocolError):
    """The byte stream cannot be parsed any further; the connection must close."""

    fatal = True


class RequestRefused(VhostUserError):
    """A well-formed request refused because of the session state or its values."""


class UnsupportedRequestError(RequestRefused):
    """A request the spec defines but this backend does not implement."""


class NotNegotiatedError(RequestRefused):
    """A request (or flag) that needs a feature that was not negotiated."""


class StateError(RequestRefused):
    """A request not valid in the current session state (e.g. before SET_OWNER)."""


class InvalidParameterError(RequestRefused):
    """A value out of range: vring index, ring size, unoffered feature bits, ..."""


class DeviceError(VhostUserError):
    """Raised by a device to refuse a request; the handler reports it and goes on."""


class PeerDisconnected(VhostUserError):
    """The front-end closed the connection in the middle of a message."""

    fatal = True
