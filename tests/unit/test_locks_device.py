"""A SETLKW through the whole device (fake front-end, vhost-user, queue runner).

The lock wait is submitted before GETATTRs on the same queue: they complete
while it waits; it completes, granted, once the holder unlocks; INTERRUPT
ends a wait with EINTR.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

import pytest
import trio

from tests.support.fakechain import OUT_HEADER, lk_body, request
from tests.unit.test_device_engine import setup_file
from tests.unit.test_device_frontend import GETATTR, Rig, running_device

SETLK, SETLKW, INTERRUPT = 32, 33, 36


def submit_nowait(rig: Rig, opcode: int, nodeid: int, body: bytes) -> tuple[int, int]:
    """Queue one request and kick; returns (head, unique) without waiting for it."""
    rig.unique += 1
    head = rig.q.add_chain([request(opcode, nodeid, body, unique=rig.unique)], [4096])
    os.eventfd_write(rig.kick, 1)
    return head, rig.unique


async def collect(rig: Rig, heads: set[int]) -> dict[int, int]:
    """Wait (bounded) until every chain in ``heads`` is used; their reply errors."""
    errors: dict[int, int] = {}
    with trio.fail_after(10):
        while not heads <= errors.keys():
            await trio.lowlevel.wait_readable(rig.call)
            os.eventfd_read(rig.call)
            for head, used_len in rig.q.collect_used():
                rec = rig.q.chains[head]
                data = b"".join(rig.ram.read(gpa, n) for gpa, n in rec.writable)[:used_len]
                errors[head] = OUT_HEADER.unpack_from(data)[1] if used_len else 1
    return errors


@pytest.mark.parametrize("pool", [4, 0])
async def test_setlkw_does_not_hold_up_the_queue(tmp_path: Path, pool: int) -> None:
    async with running_device(tmp_path, posix_locks=True, thread_pool_size=pool) as rig:
        nodeid, fh = await setup_file(rig)
        locks = rig.devices[0].session.fs.locks
        assert (await rig.fuse(SETLK, nodeid, lk_body(fh, 1, 0, 9, fcntl.F_WRLCK)))[0] == 0
        wait_head, _ = submit_nowait(rig, SETLKW, nodeid, lk_body(fh, 2, 5, 5, fcntl.F_WRLCK))
        assert await trio.to_thread.run_sync(locks.wait_until_blocked, 1, 10.0)
        for _ in range(3):  # behind the wait on the same queue, answered meanwhile
            assert (await rig.fuse(GETATTR, 1, bytes(16)))[0] == 0
        unlock_head, _ = submit_nowait(rig, SETLK, nodeid, lk_body(fh, 1, 0, 9, fcntl.F_UNLCK))
        errors = await collect(rig, {unlock_head, wait_head})
        assert errors == {unlock_head: 0, wait_head: 0}, "granted on release, no EDEADLK"
        err, payload = await rig.fuse(31, nodeid, lk_body(fh, 3, 0, 9, fcntl.F_WRLCK))  # GETLK
        assert err == 0 and struct.unpack_from("<QQI", payload) == (5, 5, fcntl.F_WRLCK)


async def test_interrupt_ends_a_wait_through_the_device(tmp_path: Path) -> None:
    async with running_device(tmp_path, posix_locks=True) as rig:
        nodeid, fh = await setup_file(rig)
        locks = rig.devices[0].session.fs.locks
        assert (await rig.fuse(SETLK, nodeid, lk_body(fh, 1, 0, 9, fcntl.F_WRLCK)))[0] == 0
        wait_head, wait_unique = submit_nowait(
            rig, SETLKW, nodeid, lk_body(fh, 2, 0, 0, fcntl.F_WRLCK)
        )
        assert await trio.to_thread.run_sync(locks.wait_until_blocked, 1, 10.0)
        rig.unique += 1
        rig.q.add_chain(
            [request(INTERRUPT, 0, struct.pack("<Q", wait_unique), unique=rig.unique | 1)], [16]
        )
        os.eventfd_write(rig.kick, 1)
        errors = await collect(rig, {wait_head})
        assert errors[wait_head] == -errno.EINTR
