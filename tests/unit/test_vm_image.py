"""Guest image building: cpio writer, kernel fragment checks, share specs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pyvirtiofsd.vm import kernel
from pyvirtiofsd.vm.initramfs import CpioWriter, InitramfsError
from pyvirtiofsd.vm.shares import Share, daemon_argv


def test_cpio_archive_is_read_back_by_cpio(tmp_path: Path) -> None:
    w = CpioWriter()
    w.directory("etc")
    w.file("etc/hello", b"hello\n", 0o640)
    w.symlink("init", "/bin/busybox")
    w.chardev("console", 5, 1)
    archive = w.finish()
    assert len(archive) % 4 == 0
    cpio = shutil.which("cpio")
    assert cpio is not None
    listing = subprocess.run([cpio, "-itv"], input=archive, capture_output=True, check=True)
    text = listing.stdout.decode()
    assert "etc/hello" in text and "init -> /bin/busybox" in text
    assert "crw-------" in text and "-rw-r-----" in text
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run([cpio, "-id", "--quiet", "etc/hello"], input=archive, cwd=out, check=True)
    assert (out / "etc/hello").read_bytes() == b"hello\n"


def test_cpio_refuses_duplicate_paths() -> None:
    w = CpioWriter()
    w.file("a", b"")
    with pytest.raises(InitramfsError, match="duplicate"):
        w.file("a", b"")


def test_fragment_options_and_config_check(tmp_path: Path) -> None:
    opts = kernel.fragment_options()
    assert opts["CONFIG_VIRTIO_FS"] == "y" and opts["CONFIG_64BIT"] == "y"
    cfg = tmp_path / "config"
    cfg.write_text("".join(f"{k}={v}\n" for k, v in opts.items() if v != "n"))
    kernel.check_config(cfg)  # everything present: no error
    lines = [ln for ln in cfg.read_text().splitlines() if not ln.startswith("CONFIG_VIRTIO_FS=")]
    cfg.write_text("\n".join(lines) + "\n")
    with pytest.raises(kernel.KernelBuildError, match="CONFIG_VIRTIO_FS: wanted y, got n"):
        kernel.check_config(cfg)


def test_cache_key_depends_on_fragment_and_patches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    frag = tmp_path / "guest.config"
    frag.write_text("CONFIG_X=y\n")
    patches = tmp_path / "patches"
    patches.mkdir()
    monkeypatch.setattr(kernel, "FRAGMENT", frag)
    monkeypatch.setattr(kernel, "PATCH_DIR", patches)
    monkeypatch.setattr(kernel, "source_version", lambda: "6.1.0-test")
    k1 = kernel.cache_key()
    assert kernel.cache_key() == k1
    frag.write_text("CONFIG_X=y\nCONFIG_Y=y\n")
    k2 = kernel.cache_key()
    assert k2 != k1
    (patches / "0001-a.patch").write_text("diff\n")
    (patches / "series").write_text("# comment\n0001-a.patch\n")
    k3 = kernel.cache_key()
    assert k3 != k2
    (patches / "series").write_text("0002-missing.patch\n")
    with pytest.raises(kernel.KernelBuildError, match="does not exist"):
        kernel.cache_key()


def test_share_parsing_and_validation(tmp_path: Path) -> None:
    s = Share.parse(f"{tmp_path}:data", backend="virtiofsd")
    assert (s.host_dir, s.tag, s.guest_mountpoint) == (tmp_path, "data", "/mnt/data")
    assert Share.parse(str(tmp_path), backend="9p").tag == tmp_path.name
    assert "mount -t virtiofs data /mnt/data" in s.mount_command()
    assert "-t 9p -o trans=virtio" in Share(tmp_path, "n", backend="9p").mount_command()
    with pytest.raises(ValueError, match="backend"):
        Share(tmp_path, "t", backend="nfs")
    with pytest.raises(ValueError, match="tag"):
        Share(tmp_path, "a/b", backend="virtiofsd")
    with pytest.raises(ValueError, match="tag"):
        Share(tmp_path, "x" * 37, backend="virtiofsd")


def test_daemon_command_lines(tmp_path: Path) -> None:
    c = daemon_argv(Share(tmp_path, "t", backend="virtiofsd"), 7)
    assert c[0].endswith("virtiofsd") and "--fd=7" in c and f"source={tmp_path}" in c
    p = daemon_argv(Share(tmp_path, "t", backend="pyvirtiofsd", readonly=True), 9)
    assert p[1:3] == ["-m", "pyvirtiofsd.daemon"]
    assert p[p.index("--fd") + 1] == "9" and "--readonly" in p
