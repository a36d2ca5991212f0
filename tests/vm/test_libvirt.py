"""libvirt as a real client: Debian 12's libvirtd starts pyvirtiofsd itself.

A private libvirtd (tests/support/libvirt.py) runs a TCG domain that boots our
guest kernel and initramfs directly, its RAM a shared memfd, with a
``<filesystem>`` whose virtiofs driver is pyvirtiofsd. libvirt, not the
harness, starts the daemon, with the arguments libvirt 9.0 really passes
(``--fd=N -o source=DIR``, a listening socket libvirt bound itself), kills it
when the domain stops, and finds the binary through the vhost-user discovery
JSON when the domain names none.

The harness reaches the guest over the same agent channel as ``vm.machine``:
a ``<channel type='unix'>`` in connect mode whose socket the test listens on.

Two boots: the first (``<binary>`` given) serves the file tests and ends by
``virsh shutdown`` (the ACPI power button, which the guest's ``pva-acpid``
answers with a clean poweroff); the second (binary discovered) ends by
``virsh destroy``. After each no pyvirtiofsd process is left.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofsd.vm.agent import GuestAgent
from pyvirtiofsd.vm.initramfs import build_initramfs
from pyvirtiofsd.vm.kernel import build_kernel
from pyvirtiofsd.vm.machine import resolve_kernel_version
from pyvirtiofsd.vm.paths import build_dir
from pyvirtiofsd.vm.qemu import AGENT_PORT_NAME, MachineSpec, kernel_cmdline
from tests.support.libvirt import (
    GuestDomain,
    Libvirtd,
    LibvirtError,
    domain_xml,
    processes_matching,
)

TAG = "lvshare"
BOOT_TIMEOUT = 180.0
SHUTDOWN_TIMEOUT = 90.0  # virsh shutdown to "shut off": ~3 s on an idle host
DAEMON = Path(sys.executable).with_name("pyvirtiofsd")
SHIPPED_DESCRIPTOR = Path(__file__).resolve().parents[2] / "daemon" / "data" / "50-pyvirtiofsd.json"


@dataclass
class Boot:
    name: str
    share: Path
    agent: GuestAgent
    seconds: float


class LibvirtGuests:
    """The module's libvirtd, its agent listener and the guest image."""

    def __init__(self, daemon: Libvirtd, root: Path, run_dir: Path) -> None:
        self.daemon = daemon
        self.root = root
        self.run_dir = run_dir
        self.kernel = build_kernel(version=resolve_kernel_version(None)).bzimage
        self.initrd = build_initramfs()
        self.agent_socket = root / "agent.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.agent_socket))
        self.listener.listen(1)

    def cmdline(self) -> str:
        # The harness's own kernel command line (vm/qemu.py).
        spec = MachineSpec(
            kernel=self.kernel,
            initrd=self.initrd,
            qmp_socket=self.root / "unused-qmp.sock",
            agent_socket=self.agent_socket,
            console_log=self.run_dir / "console.log",
        )
        return kernel_cmdline(spec)

    def boot(self, name: str, share: Path, *, binary: Path | None, **fs: Any) -> Boot:
        """Define and start domain ``name``; wait for the guest agent.
        ``fs``: the daemon's settings in the XML (GuestDomain's ``fs_*``)."""
        dom = GuestDomain(
            name=name,
            kernel=self.kernel,
            initrd=self.initrd,
            cmdline=self.cmdline(),
            fs_binary=binary,
            fs_source=share,
            fs_tag=TAG,
            agent_socket=self.agent_socket,
            agent_port_name=AGENT_PORT_NAME,
            console_log=self.run_dir / f"{name}-console.log",
            **fs,
        )
        xml = self.run_dir / f"{name}.xml"
        xml.write_text(domain_xml(dom))
        self.daemon.virsh("define", str(xml))
        started = time.monotonic()
        self.daemon.virsh("start", name, timeout=120)
        self.listener.settimeout(60)
        conn, _ = self.listener.accept()
        conn.settimeout(None)
        agent = GuestAgent(conn)
        try:
            agent.wait_ready(BOOT_TIMEOUT)
        except Exception:
            agent.close()
            console = dom.console_log.read_text(errors="replace")[-3000:]
            raise LibvirtError(f"guest {name} did not come up; console:\n{console}") from None
        return Boot(name, share, agent, time.monotonic() - started)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtGuests]:
    # Socket paths must stay short (108 bytes): the private root is in /tmp.
    root = Path(tempfile.mkdtemp(prefix="pva-lv-"))
    run_dir = build_dir() / "runs" / f"{time.strftime('%Y%m%d-%H%M%S')}-libvirt"
    run_dir.mkdir(parents=True, exist_ok=True)
    # Discovery: the only vhost-user "fs" backend libvirt sees is ours (the
    # descriptor the daemon prints for this installation).
    vhost_user = root / "vhost-user"
    vhost_user.mkdir()
    descriptor = subprocess.run(
        [str(DAEMON), "--print-backend-descriptor"], capture_output=True, text=True, check=True
    ).stdout
    (vhost_user / SHIPPED_DESCRIPTOR.name).write_text(descriptor)
    daemon = Libvirtd(root, run_dir / "libvirt-log", vhost_user_dir=vhost_user)
    g: LibvirtGuests | None = None
    try:
        daemon.start()
        g = LibvirtGuests(daemon, root, run_dir)
        yield g
    finally:
        if g is not None:
            g.close()
        daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nlibvirt logs: {run_dir}")


