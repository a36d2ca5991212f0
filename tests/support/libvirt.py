"""A private libvirtd for the tests, and the domain XML that boots our guest.

Debian 12's libvirt 9.0 (``libvirt-daemon``, ``libvirt-daemon-driver-qemu``,
``libvirt-clients``; see ``scripts/install-system-deps.sh``) run as root is
always the *system* instance: its configuration, state and logs live at fixed
paths (``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``,
``/var/log/libvirt``, ``/var/cache/libvirt``) and only ``libvirtd.conf`` can be
moved (``--config``). So :class:`Libvirtd` starts it in a mount namespace of
its own (``unshare --mount``) where each of those paths is a bind mount of a
directory under the test's root; nothing of the host's libvirt (if any) is
read or written, and the daemon's children (QEMU, pyvirtiofsd) inherit the
same view.

Two quirks of running it without ``libvirt-daemon-system``:

- the QEMU driver resolves its compile-time default user ``libvirt-qemu``
  before it reads ``qemu.conf`` (which sets ``user = "root"``): inside the
  namespace ``/etc/passwd`` and ``/etc/group`` are copies with that one entry
  added, so the host's are untouched;
- no virtlogd: ``stdio_handler = "file"``; no cgroups, no per-domain mount
  namespace, no security driver (a container can do none of them).

libvirt daemonizes QEMU and every virtiofsd it starts, so they are not our
children: :meth:`Libvirtd.stop` destroys what is still running first, and as
a last resort kills what the pid files under ``run/qemu`` name.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from pyvirtiofsd.vm.process import ChildProcess, pid_exists

LIBVIRTD = "/usr/sbin/libvirtd"
VIRSH = "virsh"

#: Host path -> directory under the private root bound over it.
BIND_DIRS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/log/libvirt": "log",
    "/var/cache/libvirt": "cache",
}
#: Where a privileged libvirt looks first for vhost-user backend descriptors
#: (docs/interop/vhost-user.json), then /etc/qemu/vhost-user.
VHOST_USER_DIR = "/usr/share/qemu/vhost-user"

LIBVIRTD_CONF = """\
# Written by tests/support/libvirt.py for a private libvirtd.
auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

QEMU_CONF = """\
# Written by tests/support/libvirt.py for a private libvirtd.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""

#: Runs as ``sh -c SCRIPT sh ROOT`` inside ``unshare --mount``.
NAMESPACE_SCRIPT = """\
set -eu
root=$1
cp /etc/passwd "$root/passwd"
cp /etc/group "$root/group"
grep -q '^libvirt-qemu:' "$root/passwd" ||
    echo 'libvirt-qemu:x:64055:64055:resolved by libvirt, not used:/nonexistent:/bin/false' \
        >>"$root/passwd"
grep -q '^libvirt-qemu:' "$root/group" || echo 'libvirt-qemu:x:64055:' >>"$root/group"
mount --bind "$root/passwd" /etc/passwd
mount --bind "$root/group" /etc/group
{binds}
exec {libvirtd} --config /etc/libvirt/libvirtd.conf --pid-file /run/libvirt/libvirtd.pid
"""


class LibvirtError(RuntimeError):
    """libvirtd could not be started or a virsh command failed."""


@dataclass(frozen=True)
class GuestDomain:
    """What the domain XML of :func:`domain_xml` needs."""

    name: str
    kernel: Path
    initrd: Path
    cmdline: str
    fs_binary: Path | None  # None: libvirt finds it through the discovery JSON
    fs_source: Path
    fs_tag: str
    agent_socket: Path  # we listen; QEMU connects (virtio-serial port)
    agent_port_name: str
    console_log: Path
    # The daemon's settings libvirt turns into arguments (None: not in the XML).
    fs_cache: str | None = None  # <cache mode=...>: -o ...,cache=MODE
    fs_sandbox: str | None = None  # <sandbox mode=...>: -o ...,sandbox=MODE
    fs_xattr: bool | None = None  # <binary xattr=on|off>: -o ...,[no_]xattr
    fs_locks: bool | None = None  # <lock posix flock>: -o ...,[no_]flock,[no_]posix_lock
    fs_thread_pool: int | None = None  # <thread_pool size=N>: --thread-pool-size=N
    memory_mib: int = 512
    cpus: int = 2
    emulator: str = "/usr/bin/qemu-system-x86_64"


def binary_xml(d: GuestDomain) -> str:
    """The ``<binary>`` element (empty when it would say nothing)."""

    def onoff(v: bool) -> str:
        return "on" if v else "off"

    attrs = "" if d.fs_binary is None else f" path={quoteattr(str(d.fs_binary))}"
    if d.fs_xattr is not None:
        attrs += f" xattr='{onoff(d.fs_xattr)}'"
    children = []
    if d.fs_cache is not None:
        children.append(f"<cache mode={quoteattr(d.fs_cache)}/>")
    if d.fs_sandbox is not None:
        children.append(f"<sandbox mode={quoteattr(d.fs_sandbox)}/>")
    if d.fs_locks is not None:
        children.append(f"<lock posix='{onoff(d.fs_locks)}' flock='{onoff(d.fs_locks)}'/>")
    if d.fs_thread_pool is not None:
        children.append(f"<thread_pool size='{d.fs_thread_pool}'/>")
    if not attrs and not children:
        return ""
    inner = "".join(f"\n        {c}" for c in children)
    return f"      <binary{attrs}>{inner}\n      </binary>\n"


def domain_xml(d: GuestDomain) -> str:
    """A TCG domain booting our kernel directly, with one virtio-fs share
    served by ``d.fs_binary`` that libvirt itself starts."""

    def t(v: object) -> str:
        return escape(str(v))

    def a(v: object) -> str:
        return quoteattr(str(v))

    binary = binary_xml(d)
    return f"""\
