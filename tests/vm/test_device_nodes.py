"""Device nodes in a real guest: what a root-filesystem build does, under both
policies, and the daemon never opens a node on the host.

One boot, two shares: ``dn`` with the default policy (device nodes refused
with EPERM and a log line naming ``--allow-device-nodes``) and ``dnok``
started with ``--allow-device-nodes``.  On each the guest runs the MAKEDEV
part of a root filesystem build (``mknod`` of null, zero, tty, console,
sda) and extracts, with busybox tar, an archive that holds device nodes,
a FIFO, a symlink, directories and files.  With the option the host gets
the nodes with their numbers, modes and owners; the guest then uses them
(its own drivers: writes to null, reads zero) while an inotify watch on the
host proves the daemon opened none of them.
"""

from __future__ import annotations

import ctypes
import io
import os
import stat
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.shares import Share

#: name -> (type, major, minor, mode) as a root filesystem's /dev has them
NODES = {
    "null": (stat.S_IFCHR, 1, 3, 0o666),
    "zero": (stat.S_IFCHR, 1, 5, 0o666),
    "tty": (stat.S_IFCHR, 5, 0, 0o666),
    "console": (stat.S_IFCHR, 5, 1, 0o600),
    "sda": (stat.S_IFBLK, 8, 0, 0o660),
}
_IN_OPEN = 0x20
_libc = ctypes.CDLL(None, use_errno=True)


def rootfs_tar() -> bytes:
    """A small root filesystem archive: /dev nodes, a FIFO, files, a symlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in ("dev", "etc", "run"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, (kind, major, minor, mode) in NODES.items():
            info = tarfile.TarInfo(f"dev/{name}")
            info.type = tarfile.CHRTYPE if kind == stat.S_IFCHR else tarfile.BLKTYPE
            info.devmajor, info.devminor, info.mode, info.gid = major, minor, mode, 5
            tar.addfile(info)
        info = tarfile.TarInfo("run/initctl")
        info.type, info.mode = tarfile.FIFOTYPE, 0o600
        tar.addfile(info)
        data = b"root:x:0:0:root:/root:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("dev/stdin")
        info.type, info.linkname = tarfile.SYMTYPE, "/proc/self/fd/0"
        tar.addfile(info)
    return buf.getvalue()


MAKEDEV = " && ".join(
    f"mknod -m {mode:o} {{d}}/{name} {'c' if kind == stat.S_IFCHR else 'b'} {major} {minor}"
    for name, (kind, major, minor, mode) in NODES.items()
)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Machine, Path, Path]]:
    base = tmp_path_factory.mktemp("devnodes")
    denied, allowed = base / "dn", base / "dnok"
    denied.mkdir()
    allowed.mkdir()
    shares = [
        Share(denied, "dn", backend="pyvirtiofsd"),
        Share(allowed, "dnok", backend="pyvirtiofsd", daemon_args=("--allow-device-nodes",)),
    ]
    with Machine(MachineConfig(shares=shares), name="devnodes") as vm:
        vm.agent.write_file("/tmp/rootfs.tar", rootfs_tar())
        yield vm, denied, allowed


def daemon_logs(vm: Machine) -> str:
    return "".join(p.read_text(errors="replace") for p in vm.log_dir.glob("*-pyvirtiofsd.log"))


def test_default_refuses_device_nodes_with_eperm_and_names_the_option(
    guest: tuple[Machine, Path, Path],
) -> None:
    vm, denied, _ = guest
    r = vm.agent.run(f"mkdir /mnt/dn/dev && {MAKEDEV.format(d='/mnt/dn/dev')}", timeout=60)
    assert r.status != 0 and b"Operation not permitted" in r.stderr, r
    assert not (denied / "dev/null").exists()
    # a FIFO is no device: allowed
    assert vm.agent.run("mknod /mnt/dn/dev/fifo p", timeout=30).status == 0
    assert stat.S_ISFIFO(os.lstat(denied / "dev/fifo").st_mode)
    r = vm.agent.run("mkdir /mnt/dn/root && tar -xf /tmp/rootfs.tar -C /mnt/dn/root", timeout=60)
    # busybox tar reports each node it could not make (and exits 0) ...
    for name in NODES:
        assert f"can't create node dev/{name}: Operation not permitted".encode() in r.stderr, r
    assert (denied / "root/etc/passwd").read_bytes().startswith(b"root:")  # ... and goes on
    assert stat.S_ISFIFO(os.lstat(denied / "root/run/initctl").st_mode)
    assert not any((denied / "root/dev" / n).exists() for n in NODES)
    log = daemon_logs(vm)
    assert "refused with EPERM" in log and "--allow-device-nodes" in log, log[-2000:]


class _Inotify:
    """IN_OPEN events under one host directory (O_PATH opens raise none)."""

    def __init__(self, path: Path) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0
        assert _libc.inotify_add_watch(self.fd, str(path).encode(), _IN_OPEN) >= 0

    def opened(self) -> list[str]:
        names = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            off = 0
            while off < len(data):
                _, _, _, length = struct.unpack_from("iIII", data, off)
                raw = data[off + 16 : off + 16 + length]
                names.append(raw.rstrip(b"\0").decode())
                off += 16 + length

    def close(self) -> None:
        os.close(self.fd)


def test_allowed_nodes_are_created_and_never_opened_by_the_daemon(
    guest: tuple[Machine, Path, Path],
) -> None:
    vm, _, allowed = guest
    r = vm.agent.run(f"mkdir /mnt/dnok/dev && {MAKEDEV.format(d='/mnt/dnok/dev')}", timeout=60)
    assert r.status == 0, r
    r = vm.agent.run(
        "mkdir /mnt/dnok/root && tar -xf /tmp/rootfs.tar -C /mnt/dnok/root", timeout=60
    )
    assert r.status == 0, r
    for where, gid in ((allowed / "dev", 0), (allowed / "root/dev", 5)):
        for name, (kind, major, minor, mode) in NODES.items():
            st = os.lstat(where / name)
            assert stat.S_IFMT(st.st_mode) == kind, (where, name)
            assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (major, minor), name
            assert stat.S_IMODE(st.st_mode) == mode and (st.st_uid, st.st_gid) == (0, gid), name
    assert os.readlink(allowed / "root/dev/stdin") == "/proc/self/fd/0"
    watch = _Inotify(allowed / "root/dev")
    try:
        d = "/mnt/dnok/root/dev"
        r = vm.agent.run(
            f"echo hi > {d}/null && head -c 4 {d}/zero | od -An -tx1 && ls -l {d} >/dev/null"
            f" && chmod 0600 {d}/tty && chown 1000 {d}/console && touch {d}/sda"
            f" && stat -c '%t:%T' {d}/sda",
            timeout=60,
        )
        assert r.status == 0, r
        assert r.stdout.split() == [b"00", b"00", b"00", b"00", b"8:0"], r
        # the guest's sda (if any) is not the host's: no driver behind 8:0 in this guest
        assert vm.agent.run(f"head -c 1 {d}/sda", timeout=30).status != 0
        opened = [n for n in watch.opened() if n]  # "" is the directory itself
    finally:
        watch.close()
    assert opened == [], f"the daemon opened special files on the host: {opened}"
    assert stat.S_IMODE(os.lstat(allowed / "root/dev/tty").st_mode) == 0o600
    assert os.lstat(allowed / "root/dev/console").st_uid == 1000
