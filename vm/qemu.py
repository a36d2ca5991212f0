"""QEMU command lines for the test guest, built by pure functions.

Every QEMU quirk the harness depends on lives here, next to the reason:

- vhost-user needs guest RAM in a shared memfd
  (``memory-backend-memfd,share=on`` + ``-numa node,memdev=``).
- The harness boots with ``-no-reboot`` and ends a guest with ``reboot -f``
  or QMP ``quit`` (a panic, ``panic=-1``, also exits QEMU); a clean poweroff
  goes through the ACPI power button (``system_powerdown``, answered by the
  guest's ``pva-acpid``).
- QEMU's transitional devices (virtio-9p-pci, virtio-net-pci) accept
  ``iommu_platform=on`` only with ``disable-legacy=on``.
- The harness owns the QMP and agent sockets (it listens; QEMU connects as a
  client), so nothing waits for a socket file to appear.
- In an option list (``-device a=1,b=2``) a comma inside a value must be
  doubled, or the rest of the value is parsed as further options (a share
  directory named ``x,readonly=off`` would inject one): every value taken
  from outside goes through ``opt()``. The legacy ``-serial file:PATH``
  form has no escape at all, so the console is a ``-chardev file``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

QEMU_BINARY = "qemu-system-x86_64"
AGENT_PORT_NAME = "org.pyvirtiofsd.agent.0"


def opt(value: object) -> str:
    """``value`` as one QEMU option value: commas doubled."""
    return str(value).replace(",", ",,")


@dataclass(frozen=True)
class VhostUserFsDevice:
    """A ``vhost-user-fs-pci`` device whose backend listens on ``socket``."""

    id: str
    socket: Path
    tag: str
    addr: int | None = None  # PCI slot on the root bus (bus 0, function 0)
    iommu_platform: bool = False
    num_request_queues: int = 1
    queue_size: int = 1024

    def chardev_args(self) -> str:
        return f"socket,id=chr-{opt(self.id)},path={opt(self.socket)}"

    def qmp_device_add(self) -> dict[str, object]:
        """Arguments of QMP ``device_add`` for hot-plugging this device."""
        args: dict[str, object] = {
            "driver": "vhost-user-fs-pci",
            "id": self.id,
            "chardev": f"chr-{self.id}",
            "tag": self.tag,
            "queue-size": self.queue_size,
            "num-request-queues": self.num_request_queues,
        }
        if self.iommu_platform:
            args["iommu_platform"] = True
        if self.addr is not None:
            args["addr"] = f"{self.addr:#x}"
        return args

    def qmp_chardev_add(self) -> dict[str, object]:
        """Arguments of QMP ``chardev-add`` for the device's vhost-user socket."""
        return {
            "id": f"chr-{self.id}",
            "backend": {
                "type": "socket",
                "data": {
                    "addr": {"type": "unix", "data": {"path": str(self.socket)}},
                    "server": False,
                },
            },
        }

    def device_args(self) -> str:
        opts = [
            "vhost-user-fs-pci",
            f"id={opt(self.id)}",
            f"chardev=chr-{opt(self.id)}",
            f"tag={opt(self.tag)}",
            f"queue-size={self.queue_size}",
            f"num-request-queues={self.num_request_queues}",
        ]
        if self.iommu_platform:
            opts.append("iommu_platform=on")
        if self.addr is not None:
            opts.append(f"addr={self.addr:#x}")
        return ",".join(opts)


@dataclass(frozen=True)
class NinePShare:
    """QEMU's own virtio-9p share (the baseline peer)."""

    id: str
    path: Path
    tag: str
    addr: int | None = None
    iommu_platform: bool = False
    readonly: bool = False

    def fsdev_args(self) -> str:
        # security_model=none: files are created with the daemon's (root's)
        # credentials, which is what a root-run peer of virtiofsd does.
        ro = ",readonly=on" if self.readonly else ""
        return f"local,id=fsdev-{opt(self.id)},path={opt(self.path)},security_model=none{ro}"

    def device_args(self) -> str:
        opts = [
            "virtio-9p-pci",
            f"id={opt(self.id)}",
            f"fsdev=fsdev-{opt(self.id)}",
            f"mount_tag={opt(self.tag)}",
        ]
        if self.iommu_platform:
            opts += ["disable-legacy=on", "iommu_platform=on"]
        if self.addr is not None:
            opts.append(f"addr={self.addr:#x}")
        return ",".join(opts)


@dataclass(frozen=True)
class MachineSpec:
    """Everything that determines one guest's QEMU command line."""

    kernel: Path
    initrd: Path
    qmp_socket: Path
    agent_socket: Path
    console_log: Path
    memory_mib: int = 1024
    cpus: int = 2
    accel: str = "tcg"  # "tcg" or "kvm"
    kernel_args: tuple[str, ...] = ()
    fs_devices: tuple[VhostUserFsDevice, ...] = ()
    ninep_shares: tuple[NinePShare, ...] = ()
    interactive: bool = False  # serial console on stdio (with a log) instead of a file
    extra_args: tuple[str, ...] = field(default=())


def kernel_cmdline(spec: MachineSpec) -> str:
    base = ["console=ttyS0", "panic=-1", "oops=panic", "loglevel=4", "rdinit=/init"]
    return " ".join([*base, *spec.kernel_args])


def accel_args(accel: str) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    if accel == "tcg":
        return ["-accel", "tcg,thread=multi", "-cpu", "max"]
    raise ValueError(f"unknown accelerator {accel!r} (want 'kvm' or 'tcg')")


def qemu_command(spec: MachineSpec, qemu: str = QEMU_BINARY) -> list[str]:
    """The full argv to start the guest described by ``spec``."""
    mem = f"{spec.memory_mib}M"
    argv = [
        qemu,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-machine",
        "pc,memory-backend=mem",
        *accel_args(spec.accel),
        "-smp",
        str(spec.cpus),
        "-m",
        mem,
        "-object",
        f"memory-backend-memfd,id=mem,size={mem},share=on",
        "-kernel",
        str(spec.kernel),
        "-initrd",
        str(spec.initrd),
        "-append",
        kernel_cmdline(spec),
        # QMP: QEMU connects to the harness's listening socket.
        "-chardev",
        f"socket,id=qmp,path={opt(spec.qmp_socket)}",
        "-mon",
        "chardev=qmp,mode=control",
        # Guest agent over virtio-serial; the harness listens here too.
        "-device",
        "virtio-serial-pci,id=vser",
        "-chardev",
        f"socket,id=agent,path={opt(spec.agent_socket)}",
        "-device",
        f"virtserialport,bus=vser.0,chardev=agent,name={AGENT_PORT_NAME}",
    ]
    if spec.interactive:
        argv += [
            "-chardev",
            f"stdio,id=con,mux=on,signal=off,logfile={opt(spec.console_log)}",
            "-serial",
            "chardev:con",
        ]
    else:
        argv += ["-chardev", f"file,id=con,path={opt(spec.console_log)}", "-serial", "chardev:con"]
    for d in spec.fs_devices:
        argv += ["-chardev", d.chardev_args(), "-device", d.device_args()]
    for s in spec.ninep_shares:
        argv += ["-fsdev", s.fsdev_args(), "-device", s.device_args()]
    argv += list(spec.extra_args)
    return argv
