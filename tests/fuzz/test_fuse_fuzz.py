"""Fuzzing FUSE decode and dispatch against a temporary share (hypothesis).

Each example is a fresh share beside an ``outside/`` directory and a
sequence of requests (random opcodes, node ids, credentials, reply room;
bodies either random bytes, mutated seeds from ``corpus/`` or structured
bodies with hostile names).  Invariants, whatever the input:

* ``FuseSession.handle`` never raises and never writes past the reply room;
* a reply's header says its own length, echoes the request's unique and
  carries 0 or a negative errno;
* nothing outside the share changes (names, contents, modes, xattrs);
* once the filesystem is closed, no fd it opened is left.

``make test`` runs a short budget (``PYVIRTIOFSD_FUZZ_EXAMPLES``, default
150); ``make fuzz`` a long one.  The corpus (``corpus/*.bin``, raw requests)
is replayed by every run and seeds the mutations.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtiofsd.daemon.fuse.session import FuseSession
from pyvirtiofsd.daemon.passthrough import PassthroughFs
from tests.support.fakechain import (
    IN_HEADER,
    OUT_HEADER,
    SETLK,
    SETLKW,
    FakeChain,
    init_body,
    request,
)

CORPUS = Path(__file__).parent / "corpus"
EXAMPLES = int(os.environ.get("PYVIRTIOFSD_FUZZ_EXAMPLES", "150"))
OPCODES = [*range(1, 53), 4096, 0xFFFF_FFFF]
HOSTILE_NAMES = [
    b"..", b".", b"", b"/", b"../outside", b"../outside/new", b"../outside/secret",
    b"a/b", b"x\0y", b"outside", b"hello.txt", b"sub", b"link", b"n" * 256, b"new",
    b"\xff\xfe",
]  # fmt: skip


def seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted(CORPUS.glob("*.bin"))]


def make_tree(top: Path) -> tuple[Path, Path]:
    share, outside = top / "share", top / "outside"
    share.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"host only\n")
    os.setxattr(outside / "secret", "user.host", b"1")
    (share / "hello.txt").write_bytes(b"hello world\n")
    (share / "sub").mkdir()
    (share / "sub" / "f").write_bytes(b"f" * 100)
    os.symlink("../outside/secret", share / "link")
    os.symlink("/", share / "abs")
    return share, outside


def snapshot(d: Path) -> list[tuple[str, int, bytes, list[str]]]:
    out = []
    for p in sorted(d.rglob("*")):
        st_ = p.lstat()
        data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
        out.append((str(p), st_.st_mode, data, sorted(os.listxattr(p, follow_symlinks=False))))
    return out


def fd_set() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in flips:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


names = st.sampled_from(HOSTILE_NAMES) | st.binary(max_size=40)
nodeids = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 1 << 63, 0xFFFF_FFFF_FFFF_FFFF])
structured_body = st.one_of(
    names.map(lambda n: n + b"\0"),  # LOOKUP/UNLINK/MKDIR-like
    st.tuples(st.integers(0, 0xFFFF_FFFF), st.integers(0, 0xFFFF_FFFF), names).map(
        lambda t: struct.pack("<II", t[0], t[1]) + t[2] + b"\0"
    ),
    st.tuples(st.integers(0, 1 << 64 - 1), names, names).map(
        lambda t: struct.pack("<Q", t[0]) + t[1] + b"\0" + t[2] + b"\0"
    ),
    st.tuples(st.integers(0, 0xFFFF), st.integers(-(1 << 63), (1 << 63) - 1)).map(
        lambda t: struct.pack("<QqII", t[0], t[1], 4096, 0) + bytes(24)
    ),
)


@st.composite
def fuse_request(draw: st.DrawFn, seed_list: list[bytes]) -> tuple[bytes, int]:
    kind = draw(st.sampled_from(["structured", "random", "seed"]))
    if kind == "seed" and seed_list:
        raw = flip(draw(st.sampled_from(seed_list)),
                   draw(st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)),
                                 max_size=4)))  # fmt: skip
    else:
        body = draw(structured_body if kind == "structured" else st.binary(max_size=300))
        raw = request(
            draw(st.sampled_from(OPCODES)),
            draw(nodeids),
            body,
            unique=draw(st.integers(0, 1 << 64 - 1)),
            uid=draw(st.sampled_from([0, 1000, 0xFFFF_FFFF])),
            gid=draw(st.sampled_from([0, 1000])),
        )
        if draw(st.booleans()) and len(raw) >= 4:  # lie about the length sometimes
            raw = struct.pack("<I", draw(st.integers(0, 0xFFFF_FFFF))) + raw[4:]
    room = draw(st.sampled_from([0, 15, 16, 120, 4096, 1 << 17]))
    return raw, room


def no_blocking_wait(raw: bytes) -> bytes:
    """SETLKW waits (on this thread) until the lock is free, which a
    conflicting owner in the same sequence would make forever: use SETLK."""
    if len(raw) >= 8 and struct.unpack_from("<I", raw, 4)[0] == SETLKW:
        return raw[:4] + struct.pack("<I", SETLK) + raw[8:]
    return raw


def check_reply(raw: bytes, chain: FakeChain, used: int) -> None:
    assert 0 <= used <= chain.writable_len
    assert chain.high_water <= chain.writable_len
    if used == 0:
        return
    length, error, unique = OUT_HEADER.unpack_from(chain.writable)
    assert length == used
    if len(raw) >= IN_HEADER.size:
        assert unique == IN_HEADER.unpack_from(raw)[2]
    assert -4095 <= error <= 0


def run_sequence(requests: list[tuple[bytes, int]], do_init: bool) -> None:
    before_fds = fd_set()
    with tempfile.TemporaryDirectory(prefix="fuzz-") as top:
        share, outside = make_tree(Path(top))
        outside_before = snapshot(outside)
        fs = PassthroughFs(share, xattr=True, posix_locks=True, flock=True)
        session = FuseSession(fs)
        try:
            if do_init:
                chain = FakeChain(request(26, 0, init_body()), 4096)
                check_reply(chain.read(), chain, session.handle(chain))
            for raw, room in requests:
                raw = no_blocking_wait(raw)
                chain = FakeChain(raw, room)
                check_reply(raw, chain, session.handle(chain))
        finally:
            fs.close()
        assert snapshot(outside) == outside_before
    leaked = fd_set() - before_fds
    assert not leaked, leaked


SEEDS = seeds()


def test_corpus_replays_cleanly() -> None:
    assert SEEDS, "the kept corpus is empty"
    run_sequence([(s, 4096) for s in SEEDS], do_init=True)  # each seed in order
    run_sequence([(s, 16) for s in SEEDS], do_init=False)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(fuse_request(SEEDS), min_size=1, max_size=12), st.booleans())
def test_fuse_dispatch_survives_anything(requests: list[tuple[bytes, int]], do_init: bool) -> None:
    run_sequence(requests, do_init)
