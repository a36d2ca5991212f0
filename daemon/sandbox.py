"""``--sandbox namespace|chroot|none``: confine the daemon to the shared directory.

``namespace`` (the default as root), as virtiofsd:

1. The process unshares a new pid namespace and forks.  The parent stays
   outside, drops every capability and sets no_new_privs: it forwards
   SIGTERM/SIGINT/SIGHUP/SIGQUIT/SIGUSR1/SIGUSR2 to the child, waits for
   it and exits with its status (``128 + N`` when it was killed by signal
   N, logged; SIGSYS is a seccomp kill).  It also removes the
   ``--socket-path`` file afterwards, which the child can no longer see.
2. The child (pid 1 of its namespace) unshares new mount, network, IPC and
   UTS namespaces, makes every mount a slave (host unmounts still
   propagate in, nothing propagates out), mounts a fresh procfs on /proc
   and opens ``/proc/self/fd`` there (:mod:`procfs`), bind-mounts the
   shared directory onto itself and ``pivot_root``\\ s into it; the old root
   is detached.  The shared directory is then ``/``.

Not root, ``namespace`` first makes the daemon root of a new user
namespace (``unshare(CLONE_NEWUSER)``), as virtiofsd does; then the steps
above, which that root may take in namespaces its user namespace owns.
Without ``--uid-map``/``--gid-map`` the process maps itself: namespace id
0 is its own uid/gid (``/proc/self/uid_map``, ``setgroups`` denied), the
only mapping the kernel lets an unprivileged process write.  With them a
helper forked before the unshare (it stays in the host's namespace) runs
``newuidmap``/``newgidmap`` (setuid root, Debian's ``uidmap``; the ranges
must be the user's in ``/etc/subuid``/``/etc/subgid``) on the process, and
the missing one of the two maps the own id only.  Host ids the namespace
does not map appear as the overflow id (65534); the daemon can switch its
fsuid only to mapped ids.

``chroot``: ``/proc/self/fd`` is opened, then ``chroot`` into the shared
directory (needs CAP_SYS_CHROOT: refused at start-up when not root).
``none``: nothing.

Python imports lazily, and after ``pivot_root`` no module file can be found:
:func:`preload` imports everything the daemon uses later, and a last
``sys.meta_path`` finder logs any import that still comes too late (the
import then fails as it would anyway).

The vhost-user socket is bound (``--socket-path``) or inherited (``--fd``)
before; an fd survives every namespace change.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import pkgutil
import platform
import signal
import subprocess
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path

from . import capabilities, procfs
from .idmap import NamespaceMap, namespace_map_args

__all__ = ["MODES", "LateImportLogger", "default_mode", "enter", "preload"]

log = logging.getLogger("pyvirtiofsd")

MODES = ("namespace", "chroot", "none")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4

CLONE_NEWNS = 0x0002_0000
CLONE_NEWUTS = 0x0400_0000
CLONE_NEWIPC = 0x0800_0000
CLONE_NEWPID = 0x2000_0000
CLONE_NEWNET = 0x4000_0000
CLONE_NEWUSER = 0x1000_0000
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MNT_DETACH = 2
_PR_SET_PDEATHSIG = 1
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(platform.machine())

#: Signals the outer process passes on to the sandboxed daemon.
FORWARDED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)

#: Modules the daemon imports after start-up (lazily, or inside functions).
PRELOAD = (
    "pyvirtiofsd.daemon.service",
    "pyvirtiofsd.daemon.device",
    "pyvirtiofsd.daemon.fuse.abi",
    "pyvirtiofsd.daemon.fuse.session",
    "pyvirtiofsd.daemon.passthrough.filesystem",
    "pyvirtiofsd.daemon.passthrough.inodes",
    "pyvirtiofsd.daemon.passthrough.oscalls",
    "pyvirtiofsd.daemon.vhost_user.backend",
    "pyvirtiofsd.daemon.vhost_user.connection",
    "pyvirtiofsd.daemon.vhost_user.errors",
    "pyvirtiofsd.daemon.vhost_user.handler",
    "pyvirtiofsd.daemon.vhost_user.messages",
    "pyvirtiofsd.daemon.vhost_user.server",
    "pyvirtiofsd.dma",
    "trio",
    "trio.lowlevel",
    "trio.socket",
    "trio.to_thread",
    "trio.from_thread",
    "encodings.idna",
    "encodings.ascii",
    "encodings.latin_1",
    "encodings.utf_8",
    "traceback",
    "linecache",
    "tokenize",
    "faulthandler",
)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return ret


def default_mode() -> str:
    """``namespace`` as root, else ``none`` (namespaces need CAP_SYS_ADMIN)."""
    return "namespace" if os.geteuid() == 0 else "none"


class LateImportLogger(importlib.abc.MetaPathFinder):
    """The last finder: every import reaching it was not found anywhere."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        log.error("sandbox: module %s was not imported before the sandbox was entered", fullname)
        return None