<domain type='qemu'>
  <name>{t(d.name)}</name>
  <memory unit='MiB'>{d.memory_mib}</memory>
  <vcpu>{d.cpus}</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{t(d.kernel)}</kernel>
    <initrd>{t(d.initrd)}</initrd>
    <cmdline>{t(d.cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum' migratable='off'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{t(d.emulator)}</emulator>
    <filesystem type='mount' accessmode='passthrough'>
      <driver type='virtiofs'/>
{binary}      <source dir={a(d.fs_source)}/>
      <target dir={a(d.fs_tag)}/>
    </filesystem>
    <serial type='file'>
      <source path={a(d.console_log)}/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='connect' path={a(d.agent_socket)}/>
      <target type='virtio' name={a(d.agent_port_name)}/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
"""


class Libvirtd:
    """libvirtd in its own mount namespace, with everything under ``root``.

    ``log_dir`` (bound on ``/var/log/libvirt``) may lie elsewhere, e.g. in
    the build tree's run directory, so the logs outlive the test.
    """

    def __init__(self, root: Path, log_dir: Path, *, vhost_user_dir: Path | None = None) -> None:
        self.root = root
        self.log_dir = log_dir
        self.binds = {inside: self.host_path(inside) for inside in BIND_DIRS}
        if vhost_user_dir is not None:
            # The only vhost-user backend descriptors libvirt will find.
            self.binds[VHOST_USER_DIR] = vhost_user_dir
        self.process: ChildProcess | None = None

    @property
    def socket_path(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket_path}"

    def host_path(self, path: str) -> Path:
        """Where a path of libvirtd's view (``/run/libvirt/...``) is on the host."""
        for inside, sub in BIND_DIRS.items():
            if path == inside or path.startswith(inside + "/"):
                base = self.log_dir if sub == "log" else self.root / sub
                return base / os.path.relpath(path, inside)
        return Path(path)

    def start(self, timeout: float = 60.0) -> None:
        if not Path(LIBVIRTD).exists() or shutil.which(VIRSH) is None:
            raise LibvirtError(
                f"{LIBVIRTD} or {VIRSH} is missing: run scripts/install-system-deps.sh (make deps)"
            )
        for sub in BIND_DIRS.values():
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        (self.root / "etc" / "qemu.conf").write_text(QEMU_CONF)
        binds = "\n".join(
            f"mkdir -p {inside}\nmount --bind {shlex.quote(str(src))} {inside}"
            for inside, src in self.binds.items()
        )
        script = NAMESPACE_SCRIPT.format(binds=binds, libvirtd=LIBVIRTD)
        argv = ["unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", script, "sh", str(self.root)]  # fmt: skip
        # unshare and sh exec: the child we own (and its PDEATHSIG) is libvirtd.
        self.process = ChildProcess("libvirtd", argv, self.log_dir / "libvirtd.stdout")
        self._wait_listening(timeout)

    def _wait_listening(self, timeout: float) -> None:
        """Bounded wait for libvirtd's socket to accept (it has no readiness
        notification outside systemd); a virsh call made then is served once
        the drivers are initialised."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if not self.process.alive():
                raise LibvirtError(
                    f"libvirtd exited with {self.process.returncode()}:\n"
                    + self.process.log_tail()
                    + "\n"
                    + self.log_tail()
                )
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(self.socket_path))
                    return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise LibvirtError(f"libvirtd did not listen within {timeout:.0f} s")
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.log_dir / "libvirtd.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def virsh(self, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        """Run ``virsh -c URI ARGS``; returns stdout, raises LibvirtError on failure."""
        argv = [VIRSH, "-q", "-c", self.uri, *args]
        try:
            r = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired as e:
            raise LibvirtError(f"`{shlex.join(argv)}` took over {timeout:.0f} s") from e
        if check and r.returncode != 0:
            raise LibvirtError(
                f"`{shlex.join(argv)}` exited {r.returncode}: {r.stderr.strip()}\n"
                f"libvirtd.log:\n{self.log_tail()}"
            )
        return r.stdout

    def domain_state(self, name: str) -> str:
        return self.virsh("domstate", name).strip()

    def wait_state(self, name: str, state: str, timeout: float = 60.0) -> None:
        """Bounded wait for ``virsh domstate`` to read ``state`` (libvirt
        handles QEMU's exit asynchronously)."""
        deadline = time.monotonic() + timeout
        while (now := self.domain_state(name)) != state:
            if time.monotonic() > deadline:
                raise LibvirtError(f"domain {name} is {now!r}, not {state!r}, after {timeout} s")
            time.sleep(0.1)

    def _pid_files(self) -> Iterator[Path]:
        yield from (self.root / "run" / "qemu").glob("*.pid")

    def stop(self, grace: float = 15.0) -> None:
        """Destroy every running domain, stop libvirtd, kill any daemonized
        child it left (by its pid files). Idempotent."""
        if self.process is None:
            return
        if self.process.alive():
            with contextlib.suppress(LibvirtError):
                for name in self.virsh("list", "--name", timeout=30).split():
                    self.virsh("destroy", name, timeout=60, check=False)
        self.process.stop(grace)
        self.process = None
        for pid_file in self._pid_files():
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().strip())
                if pid_exists(pid):
                    os.kill(pid, signal.SIGKILL)


def processes_matching(needle: str) -> dict[int, list[str]]:
    """Live processes whose command line holds ``needle`` in one argument:
    pid -> argv (read from /proc)."""
    found: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        argv = [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]
        if any(needle in a for a in argv) and pid_exists(int(entry)):
            found[int(entry)] = argv
    return found
