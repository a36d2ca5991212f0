"""Wire structures: sizes and layouts fixed by Linux 6.1's fuse.h (7.37)."""

from __future__ import annotations

import struct

import pytest

from pyvirtiofsd.daemon.fuse import abi
from pyvirtiofsd.daemon.fuse.errors import MalformedRequest


def test_sizes_match_the_kernel_header() -> None:
    assert abi.IN_HEADER.size == 40
    assert abi.OUT_HEADER.size == 16
    assert abi.ATTR.size == 88
    assert abi.ENTRY_OUT_SIZE == 128
    assert abi.ATTR_OUT_SIZE == 104
    assert abi.INIT_OUT.size == 64
    assert abi.READ_IN.size == abi.WRITE_IN.size == 40
    assert abi.OPEN_IN.size == 8 and abi.OPEN_OUT.size == 16
    assert abi.RELEASE_IN.size == abi.FLUSH_IN.size == 24
    assert abi.KSTATFS.size == 80
    assert abi.GETATTR_IN.size == 16
    assert abi.FORGET_ONE.size == 16 and abi.BATCH_FORGET_IN.size == 8
    assert abi.DIRENT_NAME_OFFSET == 24


def test_opcodes_and_flags() -> None:
    assert abi.Opcode.LOOKUP == 1 and abi.Opcode.INIT == 26 and abi.Opcode.READDIRPLUS == 44
    assert abi.Opcode.SYNCFS == 50 and abi.Opcode.TMPFILE == 51
    assert abi.InitFlag.MAX_PAGES == 1 << 22 and abi.InitFlag.INIT_EXT == 1 << 30
    assert abi.InitFlag.SECURITY_CTX == 1 << 32
    assert (abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION) == (7, 38)


def test_decode_short_raises_malformed() -> None:
    with pytest.raises(MalformedRequest):
        abi.READ_IN.decode(b"\0" * 39)
    with pytest.raises(MalformedRequest):
        abi.FORGET_ONE.decode(b"\0" * 32, 20)


def test_in_header_roundtrip() -> None:
    raw = struct.pack("<IIQQIIII", 40, 3, 9, 1, 1000, 100, 77, 0)
    hdr = abi.IN_HEADER.decode(raw)
    assert (hdr.len, hdr.opcode, hdr.unique, hdr.nodeid, hdr.uid, hdr.gid, hdr.pid) == (
        40,
        3,
        9,
        1,
        1000,
        100,
        77,
    )
    assert abi.IN_HEADER.encode(hdr) == raw


def test_dirent_encoding_is_aligned() -> None:
    for n in range(0, 20):
        rec = abi.encode_dirent(5, 6, 8, b"x" * n)
        assert len(rec) % 8 == 0 and len(rec) == abi.dirent_size(b"x" * n)
        assert struct.unpack_from("<QQII", rec) == (5, 6, n, 8)


def test_init_in_of_every_age() -> None:
    assert abi.decode_init_in(struct.pack("<II", 7, 5)) == abi.InitIn(7, 5, 0, 0, 0)
    assert abi.decode_init_in(struct.pack("<IIII", 7, 31, 9, 3)) == abi.InitIn(7, 31, 9, 3, 0)
    full = struct.pack("<IIIII44x", 7, 37, 9, 3, 1)
    assert abi.decode_init_in(full) == abi.InitIn(7, 37, 9, 3, 1)
    with pytest.raises(MalformedRequest):
        abi.decode_init_in(b"\7\0\0\0")


def test_init_out_compat_sizes() -> None:
    out = abi.InitOut(7, 37, 0, 0, 0, 0, 4096, 1, 0, 0, 0)
    assert len(abi.encode_init_out(out, 4)) == 8
    assert len(abi.encode_init_out(out, 22)) == 24
    assert len(abi.encode_init_out(out, 37)) == 64
