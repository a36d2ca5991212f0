"""Shares offered to the guest and the device backends that serve them.

A share is a host directory with a tag, served by one of:

- ``pyvirtiofsd`` — this project's device (vhost-user-fs);
- ``virtiofsd`` — the reference C daemon shipped with QEMU 7.2
  (``/usr/lib/qemu/virtiofsd``);
- ``rust-virtiofsd`` — the Rust virtiofsd 1.13 of Debian 13, run from a
  cached trixie root (:mod:`pyvirtiofsd.bench.peers`; built on first use);
- ``9p`` — QEMU's built-in virtio-9p, the baseline peer.

The harness creates each vhost-user listening socket itself and hands the
bound fd to the backend (``--fd``), so QEMU can connect the moment it starts:
no waiting for a socket file, no race.
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from .process import ChildProcess
from .qemu import NinePShare, VhostUserFsDevice

C_VIRTIOFSD = Path(os.environ.get("PYVIRTIOFSD_C_VIRTIOFSD", "/usr/lib/qemu/virtiofsd"))
BACKENDS = ("pyvirtiofsd", "virtiofsd", "rust-virtiofsd", "9p")
#: Request queues a backend can serve, where it is fewer than a guest may use.
BACKEND_MAX_REQUEST_QUEUES = {"virtiofsd": 1}
#: The backend shares use unless told otherwise.
DEFAULT_BACKEND = os.environ.get("PYVIRTIOFSD_BACKEND", "pyvirtiofsd")


@dataclass(frozen=True)
class Share:
    """One host directory offered to the guest."""

    host_dir: Path
    tag: str
    backend: str = DEFAULT_BACKEND
    iommu_platform: bool = False
    num_request_queues: int | None = None  # None: one per guest vCPU
    queue_size: int = 1024
    addr: int | None = None
    readonly: bool = False
    daemon_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose from {', '.join(BACKENDS)}")
        if not self.tag or len(self.tag.encode()) > 36 or "/" in self.tag or "," in self.tag:
            raise ValueError(f"bad share tag {self.tag!r} (1-36 bytes, no '/' or ',')")

    @property
    def guest_mountpoint(self) -> str:
        return f"/mnt/{self.tag}"

    def mount_command(self) -> str:
        """The guest shell command mounting the share (tag and path quoted)."""
        mp, tag = shlex.quote(self.guest_mountpoint), shlex.quote(self.tag)
        if self.backend == "9p":
            opts = "trans=virtio,version=9p2000.L,msize=262144,cache=none"
            return f"mkdir -p {mp} && mount -t 9p -o {opts} {tag} {mp}"
        ro = " -o ro" if self.readonly else ""
        return f"mkdir -p {mp} && mount -t virtiofs{ro} {tag} {mp}"

    @staticmethod
    def parse(text: str, **kwargs: object) -> Share:
        """Parse the CLI form ``HOST_DIR[:TAG]`` (tag defaults to the dir's name)."""
        path, _, tag = text.partition(":")
        p = Path(path).resolve()
        return Share(host_dir=p, tag=tag or p.name or "share", **kwargs)  # type: ignore[arg-type]


def daemon_argv(share: Share, fd: int) -> list[str]:
    """The backend's command line, given the inherited listening socket ``fd``."""
    if share.backend == "virtiofsd":
        argv = [
            str(C_VIRTIOFSD),
            f"--fd={fd}",
            "-o",
            f"source={share.host_dir}",
            "-o",
            "sandbox=chroot",  # namespaces need privileges containers lack
            "-o",
            "cache=auto",
        ]
        if share.readonly:
            raise ValueError("the C virtiofsd of QEMU 7.2 has no read-only mode")
        return [*argv, *share.daemon_args]
    if share.backend == "pyvirtiofsd":
        argv = [
            sys.executable,
            "-m",
            "pyvirtiofsd.daemon",
            "--fd",
            str(fd),
            "--shared-dir",
            str(share.host_dir),
        ]
        if share.readonly:
            argv.append("--readonly")
        return [*argv, *share.daemon_args]
    if share.backend == "rust-virtiofsd":
        from pyvirtiofsd.bench.peers import rust_virtiofsd  # debootstraps it on first use

        argv = [*rust_virtiofsd().prefix(), "--fd", str(fd), "--shared-dir",
                str(share.host_dir), "--thread-pool-size", "0"]  # fmt: skip
        if share.readonly:
            argv.append("--readonly")
        return [*argv, *share.daemon_args]
    raise ValueError(f"backend {share.backend} has no daemon")


class FsDaemon:
    """A running vhost-user-fs backend serving one share."""

    def __init__(self, share: Share, device_id: str, run_dir: Path, log_dir: Path) -> None:
        self.share = share
        self.socket_path = run_dir / f"{device_id}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket_path))
            listener.listen(1)
            argv = daemon_argv(share, listener.fileno())
            self.process = ChildProcess(
                f"{share.backend}[{share.tag}]",
                argv,
                log_dir / f"{device_id}-{share.backend}.log",
                pass_fds=[listener.fileno()],
            )
        finally:
            listener.close()  # the daemon holds its own copy now

    def stop(self, grace: float = 5.0) -> int:
        return self.process.stop(grace)


def ninep_device(share: Share, device_id: str) -> NinePShare:
    return NinePShare(
        id=device_id,
        path=share.host_dir,
        tag=share.tag,
        addr=share.addr,
        iommu_platform=share.iommu_platform,
        readonly=share.readonly,
    )


def vhost_user_device(
    share: Share, device_id: str, socket_path: Path, cpus: int = 1
) -> VhostUserFsDevice:
    """The device for ``share``; ``num-request-queues`` defaults to ``cpus``.

    Linux 6.10+ uses at most one request queue per CPU (older guests use only
    the first), so one per vCPU is the most a guest can keep busy. Backends
    with a lower limit (QEMU 7.2's C virtiofsd serves one request queue and
    panics, "Invalid queue index: 2", when a 6.12 guest uses a second) get
    that limit by default.
    """
    if share.num_request_queues is not None:
        queues = share.num_request_queues
    else:
        queues = min(cpus, BACKEND_MAX_REQUEST_QUEUES.get(share.backend, cpus))
    return VhostUserFsDevice(
        id=device_id,
        socket=socket_path,
        tag=share.tag,
        addr=share.addr,
        iommu_platform=share.iommu_platform,
        num_request_queues=max(1, queues),
        queue_size=share.queue_size,
    )
