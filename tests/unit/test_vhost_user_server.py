"""The vhost-user server end to end: real serve() on a unix socket in tmp_path,
a fake front-end, and a recording device."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from pyvirtiofsd.daemon.vhost_user import (
    HANDLER_PROTOCOL_FEATURES,
    VHOST_USER_F_PROTOCOL_FEATURES,
    DeviceError,
    MemoryRegionDesc,
    ProtocolFeature,
    VhostUserDevice,
    VringAddr,
    VringConfig,
    adopt_listener,
    listen_unix,
    protocol_feature_mask,
    serve,
)
from pyvirtiofsd.daemon.vhost_user.messages import (
    U64,
    VHOST_USER_VERSION,
    FrontendReq,
    HeaderFlags,
    MemoryTable,
    VringFd,
    VringState,
    encode_message,
)
from tests.support.frontend import FakeFrontend, MemFd

VERSION_1 = 1 << 32
ACCESS_PLATFORM = 1 << 33
EVENT_IDX = 1 << 29
DEVICE_FEATURES = VERSION_1 | ACCESS_PLATFORM | EVENT_IDX
ALL_PROTOCOL = HANDLER_PROTOCOL_FEATURES
NEED_REPLY = VHOST_USER_VERSION | HeaderFlags.NEED_REPLY


def fd_ident(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class RecordingDevice:
    """Implements VhostUserDevice; records every call with typed values.

    Fds it is given ownership of are identified (dev, inode) and closed at
    once; mem-table fds are identified and left to the handler to close.
    ``fail`` names methods that raise DeviceError, ``crash`` ones that raise
    RuntimeError (a device bug).
    """

    def __init__(
        self,
        *,
        queues: int = 2,
        features: int = DEVICE_FEATURES,
        protocol: int = ALL_PROTOCOL,
        max_queue_size: int = 1024,
    ) -> None:
        self.queues = queues
        self._features = features
        self._protocol = protocol
        self._max_queue_size = max_queue_size
        self.calls: list[tuple[Any, ...]] = []
        self.fail: set[str] = set()
        self.crash: set[str] = set()
        self.status = 0
        self.vring_base = 42
        self.reset_count = 0
        self.reset_event = trio.Event()
        # the server calls the device from a worker thread (never blocking trio)
        try:
            self._token: trio.lowlevel.TrioToken | None = trio.lowlevel.current_trio_token()
        except RuntimeError:
            self._token = None

    def _call(self, name: str, *args: Any) -> None:
        self.calls.append((name, *args))
        if name in self.fail:
            raise DeviceError(f"{name} refused by the test device")
        if name in self.crash:
            raise RuntimeError(f"{name} crashed in the test device")

    def _owned(self, fd: int | None) -> tuple[int, int] | None:
        if fd is None:
            return None
        ident = fd_ident(fd)
        return ident

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def last(self, name: str) -> tuple[Any, ...]:
        for call in reversed(self.calls):
            if call[0] == name:
                return call[1:]
        raise AssertionError(f"device never saw {name}; calls: {self.names()}")

    # VhostUserDevice
    def num_queues(self) -> int:
        return self.queues

    def max_queue_size(self) -> int:
        return self._max_queue_size

    def features(self) -> int:
        return self._features

    def protocol_features(self) -> int:
        return self._protocol

    def set_features(self, acked: int) -> None:
        self._call("set_features", acked)

    def set_mem_table(self, regions: list[tuple[int, MemoryRegionDesc]]) -> None:
        self._call("set_mem_table", [(fd_ident(fd), r) for fd, r in regions])

    def add_mem_region(self, fd: int, region: MemoryRegionDesc) -> None:
        self._call("add_mem_region", fd_ident(fd), region)

    def remove_mem_region(self, region: MemoryRegionDesc) -> None:
        self._call("remove_mem_region", region)

    def start_vring(self, config: VringConfig) -> None:
        self._call("start_vring", config)

    def stop_vring(self, index: int) -> int:
        self._call("stop_vring", index)
        return self.vring_base

    def _take_fd(self, name: str, index: int | None, fd: int | None) -> None:
        ident = self._owned(fd)
        args = (ident,) if index is None else (index, ident)
        self._call(name, *args)  # raising: the handler still owns (and closes) fd
        if fd is not None:
            os.close(fd)

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._take_fd("set_vring_kick", index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._take_fd("set_vring_call", index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._take_fd("set_vring_err", index, fd)

    def set_backend_req_fd(self, fd: int) -> None:
        self._take_fd("set_backend_req_fd", None, fd)

    def set_status(self, status: int) -> None:
        self._call("set_status", status)
        self.status = status

    def get_status(self) -> int:
        self._call("get_status")
        return self.status

    def reset(self) -> None:
        self._call("reset")
        self.reset_count += 1
        if self._token is None:
            self.reset_event.set()
            return
        try:
            trio.from_thread.run_sync(self.reset_event.set, trio_token=self._token)
        except RuntimeError:  # called from the trio thread itself
            self.reset_event.set()


def test_recording_device_is_a_vhost_user_device() -> None:
    assert isinstance(RecordingDevice(), VhostUserDevice)


@dataclass
class Server:
    path: Path
    devices: list[RecordingDevice]
    done: trio.Event
    cancel: Callable[[], None]
    device_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> RecordingDevice:
        return self.devices[-1]

    async def wait_done(self) -> None:
        with trio.fail_after(5):
            await self.done.wait()


@asynccontextmanager
async def running_server(
    tmp_path: Path, *, reconnect: bool = False, **device_kwargs: Any
) -> AsyncIterator[Server]:
    path = tmp_path / "vhost-user.sock"
    listener = listen_unix(path)
    devices: list[RecordingDevice] = []
    done = trio.Event()

    def factory() -> RecordingDevice:
        device = RecordingDevice(**device_kwargs)
        devices.append(device)
        return device

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await serve(listener, factory, reconnect=reconnect, task_status=task_status)
        finally:
            done.set()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(run)
            yield Server(path, devices, done, nursery.cancel_scope.cancel)
            nursery.cancel_scope.cancel()
    finally:
        listener.close()


@asynccontextmanager
async def connected(
    tmp_path: Path, *, protocol: int | None = None, owner: bool = True, **device_kwargs: Any
) -> AsyncIterator[tuple[Server, FakeFrontend]]:
    """A server plus a front-end that has done QEMU's opening: features,
    protocol features (``protocol``: all offered by default), SET_OWNER."""
    async with running_server(tmp_path, **device_kwargs) as server:
        frontend = await FakeFrontend.connect(server.path)
        async with frontend:
            features = await frontend.get_features()
            assert features & VHOST_USER_F_PROTOCOL_FEATURES
            offered = await frontend.get_protocol_features()
            await frontend.set_protocol_features(offered if protocol is None else protocol)
            if owner:
                await frontend.set_owner()
            yield server, frontend


async def assert_alive(frontend: FakeFrontend) -> None:
    """The server still answers after whatever came before."""
    with trio.fail_after(5):
        assert await frontend.get_features() == DEVICE_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


async def send_fd_and_close(frontend: FakeFrontend, send: Callable[[int], Any], fd: int) -> Any:
    try:
        return await send(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# The happy path: QEMU 7.2's sequence for vhost-user-fs with iommu_platform=on
# --------------------------------------------------------------------------


async def test_qemu_like_session(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        fe = await FakeFrontend.connect(server.path)
        async with fe:
            # vhost_user_backend_init, before SET_OWNER
            features = await fe.get_features()
            assert features == DEVICE_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES
            offered = await fe.get_protocol_features()
            assert offered == ALL_PROTOCOL
            assert offered & ProtocolFeature.REPLY_ACK.mask
            assert offered & ProtocolFeature.BACKEND_REQ.mask
            wanted = protocol_feature_mask(
                ProtocolFeature.MQ,
                ProtocolFeature.REPLY_ACK,
                ProtocolFeature.BACKEND_REQ,
                ProtocolFeature.CONFIGURE_MEM_SLOTS,
                ProtocolFeature.STATUS,
            )
            assert await fe.set_protocol_features(wanted, need_reply=True) == 0
            assert await fe.get_queue_num() == 2
            assert await fe.get_max_mem_slots() == 509
            backend_fd = eventfd()
            ident = fd_ident(backend_fd)
            assert (
                await send_fd_and_close(
                    fe, partial(fe.set_backend_req_fd, need_reply=True), backend_fd
                )
                == 0
            )
            dev = server.device
            assert dev.last("set_backend_req_fd") == (ident,)
            # vhost_dev_init
            assert await fe.set_owner(need_reply=True) == 0
            # vhost_virtqueue_init: SET_VRING_CALL with the masked notifier
            for i in range(2):
                call_fd = eventfd()
                ident = fd_ident(call_fd)
                await send_fd_and_close(fe, partial(fe.set_vring_call, i), call_fd)
                await assert_alive(fe)
                assert dev.last("set_vring_call") == (i, ident)
            # vhost_dev_start.  QEMU 7.2 does not echo bit 30 in SET_FEATURES.
            acked = VERSION_1 | ACCESS_PLATFORM
            assert await fe.set_features(acked, need_reply=True) == 0
            assert dev.last("set_features") == (acked,)
            with MemFd.create(1 << 16) as mem:
                region = mem.region(guest_phys_addr=0)
                assert await fe.add_mem_reg(mem.fd, region, need_reply=True) == 0
                assert dev.last("add_mem_region") == (fd_ident(mem.fd), region)
            for i in range(2):
                # the handler keeps the ring's state; the device sees it at the start
                seen = len(dev.calls)
                assert await fe.set_vring_num(i, 256, need_reply=True) == 0
                assert await fe.set_vring_base(i, 7, need_reply=True) == 0
                addr = VringAddr(i, 0, 0x1000 * (i + 1), 0x1800, 0x1400, 0)
                assert await fe.set_vring_addr(addr, need_reply=True) == 0
                assert len(dev.calls) == seen
                kick = eventfd()
                ident = fd_ident(kick)
                assert (
                    await send_fd_and_close(
                        fe, partial(fe.set_vring_kick, i, need_reply=True), kick
                    )
                    == 0
                )
                assert dev.last("set_vring_kick") == (i, ident)
                # Bit 30 not acked in SET_FEATURES: the ring starts enabled.
                assert dev.last("start_vring") == (VringConfig(i, 256, addr, 7),)
                err = eventfd()
                ident = fd_ident(err)
                assert (
                    await send_fd_and_close(fe, partial(fe.set_vring_err, i, need_reply=True), err)
                    == 0
                )
                assert dev.last("set_vring_err") == (i, ident)
            # vhost_dev_set_vring_enable(true)
            starts = dev.names().count("start_vring")
            for i in range(2):
                assert await fe.set_vring_enable(i, True, need_reply=True) == 0
            assert dev.names().count("start_vring") == starts  # already running
            assert await fe.set_status(0xF, need_reply=True) == 0
            assert dev.last("set_status") == (0xF,)
            assert await fe.get_status() == 0xF
            # vhost_dev_stop
            for i in range(2):
                assert await fe.set_vring_enable(i, False, need_reply=True) == 0
                assert dev.last("stop_vring") == (i,)
                # where the device stopped, kept by the handler
                assert await fe.get_vring_base(i) == 42
                assert dev.names().count("stop_vring") == i + 1
        await server.wait_done()
        assert dev.reset_count == 1
        assert dev.names()[-1] == "reset"


async def test_bit30_acked_rings_start_disabled(tmp_path: Path) -> None:
    async with connected(tmp_path) as (server, fe):
        dev = server.device
        await fe.set_features(VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)
        await assert_alive(fe)
        assert dev.last("set_features") == (VERSION_1,)  # bit 30 removed
        addr = VringAddr(1, 0, 0x1000, 0x1800, 0x1400, 0)
        await fe.set_vring_num(1, 64)
        await fe.set_vring_addr(addr)
        kick = eventfd()
        await send_fd_and_close(fe, partial(fe.set_vring_kick, 1), kick)
        await assert_alive(fe)
        assert "start_vring" not in dev.names()
        assert await fe.set_vring_enable(1, True, need_reply=True) == 0
        assert dev.last("start_vring") == (VringConfig(1, 64, addr, 0),)


async def test_nofd_kick_and_call_mean_polling(tmp_path: Path) -> None:
    async with connected(tmp_path) as (server, fe):
        await fe.set_features(VERSION_1)
        await fe.set_vring_num(0, 64)
        await fe.set_vring_addr(VringAddr(0, 0, 0x1000, 0x1800, 0x1400, 0))
        assert await fe.set_vring_kick(0, None, need_reply=True) == 0
        assert server.device.last("set_vring_kick") == (0, None)
        assert server.device.last("start_vring")[0].index == 0
        assert await fe.set_vring_call(1, None, need_reply=True) == 0
        assert server.device.last("set_vring_call") == (1, None)
        assert await fe.set_vring_err(1, None, need_reply=True) == 0
        assert server.device.last("set_vring_err") == (1, None)


async def test_set_mem_table(tmp_path: Path) -> None:
    async with connected(tmp_path) as (server, fe):
        base = fd_count()
        with MemFd.create(1 << 16) as a, MemFd.create(1 << 17) as b:
            ra = a.region(0, 0x7F00_0000_0000)
            rb = b.region(1 << 20, 0x7F10_0000_0000)
            assert await fe.set_mem_table([(a.fd, ra), (b.fd, rb)], need_reply=True) == 0
            assert server.device.last("set_mem_table") == (
                [(fd_ident(a.fd), ra), (fd_ident(b.fd), rb)],
            )
        assert fd_count() == base  # the handler closed its copies


async def test_add_and_remove_mem_regions(tmp_path: Path) -> None:
    async with connected(tmp_path) as (server, fe):
        dev = server.device
        base = fd_count()
        with MemFd.create(1 << 16) as a, MemFd.create(1 << 16) as b:
            ra = a.region(0)
            rb = b.region(1 << 16, 0x7F20_0000_0000)
            assert await fe.add_mem_reg(a.fd, ra, need_reply=True) == 0
            assert await fe.add_mem_reg(b.fd, rb, need_reply=True) == 0
            # overlapping region refused
            overlap = MemoryRegionDesc(0x8000, 0x1000, 0x7F30_0000_0000, 0)
            assert await fe.add_mem_reg(a.fd, overlap, need_reply=True) == 1
            # QEMU 7.2 sends the fd with REM_MEM_REG; the mmap offset is ignored
            assert (
                await fe.rem_mem_reg(
                    MemoryRegionDesc(ra.guest_phys_addr, ra.memory_size, ra.userspace_addr, 99),
                    a.fd,
                    need_reply=True,
                )
                == 0
            )
            assert dev.last("remove_mem_region") == (ra,)
            # later QEMUs send none
            assert await fe.rem_mem_reg(rb, need_reply=True) == 0
            assert dev.last("remove_mem_region") == (rb,)
            # no such region any more
            assert await fe.rem_mem_reg(rb, need_reply=True) == 1
            # zero-sized region refused
            assert await fe.add_mem_reg(a.fd, MemoryRegionDesc(0, 0, 0, 0), need_reply=True) == 1
        await assert_alive(fe)
        assert fd_count() == base


async def test_reset_device_keeps_owner(tmp_path: Path) -> None:
    async with connected(tmp_path) as (server, fe):
        dev = server.device
        assert await fe.reset_device(need_reply=True) == 0
        assert dev.reset_count == 1
        # still owner, protocol features kept: acked request works
        assert await fe.set_vring_num(0, 64, need_reply=True) == 0


async def test_reset_owner_drops_ownership(tmp_path: Path) -> None:
    async with connected(tmp_path) as (server, fe):
        dev = server.device
        await fe.reset_owner()
        await assert_alive(fe)
        assert dev.reset_count == 1
        # protocol features are gone as well: re-negotiate REPLY_ACK
        await fe.set_protocol_features(ProtocolFeature.REPLY_ACK.mask)
        assert await fe.set_vring_num(0, 64, need_reply=True) == 1  # no owner
        assert await fe.set_owner(need_reply=True) == 0
        assert await fe.set_vring_num(0, 64, need_reply=True) == 0


# --------------------------------------------------------------------------
# Refusals: each is answered (failed ack when asked for) and the server goes on
# --------------------------------------------------------------------------


async def test_set_features_with_unoffered_bits(tmp_path: Path) -> None:
    async with connected(tmp_path) as (server, fe):
        assert await fe.set_features(VERSION_1 | (1 << 26), need_reply=True) == 1  # LOG_ALL
        assert "set_features" not in server.device.names()
        await assert_alive(fe)


async def test_set_protocol_features_with_unoffered_bits(tmp_path: Path) -> None:
    async with connected(tmp_path, protocol=ProtocolFeature.REPLY_ACK.mask) as (_, fe):
        bad = ProtocolFeature.REPLY_ACK.mask | ProtocolFeature.LOG_SHMFD.mask
        assert await fe.set_protocol_features(bad, need_reply=True) == 1
        await assert_alive(fe)


async def test_device_offering_unknown_protocol_features_is_masked(tmp_path: Path) -> None:
    protocol = ALL_PROTOCOL | ProtocolFeature.LOG_SHMFD.mask | ProtocolFeature.PAGEFAULT.mask
    async with running_server(tmp_path, protocol=protocol) as server:
        fe = await FakeFrontend.connect(server.path)
        async with fe:
            assert await fe.get_protocol_features() == ALL_PROTOCOL


@pytest.mark.parametrize(
    ("feature", "request_"),
    [
        (ProtocolFeature.CONFIGURE_MEM_SLOTS, "add_mem_reg"),
        (ProtocolFeature.CONFIGURE_MEM_SLOTS, "rem_mem_reg"),
        (ProtocolFeature.STATUS, "set_status"),
        (ProtocolFeature.BACKEND_REQ, "set_backend_req_fd"),
        (ProtocolFeature.RESET_DEVICE, "reset_device"),
    ],
)
async def test_request_needs_protocol_feature(
    tmp_path: Path, feature: ProtocolFeature, request_: str
) -> None:
    negotiated = ProtocolFeature.REPLY_ACK.mask
    async with connected(tmp_path, protocol=negotiated) as (server, fe):
        base = fd_count()
        with MemFd.create() as mem:
            region = mem.region()
            calls: dict[str, Callable[[], Any]] = {
                "add_mem_reg": partial(fe.add_mem_reg, mem.fd, region, need_reply=True),
                "rem_mem_reg": partial(fe.rem_mem_reg, region, need_reply=True),
                "set_status": partial(fe.set_status, 1, need_reply=True),
                "set_backend_req_fd": partial(fe.set_backend_req_fd, mem.fd, need_reply=True),
                "reset_device": partial(fe.reset_device, need_reply=True),
            }
            assert await calls[request_]() == 1
        await assert_alive(fe)
        assert fd_count() == base
        assert server.device.names() == []


@pytest.mark.parametrize(
    "code", [FrontendReq.GET_QUEUE_NUM, FrontendReq.GET_MAX_MEM_SLOTS, FrontendReq.GET_STATUS]
)
async def test_get_needing_protocol_feature_gets_no_reply(
    tmp_path: Path, code: FrontendReq
) -> None:
    async with connected(tmp_path, protocol=ProtocolFeature.REPLY_ACK.mask) as (_, fe):
        # Refused GETs get no reply at all (a reply would be read as a value),
        # even with NEED_REPLY: the next reply is GET_FEATURES'.
        await fe.send_raw(encode_message(code, NEED_REPLY))
        await assert_alive(fe)


async def test_need_reply_without_reply_ack_gets_no_ack(tmp_path: Path) -> None:
    async with connected(tmp_path, protocol=0) as (server, fe):
        await fe.send_raw(
            encode_message(FrontendReq.SET_VRING_CALL, NEED_REPLY, VringFd(0, True).pack())
        )
        await fe.send_raw(
            encode_message(FrontendReq.SET_VRING_CALL, NEED_REPLY, VringFd(9, True).pack())
        )
        await assert_alive(fe)
        assert server.device.last("set_vring_call") == (0, None)


async def test_requests_before_set_owner_refused(tmp_path: Path) -> None:
    async with connected(tmp_path, owner=False) as (server, fe):
        assert await fe.set_features(VERSION_1, need_reply=True) == 1
        assert await fe.set_vring_num(0, 8, need_reply=True) == 1
        with MemFd.create() as mem:
            assert await fe.set_mem_table([(mem.fd, mem.region())], need_reply=True) == 1
        assert server.device.names() == []
        assert await fe.set_owner(need_reply=True) == 0
        assert await fe.set_owner(need_reply=True) == 1  # twice
        await assert_alive(fe)


@pytest.mark.parametrize(
    "request_",
    [
        "set_vring_num",
        "set_vring_base",
        "set_vring_addr",
        "set_vring_enable",
        "set_vring_kick",
        "set_vring_call",
        "set_vring_err",
    ],
)
async def test_vring_index_out_of_range(tmp_path: Path, request_: str) -> None:
    async with connected(tmp_path) as (server, fe):
        base = fd_count()
        fd = eventfd()
        try:
            calls: dict[str, Callable[[], Any]] = {
                "set_vring_num": partial(fe.set_vring_num, 2, 8, need_reply=True),
                "set_vring_base": partial(fe.set_vring_base, 2, 0, need_reply=True),
                "set_vring_addr": partial(
                    fe.set_vring_addr, VringAddr(7, 0, 0, 0, 0, 0), need_reply=True
                ),
                "set_vring_enable": partial(fe.set_vring_enable, 255, True, need_reply=True),
                "set_vring_kick": partial(fe.set_vring_kick, 2, fd, need_reply=True),
                "set_vring_call": partial(fe.set_vring_call, 3, fd, need_reply=True),
                "set_vring_err": partial(fe.set_vring_err, 200, fd, need_reply=True),
            }
            assert await calls[request_]() == 1
        finally:
            os.close(fd)
        await assert_alive(fe)
        assert fd_count() == base
        assert server.device.names() == []


async def test_get_vring_base_out_of_range_no_reply(tmp_path: Path) -> None:
    async with connected(tmp_path) as (server, fe):
        await fe.send_raw(encode_message(FrontendReq.GET_VRING_BASE, 1, VringState(5, 0).pack()))
        await assert_alive(fe)
        assert server.device.names() == []


@pytest.mark.parametrize(("num", "ok"), [(0, 1), (1024, 0), (2048, 1), (100, 1), (1, 0)])
async def test_set_vring_num_range(tmp_path: Path, num: int, ok: int) -> None:
    async with connected(tmp_path) as (_, fe):
        assert await fe.set_vring_num(0, num, need_reply=True) == ok
        await assert_alive(fe)


async def test_bad_vring_values(tmp_path: Path) -> None:
    async with connected(tmp_path) as (server, fe):
        assert await fe.set_vring_base(0, 0x10000, need_reply=True) == 1
        assert await fe.set_vring_enable(0, 2, need_reply=False) is None
        log_addr = VringAddr(0, VringAddr.F_LOG, 0, 0, 0, 0)
        assert await fe.set_vring_addr(log_addr, need_reply=True) == 1
        assert await fe.set_vring_addr(VringAddr(0, 2, 0, 0, 0, 0), need_reply=True) == 1
        assert await fe.set_status(0x100, need_reply=True) == 1
        reserved = encode_message(FrontendReq.SET_VRING_CALL, NEED_REPLY, U64(0x200).pack())
        await fe.send_raw(reserved)
        _header, payload = await fe.recv_reply()
        assert U64.unpack(payload).value == 1
        await assert_alive(fe)
        assert server.device.names() == []


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        (FrontendReq.SET_FEATURES, b"\0" * 4),
        (FrontendReq.SET_FEATURES, b"\0" * 12),
        (FrontendReq.SET_OWNER, b"\0" * 8),
        (FrontendReq.SET_VRING_NUM, b"\0" * 12),
        (FrontendReq.SET_VRING_ADDR, b"\0" * 39),
        (FrontendReq.SET_MEM_TABLE, struct.pack("<II", 3, 0)),
        (FrontendReq.SET_MEM_TABLE, struct.pack("<II", 100, 0) + b"\0" * 32),
    ],
)
async def test_payload_size_wrong_for_type(
    tmp_path: Path, code: FrontendReq, payload: bytes
) -> None:
    async with connected(tmp_path) as (server, fe):
        await fe.send_raw(encode_message(code, NEED_REPLY, payload))
        header, reply = await fe.recv_reply()
        assert header.request == code and U64.unpack(reply).value == 1
        await assert_alive(fe)
        assert server.device.names() == []


async def test_oversize_payload_drained(tmp_path: Path) -> None:
    async with connected(tmp_path) as (server, fe):
        base = fd_count()
        fd = eventfd()
        try:
            msg = encode_message(FrontendReq.SET_FEATURES, NEED_REPLY, b"\xff" * 5000)
            await fe.send_raw(msg, [fd])
        finally:
            os.close(fd)
        header, reply = await fe.recv_reply()
        assert header.request == FrontendReq.SET_FEATURES and U64.unpack(reply).value == 1
        await assert_alive(fe)
        assert fd_count() == base
        assert server.device.names() == []


async def test_absurd_payload_size_closes_connection(tmp_path: Path) -> None:
    async with connected(tmp_path) as (server, fe):
        await fe.send_raw(struct.pack("<III", FrontendReq.SET_FEATURES, 1, 0xFFFF_FFFF))
        await server.wait_done()
        assert server.device.reset_count == 1
        assert await fe.at_eof()


async def test_truncated_header_then_disconnect(tmp_path: Path) -> None:
    async with running_server(tmp_path, reconnect=True) as server:
        async with await FakeFrontend.connect(server.path) as fe:
            await assert_alive(fe)
            await fe.send_raw(b"\x01\x00\x00")
        first = server.device
        with trio.fail_after(5):
            await first.reset_event.wait()
        async with await FakeFrontend.connect(server.path) as fe:
            await assert_alive(fe)
        assert len(server.devices) == 2


async def test_truncated_payload_then_disconnect(tmp_path: Path) -> None:
    async with connected(tmp_path) as (server, fe):
        base = fd_count()
        fd = eventfd()
        try:
            msg = encode_message(FrontendReq.SET_VRING_KICK, 1, VringFd(0, False).pack())
            await fe.send_raw(msg[:-3], [fd])
        finally:
            os.close(fd)
        fe.close()
        await server.wait_done()
        assert server.device.reset_count == 1
        assert fd_count() < base  # our socket is closed, and no received fd leaked
        assert "set_vring_kick" not in server.device.names()


@pytest.mark.parametrize(
    ("code", "payload", "nfds"),
    [
        (FrontendReq.SET_FEATURES, U64(VERSION_1).pack(), 2),
        (FrontendReq.SET_OWNER, b"", 1),
        (FrontendReq.SET_VRING_KICK, VringFd(0, True).pack(), 1),
        (FrontendReq.SET_VRING_CALL, VringFd(0, False).pack(), 2),
        (FrontendReq.SET_VRING_KICK, VringFd(0, False).pack(), 0),
        (FrontendReq.SET_MEM_TABLE, MemoryTable((MemoryRegionDesc(0, 4096, 0, 0),) * 2).pack(), 1),
        (FrontendReq.SET_BACKEND_REQ_FD, b"", 3),
        (FrontendReq.SET_FEATURES, U64(VERSION_1).pack(), 8),
        (FrontendReq.SET_FEATURES, U64(VERSION_1).pack(), 12),  # kernel truncates: MSG_CTRUNC
        (FrontendReq.SET_MEM_TABLE, MemoryTable((MemoryRegionDesc(0, 4096, 0, 0),)).pack(), 9),
    ],
)
async def test_wrong_fd_count_closes_all(
    tmp_path: Path, code: FrontendReq, payload: bytes, nfds: int
) -> None:
    async with connected(tmp_path) as (server, fe):
        base = fd_count()
        fds = [eventfd() for _ in range(nfds)]
        try:
            await fe.send_raw(encode_message(code, NEED_REPLY, payload), fds)
        finally:
            for fd in fds:
                os.close(fd)
        header, reply = await fe.recv_reply()
        assert header.request == code and U64.unpack(reply).value == 1
        await assert_alive(fe)
        assert fd_count() == base
        assert server.device.names() == []


async def test_unknown_request_code(tmp_path: Path) -> None:
    async with connected(tmp_path) as (_server, fe):
        base = fd_count()
        fd = eventfd()
        try:
            await fe.send_raw(encode_message(99, NEED_REPLY, b"abc"), [fd])
        finally:
            os.close(fd)
        header, reply = await fe.recv_reply()
        assert header.request == 99 and U64.unpack(reply).value == 1
        await fe.send_raw(encode_message(1000, 1, b""))  # no ack asked for: none sent
        await assert_alive(fe)
        assert fd_count() == base


async def test_known_but_unsupported_request(tmp_path: Path) -> None:
    async with connected(tmp_path) as (_, fe):
        base = fd_count()
        with MemFd.create() as mem:
            payload = struct.pack("<QQ", mem.size, 0)
            await fe.send_raw(
                encode_message(FrontendReq.SET_LOG_BASE, NEED_REPLY, payload), [mem.fd]
            )
            header, reply = await fe.recv_reply()
        assert header.request == FrontendReq.SET_LOG_BASE and U64.unpack(reply).value == 1
        # A GET we do not implement: no reply
        await fe.send_raw(encode_message(FrontendReq.GET_CONFIG, NEED_REPLY, b"\0" * 12))
        await assert_alive(fe)
        assert fd_count() == base


@pytest.mark.parametrize("flags", [0x0, 0x2, 0x1 | 0x4 | 0x8, 0x1 | 0x8 | 0x100])
async def test_bad_header_flags(tmp_path: Path, flags: int) -> None:
    async with connected(tmp_path) as (server, fe):
        await fe.send_raw(encode_message(FrontendReq.SET_FEATURES, flags, U64(VERSION_1).pack()))
        if flags & 0x8:
            _header, reply = await fe.recv_reply()
            assert U64.unpack(reply).value == 1
        await assert_alive(fe)
        assert server.device.names() == []


@pytest.mark.parametrize("mode", ["fail", "crash"])
async def test_device_errors_become_failed_acks(tmp_path: Path, mode: str) -> None:
    async with connected(tmp_path) as (server, fe):
        dev = server.device
        refused = getattr(dev, mode)
        refused.update({"set_features", "set_vring_kick", "start_vring", "set_mem_table",
                        "set_status"})  # fmt: skip
        base = fd_count()
        assert await fe.set_features(VERSION_1, need_reply=True) == 1
        for i in range(2):
            assert await fe.set_vring_num(i, 8, need_reply=True) == 0  # the handler's state
            assert await fe.set_vring_addr(VringAddr(i, 0, 0x1000, 0x1800, 0x1400, 0)) is None
        kick = eventfd()
        assert (
            await send_fd_and_close(fe, partial(fe.set_vring_kick, 0, need_reply=True), kick) == 1
        )
        # the device takes the kick fd but refuses to start the ring
        refused.discard("set_vring_kick")
        kick = eventfd()
        assert (
            await send_fd_and_close(fe, partial(fe.set_vring_kick, 1, need_reply=True), kick) == 1
        )
        with MemFd.create() as mem:
            assert await fe.set_mem_table([(mem.fd, mem.region())], need_reply=True) == 1
        assert await fe.set_status(1, need_reply=True) == 1
        await assert_alive(fe)
        assert fd_count() == base  # the kick fd the device refused was closed
        assert dev.names() == [
            "set_features",
            "set_vring_kick",
            "set_vring_kick",
            "start_vring",
            "set_mem_table",
            "set_status",
        ]


async def test_device_error_on_get_gives_no_reply(tmp_path: Path) -> None:
    async with connected(tmp_path) as (server, fe):
        await fe.set_vring_num(0, 8)
        await fe.set_vring_addr(VringAddr(0, 0, 0x1000, 0x1800, 0x1400, 0))
        assert await fe.set_vring_kick(0, None, need_reply=True) == 0
        assert server.device.last("start_vring")[0].index == 0
        server.device.fail.add("stop_vring")
        await fe.send_raw(encode_message(FrontendReq.GET_VRING_BASE, 1, VringState(0, 0).pack()))
        await assert_alive(fe)
        server.device.fail.clear()
        assert await fe.get_vring_base(0) == 42  # stopped now, where the device says


async def test_device_bad_status_value(tmp_path: Path) -> None:
    async with connected(tmp_path) as (server, fe):
        server.device.status = 0x1234
        await fe.send_raw(encode_message(FrontendReq.GET_STATUS, 1))
        await assert_alive(fe)


# --------------------------------------------------------------------------
# Connection lifetime
# --------------------------------------------------------------------------


async def test_disconnect_resets_device_and_serve_returns(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        async with await FakeFrontend.connect(server.path) as fe:
            await assert_alive(fe)
        await server.wait_done()
        assert server.device.reset_count == 1
        assert len(server.devices) == 1


async def test_reconnect_accepts_next_frontend(tmp_path: Path) -> None:
    async with running_server(tmp_path, reconnect=True) as server:
        for n in range(1, 4):
            async with await FakeFrontend.connect(server.path) as fe:
                await fe.set_owner()
                await assert_alive(fe)
            with trio.fail_after(5):
                await server.devices[n - 1].reset_event.wait()
            assert len(server.devices) == n
        assert not server.done.is_set()
    assert all(d.reset_count == 1 for d in server.devices)


async def test_serve_accepts_trio_socket_listener(tmp_path: Path) -> None:
    path = tmp_path / "l.sock"
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(listen_unix(path)))
    device = RecordingDevice()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve, listener, lambda: device))
        async with await FakeFrontend.connect(path) as fe:
            await assert_alive(fe)
    assert device.reset_count == 1
    await listener.aclose()


async def test_cancelled_serve_resets_device(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        async with await FakeFrontend.connect(server.path) as fe:
            await assert_alive(fe)
            server.cancel()
            await server.wait_done()
        assert server.device.reset_count == 1


# --------------------------------------------------------------------------
# Listening sockets
# --------------------------------------------------------------------------


def test_listen_unix_replaces_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    assert path.exists()
    sock = listen_unix(path)
    try:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        assert sock.getsockname() == str(path)
    finally:
        sock.close()


def test_listen_unix_refuses_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        listen_unix(path)
    assert path.read_text() == "precious"


def test_adopt_listener(tmp_path: Path) -> None:
    original = listen_unix(tmp_path / "a.sock")
    fd = original.detach()
    sock = adopt_listener(fd)
    try:
        assert sock.fileno() == fd
        assert not os.get_inheritable(fd)
    finally:
        sock.close()


def test_adopt_listener_refuses_non_listening(tmp_path: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(ValueError, match="not listening"):
            adopt_listener(a.fileno())
        os.fstat(a.fileno())  # still open: it stays the caller's
    finally:
        a.close()
        b.close()
    r, w = os.pipe()
    try:
        with pytest.raises(ValueError, match="not a socket"):
            adopt_listener(r)
    finally:
        os.close(r)
        os.close(w)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(ValueError, match="unix stream"):
            adopt_listener(udp.fileno())
    finally:
        udp.close()
    with pytest.raises(ValueError, match="not open"):
        adopt_listener(10_000)