@pytest.fixture(scope="module")
def first_boot(guests: LibvirtGuests, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Boot]:
    share = tmp_path_factory.mktemp("lvshare")
    boot = guests.boot(
        "pva-libvirt",
        share,
        binary=DAEMON,
        fs_cache="always",
        fs_xattr=True,
        fs_locks=True,
        fs_thread_pool=2,
    )
    print(f"\nguest up under libvirt in {boot.seconds:.1f} s")
    try:
        yield boot
    finally:
        boot.agent.close()


def daemons_of(share: Path) -> dict[int, list[str]]:
    """pyvirtiofsd processes serving ``share`` (libvirt doubles a comma in
    ``-o source=``, as QEMU's option syntax escapes it)."""
    return processes_matching(f"source={str(share).replace(',', ',,')}")


def test_libvirt_starts_pyvirtiofsd_with_its_own_arguments(
    guests: LibvirtGuests, first_boot: Boot
) -> None:
    procs = daemons_of(first_boot.share)
    assert procs, "no pyvirtiofsd process serves the share"
    # libvirt's pid file names the process it daemonized (the namespace
    # sandbox's supervisor; its child, same command line, is the server).
    # (libvirt 9.0 names it /run/libvirt/qemu/<id>-<name>-fs0-fs.pid.)
    pid_files = list(
        guests.daemon.host_path("/run/libvirt/qemu").glob(f"*-{first_boot.name}-fs0-fs.pid")
    )
    assert len(pid_files) == 1, pid_files
    pid = int(pid_files[0].read_text().strip())
    assert pid in procs, f"libvirt's pid {pid} is not among {sorted(procs)}"
    argv = procs[pid]
    print(f"\nlibvirt started (/proc/{pid}/cmdline): {shlex.join(argv)}")
    assert argv[1:2] == [str(DAEMON)], argv  # the venv's script, under its interpreter
    fd_args = [a for a in argv if a.startswith("--fd=")]
    assert len(fd_args) == 1, argv
    # every setting of the XML, in libvirt's order
    assert (
        argv[argv.index("-o") + 1]
        == f"source={first_boot.share},cache=always,xattr,flock,posix_lock"
    )
    assert "--thread-pool-size=2" in argv
    # ... and the daemon serves with them (its log is libvirt's fs0-virtiofsd.log)
    fs_log = guests.daemon.host_path(f"/var/log/libvirt/qemu/{first_boot.name}-fs0-virtiofsd.log")
    serving = [ln for ln in fs_log.read_text().splitlines() if " serving " in ln]
    assert serving and all(w in serving[-1] for w in ("cache=always", "xattr", "flock")), serving
    # The fd libvirt passed is the vhost-user socket it bound, and QEMU is
    # connected to it: the server holds the listener and a connection.
    fd = int(fd_args[0].removeprefix("--fd="))
    server = [p for p in procs if p != pid] or [pid]
    links = {os.readlink(f"/proc/{p}/fd/{fd}") for p in server}
    assert all(link.startswith("socket:") for link in links), links
    # libvirt writes the command it ran into the domain's log.
    domain_log = guests.daemon.host_path(f"/var/log/libvirt/qemu/{first_boot.name}.log")
    logged = [ln for ln in domain_log.read_text().splitlines() if str(DAEMON) in ln]
    assert logged, f"no pyvirtiofsd command line in {domain_log}"
    print(f"libvirt's log ({domain_log.name}): {logged[-1]}")
    assert f"--fd={fd}" in logged[-1] and f"source={first_boot.share}" in logged[-1]


