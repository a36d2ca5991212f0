"""READDIR streams from the directory fd: bounded memory, capped handles, stable offsets."""

from __future__ import annotations

import errno
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.daemon.fuse.session import FuseSession
from pyvirtiofsd.daemon.passthrough import PassthroughFs
from pyvirtiofsd.daemon.passthrough.inodes import DirHandle
from tests.support.fakechain import (
    DESTROY,
    OPENDIR,
    READDIR,
    READDIRPLUS,
    RELEASEDIR,
    Dirent,
    FuseClient,
    open_fds,
    parse_dirents,
    read_body,
    release_body,
)

BIG = 5000


@pytest.fixture(scope="module")
def big_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readdir") / "share"
    (root / "big").mkdir(parents=True)
    for i in range(BIG):
        (root / "big" / f"entry-{i:05d}-{'x' * (i % 40)}").touch()
    (root / "small").mkdir()
    for name in ("a", "b", "c"):
        (root / "small" / name).touch()
    return root


def make_client(root: Path, **kw: object) -> FuseClient:
    client = FuseClient(FuseSession(PassthroughFs(root, **kw)))  # type: ignore[arg-type]
    client.init()
    return client


@pytest.fixture
def client(big_root: Path) -> Iterator[FuseClient]:
    c = make_client(big_root)
    yield c
    c.session.close()


def page(client: FuseClient, nodeid: int, fh: int, offset: int, size: int = 4096) -> list[Dirent]:
    reply = client.call(READDIR, nodeid, read_body(fh, offset, size))
    assert reply.ok, reply.error
    return parse_dirents(reply.payload)


def listing(path: Path) -> set[bytes]:
    return {os.fsencode(n) for n in os.listdir(path)} | {b".", b".."}


def test_open_handles_do_not_copy_the_directory(client: FuseClient) -> None:
    """Fifty handles half way through a 5,000-entry directory cost almost nothing."""
    big = client.lookup(1, b"big")
    handles = [client.opendir(big.nodeid) for _ in range(50)]
    client.last_chain = None
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for fh in handles:
            offset = 0
            for _ in range(3):
                offset = page(client, big.nodeid, fh, offset)[-1].off
        client.last_chain = None  # the fake chain's own buffers are not the daemon's
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # A snapshot of the directory per handle was ~0.5 MiB each here.
    assert grown < 256 * 1024, f"{grown} bytes kept for 50 open handles"


def test_every_entry_once_and_rewind(client: FuseClient, big_root: Path) -> None:
    big = client.lookup(1, b"big")
    fh = client.opendir(big.nodeid)
    for size in (4096, 300, 1 << 16):
        names: list[bytes] = []
        offset = 0
        while batch := page(client, big.nodeid, fh, offset, size):
            names += [d.name for d in batch]
            offset = batch[-1].off
        assert len(names) == len(set(names)) == BIG + 2
        assert set(names) == listing(big_root / "big")


def test_offsets_resume_anywhere_and_per_handle(client: FuseClient) -> None:
    """The guest backs up within a reply (its buffer filled) and seekdir()s to old cookies."""
    big = client.lookup(1, b"big")
    fh = client.opendir(big.nodeid)
    pages = []
    offset = 0
    while batch := page(client, big.nodeid, fh, offset):
        pages.append(batch)
        offset = batch[-1].off
    entries = [d for p in pages for d in p]
    assert len({d.off for d in entries}) == len(entries), "offsets are distinct"
    other = client.opendir(big.nodeid)
    for i in (0, 1, 7, len(entries) // 2, len(entries) - 2):
        # resuming after entry i gives exactly the entries that followed it
        got = page(client, big.nodeid, other, entries[i].off)
        assert [d.name for d in got] == [d.name for d in entries[i + 1 : i + 1 + len(got)]]
        # ... and did not move the first handle's position
        assert [d.name for d in page(client, big.nodeid, fh, 0)] == [d.name for d in pages[0]]
    assert page(client, big.nodeid, fh, entries[-1].off) == []


def test_dot_dot_of_the_root_is_the_root(client: FuseClient, big_root: Path) -> None:
    fh = client.opendir(1)
    ents = {d.name: d for d in page(client, 1, fh, 0)}
    assert ents[b".."].ino == ents[b"."].ino == os.stat(big_root).st_ino
    small = client.lookup(1, b"small")
    fh = client.opendir(small.nodeid)
    ents = {d.name: d for d in page(client, small.nodeid, fh, 0)}
    assert ents[b".."].ino == os.stat(big_root).st_ino  # a real parent inside the share


def test_readdirplus_streams_with_lookups(client: FuseClient, big_root: Path) -> None:
    big = client.lookup(1, b"big")
    fh = client.opendir(big.nodeid)
    seen: list[bytes] = []
    offset = 0
    while True:
        reply = client.call(READDIRPLUS, big.nodeid, read_body(fh, offset, 4096))
        assert reply.ok
        batch = parse_dirents(reply.payload, plus=True)
        if not batch:
            break
        seen += [d.name for d in batch]
        offset = batch[-1].off
    assert len(seen) == len(set(seen)) and set(seen) == listing(big_root / "big")
    assert len(client.session.fs.inodes) == 2 + BIG  # root, big, its entries


def test_open_directories_are_capped(big_root: Path) -> None:
    client = make_client(big_root, max_dir_handles=8)
    try:
        baseline = open_fds()
        fhs = [client.opendir(1) for _ in range(8)]
        refused = client.call(OPENDIR, 1, b"\0" * 8)
        assert refused.error == -errno.EMFILE
        assert open_fds() == baseline + 8, "a refused OPENDIR opens nothing"
        assert client.call(RELEASEDIR, 1, release_body(fhs.pop())).ok
        fhs.append(client.opendir(1))
        assert client.call(OPENDIR, 1, b"\0" * 8).error == -errno.EMFILE
        assert client.session.fs.open_dir_handles == 8
        assert client.call(DESTROY, 0).ok
        assert client.session.fs.open_dir_handles == 0 and open_fds() == baseline
        client.init()
        fhs = [client.opendir(1) for _ in range(8)]
        assert client.call(OPENDIR, 1, b"\0" * 8).error == -errno.EMFILE
    finally:
        client.session.close()


def test_a_borrowed_directory_counts_until_its_fd_closes(big_root: Path) -> None:
    client = make_client(big_root, max_dir_handles=1)
    try:
        fh = client.opendir(1)
        fs = client.session.fs
        with fs.handles.borrow(fh, DirHandle):  # a request in flight
            assert client.call(RELEASEDIR, 1, release_body(fh)).ok
            assert client.call(OPENDIR, 1, b"\0" * 8).error == -errno.EMFILE
        assert fs.open_dir_handles == 0
        client.opendir(1)
    finally:
        client.session.close()


def test_offsets_the_host_never_gave(client: FuseClient, caplog: pytest.LogCaptureFixture) -> None:
    """A hostile guest's offsets: an errno or an ordinary reply, never a crash."""
    big = client.lookup(1, b"big")
    fh = client.opendir(big.nodeid)
    for offset in (1, 12345, (1 << 63) - 1):
        assert client.call(READDIR, big.nodeid, read_body(fh, offset, 4096)).error in (
            0,
            -errno.EINVAL,
        )
    for offset in (1 << 63, (1 << 64) - 1):
        reply = client.call(READDIRPLUS, big.nodeid, read_body(fh, offset, 4096))
        assert reply.error == -errno.EINVAL
    assert "internal error" not in caplog.text
