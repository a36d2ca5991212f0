"""The passthrough filesystem: a host directory served through O_PATH fds."""

from .filesystem import PassthroughFs, RequestContext

__all__ = ["PassthroughFs", "RequestContext"]