def test_guest_mounts_tag_and_host_sees_writes(first_boot: Boot) -> None:
    agent = first_boot.agent
    agent.run(f"mkdir -p /mnt/{TAG} && mount -t virtiofs {TAG} /mnt/{TAG}", check=True)
    mounts = agent.run("cat /proc/mounts", check=True).text
    assert f"{TAG} /mnt/{TAG} virtiofs" in mounts, mounts
    token = f"written in the guest under libvirt {time.time_ns()}\n"
    agent.run(f"printf %s {shlex.quote(token)} > /mnt/{TAG}/from-guest && sync", check=True)
    assert (first_boot.share / "from-guest").read_text() == token
    # and the other way
    (first_boot.share / "from-host").write_bytes(b"host bytes\0\xff")
    assert agent.read_file(f"/mnt/{TAG}/from-host") == b"host bytes\0\xff"
    listing = agent.run(f"ls /mnt/{TAG}", check=True).text.split()
    assert sorted(listing) == ["from-guest", "from-host"]


def test_virsh_shutdown_leaves_no_daemon(guests: LibvirtGuests, first_boot: Boot) -> None:
    name, agent = first_boot.name, first_boot.agent
    assert daemons_of(first_boot.share), "the daemon should be serving before the shutdown"
    # The share is mounted (so the clean shutdown has something to unmount)
    # and the guest's power-button listener (vm/guest/acpi-powerd.c) is up.
    agent.run(
        f"grep -q ' /mnt/{TAG} virtiofs ' /proc/mounts || {{ mkdir -p /mnt/{TAG} && "
        f"mount -t virtiofs {TAG} /mnt/{TAG}; }}",
        check=True,
    )
    agent.run(
        "i=0; until [ -e /run/pva-acpid.listening ]; do "
        "i=$((i+1)); [ $i -ge 300 ] && exit 1; sleep 0.1; done",
        timeout=60,
        check=True,
    )
    # No qemu-guest-agent channel: libvirt presses the ACPI power button.
    pressed = time.monotonic()
    guests.daemon.virsh("shutdown", name, timeout=60)
    console = guests.run_dir / f"{name}-console.log"
    try:
        guests.daemon.wait_state(name, "shut off", timeout=SHUTDOWN_TIMEOUT)
    except LibvirtError as e:
        tail = console.read_text(errors="replace")[-3000:]
        raise AssertionError(
            f"virsh shutdown: the guest did not power off ({e}); console:\n{tail}"
        ) from None
    print(f"\nvirsh shutdown to 'shut off': {time.monotonic() - pressed:.1f} s")
    reason = guests.daemon.virsh("domstate", "--reason", name).strip()
    assert reason == "shut off (shutdown)", reason
    text = console.read_text(errors="replace")
    assert "pva-acpid: power button: powering off" in text, text[-3000:]
    assert "reboot: Power down" in text, text[-3000:]
    # The guest unmounted the share on its way down: the daemon saw FUSE_DESTROY.
    fs_log = guests.daemon.host_path(f"/var/log/libvirt/qemu/{name}-fs0-virtiofsd.log")
    assert "FUSE session destroyed" in fs_log.read_text(), fs_log.read_text()[-3000:]
    # libvirt reaps the daemon (or it exits on QEMU's disconnect) shortly after.
    deadline = time.monotonic() + 15
    while (left := daemons_of(first_boot.share)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"pyvirtiofsd left behind after virsh shutdown: {left}"
    guests.daemon.virsh("undefine", name)


def test_discovered_daemon_and_virsh_destroy_leaves_none(
    guests: LibvirtGuests, tmp_path_factory: pytest.TempPathFactory
) -> None:
    shipped = json.loads(SHIPPED_DESCRIPTOR.read_text())
    assert shipped["type"] == "fs" and set(shipped) == {"description", "type", "binary"}
    # A comma in the path: libvirt escapes it, the daemon must unescape it.
    share = tmp_path_factory.mktemp("lv,discovered")
    (share / "marker").write_text("discovered\n")
    boot = guests.boot("pva-libvirt-discovered", share, binary=None, fs_sandbox="chroot")
    try:
        print(f"\nsecond guest (discovered binary) up in {boot.seconds:.1f} s")
        procs = daemons_of(share)
        assert procs and all(argv[1] == str(DAEMON) for argv in procs.values()), procs
        assert all("sandbox=chroot" in argv[argv.index("-o") + 1] for argv in procs.values())
        print(f"libvirt started (discovered): {shlex.join(next(iter(procs.values())))}")
        boot.agent.run(f"mkdir -p /mnt/{TAG} && mount -t virtiofs {TAG} /mnt/{TAG}", check=True)
        assert boot.agent.read_file(f"/mnt/{TAG}/marker") == b"discovered\n"
        guests.daemon.virsh("destroy", boot.name, timeout=60)
        # virsh destroy returns once libvirt has stopped the domain's
        # external devices: no wait here.
        left = daemons_of(share)
        assert not left, f"pyvirtiofsd left behind after virsh destroy: {left}"
        assert guests.daemon.domain_state(boot.name) == "shut off"
    finally:
        boot.agent.close()
