"""Boot and control one test guest: QEMU, its QMP monitor, its agent, its shares.

Use it as a context manager; leaving the block (normally, by an exception or
by Ctrl-C) quits QEMU, stops every backend daemon and reaps them all::

    with Machine(MachineConfig(shares=[Share(Path("/srv/x"), "x")])) as vm:
        print(vm.agent.run("ls /mnt/x", check=True).text)
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

from . import debian, swiotlb
from .accel import choose_accel
from .agent import AgentError, CommandResult, GuestAgent
from .debian import build_debian_root
from .errors import VmError
from .initramfs import ExtraFile, build_initramfs
from .kernel import (
    ANNOUNCES_VIRTIOFS_TAGS,
    DEFAULT_KERNEL_VERSION,
    KERNEL_VERSIONS,
    build_kernel,
)
from .paths import build_dir
from .process import ChildProcess
from .qemu import QEMU_BINARY, MachineSpec, NinePShare, VhostUserFsDevice, qemu_command
from .shares import FsDaemon, Share, ninep_device, vhost_user_device

log = logging.getLogger("pyvirtiofsd.vm")


class MachineError(VmError):
    """The guest could not be started or controlled."""


def resolve_kernel_version(version: str | None) -> str:
    """``version``, else ``$PYVIRTIOFSD_KERNEL_VERSION``, else the default; checked."""
    v = version or os.environ.get("PYVIRTIOFSD_KERNEL_VERSION") or DEFAULT_KERNEL_VERSION
    if v not in KERNEL_VERSIONS:
        raise MachineError(
            f"unknown guest kernel version {v!r} (known: {', '.join(KERNEL_VERSIONS)})"
        )
    return v


@dataclass
class MachineConfig:
    shares: Sequence[Share] = ()
    memory_mib: int = 1024
    cpus: int = 2
    accel: str = "auto"
    kernel_args: Sequence[str] = ()
    extra_files: Sequence[ExtraFile] = ()
    boot_timeout: float = 120.0
    interactive: bool = False
    mount_shares: bool = True
    qemu: str = QEMU_BINARY
    kernel: Path | None = None  # a bzImage to boot instead of the built, cached one
    # Guest kernel version to build and boot ("6.12" | "6.1"); None: the
    # PYVIRTIOFSD_KERNEL_VERSION environment variable, else the default.
    kernel_version: str | None = None
    debian: bool = False  # Debian 12 userland at /debian (see vm/debian.py)
    dma_mode: str = "off"  # "off" | "shared" | "per-device" (see vm/swiotlb.py)
    extra_qemu_args: Sequence[str] = field(default_factory=tuple)


class Machine:
    """A running test guest. Not thread-safe."""

    def __init__(self, config: MachineConfig, name: str = "guest") -> None:
        self.config = config
        self.name = name
        self.log_dir = build_dir() / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Socket paths must stay short (108 bytes), so they live in /tmp.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="pva-"))
        self.console_log = self.log_dir / "console.log"
        self.qemu_proc: ChildProcess | None = None
        self.daemons: list[FsDaemon] = []
        self._qmp: QEMUMonitorProtocol | None = None
        self._agent: GuestAgent | None = None
        self.accel: str | None = None
        self.dma: swiotlb.PerDeviceDma | None = None
        self.boot_seconds: float | None = None

    # -- lifecycle -----------------------------------------------------------
    def __enter__(self) -> Machine:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def agent(self) -> GuestAgent:
        if self._agent is None:
            raise MachineError("the guest is not running")
        return self._agent

    @property
    def qmp(self) -> QEMUMonitorProtocol:
        if self._qmp is None:
            raise MachineError("the guest is not running")
        return self._qmp

    @property
    def kernel_version(self) -> str:
        """The guest kernel version this machine boots (see MachineConfig)."""
        return resolve_kernel_version(self.config.kernel_version)

    def pids(self) -> list[int]:
        """PIDs of every process this machine started (QEMU and daemons)."""
        pids = [d.process.pid for d in self.daemons]
        if self.qemu_proc is not None:
            pids.append(self.qemu_proc.pid)
        return pids

    def start(self) -> None:
        cfg = self.config
        if cfg.dma_mode not in swiotlb.DMA_MODES:
            raise MachineError(f"unknown DMA mode {cfg.dma_mode!r}")
        kernel_args = (*swiotlb.kernel_args(cfg.dma_mode), *cfg.kernel_args)
        shares = list(cfg.shares)
        if cfg.dma_mode == "shared":
            shares = [replace(s, iommu_platform=True) for s in shares]
        # per-device: vhost-user shares are hot-plugged after boot, each with
        # its own window (the guest must know the assignment before probing)
        late = [s for s in shares if cfg.dma_mode == "per-device" and s.backend != "9p"]
        cold = [s for s in shares if s not in late]
        override = os.environ.get("PYVIRTIOFSD_GUEST_KERNEL")
        if cfg.kernel is not None:
            bzimage = cfg.kernel
        elif override:  # kernel development: boot a tree's bzImage everywhere
            bzimage = Path(override)
        else:
            bzimage = build_kernel(version=self.kernel_version).bzimage
        initrd = build_initramfs(cfg.extra_files)
        self.accel = choose_accel(cfg.accel, bzimage)
        if shutil.which(cfg.qemu) is None:
            raise MachineError(f"{cfg.qemu} not found: install qemu-system-x86 (run `make deps`)")

        fs_devices: list[VhostUserFsDevice] = []
        ninep: list[NinePShare] = []
        if cfg.debian:
            root = Share(build_debian_root(), debian.ROOT_TAG, backend="9p", readonly=True)
            ninep.append(ninep_device(root, "debian-root"))
        for i, share in enumerate(cold):
            dev_id = f"fs{i}"
            if share.backend == "9p":
                ninep.append(ninep_device(share, dev_id))
            else:
                daemon = FsDaemon(share, dev_id, self._sock_dir, self.log_dir)
                self.daemons.append(daemon)
                fs_devices.append(vhost_user_device(share, dev_id, daemon.socket_path, cfg.cpus))

        qmp_path = self._sock_dir / "qmp.sock"
        agent_path = self._sock_dir / "agent.sock"
        self._qmp = QEMUMonitorProtocol(str(qmp_path), server=True)
        agent_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            agent_listener.bind(str(agent_path))
            agent_listener.listen(1)
            spec = MachineSpec(
                kernel=bzimage,
                initrd=initrd,
                qmp_socket=qmp_path,
                agent_socket=agent_path,
                console_log=self.console_log,
                memory_mib=cfg.memory_mib,
                cpus=cfg.cpus,
                accel=self.accel,
                kernel_args=kernel_args,
                fs_devices=tuple(fs_devices),
                ninep_shares=tuple(ninep),
                interactive=cfg.interactive,
                extra_args=tuple(cfg.extra_qemu_args),
            )
            argv = qemu_command(spec, cfg.qemu)
            (self.log_dir / "qemu.cmdline").write_text(" ".join(argv) + "\n")
            started = time.monotonic()
            self.qemu_proc = ChildProcess(
                "qemu", argv, self.log_dir / "qemu.log", interactive=cfg.interactive
            )
            try:
                self._qmp.accept(timeout=30)
            except Exception as e:
                raise self._boot_failure(f"QEMU did not connect to QMP: {e}") from e
            agent_listener.settimeout(30)
            try:
                conn, _ = agent_listener.accept()
            except OSError as e:
                raise self._boot_failure(f"QEMU did not connect the agent channel: {e}") from e
        finally:
            agent_listener.close()
        conn.settimeout(None)
        self._agent = GuestAgent(conn)
        try:
            release = self._agent.wait_ready(cfg.boot_timeout)
        except AgentError as e:
            raise self._boot_failure(f"guest agent not ready: {e}") from e
        self.boot_seconds = time.monotonic() - started
        log.info("guest up (kernel %s, %s) in %.1f s", release, self.accel, self.boot_seconds)
        if cfg.debian:
            self.agent.run(debian.mount_script(), timeout=60, check=True)
        if cfg.mount_shares:
            for share in cold:
                self.mount(share)
                if cfg.debian:
                    self.agent.run(debian.bind_share_script(share.tag), check=True)
        if cfg.dma_mode == "per-device":
            self.dma = swiotlb.PerDeviceDma(self.agent)
            used = {s.addr for s in late if s.addr is not None}
            free_slots = (n for n in range(0x8, 0x20) if n not in used)
            for i, share in enumerate(late):
                slot = share.addr if share.addr is not None else next(free_slots)
                self.attach_share_window(share, f"fs{len(cold) + i}", slot)
                if cfg.debian:
                    self.agent.run(debian.bind_share_script(share.tag), check=True)

    def _boot_failure(self, msg: str) -> MachineError:
        details = [msg]
        if self.qemu_proc is not None and not self.qemu_proc.alive():
            details.append(f"QEMU exited with {self.qemu_proc.returncode()}:")
            details.append(self.qemu_proc.log_tail())
        for d in self.daemons:
            if not d.process.alive():
                details.append(f"{d.process.name} exited with {d.process.returncode()}:")
                details.append(d.process.log_tail())
        try:
            tail = self.console_log.read_text(errors="replace").splitlines()[-25:]
            details.append("console:\n" + "\n".join(tail))
        except OSError:
            pass
        return MachineError("\n".join(details))

    def mount(self, share: Share) -> None:
        r = self.agent.run(share.mount_command(), timeout=60)
        if r.status != 0:
            raise MachineError(
                f"mounting {share.tag} ({share.backend}) failed: "
                f"{(r.stderr or r.stdout).decode(errors='replace').strip()}"
            )

    def hotplug(self, share: Share, device_id: str, *, mount: bool = True) -> FsDaemon:
        """Start a backend for ``share`` and hot-plug its vhost-user-fs device.

        The guest sees it through ACPI PCI hotplug (``share.addr`` picks the
        slot); with ``mount`` the share is mounted once the guest has bound it.
        """
        if share.backend == "9p":
            raise MachineError("hot-plugging 9p shares is not supported (fsdev is cold-plug only)")
        daemon = FsDaemon(share, device_id, self._sock_dir, self.log_dir)
        self.daemons.append(daemon)
        dev = vhost_user_device(share, device_id, daemon.socket_path, self.config.cpus)
        self.qmp_command("chardev-add", **dev.qmp_chardev_add())
        try:
            self.qmp_command("device_add", **dev.qmp_device_add())
        except Exception:
            self.qmp_command("chardev-remove", id=f"chr-{device_id}")
            raise
        if mount:
            self.mount_when_ready(share)
        return daemon

    def wait_in_guest(self, condition: str, what: str, timeout: float = 30.0) -> None:
        """Poll a shell ``condition`` in the guest every 0.1 s until it holds.

        For guest state that changes asynchronously with no event to wait on
        (ACPI hotplug, driver probe): bounded, like ``udevadm settle``.
        Raises MachineError naming ``what`` was awaited.
        """
        loops = max(1, int(timeout * 10))
        script = (
            f"i=0; while ! ( {condition} ) >/dev/null 2>&1; do "
            f"i=$((i+1)); [ $i -ge {loops} ] && exit 1; sleep 0.1; done"
        )
        if self.agent.run(script, timeout=timeout + 10).status != 0:
            raise MachineError(f"timed out after {timeout:.0f} s waiting for {what}")

    def mount_when_ready(self, share: Share, timeout: float = 30.0) -> None:
        """Mount a just hot-plugged share once the guest has registered its tag.

        Linux 6.9+ announces the tag with a uevent (ACTION=add
        SUBSYSTEM=virtiofs TAG=<tag>): the guest's ``pva-uevent-wait`` listens
        first, tries the mount, and retries it only when that event arrives.
        6.1 announces nothing: retry the mount until the tag is known.
        """
        cmd = share.mount_command()
        if self.kernel_version in ANNOUNCES_VIRTIOFS_TAGS:
            r = self.run_on_uevent(
                cmd, ("ACTION=add", "SUBSYSTEM=virtiofs", f"TAG={share.tag}"), timeout
            )
            if r.status != 0:
                raise MachineError(
                    f"hot-plugged share {share.tag} never became mountable: "
                    f"{r.stderr.decode(errors='replace').strip()}"
                )
            return
        try:
            self.wait_in_guest(cmd, f"hot-plugged share {share.tag} to become mountable", timeout)
        except MachineError as e:
            r = self.agent.run(cmd, timeout=60)  # one last try, for its error message
            if r.status != 0:
                raise MachineError(
                    f"hot-plugged share {share.tag} never became mountable: "
                    f"{r.stderr.decode(errors='replace').strip()}"
                ) from e

    def run_on_uevent(
        self, command: str, keys: Sequence[str], timeout: float = 30.0
    ) -> CommandResult:
        """Run a guest shell ``command``; if it fails, run it once more when a
        uevent carrying every ``KEY=VALUE`` of ``keys`` arrives.

        The guest's ``pva-uevent-wait`` listens before the first try, so an
        event is never missed; no polling. Returns the last try's result
        (status 124 when no such event came within ``timeout``).
        """
        argv = ["pva-uevent-wait", "-t", f"{timeout:g}", *keys, "--", "sh", "-c", command]
        return self.agent.run(shlex.join(argv), timeout=timeout + 30)

    def wait_for_virtio(self, address: str, timeout: float = 30.0) -> None:
        """Wait until virtio-pci has finished probing the hot-plugged device at
        ``address`` (its virtio device is registered).

        The PCI ``driver`` link is no such signal: it appears before probe runs.
        The driver core's ``bind`` uevent for the PCI device is: it is sent
        once ``virtio_pci_probe()`` returned (both kernels).
        """
        r = self.run_on_uevent(
            f"ls -d /sys/bus/pci/devices/{shlex.quote(address)}/virtio*",
            ("ACTION=bind", "SUBSYSTEM=pci", f"PCI_SLOT_NAME={address}", "DRIVER=virtio-pci"),
            timeout,
        )
        if r.status != 0:
            raise MachineError(
                f"timed out after {timeout:.0f} s waiting for virtio-pci to probe {address}"
            )

    def unplug(self, device_id: str, timeout: float = 30.0, *, remove_chardev: bool = True) -> None:
        """``device_del`` and wait for QEMU's DEVICE_DELETED (the guest released it)."""
        self.qmp.clear_events()
        self.qmp_command("device_del", id=device_id)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MachineError(f"guest did not release {device_id} within {timeout:.0f} s")
            event = self.qmp.pull_event(wait=left)
            if (
                event is not None
                and event.get("event") == "DEVICE_DELETED"
                and event.get("data", {}).get("device") == device_id
            ):
                break
        if remove_chardev:
            self.qmp_command("chardev-remove", id=f"chr-{device_id}")

    # -- per-device swiotlb windows (the whole flow; vm/swiotlb.py's steps) --
    def _windows(self) -> swiotlb.PerDeviceDma:
        if self.dma is None:
            raise MachineError("this guest was not started with dma_mode='per-device'")
        return self.dma

    def attach_share_window(
        self, share: Share, device_id: str, slot: int, size: int = swiotlb.DEFAULT_WINDOW
    ) -> swiotlb.Attached:
        """Hot-plug ``share`` in ``slot`` with its own window: assign it in the
        guest, start the daemon confined to it, plug, verify, mount."""
        dma = self._windows()
        address, window = dma.assign(slot, size)
        strict = replace(
            share,
            addr=slot,
            iommu_platform=True,
            daemon_args=(*share.daemon_args, "--swiotlb", window.swiotlb_arg()),
        )
        try:
            self.hotplug(strict, device_id, mount=False)
            self.wait_for_virtio(address)
            dma.verify(address, window)
            self.mount_when_ready(strict)
        except BaseException:
            dma.abandon(address)
            raise
        att = swiotlb.Attached(device_id, address, window, strict)
        dma.record(att)
        return att

    def attach_net_window(
        self, device_id: str, slot: int, netdev: str, size: int = swiotlb.DEFAULT_WINDOW
    ) -> swiotlb.Attached:
        """Hot-plug a QEMU virtio-net device (``netdev`` must exist) with its own window."""
        dma = self._windows()
        address, window = dma.assign(slot, size)
        try:
            self.qmp_command(
                "device_add",
                driver="virtio-net-pci",
                id=device_id,
                netdev=netdev,
                addr=f"{slot:#x}",
                **{"disable-legacy": "on", "iommu_platform": True},
            )
            self.wait_for_virtio(address)
            dma.verify(address, window)
        except BaseException:
            dma.abandon(address)
            raise
        att = swiotlb.Attached(device_id, address, window, None)
        dma.record(att)
        return att

    def detach_window_device(self, device_id: str) -> None:
        """Unmount (shares), unplug, and free the device's window on both sides."""
        dma = self._windows()
        att = dma.devices[device_id]
        if att.share is not None:
            self.agent.run(f"umount {shlex.quote(att.share.guest_mountpoint)}", check=True)
        self.unplug(device_id, remove_chardev=att.share is not None)
        dma.release(device_id)

    def debian_run(
        self, command: str, *, timeout: float = 600.0, check: bool = False
    ) -> CommandResult:
        """Run ``command`` inside the Debian userland (needs ``MachineConfig.debian``)."""
        if not self.config.debian:
            raise MachineError("this guest was started without the Debian userland")
        return self.agent.run(debian.chroot_command(command), timeout=timeout, check=check)

    def qmp_command(self, name: str, **args: Any) -> Any:
        """Run a QMP command; returns its ``return`` value, raises on error."""
        return self.qmp.cmd(name, **args)

    def status(self) -> str:
        reply = self.qmp_command("query-status")
        return str(reply["status"])

    def close(self, timeout: float = 15.0) -> None:
        """Quit QEMU, stop every daemon, reap everything. Idempotent."""
        if self._agent is not None:
            self._agent.close()
            self._agent = None
        if self.qemu_proc is not None and self.qemu_proc.alive() and self._qmp is not None:
            try:
                self._qmp.settimeout(5)
                self._qmp.cmd("quit")
            except Exception as e:  # QEMU may already be going away
                log.debug("QMP quit failed: %s", e)
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception as e:
                log.debug("closing QMP: %s", e)
            self._qmp = None
        if self.qemu_proc is not None:
            if self.qemu_proc.wait(timeout) is None:
                log.warning("QEMU did not quit within %.0f s; killing it", timeout)
            self.qemu_proc.stop(grace=2)
        for d in self.daemons:
            # A vhost-user backend exits by itself when QEMU disconnects.
            if d.process.wait(timeout) is None:
                log.warning("%s still running after QEMU quit; stopping it", d.process.name)
            d.stop(grace=2)
        shutil.rmtree(self._sock_dir, ignore_errors=True)
