"""Message framing over a unix stream socket, with fds passed as SCM_RIGHTS.

:meth:`Connection.recv_message` reads one header and its payload, collecting
every fd that arrives with them.  It never allocates from a size read off the
wire: a payload larger than :data:`~.messages.MAX_PAYLOAD_SIZE` is read in
small chunks and thrown away (up to :data:`MAX_DRAIN`; beyond that the stream
is given up as out of sync).  The fds of a message belong to the caller, which
must close those it does not hand on (``RawMessage.close_fds``); on any error
inside ``recv_message`` they are closed here.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, field

import trio

from .errors import FramingError, PeerDisconnected
from .messages import HEADER_SIZE, MAX_FDS, MAX_PAYLOAD_SIZE, Header

__all__ = ["MAX_DRAIN", "Connection", "RawMessage", "close_fds"]

log = logging.getLogger("pyvirtiofsd.vhost_user")

#: An oversize payload up to this many bytes is drained to keep the stream in
#: sync; a larger one closes the connection.
MAX_DRAIN = 1 << 20
_CHUNK = 65536
_FD_SIZE = array.array("i").itemsize
_ANCBUF = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)


def close_fds(fds: list[int]) -> None:
    """Close every fd in the list (ignoring ones already gone) and empty it."""
    while fds:
        fd = fds.pop()
        with contextlib.suppress(OSError):
            os.close(fd)


@dataclass(slots=True)
class RawMessage:
    """One message off the wire, not yet validated."""

    header: Header
    payload: bytes
    fds: list[int] = field(default_factory=list)
    #: The payload was larger than MAX_PAYLOAD_SIZE and was discarded.
    oversize: bool = False
    #: The kernel truncated the ancillary data (more fds than we accept).
    fds_truncated: bool = False

    def close_fds(self) -> None:
        close_fds(self.fds)


def _collect_fds(ancdata: list[tuple[int, int, bytes]], fds: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - (len(data) % _FD_SIZE)])
            fds.extend(received)


class Connection:
    """The back-end end of one vhost-user connection."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock

    async def _recv_into(
        self, want: int, fds: list[int], *, at_start: bool
    ) -> tuple[bytes, bool] | None:
        """Read exactly ``want`` bytes; ``None`` on a clean EOF before any byte
        when ``at_start``.  Returns the data and whether fds were truncated."""
        parts: list[bytes] = []
        got = 0
        truncated = False
        while got < want:
            try:
                data, ancdata, msg_flags, _addr = await self._sock.recvmsg(
                    min(want - got, _CHUNK), _ANCBUF, socket.MSG_CMSG_CLOEXEC
                )
            except ConnectionResetError as err:
                raise PeerDisconnected("connection reset by the front-end") from err
            _collect_fds(ancdata, fds)
            if msg_flags & socket.MSG_CTRUNC:
                truncated = True
            if not data:
                if at_start and got == 0:
                    return None
                raise PeerDisconnected(
                    f"front-end closed the connection {got} bytes into a {want}-byte read"
                )
            parts.append(data)
            got += len(data)
        return b"".join(parts), truncated

    async def recv_message(self) -> RawMessage | None:
        """The next message, or ``None`` when the front-end closed the connection
        cleanly between messages.  Raises :class:`PeerDisconnected` (EOF inside a
        message) or :class:`FramingError` (payload too large to drain)."""
        fds: list[int] = []
        try:
            got = await self._recv_into(HEADER_SIZE, fds, at_start=True)
            if got is None:
                return None
            raw_header, truncated = got
            header = Header.unpack(raw_header)
            if header.size > MAX_PAYLOAD_SIZE:
                if header.size > MAX_DRAIN:
                    raise FramingError(
                        f"payload size {header.size} in request {header.request} is "
                        f"beyond {MAX_DRAIN} bytes; the stream cannot be resynchronised"
                    )
                remaining = header.size
                while remaining:
                    chunk = min(remaining, _CHUNK)
                    got = await self._recv_into(chunk, fds, at_start=False)
                    assert got is not None
                    truncated |= got[1]
                    remaining -= chunk
                return RawMessage(header, b"", fds, oversize=True, fds_truncated=truncated)
            payload = b""
            if header.size:
                got = await self._recv_into(header.size, fds, at_start=False)
                assert got is not None
                payload, more_truncated = got
                truncated |= more_truncated
            return RawMessage(header, payload, fds, fds_truncated=truncated)
        except BaseException:
            close_fds(fds)
            raise

    async def send(self, data: bytes) -> None:
        """Send a whole reply (replies on the main socket never carry fds)."""
        view = memoryview(data)
        while view:
            try:
                sent = await self._sock.send(view)
            except (BrokenPipeError, ConnectionResetError) as err:
                raise PeerDisconnected("front-end closed the connection") from err
            view = view[sent:]

    def close(self) -> None:
        self._sock.close()
