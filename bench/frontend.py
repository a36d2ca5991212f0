"""A vhost-user front-end (what QEMU does), async over a real unix socket.

The unit tests drive backends with it (``tests/support/frontend.py``
re-exports it) and the daemon benchmark uses it for the handshake before its
C request loop takes over the rings.

Typed helpers for every request the backend handles; each returns the reply
value for GET_* requests, or with ``need_reply=True`` the REPLY_ACK value
(0 = success).  ``send_raw`` / ``recv_reply`` send and read arbitrary bytes for
negative tests.  ``MemFd`` is a tiny shared-memory region (memfd + mmap).
"""

from __future__ import annotations

import array
import mmap
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import trio

from pyvirtiofsd.daemon.vhost_user.messages import (
    HEADER_SIZE,
    U64,
    VHOST_USER_VERSION,
    FrontendReq,
    Header,
    HeaderFlags,
    MemoryRegionDesc,
    MemoryTable,
    MemRegionMsg,
    VringAddr,
    VringFd,
    VringState,
    encode_message,
)

__all__ = ["FakeFrontend", "MemFd", "ReplyError"]


class ReplyError(AssertionError):
    """The backend's reply was not what the front-end expected."""


@dataclass
class MemFd:
    """A memfd of ``size`` bytes, mapped shared; ``fd`` stays ours."""

    fd: int
    size: int
    map: mmap.mmap

    @classmethod
    def create(cls, size: int = 1 << 16, name: str = "guest-ram") -> MemFd:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, size, mapping)

    def region(
        self, guest_phys_addr: int = 0, userspace_addr: int = 0x7F00_0000_0000
    ) -> MemoryRegionDesc:
        return MemoryRegionDesc(guest_phys_addr, self.size, userspace_addr, 0)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class FakeFrontend:
    """The front-end (QEMU) end of one vhost-user connection."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock

    @classmethod
    async def connect(cls, path: str | os.PathLike[str]) -> FakeFrontend:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(os.fspath(path))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    # ------------------------------------------------------------- raw I/O
    async def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send bytes, with ``fds`` attached to the first byte (like QEMU)."""
        view = memoryview(data)
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        )
        first = True
        while first or view:
            sent = await self._sock.sendmsg([view], anc if first else [])
            first = False
            view = view[sent:]

    async def _recv_exact(self, n: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < n:
            data = await self._sock.recv(n - got)
            if not data:
                raise EOFError(f"backend closed the connection ({got} of {n} bytes read)")
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    async def recv_reply(self) -> tuple[Header, bytes]:
        """Read one reply: its header and payload."""
        header = Header.unpack(await self._recv_exact(HEADER_SIZE))
        if header.size > 4096:
            raise ReplyError(f"reply payload of {header.size} bytes")
        payload = await self._recv_exact(header.size) if header.size else b""
        return header, payload

    async def at_eof(self) -> bool:
        """True once the backend has closed its end (reads return b"")."""
        return await self._sock.recv(1) == b""

    # ------------------------------------------------------------ requests
    async def request(
        self,
        code: FrontendReq | int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
        has_reply: bool = False,
    ) -> bytes | None:
        """Send one request; return the reply payload of a GET (``has_reply``)
        or of the REPLY_ACK (``need_reply``), else ``None``."""
        flags = VHOST_USER_VERSION | (HeaderFlags.NEED_REPLY if need_reply else 0)
        await self.send_raw(encode_message(int(code), flags, payload), fds)
        if not (has_reply or need_reply):
            return None
        header, reply = await self.recv_reply()
        if header.request != int(code):
            raise ReplyError(f"reply to request {header.request}, expected {int(code)}")
        if header.flags != VHOST_USER_VERSION | HeaderFlags.REPLY:
            raise ReplyError(f"reply flags {header.flags:#x}")
        return reply

    async def _get_u64(self, code: FrontendReq, *, need_reply: bool = False) -> int:
        reply = await self.request(code, need_reply=need_reply, has_reply=True)
        assert reply is not None
        return U64.unpack(reply).value

    async def _send(
        self,
        code: FrontendReq,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool,
    ) -> int | None:
        reply = await self.request(code, payload, fds, need_reply=need_reply)
        if reply is None:
            return None
        return U64.unpack(reply).value

    async def get_features(self, *, need_reply: bool = False) -> int:
        return await self._get_u64(FrontendReq.GET_FEATURES, need_reply=need_reply)

    async def set_features(self, features: int, *, need_reply: bool = False) -> int | None:
        return await self._send(
            FrontendReq.SET_FEATURES, U64(features).pack(), need_reply=need_reply
        )

    async def get_protocol_features(self) -> int:
        return await self._get_u64(FrontendReq.GET_PROTOCOL_FEATURES)

    async def set_protocol_features(self, features: int, *, need_reply: bool = False) -> int | None:
        return await self._send(
            FrontendReq.SET_PROTOCOL_FEATURES, U64(features).pack(), need_reply=need_reply
        )

    async def set_owner(self, *, need_reply: bool = False) -> int | None:
        return await self._send(FrontendReq.SET_OWNER, need_reply=need_reply)

    async def reset_owner(self, *, need_reply: bool = False) -> int | None:
        return await self._send(FrontendReq.RESET_OWNER, need_reply=need_reply)

    async def reset_device(self, *, need_reply: bool = False) -> int | None:
        return await self._send(FrontendReq.RESET_DEVICE, need_reply=need_reply)

    async def get_queue_num(self) -> int:
        return await self._get_u64(FrontendReq.GET_QUEUE_NUM)

    async def get_max_mem_slots(self) -> int:
        return await self._get_u64(FrontendReq.GET_MAX_MEM_SLOTS)

    async def set_mem_table(
        self, regions: Sequence[tuple[int, MemoryRegionDesc]], *, need_reply: bool = False
    ) -> int | None:
        table = MemoryTable(tuple(region for _fd, region in regions))
        return await self._send(
            FrontendReq.SET_MEM_TABLE,
            table.pack(),
            [fd for fd, _region in regions],
            need_reply=need_reply,
        )

    async def add_mem_reg(
        self, fd: int, region: MemoryRegionDesc, *, need_reply: bool = False
    ) -> int | None:
        return await self._send(
            FrontendReq.ADD_MEM_REG, MemRegionMsg(region).pack(), [fd], need_reply=need_reply
        )

    async def rem_mem_reg(
        self, region: MemoryRegionDesc, fd: int | None = None, *, need_reply: bool = False
    ) -> int | None:
        return await self._send(
            FrontendReq.REM_MEM_REG,
            MemRegionMsg(region).pack(),
            [] if fd is None else [fd],
            need_reply=need_reply,
        )

    async def set_vring_num(self, index: int, num: int, *, need_reply: bool = False) -> int | None:
        return await self._send(
            FrontendReq.SET_VRING_NUM, VringState(index, num).pack(), need_reply=need_reply
        )

    async def set_vring_addr(self, addr: VringAddr, *, need_reply: bool = False) -> int | None:
        return await self._send(FrontendReq.SET_VRING_ADDR, addr.pack(), need_reply=need_reply)

    async def set_vring_base(
        self, index: int, base: int, *, need_reply: bool = False
    ) -> int | None:
        return await self._send(
            FrontendReq.SET_VRING_BASE, VringState(index, base).pack(), need_reply=need_reply
        )

    async def get_vring_base(self, index: int) -> int:
        reply = await self.request(
            FrontendReq.GET_VRING_BASE, VringState(index, 0).pack(), has_reply=True
        )
        assert reply is not None
        state = VringState.unpack(reply)
        if state.index != index:
            raise ReplyError(f"GET_VRING_BASE reply for vring {state.index}, asked {index}")
        return state.num

    async def _set_vring_fd(
        self, code: FrontendReq, index: int, fd: int | None, need_reply: bool
    ) -> int | None:
        payload = VringFd(index, fd is None).pack()
        return await self._send(code, payload, [] if fd is None else [fd], need_reply=need_reply)

    async def set_vring_kick(
        self, index: int, fd: int | None, *, need_reply: bool = False
    ) -> int | None:
        return await self._set_vring_fd(FrontendReq.SET_VRING_KICK, index, fd, need_reply)

    async def set_vring_call(
        self, index: int, fd: int | None, *, need_reply: bool = False
    ) -> int | None:
        return await self._set_vring_fd(FrontendReq.SET_VRING_CALL, index, fd, need_reply)

    async def set_vring_err(
        self, index: int, fd: int | None, *, need_reply: bool = False
    ) -> int | None:
        return await self._set_vring_fd(FrontendReq.SET_VRING_ERR, index, fd, need_reply)

    async def set_vring_enable(
        self, index: int, enabled: bool, *, need_reply: bool = False
    ) -> int | None:
        return await self._send(
            FrontendReq.SET_VRING_ENABLE,
            VringState(index, int(enabled)).pack(),
            need_reply=need_reply,
        )

    async def set_backend_req_fd(self, fd: int, *, need_reply: bool = False) -> int | None:
        return await self._send(FrontendReq.SET_BACKEND_REQ_FD, b"", [fd], need_reply=need_reply)

    async def set_status(self, status: int, *, need_reply: bool = False) -> int | None:
        return await self._send(FrontendReq.SET_STATUS, U64(status).pack(), need_reply=need_reply)

    async def get_status(self) -> int:
        return await self._get_u64(FrontendReq.GET_STATUS)
