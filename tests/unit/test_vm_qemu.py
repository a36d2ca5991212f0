"""QEMU command-line building (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvirtiofsd.vm.qemu import (
    MachineSpec,
    NinePShare,
    VhostUserFsDevice,
    accel_args,
    kernel_cmdline,
    opt,
    qemu_command,
)


def spec(**kw: object) -> MachineSpec:
    base: dict[str, object] = dict(
        kernel=Path("/k"), initrd=Path("/i"), qmp_socket=Path("/s/qmp"),
        agent_socket=Path("/s/agent"), console_log=Path("/l/console"),
    )  # fmt: skip
    base.update(kw)
    return MachineSpec(**base)  # type: ignore[arg-type]


def opt_values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_guest_ram_is_a_shared_memfd() -> None:
    argv = qemu_command(spec(memory_mib=512))
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in opt_values(argv, "-object")
    assert "pc,memory-backend=mem" in opt_values(argv, "-machine")
    assert opt_values(argv, "-m") == ["512M"]
    assert "-no-reboot" in argv


def test_harness_owns_the_sockets_qemu_is_the_client() -> None:
    chardevs = opt_values(qemu_command(spec()), "-chardev")
    assert "socket,id=qmp,path=/s/qmp" in chardevs
    assert "socket,id=agent,path=/s/agent" in chardevs
    assert not any("server" in c for c in chardevs)


def test_console_goes_to_a_file_or_to_stdio_with_a_log() -> None:
    argv = qemu_command(spec())
    assert opt_values(argv, "-serial") == ["chardev:con"]
    assert "file,id=con,path=/l/console" in opt_values(argv, "-chardev")
    argv = qemu_command(spec(interactive=True))
    assert opt_values(argv, "-serial") == ["chardev:con"]
    assert "stdio,id=con,mux=on,signal=off,logfile=/l/console" in opt_values(argv, "-chardev")


def test_vhost_user_fs_device() -> None:
    dev = VhostUserFsDevice("fs0", Path("/s/fs0.sock"), "tag0", addr=5, iommu_platform=True,
                            num_request_queues=2, queue_size=512)  # fmt: skip
    argv = qemu_command(spec(fs_devices=(dev,)))
    assert "socket,id=chr-fs0,path=/s/fs0.sock" in opt_values(argv, "-chardev")
    assert (
        "vhost-user-fs-pci,id=fs0,chardev=chr-fs0,tag=tag0,queue-size=512,"
        "num-request-queues=2,iommu_platform=on,addr=0x5"
    ) in opt_values(argv, "-device")


def test_9p_with_iommu_platform_needs_disable_legacy() -> None:
    share = NinePShare("p0", Path("/srv"), "t", iommu_platform=True)
    argv = qemu_command(spec(ninep_shares=(share,)))
    assert "local,id=fsdev-p0,path=/srv,security_model=none" in opt_values(argv, "-fsdev")
    (dev,) = [d for d in opt_values(argv, "-device") if d.startswith("virtio-9p-pci")]
    assert "disable-legacy=on" in dev and "iommu_platform=on" in dev


def test_kernel_cmdline_and_accel() -> None:
    line = kernel_cmdline(spec(kernel_args=("swiotlb=force",)))
    assert line.startswith("console=ttyS0") and line.endswith("swiotlb=force")
    assert accel_args("tcg")[:2] == ["-accel", "tcg,thread=multi"]
    assert accel_args("kvm")[:2] == ["-accel", "kvm"]
    with pytest.raises(ValueError):
        accel_args("hvf")


def test_commas_in_option_values_are_doubled_never_parsed_as_options() -> None:
    assert opt("/srv/a,readonly=off") == "/srv/a,,readonly=off"
    ninep = NinePShare("p0", Path("/srv/a,b"), "t", readonly=True)
    fs = VhostUserFsDevice("fs0", Path("/s/x,server=on.sock"), "tag0")
    argv = qemu_command(
        spec(fs_devices=(fs,), ninep_shares=(ninep,), console_log=Path("/l/con,sole"))
    )
    fsdev = opt_values(argv, "-fsdev")
    assert fsdev == ["local,id=fsdev-p0,path=/srv/a,,b,security_model=none,readonly=on"]
    chardevs = opt_values(argv, "-chardev")
    assert "socket,id=chr-fs0,path=/s/x,,server=on.sock" in chardevs
    assert "file,id=con,path=/l/con,,sole" in chardevs
    # What QEMU's option parser sees: ",," is a literal comma, "," splits.
    keys = [kv.split("=", 1)[0] for kv in fsdev[0].replace(",,", "\0").split(",")]
    assert keys == ["local", "id", "path", "security_model", "readonly"]
