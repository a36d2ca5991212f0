"""The inode and handle tables: dedup, exact counts, borrow-before-close, threads."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.daemon.fuse.session import FuseSession
from pyvirtiofsd.daemon.passthrough import PassthroughFs
from pyvirtiofsd.daemon.passthrough.inodes import FileHandle, HandleTable
from tests.support.fakechain import FuseClient, build_tree, open_fds


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[PassthroughFs]:
    build_tree(tmp_path, many=False)
    fs = PassthroughFs(tmp_path)
    yield fs
    fs.close()


def test_root_is_inode_one_and_never_freed(fs: PassthroughFs) -> None:
    assert fs.inodes.root.nodeid == 1
    fs.forget(1, 1 << 40)
    with fs.inodes.borrow(1) as root:
        os.fstat(root.fd)
    fs.destroy()
    assert len(fs.inodes) == 1


def test_close_releases_every_fd(tmp_path: Path) -> None:
    build_tree(tmp_path, many=False)
    baseline = open_fds()
    fs = PassthroughFs(tmp_path)
    fs.lookup(1, b"sub")
    fs.opendir(1, 0)
    fs.close()
    assert open_fds() == baseline


def test_missing_root_raises_without_leaking(tmp_path: Path) -> None:
    baseline = open_fds()
    with pytest.raises(FileNotFoundError):
        PassthroughFs(tmp_path / "absent")
    assert open_fds() == baseline


def test_handle_table_release_while_borrowed(tmp_path: Path) -> None:
    table = HandleTable()
    fd = os.open(tmp_path, os.O_RDONLY)
    fh = table.add(FileHandle(fd, 1))
    with table.borrow(fh, FileHandle) as handle:
        table.release(fh)
        os.fstat(handle.fd)  # still valid for the borrower
        with pytest.raises(OSError), table.borrow(fh, FileHandle):
            pass
    with pytest.raises(OSError):
        os.fstat(fd)
    table.release(fh)  # double release is harmless


def test_concurrent_lookups_and_forgets_keep_exact_counts(fs: PassthroughFs) -> None:
    client = FuseClient(FuseSession(fs))
    client.init()
    baseline = open_fds()
    rounds, threads = 200, 8
    names = [b"hello.txt", b"sub", b"big.bin", b"empty"]
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            barrier.wait()
            for i in range(rounds):
                name = names[(i + k) % len(names)]
                entry = fs.lookup(1, name)
                fs.getattr(entry.nodeid)
                if i % 2:
                    fs.forget(entry.nodeid, 1)
                else:
                    fs.batch_forget([(entry.nodeid, 1)])
        except BaseException as exc:  # re-raised below, in the test thread
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors
    assert len(fs.inodes) == 1
    assert open_fds() == baseline


def test_concurrent_lookups_share_one_node(fs: PassthroughFs) -> None:
    threads = 8
    barrier = threading.Barrier(threads)
    ids: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        for _ in range(50):
            nodeid = fs.lookup(1, b"hello.txt").nodeid
            with lock:
                ids.append(nodeid)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert len(set(ids)) == 1
    assert fs.inodes.nlookup(ids[0]) == threads * 50
    assert len(fs.inodes) == 2
