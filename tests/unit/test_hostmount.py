"""``pyvirtiofsd mount``: the passthrough through the host kernel's FUSE client."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.daemon.hostmount import is_mounted, mounted

pytestmark = pytest.mark.skipif(
    not (os.path.exists("/dev/fuse") and shutil.which("fusermount3") and os.geteuid() == 0),
    reason="needs /dev/fuse, fusermount3 and root",
)

SETPRIV = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"]


@pytest.fixture
def dirs() -> Iterator[tuple[Path, Path]]:
    """(share, mountpoint) under a world-traversable directory (pytest's tmp is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="hostmount-"))
    try:
        base.chmod(0o755)
        share, mnt = base / "share", base / "mnt"
        share.mkdir(mode=0o777)
        share.chmod(0o777)
        mnt.mkdir()
        yield share, mnt
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(base)


def as_user(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SETPRIV, *cmd], capture_output=True, text=True, check=False)


def test_basic_io_reaches_the_share(dirs: tuple[Path, Path]) -> None:
    share, mnt = dirs
    with mounted(share, mnt) as proc:
        assert is_mounted(mnt)
        (mnt / "f").write_bytes(b"hello world")
        assert (share / "f").read_bytes() == b"hello world"
        assert (mnt / "f").read_bytes() == b"hello world"
        fd = os.open(mnt / "f", os.O_RDWR)
        try:
            assert os.pwrite(fd, b"W", 6) == 1
            assert os.pread(fd, 100, 0) == b"hello World"
        finally:
            os.close(fd)
        (mnt / "d").mkdir()
        (mnt / "f").rename(mnt / "d" / "g")
        assert sorted(os.listdir(mnt)) == ["d"]
        assert (share / "d" / "g").read_bytes() == b"hello World"
        os.link(mnt / "d" / "g", mnt / "h")
        assert os.stat(mnt / "h").st_nlink == 2
        assert os.stat(mnt / "h").st_ino == os.stat(mnt / "d" / "g").st_ino
        os.truncate(mnt / "h", 5)
        assert (share / "d" / "g").read_bytes() == b"hello"
        os.utime(mnt / "h", ns=(1_000_000_001, 2_000_000_002))
        assert os.stat(share / "h").st_mtime_ns == 2_000_000_002
        # Open, unlink, keep using the file through the fd.
        fd = os.open(mnt / "h", os.O_RDWR)
        try:
            os.unlink(mnt / "h")
            os.unlink(mnt / "d" / "g")
            assert os.pwrite(fd, b"!", 5) == 1
            assert os.pread(fd, 10, 0) == b"hello!"
        finally:
            os.close(fd)
        assert os.listdir(share / "d") == []
        assert proc.poll() is None
    assert proc.returncode == 0
    assert not is_mounted(mnt)


def test_symlinks_are_resolved_by_the_client_never_followed_by_the_server(
    dirs: tuple[Path, Path],
) -> None:
    share, _ = dirs
    # Next to the share, not next to the mountpoint: a server that followed
    # "../share-outside" on its side would reach it.
    mnt = share.parent / "deeper" / "mnt"
    mnt.mkdir(parents=True)
    outside = share.parent / "share-outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (share / "esc").symlink_to("../share-outside")
    with mounted(share, mnt):
        st = os.lstat(mnt / "esc")
        assert stat.S_ISLNK(st.st_mode)
        assert os.readlink(mnt / "esc") == "../share-outside"
        # The host kernel resolves the target next to the *mountpoint*.
        with pytest.raises(FileNotFoundError):
            (mnt / "esc" / "secret").read_text()
        with pytest.raises(OSError) as exc:
            os.open(mnt / "esc", os.O_RDONLY | os.O_NOFOLLOW)
        assert exc.value.errno == errno.ELOOP
        os.symlink("/etc/passwd", mnt / "abs")
        assert os.readlink(share / "abs") == "/etc/passwd"
        assert stat.S_ISLNK(os.lstat(share / "abs").st_mode)


