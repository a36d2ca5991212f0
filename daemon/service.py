"""The daemon's top level: one trio run serving vhost-user front-ends.

The control plane (vhost-user messages) runs in trio; the data plane runs in
the device's queue worker threads. SIGTERM and SIGINT end the service
cleanly: the current front-end's device is reset (workers joined, memory
unmapped, inodes closed) before the process exits.
"""

from __future__ import annotations

import logging
import signal
import socket

import trio

from pyvirtiofsd.dma import FastPath

from .config import CachePolicy, FsConfig, ServiceConfig
from .device import FsDevice
from .fuse.session import FuseSession
from .passthrough.filesystem import PassthroughFs

__all__ = ["CachePolicy", "FsConfig", "ServiceConfig", "make_device", "run_service"]

log = logging.getLogger("pyvirtiofsd")


def make_device(config: ServiceConfig) -> FsDevice:
    """A fresh device (and filesystem session) for one front-end connection."""
    fs = PassthroughFs(config.fs, inode_fds=config.inode_fds)
    # The C fast path reads a mirror of the filesystem's tables; the session
    # turns it on at INIT, the device's queue runners serve from it.
    fast = FastPath()
    fs.attach_fast_path(fast)
    session = FuseSession(fs, fast=fast, ids=config.fs.ids)
    return FsDevice(
        session,
        num_request_queues=config.num_request_queues,
        window=config.window,
        thread_pool_size=config.thread_pool_size,
        poll_max_ns=config.poll_max_ns,
        fast=fast,
        stats_file=config.stats_file,
    )


async def _signals(
    cancel: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
        task_status.started()
        async for signum in sigs:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            cancel.cancel()
            return


async def run_service(listener: socket.socket, config: ServiceConfig) -> None:
    from .vhost_user.server import serve

    devices: list[FsDevice] = []

    def next_device() -> FsDevice:
        # The handler resets a device when its front-end goes; closing it
        # (root fd, queue fds) is ours, once the next one replaces it.
        while devices:
            devices.pop().close()
        devices.append(make_device(config))
        return devices[-1]

    try:
        async with trio.open_nursery() as nursery:
            # "serving" once SIGTERM/SIGINT/SIGHUP end the service cleanly
            await nursery.start(_signals, nursery.cancel_scope)
            log.info(
                "serving %s%s",
                config.fs.describe(),
                f", swiotlb window {config.window[0]:#x}+{config.window[1]:#x}"
                if config.window
                else "",
            )
            await serve(listener, next_device, reconnect=config.keep_listening)
            nursery.cancel_scope.cancel()
    finally:
        while devices:
            devices.pop().close()
    log.info("front-end gone; exiting")
