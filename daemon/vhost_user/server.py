"""Accept loop: one front-end at a time (vhost-user is 1:1).

``serve`` accepts a connection, creates a device with ``device_factory``,
runs a :class:`~.handler.VhostUserHandler` over it until the front-end hangs
up, resets the device, and then returns (the default, like virtiofsd: the
daemon exits with its VM) or accepts the next connection (``reconnect=True``).

``listen_unix`` and ``adopt_listener`` make the listening socket for
``--socket-path`` and ``--fd``.  The caller owns the listener and closes it.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Callable

import trio

from .backend import VhostUserDevice
from .connection import Connection
from .errors import VhostUserError
from .handler import DEFAULT_MAX_MEM_SLOTS, VhostUserHandler

__all__ = ["adopt_listener", "listen_unix", "serve", "serve_connection"]

log = logging.getLogger("pyvirtiofsd.vhost_user")


def listen_unix(path: str | os.PathLike[str], *, backlog: int = 1) -> socket.socket:
    """A listening unix stream socket at ``path`` (``--socket-path``).

    A stale socket file there is unlinked first; any other kind of file is
    refused with :class:`FileExistsError`.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{os.fspath(path)!r} exists and is not a socket")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(os.fspath(path))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def adopt_listener(fd: int) -> socket.socket:
    """Take over an inherited listening unix stream socket (``--fd N``).

    Raises :class:`ValueError` when the fd is not a listening unix stream socket
    (the fd is left open then: it still belongs to the caller).
    """
    try:
        st = os.fstat(fd)
    except OSError as err:
        raise ValueError(f"fd {fd} is not open: {err}") from err
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"fd {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError(f"fd {fd} is not a unix stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"fd {fd} is not listening")
    except BaseException:
        sock.detach()
        raise
    os.set_inheritable(fd, False)
    return sock


def _as_trio_socket(listener: trio.SocketListener | socket.socket) -> trio.socket.SocketType:
    if isinstance(listener, trio.SocketListener):
        return listener.socket
    return trio.socket.from_stdlib_socket(listener)


async def serve_connection(
    sock: trio.socket.SocketType,
    device: VhostUserDevice,
    *,
    max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS,
) -> None:
    """Serve one front-end until it hangs up; then reset the device and close
    the socket (also when cancelled)."""
    conn = Connection(sock)
    try:
        handler = VhostUserHandler(device, max_mem_slots=max_mem_slots)
    except BaseException:
        conn.close()
        raise
    try:
        while True:
            msg = await conn.recv_message()
            if msg is None:
                log.info("vhost-user front-end disconnected")
                return
            # In a worker thread: a message may wait for the device's queue
            # threads (GET_VRING_BASE stops and drains a ring), and the trio
            # loop must never block on that.  One message at a time still.
            reply = await trio.to_thread.run_sync(handler.handle, msg)
            if reply is not None:
                await conn.send(reply)
    except VhostUserError as err:
        if not err.fatal:  # pragma: no cover - recv/send raise only fatal ones
            raise
        log.warning("vhost-user connection closed: %s", err)
    except OSError as err:
        log.warning("vhost-user connection failed: %s", err)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(handler.disconnected)
        conn.close()


async def serve(
    listener: trio.SocketListener | socket.socket,
    device_factory: Callable[[], VhostUserDevice],
    *,
    reconnect: bool = False,
    max_mem_slots: int = DEFAULT_MAX_MEM_SLOTS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept front-ends one at a time on ``listener`` and serve each with a
    fresh device from ``device_factory``.

    Returns after the first front-end disconnects, unless ``reconnect``.
    ``task_status.started()`` is called once the socket is listening (it is
    already listening when passed in: callers bind before starting us).
    """
    lsock = _as_trio_socket(listener)
    task_status.started()
    while True:
        sock, _addr = await lsock.accept()
        log.info("vhost-user front-end connected")
        try:
            device = device_factory()
        except BaseException:
            sock.close()
            raise
        await serve_connection(sock, device, max_mem_slots=max_mem_slots)
        if not reconnect:
            return
