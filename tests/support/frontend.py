"""The fake vhost-user front-end of the tests: :mod:`pyvirtiofsd.bench.frontend`.

It lives in the benchmark package because the daemon benchmark plays QEMU
with it too; the tests import it from here.
"""

from pyvirtiofsd.bench.frontend import FakeFrontend, MemFd, ReplyError

__all__ = ["FakeFrontend", "MemFd", "ReplyError"]