def test_default_permissions_and_caller_credentials(dirs: tuple[Path, Path]) -> None:
    share, mnt = dirs
    with mounted(share, mnt):
        (mnt / "private").write_text("root only")
        os.chmod(mnt / "private", 0o600)
        (mnt / "public").write_text("everyone reads")
        os.chmod(mnt / "public", 0o644)

        r = as_user("cat", str(mnt / "private"))
        assert r.returncode != 0 and "Permission denied" in r.stderr
        r = as_user("cat", str(mnt / "public"))
        assert r.returncode == 0 and r.stdout == "everyone reads"
        r = as_user("sh", "-c", f"echo x >> {mnt / 'public'}")
        assert r.returncode != 0 and "Permission denied" in r.stderr
        # Created through the mount by uid 1000: owned by 1000 on the host.
        r = as_user("sh", "-c", f"umask 022 && echo mine > {mnt / 'mine'} && mkdir {mnt / 'sub'}")
        assert r.returncode == 0, r.stderr
        st = os.stat(share / "mine")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o644)
        assert os.stat(share / "sub").st_uid == 1000
        r = as_user("chmod", "777", str(mnt / "public"))
        assert r.returncode != 0
        r = as_user("rm", "-f", str(mnt / "private"))  # the share is 0777: allowed
        assert r.returncode == 0, r.stderr
        assert not (share / "private").exists()
    assert (share / "public").read_text() == "everyone reads"


def test_readonly_refuses_changes(dirs: tuple[Path, Path]) -> None:
    share, mnt = dirs
    (share / "f").write_text("keep")
    with mounted(share, mnt, "--readonly"):
        assert (mnt / "f").read_text() == "keep"
        for action in (
            lambda: (mnt / "f").write_text("x"),
            lambda: (mnt / "g").write_text("x"),
            lambda: os.unlink(mnt / "f"),
            lambda: os.mkdir(mnt / "d"),
            lambda: os.chmod(mnt / "f", 0o600),
        ):
            with pytest.raises(OSError) as exc:
                action()
            assert exc.value.errno == errno.EROFS
    assert (share / "f").read_text() == "keep"
    assert sorted(os.listdir(share)) == ["f"]


def test_xattrs_only_with_the_option(dirs: tuple[Path, Path]) -> None:
    share, mnt = dirs
    (share / "f").write_text("")
    with mounted(share, mnt):
        with pytest.raises(OSError) as exc:
            os.setxattr(mnt / "f", "user.k", b"v")
        assert exc.value.errno == errno.EOPNOTSUPP
    with mounted(share, mnt, "--xattr"):
        os.setxattr(mnt / "f", "user.k", b"v")
        assert os.getxattr(share / "f", "user.k") == b"v"
        assert "user.k" in os.listxattr(mnt / "f")
        with pytest.raises(FileExistsError):
            os.setxattr(mnt / "f", "user.k", b"w", os.XATTR_CREATE)
        with pytest.raises(OSError) as exc:
            os.setxattr(mnt / "f", "user.none", b"w", os.XATTR_REPLACE)
        assert exc.value.errno == errno.ENODATA
        os.removexattr(mnt / "f", "user.k")
        assert "user.k" not in os.listxattr(share / "f")


def test_sigterm_unmounts_and_exits(dirs: tuple[Path, Path]) -> None:
    share, mnt = dirs
    with mounted(share, mnt) as proc:
        (mnt / "f").write_text("x")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not is_mounted(mnt)
    assert (share / "f").read_text() == "x"


def test_background_mode_returns_once_mounted(dirs: tuple[Path, Path]) -> None:
    share, mnt = dirs
    # The daemon inherits the write end of this pipe: EOF means it has exited.
    rfd, wfd = os.pipe()
    try:
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "pyvirtiofsd.daemon",
                "mount",
                "--shared-dir",
                str(share),
                str(mnt),
            ],
            pass_fds=(wfd,),
            capture_output=True,
            check=False,
            timeout=60,
        )
        os.close(wfd)
        wfd = -1
        assert r.returncode == 0, r.stderr
        assert is_mounted(mnt)
        (mnt / "f").write_text("bg")
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        with os.fdopen(rfd, "rb") as gone:
            rfd = -1
            assert gone.read() == b""
        assert not is_mounted(mnt)
        assert (share / "f").read_text() == "bg"
    finally:
        for fd in (rfd, wfd):
            if fd >= 0:
                os.close(fd)


def test_bad_share_fails_without_mounting(dirs: tuple[Path, Path]) -> None:
    share, mnt = dirs
    with pytest.raises(RuntimeError, match="not a directory"), mounted(share / "missing", mnt):
        pass
    assert not is_mounted(mnt)
