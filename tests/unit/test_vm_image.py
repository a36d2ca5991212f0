"""Guest image building: cpio writer, kernel fragment checks, share specs."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from pyvirtiofsd.vm import debian, kernel, swiotlb
from pyvirtiofsd.vm.initramfs import UEVENT_WAIT_SOURCE, CpioWriter, InitramfsError, build_agent
from pyvirtiofsd.vm.shares import Share, daemon_argv, vhost_user_device


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


@pytest.mark.parametrize("version", kernel.KERNEL_VERSIONS)
def test_fragment_options_and_config_check(tmp_path: Path, version: str) -> None:
    src = kernel.kernel_source(version)
    opts = kernel.fragment_options(src)
    assert opts["CONFIG_VIRTIO_FS"] == "y" and opts["CONFIG_64BIT"] == "y"
    assert opts["CONFIG_VIRTIO_PCI_SWIOTLB"] == "y"
    cfg = tmp_path / "config"
    cfg.write_text("".join(f"{k}={v}\n" for k, v in opts.items() if v != "n"))
    kernel.check_config(src, cfg)  # everything present: no error
    lines = [ln for ln in cfg.read_text().splitlines() if not ln.startswith("CONFIG_VIRTIO_FS=")]
    cfg.write_text("\n".join(lines) + "\n")
    with pytest.raises(kernel.KernelBuildError, match="CONFIG_VIRTIO_FS: wanted y, got n"):
        kernel.check_config(src, cfg)


def test_each_version_has_its_own_config_dir_and_patch_series() -> None:
    dirs = {v: kernel.kernel_source(v).config_dir for v in kernel.KERNEL_VERSIONS}
    assert len(set(dirs.values())) == len(dirs)
    for v, d in dirs.items():
        src = kernel.kernel_source(v)
        assert d.name == v and src.package == f"linux-source-{v}"
        assert src.fragment.is_file()
        names = [p.name for p in kernel.patch_series(src)]
        assert len(names) == 4 and names[0].startswith("0001-swiotlb-"), (v, names)
        assert all(p.path.parent == src.patch_dir for p in kernel.patch_series(src))
    assert kernel.DEFAULT_KERNEL_VERSION in kernel.KERNEL_VERSIONS
    with pytest.raises(kernel.KernelBuildError, match="unknown guest kernel version"):
        kernel.kernel_source("5.10")


def _fake_source(tmp_path: Path, name: str) -> kernel.KernelSource:
    d = tmp_path / name
    (d / "patches").mkdir(parents=True)
    (d / "guest.config").write_text("CONFIG_X=y\n")
    return kernel.KernelSource("6.1", d)


def test_cache_key_depends_on_fragment_and_patches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel, "source_version", lambda src: "6.1.0-test")
    src = _fake_source(tmp_path, "a")
    frag, patches = src.fragment, src.patch_dir
    k1 = kernel.cache_key(src)
    assert kernel.cache_key(src) == k1
    frag.write_text("CONFIG_X=y\nCONFIG_Y=y\n")
    k2 = kernel.cache_key(src)
    assert k2 != k1
    (patches / "0001-a.patch").write_text("diff\n")
    (patches / "series").write_text("# comment\n0001-a.patch\n")
    k3 = kernel.cache_key(src)
    assert k3 != k2
    (patches / "series").write_text("0002-missing.patch\n")
    with pytest.raises(kernel.KernelBuildError, match="does not exist"):
        kernel.cache_key(src)


def test_cache_key_hashes_contents_not_paths_and_tells_versions_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    versions = {"6.1": "6.1.158-1", "6.12": "6.12.117-1~deb12u1"}
    monkeypatch.setattr(kernel, "source_version", lambda src: versions[src.version])
    a, b = _fake_source(tmp_path, "a"), _fake_source(tmp_path, "moved/elsewhere")
    # Moving the same files elsewhere keeps a built kernel's key (and cache entry).
    assert kernel.cache_key(a) == kernel.cache_key(b)
    # The same files for another source package are another kernel.
    assert kernel.cache_key(kernel.KernelSource("6.12", a.config_dir)) != kernel.cache_key(a)


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


def test_request_queues_default_to_the_vcpu_count(tmp_path: Path) -> None:
    s = Share(tmp_path, "q", backend="pyvirtiofsd")
    assert s.num_request_queues is None
    assert vhost_user_device(s, "fs0", tmp_path / "s", cpus=4).num_request_queues == 4
    assert vhost_user_device(s, "fs0", tmp_path / "s").num_request_queues == 1
    pinned = Share(tmp_path, "q", backend="pyvirtiofsd", num_request_queues=1)
    assert vhost_user_device(pinned, "fs0", tmp_path / "s", cpus=4).num_request_queues == 1
    c_daemon = Share(tmp_path, "q", backend="virtiofsd")  # QEMU 7.2's: one request queue
    assert vhost_user_device(c_daemon, "fs0", tmp_path / "s", cpus=4).num_request_queues == 1
    args = vhost_user_device(s, "f", tmp_path / "s", 4).device_args()
    assert args.endswith(",num-request-queues=4")


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_uevent_wait_listens_then_tries_and_times_out_without_the_event(tmp_path: Path) -> None:
    prog = build_agent(tmp_path, UEVENT_WAIT_SOURCE)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(prog), *args], capture_output=True, text=True, timeout=30)

    marker = tmp_path / "tries"
    count = f"echo x >> {marker}"
    # Succeeds at once: one try, no waiting.
    assert run("-t", "5", "ACTION=add", "--", "sh", "-c", f"{count}; true").returncode == 0
    assert marker.read_text() == "x\n"
    # Fails and the event never comes: exit 124 after the timeout, tried once.
    marker.unlink()
    r = run("-t", "0.2", "ACTION=add", "TAG=pva-never", "--", "sh", "-c", f"{count}; false")
    assert r.returncode == 124, r.stderr
    assert "no uevent with ACTION=add TAG=pva-never within 0.2 s" in r.stderr
    assert marker.read_text() == "x\n"
    assert run("ACTION=add").returncode == 2  # no command
    assert run("NOEQUALS", "--", "true").returncode == 2


def test_guest_commands_quote_tags_and_paths(tmp_path: Path) -> None:
    s = Share(tmp_path, "it's a;tag", backend="pyvirtiofsd")
    mkdir, mount = (shlex.split(part) for part in s.mount_command().split(" && "))
    assert mkdir == ["mkdir", "-p", "/mnt/it's a;tag"]
    assert mount == ["mount", "-t", "virtiofs", "it's a;tag", "/mnt/it's a;tag"]
    nine = Share(tmp_path, "$(reboot)", backend="9p").mount_command()
    assert shlex.split(nine.split(" && ")[1])[-2:] == ["$(reboot)", "/mnt/$(reboot)"]
    bind = shlex.split(debian.bind_share_script("a b").split(" && ")[1])
    assert bind == ["mount", "--bind", "/mnt/a b", "/debian/mnt/a b"]
    cmd = swiotlb.assignment_command("0000:00:08.0 0x1 2'; reboot -f; '")
    assert shlex.split(cmd)[:3] == ["printf", "%s\\n", "0000:00:08.0 0x1 2'; reboot -f; '"]


def test_every_harness_error_has_one_root() -> None:
    from pyvirtiofsd.vm.agent import AgentError, GuestCommandError
    from pyvirtiofsd.vm.errors import VmError
    from pyvirtiofsd.vm.machine import MachineError

    for cls in (kernel.KernelBuildError, InitramfsError, debian.DebianBuildError, AgentError,
                GuestCommandError, MachineError, swiotlb.SwiotlbError):  # fmt: skip
        assert issubclass(cls, VmError), cls


def test_series_patch_is_skipped_where_the_source_already_has_the_fix(tmp_path: Path) -> None:
    src = _fake_source(tmp_path, "fake")
    src.patch_dir.mkdir(parents=True, exist_ok=True)
    (src.patch_dir / "0001-a.patch").write_text("")
    (src.patch_dir / "0002-b.patch").write_text("")
    (src.patch_dir / "series").write_text(
        "0001-a.patch\n0002-b.patch unless fs/fuse/virtio_fs.c:verify_response  # upstream\n"
    )
    a, b = kernel.patch_series(src)
    tree = tmp_path / "tree"
    (tree / "fs/fuse").mkdir(parents=True)
    (tree / "fs/fuse/virtio_fs.c").write_text("static int other(void);\n")
    assert not a.superseded_in(tree) and not b.superseded_in(tree)
    (tree / "fs/fuse/virtio_fs.c").write_text("static bool verify_response(void);\n")
    assert not a.superseded_in(tree) and b.superseded_in(tree)
    (src.patch_dir / "series").write_text("0002-b.patch if fs/fuse/virtio_fs.c:x\n")
    with pytest.raises(kernel.KernelBuildError, match="expected 'NAME' or 'NAME unless"):
        kernel.patch_series(src)