#: Daemon modules never imported by the serving daemon.
_NOT_PRELOADED = ("pyvirtiofsd.daemon.hostmount", "pyvirtiofsd.daemon.__main__")


def _package_modules(package: str) -> list[str]:
    """Every module of ``package`` (so that a module added later is covered too)."""
    pkg = importlib.import_module(package)
    return [
        info.name
        for info in pkgutil.walk_packages(pkg.__path__, f"{package}.")
        if info.name not in _NOT_PRELOADED
    ]


def preload(extra: Sequence[str] = ()) -> None:
    """Import every module the daemon needs once it is confined."""
    names = [*PRELOAD, *_package_modules("pyvirtiofsd.daemon"), *extra]
    for name in names:
        importlib.import_module(name)
    # traceback formatting and logging touch these on first use
    import time

    time.localtime()
    if not any(isinstance(f, LateImportLogger) for f in sys.meta_path):
        sys.meta_path.append(LateImportLogger())


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    enc = os.fsencode
    _check(
        _libc.mount(
            enc(source) if source else None,
            enc(target),
            enc(fstype) if fstype else None,
            flags,
            None,
        ),
        f"mount {target}",
    )


def _pivot_root(new_root: str, put_old: str) -> None:
    if _SYS_PIVOT_ROOT is None:
        raise OSError(f"no pivot_root system call number for {platform.machine()}")
    _check(
        _libc.syscall(
            ctypes.c_long(_SYS_PIVOT_ROOT),
            ctypes.c_char_p(os.fsencode(new_root)),
            ctypes.c_char_p(os.fsencode(put_old)),
        ),
        "pivot_root",
    )


def _open_proc() -> None:
    procfs.set_proc_self_fd(os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))


#: Knobs that can forbid unprivileged user namespaces (Debian's, upstream's, Ubuntu's).
USERNS_SYSCTLS = (
    "/proc/sys/kernel/unprivileged_userns_clone",
    "/proc/sys/user/max_user_namespaces",
    "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
)


def userns_settings() -> str:
    """The present ``USERNS_SYSCTLS`` as ``name=value`` (for error messages)."""
    found = []
    for path in USERNS_SYSCTLS:
        with contextlib.suppress(OSError), open(path, encoding="ascii") as f:
            found.append(f"{path.removeprefix('/proc/sys/').replace('/', '.')}={f.read().strip()}")
    return ", ".join(found) or "none of " + ", ".join(USERNS_SYSCTLS)


def _unshare_user_failed(code: int) -> OSError:
    return OSError(
        code,
        f"unshare(CLONE_NEWUSER): {os.strerror(code)}: this host may not allow unprivileged "
        f"user namespaces ({userns_settings()}); use --sandbox none",
    )


def _write_proc(name: str, text: str) -> None:
    with open(f"/proc/self/{name}", "w", encoding="ascii") as f:
        f.write(text)


