"""The benchmark's FUSE requests, decoded by the daemon's own ABI layer.

The two encoders are written apart; agreeing here means both match fuse.h's
layout as far as these requests go (and the exact reply sizes the load
generator insists on are those the daemon's layouts give).
"""

from __future__ import annotations

import os

import pytest

from pyvirtiofsd.bench import fuse
from pyvirtiofsd.daemon.fuse import abi


def _split(req: fuse.Request) -> tuple[abi.InHeader, bytes]:
    header = abi.IN_HEADER.decode(req.head)
    assert header.len == len(req.head) + len(req.data)
    assert header.unique == 0  # stamped by the C loop
    return header, req.head[abi.IN_HEADER.size :]


def test_getattr_lookup_and_open() -> None:
    h, body = _split(fuse.getattr_())
    assert (h.opcode, h.nodeid) == (abi.Opcode.GETATTR, abi.ROOT_ID)
    assert abi.GETATTR_IN.decode(body) == abi.GetattrIn(0, 0, 0)
    h, body = _split(fuse.lookup("file.bin", parent=7))
    assert (h.opcode, h.nodeid, body) == (abi.Opcode.LOOKUP, 7, b"file.bin\0")
    h, body = _split(fuse.open_(9))
    assert (h.opcode, h.nodeid) == (abi.Opcode.OPEN, 9)
    assert abi.OPEN_IN.decode(body).flags == os.O_RDWR
    h, body = _split(fuse.opendir(9))
    assert h.opcode == abi.Opcode.OPENDIR
    assert abi.OPEN_IN.decode(body).flags & os.O_DIRECTORY


def test_read_write_and_readdirplus() -> None:
    h, body = _split(fuse.read(5, 77, 8192, 4096))
    assert (h.opcode, h.nodeid) == (abi.Opcode.READ, 5)
    r = abi.READ_IN.decode(body)
    assert (r.fh, r.offset, r.size) == (77, 8192, 4096)
    data = bytes(range(256)) * 16
    w_req = fuse.write(5, 77, 12288, data)
    h, body = _split(w_req)
    assert h.opcode == abi.Opcode.WRITE and w_req.data == data  # data in its own buffer
    w = abi.WRITE_IN.decode(body)
    assert (w.fh, w.offset, w.size) == (77, 12288, 4096)
    assert len(body) == abi.WRITE_IN.size
    h, body = _split(fuse.readdirplus(6, 3))
    assert h.opcode == abi.Opcode.READDIRPLUS
    r = abi.READ_IN.decode(body)
    assert (r.fh, r.offset, r.size) == (3, 0, 4096)


def test_create_release_unlink_forget() -> None:
    h, body = _split(fuse.create("bench-q0-s1"))
    assert h.opcode == abi.Opcode.CREATE
    c = abi.CREATE_IN.decode(body)
    assert c.flags & os.O_CREAT and c.flags & os.O_EXCL and c.mode == 0o100644
    assert body[abi.CREATE_IN.size :] == b"bench-q0-s1\0"
    h, body = _split(fuse.release(0))
    assert h.opcode == abi.Opcode.RELEASE
    assert abi.RELEASE_IN.decode(body).fh == 0
    # where the C loop patches CREATE's handle in
    assert abi.IN_HEADER.size == fuse.RELEASE_FH_OFFSET
    h, body = _split(fuse.unlink("bench-q0-s1"))
    assert (h.opcode, body) == (abi.Opcode.UNLINK, b"bench-q0-s1\0")
    h, body = _split(fuse.forget(12, 3))
    assert (h.opcode, h.nodeid) == (abi.Opcode.FORGET, 12)
    assert abi.FORGET_IN.decode(body).nlookup == 3


def test_init() -> None:
    h, body = _split(fuse.init())
    assert h.opcode == abi.Opcode.INIT
    assert len(body) == 16  # what a 7.31 kernel sends
    major, minor, _readahead, flags = (int.from_bytes(body[i : i + 4], "little")
                                       for i in range(0, 16, 4))  # fmt: skip
    assert (major, minor) == (7, 31)
    assert flags & abi.InitFlag.DO_READDIRPLUS


def test_reply_sizes_match_the_daemon_layouts() -> None:
    out = abi.OUT_HEADER.size
    assert out + abi.ATTR_OUT_SIZE == fuse.ReplySize.GETATTR
    assert out + abi.ENTRY_OUT_SIZE == fuse.ReplySize.ENTRY
    assert out + abi.OPEN_OUT.size == fuse.ReplySize.OPEN
    assert out + abi.ENTRY_OUT_SIZE + abi.OPEN_OUT.size == fuse.ReplySize.CREATE
    assert out + abi.WRITE_OUT.size == fuse.ReplySize.WRITE
    assert out + abi.ENTRY_OUT_SIZE == fuse.CREATE_FH_OFFSET  # fuse_open_out.fh


@pytest.mark.parametrize("name", ["", "a/b", "nul\0"])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="bad file name"):
        fuse.lookup(name)
