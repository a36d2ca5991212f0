"""The whole device in-process: fake QEMU front-end -> vhost-user -> queues -> FUSE.

A real socket, a real memfd "guest RAM", real eventfds, the real FsDevice with
its worker threads and the real passthrough filesystem; the guest driver is
played by the split-ring builder. Each hostile case checks that the one bad
request fails and the device keeps serving.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from pyvirtiofsd.daemon.device import (
    VIRTIO_F_ACCESS_PLATFORM,
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    FsDevice,
)
from pyvirtiofsd.daemon.service import ServiceConfig, make_device
from pyvirtiofsd.daemon.vhost_user.messages import (
    VHOST_USER_F_PROTOCOL_FEATURES,
    ProtocolFeature,
    VringAddr,
)
from pyvirtiofsd.daemon.vhost_user.server import listen_unix, serve
from tests.support.fakechain import (
    OUT_HEADER,
    init_body,
    name_body,
    parse_entry,
    read_body,
    request,
)
from tests.support.frontend import FakeFrontend
from tests.support.splitq import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    GuestRam,
    SplitQueueBuilder,
)

RAM_SIZE = 4 << 20
UADDR = 0x7F00_0000_0000  # where the "front-end" has guest RAM mapped
QSIZE = 64
INIT, LOOKUP, GETATTR, OPEN, READ = 26, 1, 3, 14, 15


@dataclass
class Rig:
    fe: FakeFrontend
    ram: GuestRam
    q: SplitQueueBuilder
    kick: int
    call: int
    devices: list[FsDevice]
    share: Path
    queue: int = 1
    unique: int = 100

    async def submit(self) -> list[tuple[int, int]]:
        """Kick the queue and wait (bounded) for used buffers and their notification.

        A notification with nothing new is legal (virtio allows spurious
        interrupts), so keep waiting until the used ring moved.
        """
        os.eventfd_write(self.kick, 1)
        return await self.wait_used()

    async def wait_used(self, count: int = 1) -> list[tuple[int, int]]:
        """Wait (bounded) until at least ``count`` used buffers were notified."""
        used: list[tuple[int, int]] = []
        with trio.fail_after(10):
            while len(used) < count:
                await trio.lowlevel.wait_readable(self.call)
                os.eventfd_read(self.call)
                used += self.q.collect_used()
        return used

    async def fuse(
        self, opcode: int, nodeid: int, body: bytes, writable: list[int] | None = None
    ) -> tuple[int, bytes]:
        """One FUSE request; returns (error, reply payload)."""
        self.unique += 1
        head = self.q.add_chain([request(opcode, nodeid, body, unique=self.unique)],
                                writable or [4096])  # fmt: skip
        used = await self.submit()
        assert [h for h, _ in used] == [head]
        ((_, used_len),) = used
        rec = self.q.chains[head]
        data = b"".join(self.ram.read(gpa, n) for gpa, n in rec.writable)[:used_len]
        length, error, unique = OUT_HEADER.unpack_from(data)
        assert (length, unique) == (used_len, self.unique)
        return error, data[OUT_HEADER.size :]


@contextlib.asynccontextmanager
async def running_device(
    tmp_path: Path,
    *,
    window: tuple[int, int] | None = None,
    features: int | None = None,
    queue: int = 1,
    start: bool = True,
    **config: object,
) -> AsyncIterator[Rig]:
    share = tmp_path / "share"
    share.mkdir(exist_ok=True)
    (share / "file.bin").write_bytes(bytes(range(256)) * 40)  # 10240 bytes
    devices: list[FsDevice] = []

    def factory() -> FsDevice:
        devices.append(make_device(ServiceConfig(shared_dir=share, num_request_queues=2,
                                                 window=window, **config)))  # type: ignore[arg-type]  # fmt: skip
        return devices[-1]

    listener = listen_unix(tmp_path / "vu.sock")
    ram = GuestRam(RAM_SIZE)
    kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, listener, factory)
            fe = await FakeFrontend.connect(tmp_path / "vu.sock")
            offered = await fe.get_features()
            assert offered & VIRTIO_F_ACCESS_PLATFORM and offered & VHOST_USER_F_PROTOCOL_FEATURES
            await fe.set_owner()
            pf = await fe.get_protocol_features()
            want = ProtocolFeature.REPLY_ACK.mask | ProtocolFeature.MQ.mask
            assert pf & want == want
            await fe.set_protocol_features(want)
            assert await fe.get_queue_num() == 3
            if features is None:
                features = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC
                if window is not None:
                    features |= VIRTIO_F_ACCESS_PLATFORM
            ack = await fe.set_features(features | VHOST_USER_F_PROTOCOL_FEATURES,
                                        need_reply=True)  # fmt: skip
            rig_ack = ack
            assert await fe.set_mem_table([(ram.fd, ram_region())], need_reply=True) == 0
            q = SplitQueueBuilder.at(ram, 0x10000, QSIZE, data_gpa=0x20000)
            rig = Rig(fe, ram, q, kick, call, devices, share, queue)
            if rig_ack == 0 and start:
                await start_ring(rig)
            yield rig
            fe.close()
            nursery.cancel_scope.deadline = trio.current_time() + 10
    finally:
        for device in devices:  # what run_service does: workers joined, every fd closed
            device.close()
        os.close(kick)
        os.close(call)
        ram.close()
        listener.close()


def ram_region() -> object:
    from pyvirtiofsd.daemon.vhost_user.messages import MemoryRegionDesc

    return MemoryRegionDesc(0, RAM_SIZE, UADDR, 0)


async def start_ring(rig: Rig, *, expect_ok: bool = True) -> int | None:
    fe, q, n = rig.fe, rig.q, rig.queue
    await fe.set_vring_num(n, QSIZE)
    await fe.set_vring_base(n, 0)
    addr = VringAddr(n, 0, UADDR + q.desc_gpa, UADDR + q.used_gpa,
                     UADDR + q.avail_gpa, 0)  # fmt: skip
    await fe.set_vring_addr(addr)
    await fe.set_vring_call(n, os.dup(rig.call))
    await fe.set_vring_kick(n, os.dup(rig.kick))
    ack = await fe.set_vring_enable(n, True, need_reply=True)
    if expect_ok:
        assert ack == 0
    return ack


async def test_fuse_requests_travel_through_the_ring(tmp_path: Path) -> None:
    async with running_device(tmp_path) as rig:
        err, _ = await rig.fuse(INIT, 0, init_body())
        assert err == 0
        err, payload = await rig.fuse(LOOKUP, 1, name_body(b"file.bin"))
        assert err == 0
        entry = parse_entry(payload)
        assert entry.attr[1] == 10240  # size
        err, payload = await rig.fuse(OPEN, entry.nodeid, struct.pack("<II", os.O_RDONLY, 0))
        assert err == 0
        fh = struct.unpack_from("<Q", payload)[0]
        # READ into a writable part split over several descriptors, zero-copy
        err, payload = await rig.fuse(READ, entry.nodeid, read_body(fh, 100, 9000),
                                      writable=[16, 1000, 4096, 4096])  # fmt: skip
        assert err == 0
        assert payload == (bytes(range(256)) * 40)[100:9100]
        err, _ = await rig.fuse(LOOKUP, 1, name_body(b".."))
        assert err == -errno.EINVAL
        # GET_VRING_BASE stops the ring and reports how far the device got
        assert await rig.fe.get_vring_base(rig.queue) == 5


async def test_hostile_chains_fail_alone(tmp_path: Path) -> None:
    async with running_device(tmp_path) as rig:
        assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
        q = rig.q
        req = q.alloc_data(request(GETATTR, 1, bytes(16)))
        out = q.alloc(4096)
        ind, nxt, wr = VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
        nested = q.write_table([(req, 56, nxt, 1), (q.alloc(64), 32, ind, 0)])
        good_table = q.write_table([(req, 56, nxt, 1), (out, 4096, wr, 0)])
        # reason -> (head, [(index, addr, len, flags, next)]); indexes 40.. are unused
        hostile: dict[str, tuple[int, list[tuple[int, int, int, int, int]]]] = {
            "outside guest memory": (40, [(40, RAM_SIZE + 4096, 64, 0, 0)]),
            "address overflow": (40, [(40, 2**64 - 16, 64, 0, 0)]),
            "huge length": (40, [(40, req, 0xFFFF_FFFF, 0, 0)]),
            "loop": (40, [(40, req, 56, nxt, 41), (41, out, 4096, wr | nxt, 40)]),
            "next out of range": (40, [(40, req, 56, nxt, QSIZE + 3)]),
            "head out of range": (QSIZE + 7, []),
            "readable after writable": (40, [(40, out, 4096, wr | nxt, 41), (41, req, 56, 0, 0)]),
            "nested indirect": (40, [(40, nested, 32, ind, 0)]),
            "indirect length not a multiple of 16": (40, [(40, good_table, 24, ind, 0)]),
            "indirect with next": (40, [(40, good_table, 32, ind | nxt, 41), (41, out, 64, wr, 0)]),
            "empty indirect table": (40, [(40, good_table, 0, ind, 0)]),
        }
        for reason, (head, descs) in hostile.items():
            for i, a, n, f, nx in descs:
                q.write_desc(i, a, n, f, nx)
            q.publish(head)
            used = await rig.submit()
            assert used == [(head, 0)], reason
            # and the device still answers a good request right after
            err, _ = await rig.fuse(GETATTR, 1, bytes(16))
            assert err == 0, reason
        # a well-formed indirect chain works too
        q.write_desc(40, good_table, 32, ind, 0)
        q.publish(40)
        ((h, n),) = await rig.submit()
        assert h == 40 and n > 16
        assert rig.devices[0].memory.mapped_bytes == RAM_SIZE


async def test_strict_window_maps_and_serves_only_the_window(tmp_path: Path) -> None:
    window = (0, 2 << 20)
    async with running_device(tmp_path, window=window) as rig:
        assert rig.devices[0].memory.mapped_bytes == 2 << 20
        assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
        # a request whose reply buffer lies in guest RAM but outside the window
        q = rig.q
        req = q.alloc_data(request(GETATTR, 1, bytes(16)))
        q.write_desc(50, req, 56, VRING_DESC_F_NEXT, 51)
        q.write_desc(51, 3 << 20, 4096, VRING_DESC_F_WRITE, 0)
        q.publish(50)
        assert await rig.submit() == [(50, 0)]
        assert rig.ram.read(3 << 20, 16) == bytes(16)  # nothing written outside the window
        err, _ = await rig.fuse(GETATTR, 1, bytes(16))
        assert err == 0


async def test_strict_window_without_access_platform_ack_still_serves(tmp_path: Path) -> None:
    # QEMU without a vIOMMU strips ACCESS_PLATFORM from SET_FEATURES even with
    # iommu_platform=on: the device must accept that (and keep EVENT_IDX etc.).
    async with running_device(
        tmp_path, window=(0, 2 << 20), features=VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    ) as rig:
        assert rig.devices[0]._acked & VIRTIO_RING_F_EVENT_IDX
        assert (await rig.fuse(INIT, 0, init_body()))[0] == 0


async def test_ring_outside_the_window_is_refused(tmp_path: Path) -> None:
    async with running_device(tmp_path, window=(0x100000, 1 << 20), start=False) as rig:
        # the rings sit at 0x10000, below the window: enabling the ring fails, logged
        assert await start_ring(rig, expect_ok=False) != 0
        # the connection still answers
        assert await rig.fe.get_queue_num() == 3


@pytest.mark.parametrize("queue", [0, 2])
async def test_every_queue_is_served(tmp_path: Path, queue: int) -> None:
    async with running_device(tmp_path, queue=queue) as rig:
        assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
        assert (await rig.fuse(GETATTR, 1, bytes(16)))[0] == 0


async def test_strict_window_payload_outside_gets_eio_not_zeros(tmp_path: Path) -> None:
    # Linux's virtio-fs driver ignores the used length and parses the reply
    # header in the first writable buffer: a READ whose payload buffer lies
    # outside the window must come back as an error, never as a zero header
    # (error 0) over unwritten data.
    async with running_device(tmp_path, window=(0, 2 << 20)) as rig:
        assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
        err, payload = await rig.fuse(LOOKUP, 1, name_body(b"file.bin"))
        assert err == 0
        nodeid = parse_entry(payload).nodeid
        err, payload = await rig.fuse(OPEN, nodeid, struct.pack("<II", os.O_RDONLY, 0))
        assert err == 0
        fh = struct.unpack_from("<Q", payload)[0]
        q, outside = rig.q, 3 << 20
        rig.ram.write(outside, b"\x5a" * 4096)
        rig.unique += 1
        data = request(READ, nodeid, read_body(fh, 0, 4096), unique=rig.unique)
        req = q.alloc_data(data)
        out = q.alloc(16)
        rig.ram.write(out, b"\xff" * 16)
        q.write_desc(50, req, len(data), VRING_DESC_F_NEXT, 51)
        q.write_desc(51, out, 16, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 52)
        q.write_desc(52, outside, 4096, VRING_DESC_F_WRITE, 0)
        q.publish(50)
        assert await rig.submit() == [(50, 16)]
        assert OUT_HEADER.unpack(rig.ram.read(out, 16)) == (16, -errno.EIO, rig.unique)
        assert rig.ram.read(outside, 4096) == b"\x5a" * 4096  # nothing written outside
        # the device keeps serving, the same READ inside the window works
        err, payload = await rig.fuse(READ, nodeid, read_body(fh, 0, 4096), writable=[16, 4096])
        assert err == 0 and payload == (bytes(range(256)) * 16)
        # a request whose own header lies outside cannot be answered: used len 0
        q.write_desc(53, outside, 80, VRING_DESC_F_NEXT, 54)
        q.write_desc(54, out, 16, VRING_DESC_F_WRITE, 0)
        q.publish(53)
        assert await rig.submit() == [(53, 0)]
        assert (await rig.fuse(GETATTR, 1, bytes(16)))[0] == 0


async def test_strict_window_forget_with_body_outside_gets_no_reply(tmp_path: Path) -> None:
    async with running_device(tmp_path, window=(0, 2 << 20)) as rig:
        assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
        q = rig.q
        forget = 2
        hdr = request(forget, 1, struct.pack("<Q", 1), unique=999)[:40]
        # a FORGET has no writable part, so give it one to make it salvageable
        out = q.alloc(16)
        rig.ram.write(out, b"\xee" * 16)
        q.write_desc(50, q.alloc_data(hdr), 40, VRING_DESC_F_NEXT, 51)
        q.write_desc(51, 3 << 20, 8, VRING_DESC_F_NEXT, 52)
        q.write_desc(52, out, 16, VRING_DESC_F_WRITE, 0)
        q.publish(50)
        assert await rig.submit() == [(50, 0)]
        assert rig.ram.read(out, 16) == b"\xee" * 16
        assert (await rig.fuse(GETATTR, 1, bytes(16)))[0] == 0