def _map_with_tools(
    pid: int, uid_map: Sequence[NamespaceMap], gid_map: Sequence[NamespaceMap]
) -> str:
    """In the helper: newuidmap/newgidmap on ``pid``; an error message or ""."""
    own = {"uid": os.getuid(), "gid": os.getgid()}
    for kind, ranges in (("uid", uid_map), ("gid", gid_map)):
        ranges = ranges or (NamespaceMap(0, own[kind], 1),)
        argv = [f"new{kind}map", str(pid), *namespace_map_args(ranges)]
        try:
            r = subprocess.run(argv, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{argv[0]}: {e} (install Debian's uidmap)"
        if r.returncode != 0:
            why = r.stderr.decode(errors="replace").strip() or f"exit status {r.returncode}"
            return f"{' '.join(argv)}: {why}"
    return ""


def _enter_user_namespace(uid_map: Sequence[NamespaceMap], gid_map: Sequence[NamespaceMap]) -> None:
    """Become root of a new user namespace (see the module docstring)."""
    uid, gid = os.geteuid(), os.getegid()
    if not uid_map and not gid_map:
        if _libc.unshare(CLONE_NEWUSER) != 0:
            raise _unshare_user_failed(ctypes.get_errno())
        _write_proc("setgroups", "deny")
        _write_proc("uid_map", f"0 {uid} 1\n")
        _write_proc("gid_map", f"0 {gid} 1\n")
    else:
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        parent = os.getpid()
        helper = os.fork()
        if helper == 0:  # stays in the host's user namespace
            os.close(go_w)
            os.close(done_r)
            message = "the daemon did not unshare"
            if os.read(go_r, 1) == b"1":
                message = _map_with_tools(parent, uid_map, gid_map)
            os.write(done_w, message.encode()[:4000])
            os._exit(1 if message else 0)
        os.close(go_r)
        os.close(done_w)
        unshared = _libc.unshare(CLONE_NEWUSER) == 0
        code = ctypes.get_errno()
        os.write(go_w, b"1" if unshared else b"0")
        os.close(go_w)
        chunks = []
        while chunk := os.read(done_r, 4096):
            chunks.append(chunk)
        os.close(done_r)
        _, status = os.waitpid(helper, 0)
        if not unshared:
            raise _unshare_user_failed(code)
        if status != 0:
            raise OSError(b"".join(chunks).decode(errors="replace") or "id mapping failed")
    # root of the namespace now: make the ids read as 0 (mapped above)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    log.info(
        "sandbox: user namespace, uid map %s, gid map %s",
        " ".join(map(str, uid_map)) or f":0:{uid}:1:",
        " ".join(map(str, gid_map)) or f":0:{gid}:1:",
    )


def _enter_chroot(shared: Path) -> Path:
    _open_proc()
    os.chroot(shared)
    os.chdir("/")
    return Path("/")


def _confine_child(shared: Path) -> Path:
    """In the child: new namespaces, fresh /proc, pivot_root into ``shared``."""
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
    _mount(None, "/", None, MS_SLAVE | MS_REC)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME)
    _open_proc()
    _mount(str(shared), str(shared), None, MS_BIND | MS_REC)
    os.chdir(shared)
    _pivot_root(".", ".")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    # pid 1 of a namespace ignores signals it has no handler for
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    return Path("/")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _supervise(child: int, cleanup: Callable[[], None], ready: int) -> int:
    """The outer process: forward signals, wait, return the exit status.
    Closing ``ready`` lets the child go on, once the signals are set up."""

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for forwarded in FORWARDED_SIGNALS:
        signal.signal(forwarded, forward)
    # Waiting, signalling its own child and unlinking the socket file need
    # no capability: the outer process keeps none.
    try:
        if os.geteuid() == 0:
            capabilities.restrict(frozenset(), who="outer process")
        capabilities.set_no_new_privs()
    except (OSError, RuntimeError) as e:
        log.warning("sandbox: the outer process keeps its capabilities: %s", e)
    os.close(ready)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            status = 1 << 8
            break
    cleanup()
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name
        if sig == signal.SIGSYS:
            log.error(
                "sandboxed daemon (pid %d) killed by SIGSYS: a system call outside "
                "the seccomp allowlist (see the kernel's audit log: type=1326)",
                child,
            )
        else:
            log.error("sandboxed daemon (pid %d) killed by %s", child, name)
        return 128 + sig
    return os.waitstatus_to_exitcode(status)


def enter(
    mode: str,
    shared: Path,
    *,
    parent_cleanup: Callable[[], None],
    uid_map: Sequence[NamespaceMap] = (),
    gid_map: Sequence[NamespaceMap] = (),
) -> Path:
    """Confine the process (see the module docstring); return the shared
    directory's path inside the sandbox.

    In ``namespace`` mode only the sandboxed child returns; the outer
    process runs ``parent_cleanup`` once the child is gone and exits with
    its status.  Must run while the process has one thread.  ``uid_map`` /
    ``gid_map`` (``--uid-map``/``--gid-map``) are for a daemon that is not
    root, in ``namespace`` mode only.
    """
    rootless = os.geteuid() != 0
    if (uid_map or gid_map) and (mode != "namespace" or not rootless):
        raise ValueError(
            "--uid-map/--gid-map need --sandbox namespace and a daemon that is not root"
        )
    if mode == "none":
        return shared
    if mode == "chroot" and rootless:
        raise ValueError(
            "--sandbox chroot needs root (CAP_SYS_CHROOT); not root, use --sandbox "
            "namespace (a user namespace) or none"
        )
    preload()
    if mode == "chroot":
        path = _enter_chroot(shared)
        log.info("sandbox: chroot into %s", shared)
        return path
    if mode != "namespace":
        raise ValueError(f"unknown sandbox mode {mode!r}")
    if rootless:
        _enter_user_namespace(uid_map, gid_map)
    _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    sys.stdout.flush()
    sys.stderr.flush()
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(ready_w)
        os.read(ready_r, 1)  # the outer process forwards signals from here on
        os.close(ready_r)
        try:
            path = _confine_child(shared)
        except BaseException as e:
            log.error("sandbox: cannot confine the daemon: %s", e)
            os._exit(1)
        log.info("sandbox: namespaces (mount, pid, net, ipc, uts), root is %s", shared)
        return path
    os.close(ready_r)
    code = _supervise(child, parent_cleanup, ready_w)
    logging.shutdown()
    os._exit(code)
