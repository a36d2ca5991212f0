"""``pyvirtiofsd``: command line of the vhost-user-fs backend.

A drop-in for virtiofsd 1.13's command line: each of its options is accepted
as ``--opt value`` and ``--opt=value`` (and its ``-o`` list), and is either
served or refused by name at start-up (:data:`VIRTIOFSD_OPTIONS` says which)::

    pyvirtiofsd --socket-path /run/fs.sock --shared-dir /srv/share
    pyvirtiofsd --fd 3 --shared-dir /srv/share          # inherited listening socket
    pyvirtiofsd --socket-path=/run/fs.sock -o source=/srv/share,cache=auto
    pyvirtiofsd --print-capabilities                     # vhost-user backend JSON

Every value is checked when the command line is read, before the daemon
listens: a bad value is an exit status 2 at start, never an error when the
front-end connects. With --socket-path the daemon writes ``<socket>.pid``
(locked, holding its pid) before it listens, as virtiofsd; clients wait for it.

The daemon serves one front-end (QEMU) at a time. When it disconnects the
daemon releases everything and exits, like virtiofsd; with
``--keep-listening`` it waits for the next connection instead.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import grp
import json
import logging
import logging.handlers
import os
import shutil
import signal
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from . import __version__, capabilities, idmap, limits, sandbox, seccomp
from .config import (
    DEFAULT_NUM_REQUEST_QUEUES,
    DEFAULT_POLL_MAX_NS,
    DEFAULT_THREAD_POOL_SIZE,
    INODE_FILE_HANDLES_MODES,
    MAX_POLL_MAX_NS,
    MAX_REQUEST_QUEUES,
    MAX_THREAD_POOL_SIZE,
    CachePolicy,
    ConfigError,
    FsConfig,
    ServiceConfig,
)
from .passthrough import filehandles
from .passthrough.xattrmap import XattrMap, XattrMapError

log = logging.getLogger("pyvirtiofsd")

LOG_LEVELS = {
    "error": logging.ERROR,
    "err": logging.ERROR,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": logging.DEBUG,
    "off": logging.CRITICAL + 1,
}

#: ``--sandbox`` when root and none is given (``none`` when not root).
DEFAULT_SANDBOX_ROOT = "namespace"
#: ``--seccomp`` when none is given.
DEFAULT_SECCOMP = "kill"
#: Where ``--syslog`` sends (the syslog crate virtiofsd uses tries these too).
SYSLOG_SOCKETS = ("/dev/log", "/var/run/syslog", "/var/run/log")

#: What ``--print-capabilities`` prints (QEMU docs/interop/vhost-user.json,
#: VHostUserBackendCapabilitiesFs), in virtiofsd's layout. "separate-options":
#: libvirt may pass --shared-dir, --cache ... rather than one -o list. Not
#: "migrate-precopy": the device offers no VHOST_USER_PROTOCOL_F_DEVICE_STATE.
CAPABILITIES: dict[str, Any] = {"type": "fs", "features": ["separate-options"]}

IMPLEMENTED = "implemented"
REFUSED = "refused"
NO_EFFECT = "accepted, no effect"

#: Every option of virtiofsd 1.13: its status here and what it does (or why
#: it is refused). The README's table is this one; a test holds them equal.
VIRTIOFSD_OPTIONS: dict[str, tuple[str, str]] = {
    "--shared-dir": (IMPLEMENTED, "the directory to share"),
    "--tag": (REFUSED, "no VHOST_USER_PROTOCOL_F_CONFIG: the tag is QEMU's tag= property"),
    "--socket": (IMPLEMENTED, "deprecated spelling of --socket-path (a warning)"),
    "--socket-path": (IMPLEMENTED, "listen there; writes <socket-path>.pid"),
    "--socket-group": (IMPLEMENTED, "group of the socket file (mode 0660)"),
    "--fd": (IMPLEMENTED, "an inherited listening socket (libvirt)"),
    "--thread-pool-size": (
        IMPLEMENTED,
        f"Python workers, 0..{MAX_THREAD_POOL_SIZE} (default {DEFAULT_THREAD_POOL_SIZE}; "
        "virtiofsd's is 0)",
    ),
    "--xattr": (IMPLEMENTED, "extended attributes"),
    "--posix-acl": (REFUSED, "FUSE_POSIX_ACL is not implemented"),
    "--xattrmap": (IMPLEMENTED, "virtiofsd's rule syntax; implies --xattr"),
    "--sandbox": (IMPLEMENTED, "namespace, chroot, none"),
    "--readonly": (IMPLEMENTED, "every modification answers EROFS"),
    "--seccomp": (IMPLEMENTED, "kill, log, trap, none"),
    "--announce-submounts": (IMPLEMENTED, "FUSE_SUBMOUNTS (default off here, on in virtiofsd)"),
    "--no-announce-submounts": (IMPLEMENTED, "the default here"),
    "--inode-file-handles": (IMPLEMENTED, "never (default), prefer, mandatory; fallback = prefer"),
    "--cache": (IMPLEMENTED, "auto, always, never, metadata (and -o cache=none)"),
    "--allow-mmap": (REFUSED, "FUSE_DIRECT_IO_ALLOW_MMAP is not implemented"),
    "--no-readdirplus": (IMPLEMENTED, "INIT offers no READDIRPLUS (nor with --cache never)"),
    "--writeback": (IMPLEMENTED, "FUSE_WRITEBACK_CACHE"),
    "--allow-direct-io": (IMPLEMENTED, "a guest O_DIRECT open is host O_DIRECT"),
    "--print-capabilities": (IMPLEMENTED, "vhost-user.json capabilities"),
    "--modcaps": (IMPLEMENTED, "+cap/-cap on the kept capability set"),
    "--log-level": (IMPLEMENTED, "error, warn, info, debug, trace, off"),
    "--syslog": (IMPLEMENTED, "log to /dev/log (opened before the sandbox)"),
    "--rlimit-nofile": (IMPLEMENTED, "open-file limit (0: leave it)"),
    "-o": (IMPLEMENTED, "virtiofsd's compat list (see below)"),
    "-d": (IMPLEMENTED, "deprecated --log-level debug (a warning)"),
    "--no-killpriv-v2": (IMPLEMENTED, "INIT offers no HANDLE_KILLPRIV_V2 (virtiofsd's default)"),
    "--killpriv-v2": (IMPLEMENTED, "HANDLE_KILLPRIV_V2 (the default here)"),
    "-f": (NO_EFFECT, "virtiofsd ignores it too: the daemon runs in the foreground"),
    "--security-label": (REFUSED, "FUSE_SECURITY_CTX is not implemented"),
    "--uid-map": (IMPLEMENTED, "user namespace of the rootless namespace sandbox"),
    "--gid-map": (IMPLEMENTED, "user namespace of the rootless namespace sandbox"),
    "--translate-uid": (IMPLEMENTED, "uid translation in the daemon"),
    "--translate-gid": (IMPLEMENTED, "gid translation in the daemon"),
    "--preserve-noatime": (REFUSED, "O_NOATIME is always cleared (virtiofsd's default)"),
    "--migration-mode": (REFUSED, "migration is not implemented (no DEVICE_STATE)"),
    "--migration-on-error": (REFUSED, "migration is not implemented (no DEVICE_STATE)"),
    "--migration-verify-handles": (REFUSED, "migration is not implemented (no DEVICE_STATE)"),
    "--migration-confirm-paths": (REFUSED, "migration is not implemented (no DEVICE_STATE)"),
    "--help": (IMPLEMENTED, "also -h"),
    "--version": (IMPLEMENTED, "also -V; exits 0"),
}

#: virtiofsd 1.13's ``-o`` names (and ours: log_level=, posix_lock, flock,
#: no_announce_submounts, sandbox=none): what each sets, or why it is refused.
COMPAT_VALUES = {"source", "cache", "loglevel", "log_level", "sandbox", "modcaps", "xattrmap"}
COMPAT_FLAGS: dict[str, tuple[str, Any]] = {
    "xattr": ("xattr", True),
    "no_xattr": ("xattr", False),
    "readdirplus": ("readdirplus", True),
    "no_readdirplus": ("readdirplus", False),
    "writeback": ("writeback", True),
    "no_writeback": ("writeback", False),
    "allow_direct_io": ("allow_direct_io", True),
    "no_allow_direct_io": ("allow_direct_io", False),
    "announce_submounts": ("announce_submounts", True),
    "no_announce_submounts": ("announce_submounts", False),
    "killpriv_v2": ("killpriv_v2", True),
    "no_killpriv_v2": ("killpriv_v2", False),
    "no_posix_acl": ("posix_acl", False),
    "no_security_label": ("security_label", False),
    "posix_lock": ("posix_lock", True),
    "no_posix_lock": ("posix_lock", False),
    "flock": ("flock", True),
    "no_flock": ("flock", False),
}
COMPAT_REFUSED = {
    "posix_acl": "FUSE_POSIX_ACL is not implemented",
    "security_label": "FUSE_SECURITY_CTX is not implemented",
}


def backend_descriptor() -> dict[str, str]:
    """The VhostUserBackend JSON that libvirt/management tools discover
    (``share/qemu/vhost-user/50-pyvirtiofsd.json``), naming this installation."""
    binary = shutil.which("pyvirtiofsd") or str(Path(sys.argv[0]).resolve())
    return {
        "description": "pyvirtiofsd: virtio-fs vhost-user backend in Python",
        "type": "fs",
        "binary": str(Path(binary).resolve()),
    }


# --- value parsers: each raises ArgumentTypeError, so argparse names the option


def _int_in(low: int, high: int | None) -> Any:
    def parse(text: str) -> int:
        try:
            n = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"{n} is not in {low}..{'' if high is None else high}")
        return n

    return parse


_pool_size = _int_in(0, MAX_THREAD_POOL_SIZE)
_poll_max_ns = _int_in(0, MAX_POLL_MAX_NS)
_queues = _int_in(1, MAX_REQUEST_QUEUES)
_fd_number = _int_in(0, None)
_nofile = _int_in(0, None)


def _cache(text: str) -> CachePolicy:
    try:
        return CachePolicy.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _xattrmap(text: str) -> XattrMap:
    try:
        return XattrMap.from_option(text)
    except XattrMapError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _group(text: str) -> str:
    try:
        grp.getgrnam(text)
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown group {text!r}") from None
    return text


def _choice(name: str, choices: Sequence[str]) -> Any:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"bad {name} {text!r} (one of {', '.join(choices)})")
        return text

    return parse


_log_level = _choice("log level", tuple(LOG_LEVELS))
_sandbox = _choice("sandbox", sandbox.MODES)
_seccomp = _choice("seccomp action", seccomp.MODES)
_inode_file_handles = _choice("inode file handles mode", (*INODE_FILE_HANDLES_MODES, "fallback"))


def parse_swiotlb(text: str) -> tuple[int, int]:
    """Parse the ``0x<base>,<size>`` window form (size in bytes, hex or decimal)."""
    base_s, sep, size_s = text.partition(",")
    if not sep:
        raise argparse.ArgumentTypeError("expected 0x<base>,<size>")
    try:
        base, size = int(base_s, 0), int(size_s, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad number in {text!r}") from None
    if size <= 0 or base < 0 or base + size > 1 << 64:
        raise argparse.ArgumentTypeError(f"bad window {text!r}")
    return base, size


def _id_rule(text: str) -> idmap.IdRule:
    try:
        return idmap.parse_rule(text)
    except idmap.IdMapError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ns_range(text: str) -> idmap.NamespaceMap:
    try:
        return idmap.parse_namespace_map(text)
    except idmap.IdMapError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _Refused(argparse.Action):
    """A virtiofsd option this daemon does not serve: an error naming it, at
    parse time (``--opt``, ``--opt value`` and ``--opt=value`` alike)."""

    def __init__(self, option_strings: list[str], dest: str, reason: str, **kw: Any) -> None:
        self.reason = reason
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, **kw)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        parser.error(f"{option_string}: not supported by pyvirtiofsd: {self.reason}")


def split_compat_options(text: str) -> list[str]:
    """``-o`` split at single commas; ``,,`` is a literal comma, QEMU's escape,
    which libvirt uses: ``-o source=/srv/a,,b`` shares ``/srv/a,b``."""
    return [part.replace("\0", ",") for part in text.replace(",,", "\0").split(",")]


class _Compat(argparse.Action):
    """virtiofsd's ``-o a=b,c,...``, folded into the other options as read
    (the same value checks, the same errors at start-up)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        namespace.compat_options = True
        for opt in split_compat_options(str(values)):
            if not opt:
                continue
            key, eq, value = opt.partition("=")
            try:
                self._one(namespace, key, value if eq else None)
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentError(self, f"-o {opt}: {e}") from None

    @staticmethod
    def _one(ns: argparse.Namespace, key: str, value: str | None) -> None:
        if key in COMPAT_REFUSED and value is None:
            raise argparse.ArgumentTypeError(f"not supported by pyvirtiofsd: {COMPAT_REFUSED[key]}")
        if key in COMPAT_FLAGS and value is None:
            dest, flag = COMPAT_FLAGS[key]
            setattr(ns, dest, flag)
            return
        if key not in COMPAT_VALUES or value is None:
            raise argparse.ArgumentTypeError("unknown option")
        if key == "source":
            ns.shared_dir = value
        elif key == "cache":
            ns.cache = _cache(value)
        elif key in ("loglevel", "log_level"):
            ns.log_level = _log_level(value)
        elif key == "sandbox":
            ns.sandbox = _sandbox(value)
        elif key == "modcaps":
            ns.modcaps = value  # checked with --modcaps, in main()
        else:
            ns.xattrmap = _xattrmap(value)


