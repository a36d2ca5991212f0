"""A Debian 12 userland for the test guest, built with debootstrap and cached.

The busybox initramfs stays the guest's root; the Debian tree is shared
read-only over QEMU's 9p and mounted at ``/debian`` with proc, sys, dev and
tmpfs scratch directories, and each test share is bind-mounted into it at
``/debian/mnt/<tag>``. Commands run there with :func:`chroot_command`. That
keeps the guest kernel tiny (no block layer, no systemd) while giving tests
Debian's own load and verification tools (fio, stress-ng, dbench, python3).

The tree is cached under ``<build>/debian/<key>/root`` by suite, package list
and recipe version; building it takes a minute or two and needs Debian's
mirror (``PYVIRTIOFSD_DEBIAN_MIRROR`` overrides it).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .paths import build_dir

SUITE = "bookworm"
PACKAGES = ("python3", "fio", "stress-ng", "dbench")
MIRROR = os.environ.get("PYVIRTIOFSD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
RECIPE_VERSION = "1"
GUEST_ROOT = "/debian"
ROOT_TAG = "debian-root"


class DebianBuildError(RuntimeError):
    """The Debian userland could not be built."""


def cache_key() -> str:
    h = hashlib.sha256(f"{RECIPE_VERSION}\n{SUITE}\n{' '.join(PACKAGES)}\n".encode())
    return h.hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"[debian] {msg}", file=sys.stderr, flush=True)


def build_debian_root() -> Path:
    """Return the cached Debian tree, running debootstrap first if needed."""
    root_dir = build_dir() / "debian"
    root_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key()
    out = root_dir / key / "root"
    with (root_dir / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "usr/bin/fio").exists():
            return out
        debootstrap = shutil.which("debootstrap")
        if debootstrap is None:
            raise DebianBuildError("debootstrap is missing: run `make deps`")
        if os.geteuid() != 0:
            raise DebianBuildError("building the Debian guest userland needs root (debootstrap)")
        work = root_dir / f"{key}.work"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        log = root_dir / f"{key}.log"
        _log(f"debootstrap {SUITE} (minbase + {', '.join(PACKAGES)}) from {MIRROR}; log {log}")
        started = time.monotonic()
        cmd = [
            debootstrap,
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(work / "root"),
            MIRROR,
        ]
        with log.open("wb") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise DebianBuildError(f"debootstrap failed ({r.returncode}):\n{tail}")
        # Drop the package cache: nothing in the guest installs packages.
        shutil.rmtree(work / "root/var/cache/apt/archives", ignore_errors=True)
        (out.parent).mkdir(parents=True, exist_ok=True)
        (work / "root").rename(out)
        shutil.rmtree(work)
        _log(f"Debian userland ready in {time.monotonic() - started:.0f} s: {out}")
        return out


def mount_script() -> str:
    """Guest commands that mount the Debian tree (9p tag ROOT_TAG) at GUEST_ROOT."""
    r = GUEST_ROOT
    return " && ".join(
        [
            f"mkdir -p {r}",
            f"mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro {ROOT_TAG} {r}",
            f"mount -t proc proc {r}/proc",
            f"mount -t sysfs sysfs {r}/sys",
            f"mount --bind /dev {r}/dev",
            f"mount -t tmpfs tmpfs {r}/tmp",
            f"mount -t tmpfs tmpfs {r}/run",
            f"mount -t tmpfs tmpfs {r}/var/tmp",
            f"mount -t tmpfs tmpfs {r}/mnt",
        ]
    )


def bind_share_script(tag: str) -> str:
    """Make the share mounted at /mnt/<tag> visible in the Debian tree."""
    return f"mkdir -p {GUEST_ROOT}/mnt/{tag} && mount --bind /mnt/{tag} {GUEST_ROOT}/mnt/{tag}"


def chroot_command(command: str) -> str:
    """Wrap a shell command to run inside the Debian tree."""
    env = "env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8"
    return f"chroot {GUEST_ROOT} {env} /bin/sh -c {shlex.quote(command)}"
