"""``pyvirtiofsd-vm``: build and boot the test guest.

    pyvirtiofsd-vm build                      # both kernels + initramfs (cached)
    pyvirtiofsd-vm run --share DIR[:TAG] ...  # boot, mount each share at /mnt/TAG

``run`` drops into a guest shell when stdin is a terminal (leave it with
``exit``, or Ctrl-A X); otherwise it runs ``--cmd`` (or a smoke command) in
the guest through the agent, prints its output and exits with its status.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from .accel import ACCELS
from .errors import VmError
from .initramfs import build_initramfs
from .kernel import DEFAULT_KERNEL_VERSION, KERNEL_VERSIONS, build_kernel
from .machine import Machine, MachineConfig
from .shares import BACKENDS, DEFAULT_BACKEND, Share
from .swiotlb import DMA_MODES

SMOKE_COMMAND = (
    "uname -r; grep -E ' (virtiofs|9p) ' /proc/mounts; for d in /mnt/*; do ls -la $d; done"
)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through Machine.__exit__: no orphans


def cmd_build(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    versions = KERNEL_VERSIONS if args.kernel_version == "all" else (args.kernel_version,)
    for v in versions:
        img = build_kernel(args.jobs, version=v)
        if img.build_seconds is None:
            took = img.bzimage.with_name("build-seconds")
            built = f", built in {float(took.read_text()):.0f} s" if took.is_file() else ""
            print(f"kernel {v:<5}: {img.bzimage} (cached, key {img.key}{built})")
        else:
            print(f"kernel {v:<5}: {img.bzimage} (built in {img.build_seconds:.0f} s)")
    initrd = build_initramfs()
    print(f"initramfs   : {initrd}")
    print(f"done in {time.monotonic() - t0:.1f} s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    shares = [
        Share.parse(
            s,
            backend=args.backend,
            iommu_platform=args.iommu_platform,
            num_request_queues=args.queues,
        )
        for s in args.share
    ]
    for s in shares:
        if not s.host_dir.is_dir():
            print(f"error: share {s.host_dir} is not a directory", file=sys.stderr)
            return 2
    interactive = args.cmd is None and sys.stdin.isatty() and not args.no_shell
    config = MachineConfig(
        shares=shares,
        memory_mib=args.memory,
        cpus=args.cpus,
        accel=args.accel,
        kernel_args=args.kernel_arg,
        kernel=args.kernel,
        kernel_version=args.kernel_version,
        dma_mode=args.dma_mode,
        interactive=interactive,
    )
    with Machine(config, name="dev") as vm:
        print(
            f"guest up in {vm.boot_seconds:.1f} s ({vm.accel}); logs in {vm.log_dir}",
            file=sys.stderr,
        )
        for s in shares:
            print(f"  {s.host_dir} -> {s.guest_mountpoint} ({s.backend})", file=sys.stderr)
        if interactive:
            # A login shell on the serial console; leaving it powers the guest off.
            vm.agent.run(
                "setsid -c sh -c '/bin/sh -l; reboot -f' </dev/ttyS0 >/dev/ttyS0 2>&1 &",
                check=True,
            )
            assert vm.qemu_proc is not None
            vm.qemu_proc.popen.wait()
            return 0
        r = vm.agent.run(args.cmd or SMOKE_COMMAND, timeout=args.timeout)
        sys.stdout.buffer.write(r.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(r.stderr)
        return r.status if 0 <= r.status < 256 else 1


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pyvirtiofsd-vm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build (or find cached) guest kernel and initramfs")
    b.add_argument("-j", "--jobs", type=int, default=None, help="kernel build jobs")
    b.add_argument(
        "--kernel-version",
        choices=(*KERNEL_VERSIONS, "all"),
        default="all",
        help="guest kernel version to build (default: all of them)",
    )
    b.set_defaults(func=cmd_build)

    r = sub.add_parser("run", help="boot the guest with shares mounted")
    r.add_argument(
        "--share",
        action="append",
        default=[],
        metavar="HOST_DIR[:TAG]",
        help="share HOST_DIR at /mnt/TAG (repeatable; TAG defaults to the dir name)",
    )
    r.add_argument(
        "--backend",
        choices=BACKENDS,
        default=DEFAULT_BACKEND,
        help=f"device serving the shares (default {DEFAULT_BACKEND})",
    )
    r.add_argument(
        "--iommu-platform",
        action="store_true",
        help="offer the devices with iommu_platform=on (VIRTIO_F_ACCESS_PLATFORM)",
    )
    r.add_argument(
        "--queues",
        type=int,
        default=None,
        help="virtio-fs request queues per share (default: one per vCPU)",
    )
    r.add_argument("--cmd", default=None, help="run this in the guest and exit with its status")
    r.add_argument("--timeout", type=float, default=600, help="--cmd timeout in seconds")
    r.add_argument("--no-shell", action="store_true", help="never start an interactive shell")
    r.add_argument("--accel", choices=ACCELS, default="auto")
    r.add_argument("--memory", type=int, default=1024, help="guest RAM in MiB")
    r.add_argument("--cpus", type=int, default=2)
    r.add_argument(
        "--dma-mode",
        choices=DMA_MODES,
        default="off",
        help="off: plain virtio; shared: iommu_platform=on + swiotlb=force (one global pool); "
        "per-device: each share gets its own swiotlb window (patched guest kernel)",
    )
    r.add_argument(
        "--kernel",
        type=Path,
        default=None,
        help="boot this bzImage instead of the built guest kernel",
    )
    r.add_argument(
        "--kernel-version",
        choices=KERNEL_VERSIONS,
        default=None,
        help="guest kernel version to boot (default: $PYVIRTIOFSD_KERNEL_VERSION, "
        f"else {DEFAULT_KERNEL_VERSION})",
    )
    r.add_argument(
        "--kernel-arg",
        action="append",
        default=[],
        help="extra guest kernel command-line argument (repeatable)",
    )
    r.set_defaults(func=cmd_run)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return int(args.func(args))
    except (VmError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
