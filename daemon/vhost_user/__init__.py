"""vhost-user transport: wire format, protocol state machine, socket server.

Layers, bottom up: ``messages`` (bytes <-> typed values), ``connection``
(framing and SCM_RIGHTS fds over a trio socket), ``handler`` (all protocol
state, drives a device), ``server`` (accept loop).  The device implements
:class:`~.backend.VhostUserDevice`.
"""

from __future__ import annotations

from .backend import VhostUserDevice, VhostUserDeviceBase, VringConfig
from .errors import (
    DeviceError,
    FdCountError,
    FramingError,
    HeaderError,
    InvalidParameterError,
    NotNegotiatedError,
    PayloadSizeError,
    PeerDisconnected,
    ProtocolError,
    RequestRefused,
    StateError,
    UnknownRequestError,
    UnsupportedRequestError,
    VhostUserError,
)
from .handler import DEFAULT_MAX_MEM_SLOTS, HANDLER_PROTOCOL_FEATURES, VhostUserHandler
from .messages import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    FrontendReq,
    MemoryRegionDesc,
    ProtocolFeature,
    VringAddr,
    protocol_feature_mask,
)
from .server import adopt_listener, listen_unix, serve, serve_connection

__all__ = [
    "DEFAULT_MAX_MEM_SLOTS",
    "HANDLER_PROTOCOL_FEATURES",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "DeviceError",
    "FdCountError",
    "FramingError",
    "FrontendReq",
    "HeaderError",
    "InvalidParameterError",
    "MemoryRegionDesc",
    "NotNegotiatedError",
    "PayloadSizeError",
    "PeerDisconnected",
    "ProtocolError",
    "ProtocolFeature",
    "RequestRefused",
    "StateError",
    "UnknownRequestError",
    "UnsupportedRequestError",
    "VhostUserDevice",
    "VhostUserDeviceBase",
    "VhostUserError",
    "VhostUserHandler",
    "VringAddr",
    "VringConfig",
    "adopt_listener",
    "listen_unix",
    "protocol_feature_mask",
    "serve",
    "serve_connection",
]
