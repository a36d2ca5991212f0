"""Where the daemon benchmark puts its shared directory, and how it names the filesystem."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirtiofsd.bench import daemon
from pyvirtiofsd.bench.daemon import fs_type, share_parent


def test_fs_type_takes_the_longest_mount_point(tmp_path: Path) -> None:
    assert fs_type(Path("/proc/self")) == "proc"  # inside /, the inner mount counts
    assert fs_type(Path("/proc/self/fd")) == "proc"
    assert fs_type(Path("/")) not in ("proc", "unknown")
    assert fs_type(tmp_path) == fs_type(tmp_path.parent)


@pytest.mark.parametrize(("shm_fs", "expect_shm"), [("tmpfs", True), ("ext4", False)])
def test_share_goes_to_a_tmpfs_unless_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shm_fs: str, expect_shm: bool
) -> None:
    monkeypatch.setattr(daemon, "fs_type", lambda path: shm_fs)
    assert share_parent(tmp_path / "x", tmp_path) == tmp_path / "x"  # asked: always that
    assert share_parent(None, tmp_path) == (Path("/dev/shm") if expect_shm else tmp_path)