def _refuse(ap: argparse._ActionsContainer, option: str, *, takes_value: bool) -> None:
    status, reason = VIRTIOFSD_OPTIONS[option]
    assert status == REFUSED, option
    ap.add_argument(
        option,
        action=_Refused,
        reason=reason,
        nargs=1 if takes_value else 0,
        metavar="VALUE",
        help=f"refused: {reason}",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pyvirtiofsd",
        description="vhost-user virtio-fs device backend, in Python.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-V", "--version", action="version", version=f"pyvirtiofsd {__version__}")
    ap.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the vhost-user backend capabilities (JSON) and exit",
    )
    ap.add_argument(
        "--print-backend-descriptor",
        action="store_true",
        help="print the vhost-user backend descriptor for share/qemu/vhost-user/ and exit",
    )
    ap.add_argument(
        "--socket-path",
        metavar="PATH",
        help="vhost-user unix socket to listen on (and PATH.pid, locked, holding the pid)",
    )
    ap.add_argument("--socket", metavar="PATH", help="deprecated: --socket-path")
    ap.add_argument(
        "--fd",
        type=_fd_number,
        metavar="FD",
        help="inherited listening vhost-user socket (instead of --socket-path)",
    )
    ap.add_argument(
        "--socket-group",
        type=_group,
        metavar="GROUP",
        help="group owning the socket file created by --socket-path",
    )
    ap.add_argument("--shared-dir", metavar="DIR", help="directory to share with the guest")
    ap.add_argument(
        "-o",
        dest="compat_options",
        action=_Compat,
        default=False,
        metavar="OPTS",
        help="virtiofsd's comma-separated options: source=DIR, cache=MODE, loglevel=LEVEL, "
        "sandbox=MODE, modcaps=CAPS, xattrmap=RULES, [no_]xattr, [no_]readdirplus, "
        "[no_]writeback, [no_]allow_direct_io, [no_]announce_submounts, [no_]killpriv_v2, "
        "[no_]posix_lock, [no_]flock, no_posix_acl, no_security_label",
    )
    ap.add_argument(
        "--cache",
        type=_cache,
        default=CachePolicy.AUTO,
        metavar="auto|always|never|metadata",
        help="guest cache policy: attr/entry timeouts 1 s / a day / 0 / a day, file data "
        "cached / kept across opens / not (DIRECT_IO) / not (default auto)",
    )
    ap.add_argument(
        "--xattr", action="store_true", help="pass extended attributes through (default: ENOSYS)"
    )
    ap.add_argument(
        "--writeback",
        action="store_true",
        help="let the guest use its writeback cache (FUSE_WRITEBACK_CACHE)",
    )
    ap.add_argument(
        "--posix-lock",
        dest="posix_lock",
        action="store_true",
        help="host-visible POSIX locks, as OFD locks (default: the guest kernel "
        "locks locally); a blocking wait waits in the daemon until granted",
    )
    ap.add_argument("--flock", action="store_true", help="host-visible flock() locks")
    ap.add_argument(
        "--announce-submounts",
        action="store_true",
        help="tell the guest about host mount points inside the share (own st_dev there)",
    )
    ap.add_argument(
        "--no-announce-submounts",
        dest="announce_submounts",
        action="store_false",
        help="do not (the default)",
    )
    ap.add_argument(
        "--no-readdirplus",
        dest="readdirplus",
        action="store_false",
        help="do not offer READDIRPLUS (never offered with --cache never)",
    )
    ap.add_argument(
        "--killpriv-v2",
        dest="killpriv_v2",
        action="store_true",
        default=True,
        help="offer FUSE_HANDLE_KILLPRIV_V2: the daemon clears setuid/setgid on write, "
        "truncate and chown (the default)",
    )
    ap.add_argument(
        "--no-killpriv-v2",
        dest="killpriv_v2",
        action="store_false",
        help="do not offer it (the guest kernel clears them)",
    )
    ap.add_argument(
        "--allow-direct-io",
        action="store_true",
        help="honour the guest's O_DIRECT (host O_DIRECT, no guest page cache for that file)",
    )
    ap.add_argument(
        "--allow-device-nodes",
        action="store_true",
        help="let the guest create character/block device nodes (default: EPERM)",
    )
    ap.add_argument("--readonly", action="store_true", help="refuse every modification")
    ap.add_argument(
        "--thread-pool-size",
        type=_pool_size,
        default=DEFAULT_THREAD_POOL_SIZE,
        metavar="N",
        help="Python worker threads for the data, sync and lock requests the C fast "
        "path does not answer (GETATTR/LOOKUP/READ/WRITE run in C and metadata "
        "requests in Python, on each queue's thread); 0: serve every request on the "
        f"queue's own thread (default {DEFAULT_THREAD_POOL_SIZE}, at most "
        f"{MAX_THREAD_POOL_SIZE})",
    )
    ap.add_argument(
        "--poll-max-ns",
        type=_poll_max_ns,
        default=DEFAULT_POLL_MAX_NS,
        metavar="NS",
        help="before a request queue's thread sleeps, poll the ring for up to NS "
        "nanoseconds (adaptive, as QEMU's iothread poll-max-ns: the window shrinks "
        "to 0 while requests come further apart); saves a wake-up per request at low "
        f"queue depth; 0: never poll (default {DEFAULT_POLL_MAX_NS}, at most "
        f"{MAX_POLL_MAX_NS})",
    )
    ap.add_argument(
        "--stats-file",
        type=Path,
        metavar="PATH",
        help="keep per-queue request counts here as JSON while serving (rewritten "
        "every 0.2 s and when a device stops); implies --sandbox none",
    )
    ap.add_argument(
        "--num-request-queues",
        type=_queues,
        default=DEFAULT_NUM_REQUEST_QUEUES,
        metavar="N",
        help=f"most request queues offered to the front-end, 1..{MAX_REQUEST_QUEUES} "
        f"(default {DEFAULT_NUM_REQUEST_QUEUES})",
    )
    ap.add_argument(
        "--swiotlb",
        type=parse_swiotlb,
        metavar="0xBASE,SIZE",
        help="strict window mode: map only this guest-physical range, require "
        "VIRTIO_F_ACCESS_PLATFORM, refuse rings/buffers outside it",
    )
    ap.add_argument(
        "--keep-listening",
        action="store_true",
        help="after the front-end disconnects, wait for the next one (default: exit)",
    )
    ap.add_argument(
        "--log-level",
        type=_log_level,
        default="info",
        metavar="LEVEL",
        help=f"{', '.join(LOG_LEVELS)} (default info)",
    )
    ap.add_argument("-d", dest="compat_debug", action="store_true", help="deprecated: debug log")
    ap.add_argument(
        "--syslog",
        action="store_true",
        help="log to syslog (/dev/log, facility user) instead of stderr",
    )
    ap.add_argument(
        "--sandbox",
        type=_sandbox,
        default=None,
        metavar="|".join(sandbox.MODES),
        help="confine the daemon: namespace (new mount/pid/net/ipc/uts namespaces, "
        "pivot_root into the share; not root, inside a new user namespace, see "
        "--uid-map), chroot (root only), or none (default: "
        f"{DEFAULT_SANDBOX_ROOT} as root, none otherwise)",
    )
    ap.add_argument(
        "--seccomp",
        type=_seccomp,
        default=DEFAULT_SECCOMP,
        metavar="|".join(seccomp.MODES),
        help="action for a system call outside the allowlist: kill the daemon, log "
        f"it (kernel audit log), trap (SIGSYS, Python stacks on stderr), none "
        f"(default {DEFAULT_SECCOMP})",
    )
    ap.add_argument(
        "--modcaps",
        metavar="+CAP:-CAP",
        help="capabilities to keep besides (+) or drop from (-) the default set "
        f"({', '.join(sorted(capabilities.DEFAULT_CAPS))}), e.g. +sys_admin:-mknod",
    )
    ap.add_argument(
        "--rlimit-nofile",
        type=_nofile,
        metavar="N",
        help="open-file limit (default: min(1000000, /proc/sys/fs/nr_open), the "
        "soft limit capped by the hard one unless root; 0: leave it)",
    )
    ap.add_argument(
        "--inode-file-handles",
        type=_inode_file_handles,
        default="never",
        metavar="|".join(filehandles.MODES),
        help="keep inodes by file handle (name_to_handle_at) so that at most half "
        "the open-file limit of them hold an fd: prefer (fall back to fds where "
        "handles cannot be used; 'fallback' is the same), mandatory (fail instead), "
        "never (every inode the guest knows holds an fd; default, as virtiofsd)",
    )
    for kind in ("uid", "gid"):
        ap.add_argument(
            f"--translate-{kind}",
            dest=f"translate_{kind}",
            action="append",
            type=_id_rule,
            default=[],
            metavar="TYPE:...",
            help=f"translate {kind}s between guest and host, one rule per option "
            "(virtiofsd's): map:GUEST:HOST:COUNT (both ways), guest:GUEST:HOST:COUNT, "
            "host:HOST:GUEST:COUNT, squash-guest:GUEST:HOST:COUNT, "
            "squash-host:HOST:GUEST:COUNT, forbid-guest:GUEST:COUNT (EPERM); "
            f"unmapped {kind}s stay as they are",
        )
    for kind in ("uid", "gid"):
        ap.add_argument(
            f"--{kind}-map",
            dest=f"{kind}_map",
            action="append",
            type=_ns_range,
            default=[],
            metavar=f":NS_{kind.upper()}:HOST_{kind.upper()}:COUNT:",
            help=f"not root, with --sandbox namespace: map this range of host {kind}s "
            f"into the daemon's user namespace (new{kind}map, /etc/sub{kind}); "
            f"default: the daemon's own {kind} as 0",
        )
    ap.add_argument(
        "--xattrmap",
        type=_xattrmap,
        metavar="RULES",
        help="map guest xattr names to host names, virtiofsd syntax "
        "(:prefix|ok|bad|unsupported:client|server|all:KEY:PREPEND: and :map:KEY:PREPEND:); "
        "implies --xattr",
    )
    ap.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="accepted for compatibility (the daemon always runs in the foreground)",
    )
    refused = ap.add_argument_group("virtiofsd options refused here (an error at start-up)")
    for option in ("--tag", "--migration-mode", "--migration-on-error"):
        _refuse(refused, option, takes_value=True)
    for option in (
        "--posix-acl",
        "--security-label",
        "--allow-mmap",
        "--preserve-noatime",
        "--migration-verify-handles",
        "--migration-confirm-paths",
    ):
        _refuse(refused, option, takes_value=False)
    # These become settings of their own when implemented; until then -o
    # no_posix_acl / no_security_label set them (to their only value).
    ap.set_defaults(posix_acl=False, security_label=False)
    return ap


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line, every value checked (argparse's exit 2 otherwise)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.socket is not None:
        if args.socket_path is not None:
            ap.error("give --socket-path or the deprecated --socket, not both")
        args.socket_path = args.socket
    if args.socket_group and args.fd is not None:
        ap.error("--socket-group applies to --socket-path, not --fd")
    if args.compat_debug:
        args.log_level = "debug"
    return args


def build_config(args: argparse.Namespace, shared_dir: Path) -> ServiceConfig:
    """The service's settings from the command line (ConfigError if bad)."""
    fs = FsConfig(
        shared_dir=shared_dir,
        cache=args.cache,
        readonly=args.readonly,
        xattr=args.xattr,
        xattrmap=args.xattrmap or XattrMap.from_option(None),
        writeback=args.writeback,
        posix_locks=args.posix_lock,
        flock=args.flock,
        allow_device_nodes=args.allow_device_nodes,
        allow_direct_io=args.allow_direct_io,
        announce_submounts=args.announce_submounts,
        readdirplus=args.readdirplus,
        killpriv_v2=args.killpriv_v2,
        inode_file_handles=args.inode_file_handles,
        ids=idmap.IdTranslation(
            idmap.IdMap(tuple(args.translate_uid)), idmap.IdMap(tuple(args.translate_gid))
        ),
    )
    return ServiceConfig(
        fs,
        num_request_queues=args.num_request_queues,
        window=args.swiotlb,
        keep_listening=args.keep_listening,
        thread_pool_size=args.thread_pool_size,
        poll_max_ns=args.poll_max_ns,
        stats_file=args.stats_file,
    )


def setup_logging(level: str, *, syslog: bool) -> None:
    """stderr, or syslog: its socket is connected here, before any sandbox
    (after pivot_root there is no /dev/log); unreachable, stderr with a warning."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler | None = None
    problem: str | None = None
    if syslog:
        for address in SYSLOG_SOCKETS:
            try:
                if not stat.S_ISSOCK(os.stat(address).st_mode):
                    continue
            except OSError:
                continue
            candidate = logging.handlers.SysLogHandler(
                address=address, facility=logging.handlers.SysLogHandler.LOG_USER
            )
            try:
                # connected now, or not at all: inside the sandbox the path is gone
                candidate.socket.getpeername()  # type: ignore[attr-defined]  # not in typeshed
            except OSError as e:
                candidate.close()
                problem = f"{address}: {e.strerror}"
                continue
            handler = candidate
            handler.setFormatter(
                logging.Formatter("pyvirtiofsd[%(process)d]: %(levelname)s %(name)s: %(message)s")
            )
            break
        else:
            problem = problem or f"no socket at {', '.join(SYSLOG_SOCKETS)}"
    fell_back = syslog and handler is None
    if handler is None:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("[%(asctime)s] [pyvirtiofsd] %(levelname)s %(name)s: %(message)s")
        )
    root.addHandler(handler)
    root.setLevel(LOG_LEVELS[level])
    if fell_back:
        log.warning("can't enable syslog: %s; logging to stderr", problem)


class PidFile:
    """``<socket-path>.pid`` as virtiofsd writes it: created 0600, locked
    (flock, exclusive: a second daemon on the same socket fails here),
    holding the pid and a newline; the lock lasts as long as the process."""

    def __init__(self, path: str) -> None:
        self.path = path
        while True:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = os.fstat(fd).st_ino
                try:
                    current = os.stat(path).st_ino
                except FileNotFoundError:
                    current = None  # removed by the daemon we raced with: again
            except BaseException:
                os.close(fd)
                raise
            if locked == current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            remove_socket_file(self.path)


def make_listener(args: argparse.Namespace) -> socket.socket:
    from .vhost_user.server import adopt_listener, listen_unix

    if args.fd is not None:
        return adopt_listener(args.fd)
    sock = listen_unix(args.socket_path)
    if args.socket_group:
        try:
            gid = grp.getgrnam(args.socket_group).gr_gid
        except KeyError:
            sock.close()
            raise SystemExit(f"pyvirtiofsd: unknown group {args.socket_group!r}") from None
        os.chown(args.socket_path, -1, gid)
        os.chmod(args.socket_path, 0o660)
    return sock


def remove_socket_file(path: str) -> None:
    """``unlinkat`` relative to the socket's directory: the seccomp filter
    allows unlinkat (the passthrough's call), not unlink."""
    parent, name = os.path.split(os.path.abspath(path))
    dir_fd = os.open(parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def confine(
    args: argparse.Namespace,
    shared: Path,
    listener: socket.socket,
    keep: frozenset[str],
    pid_file: PidFile | None = None,
) -> Path:
    """The sandbox, then capabilities, no_new_privs and seccomp, in that order
    (mounts need CAP_SYS_ADMIN, which goes; the filter allows no mount).
    Runs while the process has one thread; returns the share's path inside."""
    mode = args.sandbox or (DEFAULT_SANDBOX_ROOT if os.geteuid() == 0 else "none")
    if args.stats_file is not None and mode != "none":
        # The device rewrites it by path, which does not exist inside the sandbox.
        if args.sandbox is not None:
            raise ValueError("--stats-file needs --sandbox none (the file lies outside)")
        log.info("--stats-file given: running without a sandbox")
        mode = "none"

    def parent_cleanup() -> None:  # the outer process of the namespace sandbox
        listener.close()
        if args.socket_path:
            with contextlib.suppress(OSError):
                remove_socket_file(args.socket_path)
        if pid_file is not None:
            pid_file.remove()

    if args.seccomp != "none":
        seccomp.load_library()
        sandbox.preload()
    inside = sandbox.enter(
        mode, shared, parent_cleanup=parent_cleanup, uid_map=args.uid_map, gid_map=args.gid_map
    )
    # As root (or root of the rootless sandbox's user namespace) the kept set;
    # otherwise what the daemon was given (ambient or file capabilities) is
    # cut down to it too, and usually nothing is left.
    if os.geteuid() != 0 and args.modcaps:
        log.warning("--modcaps: the daemon is not root; it keeps only what it was given")
    capabilities.restrict(keep)
    capabilities.set_no_new_privs()
    seccomp.install(args.seccomp)
    return inside


def check_inode_file_handles(shared_dir: Path, mode: str) -> None:
    """``--inode-file-handles mandatory`` refuses to start where the share's
    inodes cannot be opened by handle (checked confined, with the kept
    capabilities: CAP_DAC_READ_SEARCH)."""
    if mode != "mandatory":
        return
    fd = os.open(shared_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        handles = filehandles.probe(fd, mode, os.dup)  # fd is a mount fd already
        if handles is not None:
            handles.close()
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mount"]:
        from . import hostmount  # pyfuse3 is needed only for this subcommand

        return hostmount.main(argv[1:])
    args = parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES, indent=2))
        return 0
    if args.print_backend_descriptor:
        print(json.dumps(backend_descriptor(), indent=2))
        return 0
    setup_logging(args.log_level, syslog=args.syslog)
    for given, advice in (
        (args.foreground, "-f has no effect, please remove it"),
        (args.compat_debug, "-d is deprecated: use --log-level debug"),
        (args.compat_options, "-o is deprecated: give each option on its own (--cache auto)"),
        (args.socket is not None, "--socket is deprecated: use --socket-path"),
        (args.inode_file_handles == "fallback", "--inode-file-handles=fallback: use prefer"),
    ):
        if given:
            log.warning("%s", advice)
    if args.shared_dir is None:
        print("pyvirtiofsd: --shared-dir (or -o source=) is required", file=sys.stderr)
        return 2
    if (args.socket_path is None) == (args.fd is None):
        print("pyvirtiofsd: give exactly one of --socket-path and --fd", file=sys.stderr)
        return 2
    shared = Path(args.shared_dir)
    if not shared.is_dir():
        print(f"pyvirtiofsd: shared directory {shared} is not a directory", file=sys.stderr)
        return 1
    try:
        config = build_config(args, shared.resolve())
    except (ConfigError, idmap.IdMapError) as e:
        print(f"pyvirtiofsd: {e}", file=sys.stderr)
        return 2
    try:  # virtiofsd checks --modcaps after parsing too: exit 1
        keep = capabilities.apply_modcaps(capabilities.DEFAULT_CAPS, args.modcaps)
    except capabilities.ModcapsError as e:
        print(f"pyvirtiofsd: {e}", file=sys.stderr)
        return 1

    pid_file = None
    if args.socket_path is not None:
        try:
            pid_file = PidFile(args.socket_path + ".pid")
        except OSError as e:
            print(f"pyvirtiofsd: pid file {args.socket_path}.pid: {e}", file=sys.stderr)
            return 1
    try:
        listener = make_listener(args)
    except (OSError, ValueError) as e:
        print(f"pyvirtiofsd: cannot listen: {e}", file=sys.stderr)
        if pid_file is not None:
            pid_file.remove()
        return 1

    shared_dir: Path | None = None
    try:
        soft, _ = limits.raise_nofile_limit(args.rlimit_nofile)
        shared_dir = confine(args, config.shared_dir, listener, keep, pid_file)
        check_inode_file_handles(shared_dir, config.fs.inode_file_handles)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"pyvirtiofsd: {e}", file=sys.stderr)
        listener.close()
        if shared_dir in (None, config.shared_dir):  # not confined: the paths are ours
            with contextlib.suppress(OSError):
                if args.socket_path:
                    remove_socket_file(args.socket_path)
            if pid_file is not None:
                pid_file.remove()
        return 1
    # Inside the sandbox the share has another path ("/"); and the inode fd
    # budget is half the limit just set (read now: seccomp allows no getrlimit).
    config = config.replace(shared_dir=shared_dir, inode_fds=limits.inode_fd_budget(soft))

    from .service import run_service

    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        trio.run(run_service, listener, config)
    except KeyboardInterrupt:
        log.info("interrupted")
        return 130
    finally:
        listener.close()
        # Confined, the path means something else (or nothing): the namespace
        # sandbox's outer process removes the socket and pid files instead.
        if args.socket_path and shared_dir == shared.resolve():  # not confined
            with contextlib.suppress(OSError):
                remove_socket_file(args.socket_path)
            if pid_file is not None:
                pid_file.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
