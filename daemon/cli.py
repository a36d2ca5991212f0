"""``pyvirtiofsd``: command line of the vhost-user-fs backend.

Compatible with virtiofsd where the two overlap, so a QEMU (or libvirt) set-up
can swap one binary for the other::

    pyvirtiofsd --socket-path /run/fs.sock --shared-dir /srv/share
    pyvirtiofsd --fd 3 --shared-dir /srv/share          # inherited listening socket
    pyvirtiofsd --socket-path=/run/fs.sock -o source=/srv/share,cache=auto
    pyvirtiofsd --print-capabilities                     # vhost-user backend JSON

The daemon serves one front-end (QEMU) at a time. When it disconnects the
daemon releases everything and exits, like virtiofsd; with
``--keep-listening`` it waits for the next connection instead.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import logging
import os
import shutil
import signal
import socket
import sys
from pathlib import Path

import trio

from . import __version__, capabilities, limits, sandbox, seccomp
from .device import DEFAULT_THREAD_POOL_SIZE
from .passthrough.xattrmap import XattrMap

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

#: What ``--print-capabilities`` prints (docs/interop/vhost-user.json):
#: the "fs" member of VHostUserBackendCapabilities carries no features.
CAPABILITIES = {"type": "fs"}


def backend_descriptor() -> dict[str, str]:
    """The VhostUserBackend JSON that libvirt/management tools discover
    (``share/qemu/vhost-user/50-pyvirtiofsd.json``), naming this installation."""
    binary = shutil.which("pyvirtiofsd") or str(Path(sys.argv[0]).resolve())
    return {
        "description": "pyvirtiofsd: virtio-fs vhost-user backend in Python",
        "type": "fs",
        "binary": str(Path(binary).resolve()),
    }


def _pool_size(text: str) -> int:
    try:
        n = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"{n} is not in 0..1024")
    return n


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
    ap.add_argument("--socket-path", metavar="PATH", help="vhost-user unix socket to listen on")
    ap.add_argument(
        "--fd",
        type=int,
        metavar="FD",
        help="inherited listening vhost-user socket (instead of --socket-path)",
    )
    ap.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="group owning the socket file created by --socket-path",
    )
    ap.add_argument("--shared-dir", metavar="DIR", help="directory to share with the guest")
    ap.add_argument(
        "-o",
        dest="compat_options",
        action="append",
        default=[],
        metavar="OPTS",
        help="virtiofsd-style comma-separated options: source=DIR, cache=MODE, "
        "log_level=LEVEL, xattr, posix_lock, flock, writeback (and no_*)",
    )
    ap.add_argument(
        "--cache",
        choices=("auto", "always", "never", "none"),
        default="auto",
        help="guest cache policy: attr/entry timeouts (default auto)",
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
        help="Python worker threads for the requests the C fast path does not answer "
        f"(GETATTR/READ/WRITE run in C on each queue's thread); 0: serve them on the "
        f"queue's own thread (default {DEFAULT_THREAD_POOL_SIZE})",
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
        type=int,
        default=16,
        metavar="N",
        help="most request queues offered to the front-end (default 16)",
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
    ap.add_argument("--log-level", choices=sorted(LOG_LEVELS), default="info")
    ap.add_argument(
        "--sandbox",
        choices=sandbox.MODES,
        default=None,
        help="confine the daemon: namespace (new mount/pid/net/ipc/uts namespaces, "
        "pivot_root into the share), chroot, or none (default: "
        f"{DEFAULT_SANDBOX_ROOT} as root, none otherwise)",
    )
    ap.add_argument(
        "--seccomp",
        choices=seccomp.MODES,
        default=DEFAULT_SECCOMP,
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
        type=int,
        metavar="N",
        help="open-file limit (default: min(1000000, /proc/sys/fs/nr_open), the "
        "soft limit capped by the hard one unless root; 0: leave it)",
    )
    ap.add_argument(
        "--xattrmap",
        metavar="RULES",
        help="map guest xattr names to host names, virtiofsd syntax "
        "(:prefix|ok|bad|unsupported:client|server|all:KEY:PREPEND: and :map:KEY:PREPEND:)",
    )
    ap.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="accepted for compatibility (the daemon always runs in the foreground)",
    )
    return ap


def apply_compat_options(args: argparse.Namespace) -> None:
    """Fold virtiofsd's ``-o a=b,c`` options into the regular arguments."""
    for group in args.compat_options:
        for opt in filter(None, group.split(",")):
            key, _, value = opt.partition("=")
            if key == "source":
                args.shared_dir = value
            elif key == "cache":
                args.cache = value
            elif key == "log_level":
                if value not in LOG_LEVELS:
                    raise SystemExit(f"pyvirtiofsd: bad log_level {value!r}")
                args.log_level = value
            elif key in ("xattr", "posix_lock", "flock", "writeback"):
                setattr(args, key, True)
            elif key in ("no_xattr", "no_posix_lock", "no_flock", "no_writeback"):
                setattr(args, key.removeprefix("no_"), False)
            elif key in ("readdirplus", "no_readdirplus"):
                log.warning("option -o %s is not implemented; ignored", key)
            elif key == "sandbox":
                if value not in sandbox.MODES:
                    raise SystemExit(f"pyvirtiofsd: bad sandbox {value!r}")
                args.sandbox = value
            elif key in ("modcaps", "xattrmap"):
                setattr(args, key, value)
            else:
                raise SystemExit(f"pyvirtiofsd: unknown option -o {opt}")


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
    args: argparse.Namespace, shared: Path, listener: socket.socket, keep: frozenset[str]
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

    if args.seccomp != "none":
        seccomp.load_library()
        sandbox.preload()
    inside = sandbox.enter(mode, shared, parent_cleanup=parent_cleanup)
    if os.geteuid() == 0:
        capabilities.restrict(keep)
    capabilities.set_no_new_privs()
    seccomp.install(args.seccomp)
    return inside


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mount"]:
        from . import hostmount  # pyfuse3 is needed only for this subcommand

        return hostmount.main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.print_capabilities:
        print(json.dumps(CAPABILITIES, indent=2))
        return 0
    if args.print_backend_descriptor:
        print(json.dumps(backend_descriptor(), indent=2))
        return 0
    logging.basicConfig(
        level=LOG_LEVELS[args.log_level],
        format="[%(asctime)s] [pyvirtiofsd] %(levelname)s %(name)s: %(message)s",
    )
    apply_compat_options(args)
    logging.getLogger().setLevel(LOG_LEVELS[args.log_level])
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
        listener = make_listener(args)
    except (OSError, ValueError) as e:
        print(f"pyvirtiofsd: cannot listen: {e}", file=sys.stderr)
        return 1

    try:
        keep = capabilities.apply_modcaps(capabilities.DEFAULT_CAPS, args.modcaps)
        xattrmap = XattrMap.from_option(args.xattrmap)
        limits.raise_nofile_limit(args.rlimit_nofile)
        shared_dir = confine(args, shared.resolve(), listener, keep)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"pyvirtiofsd: {e}", file=sys.stderr)
        listener.close()
        return 1

    from .service import ServiceConfig, run_service

    config = ServiceConfig(
        shared_dir=shared_dir,
        xattrmap=xattrmap,
        cache=args.cache,
        readonly=args.readonly,
        xattr=args.xattr,
        writeback=args.writeback,
        posix_locks=args.posix_lock,
        flock=args.flock,
        allow_device_nodes=args.allow_device_nodes,
        allow_direct_io=args.allow_direct_io,
        announce_submounts=args.announce_submounts,
        num_request_queues=args.num_request_queues,
        window=args.swiotlb,
        keep_listening=args.keep_listening,
        thread_pool_size=args.thread_pool_size,
        stats_file=args.stats_file,
    )
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        trio.run(run_service, listener, config)
    except KeyboardInterrupt:
        log.info("interrupted")
        return 130
    finally:
        listener.close()
        # Confined, the path means something else (or nothing): the namespace
        # sandbox's outer process removes the socket file instead.
        if args.socket_path and shared_dir == shared.resolve():
            with contextlib.suppress(OSError):
                remove_socket_file(args.socket_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
