"""A Debian 12 userland for the test guest, built with debootstrap and cached.

The busybox initramfs stays the guest's root; the Debian tree is shared
read-only over QEMU's 9p and mounted at ``/debian`` with proc, sys, dev and
tmpfs scratch directories, and each test share is bind-mounted into it at
``/debian/mnt/<tag>``. Commands run there with :func:`chroot_command`. That
keeps the guest kernel tiny (no block layer, no systemd) while giving tests
Debian's own load and verification tools (fio, stress-ng, dbench, python3).

The tree is cached under ``<build>/debian/<key>/root`` by suite, package list
and recipe version; building it takes a minute or two and needs Debian's
mirror (``PYVIRTIOFSD_DEBIAN_MIRROR`` overrides it). :func:`debootstrap_root`
is the cached debootstrap itself; the daemon benchmark uses it too, for a
Debian 13 root holding the Rust virtiofsd.
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
from collections.abc import Sequence
from pathlib import Path

from .errors import VmError
from .paths import build_dir

SUITE = "bookworm"
PACKAGES = ("python3", "fio", "stress-ng", "dbench")
MIRROR = os.environ.get("PYVIRTIOFSD_DEBIAN_MIRROR", "http://deb.debian.org/debian")
RECIPE_VERSION = "1"
GUEST_ROOT = "/debian"
ROOT_TAG = "debian-root"


class DebianBuildError(VmError):
    """The Debian userland could not be built."""


def cache_key() -> str:
    h = hashlib.sha256(f"{RECIPE_VERSION}\n{SUITE}\n{' '.join(PACKAGES)}\n".encode())
    return h.hexdigest()[:16]


def _log(msg: str) -> None:
    print(f"[debian] {msg}", file=sys.stderr, flush=True)


def debootstrap_root(
    dest: Path,
    suite: str,
    packages: Sequence[str],
    *,
    recipe_version: str,
    mirror: str = MIRROR,
    drop_apt_cache: bool = True,
) -> Path:
    """A minbase ``suite`` tree with ``packages`` at ``dest/root``, built once and cached.

    ``dest/stamp`` records the recipe (version, suite, packages, mirror is not
    part of it); the tree is rebuilt only when the recipe changes. Concurrent
    callers serialise on ``dest/.lock``; the tree is built in ``dest/root.work``
    and renamed into place, so a half-built tree is never returned.
    """
    dest.mkdir(parents=True, exist_ok=True)
    recipe = f"{recipe_version}\n{suite}\n{' '.join(packages)}\n"
    out = dest / "root"
    stamp = dest / "stamp"
    with (dest / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.is_dir() and stamp.exists() and stamp.read_text() == recipe:
            return out
        debootstrap = shutil.which("debootstrap")
        if debootstrap is None:
            raise DebianBuildError("debootstrap is missing: run `make deps`")
        if os.geteuid() != 0:
            raise DebianBuildError(f"debootstrapping {suite} into {dest} needs root")
        work = dest / "root.work"
        for old in (work, out):
            if old.exists():
                shutil.rmtree(old)
        stamp.unlink(missing_ok=True)
        log = dest / "debootstrap.log"
        _log(f"debootstrap {suite} (minbase + {', '.join(packages)}) from {mirror}; log {log}")
        started = time.monotonic()
        cmd = [debootstrap, "--variant=minbase", f"--include={','.join(packages)}", suite,
               str(work), mirror]  # fmt: skip
        with log.open("wb") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
            raise DebianBuildError(f"debootstrap {suite} failed ({r.returncode}):\n{tail}")
        if drop_apt_cache:
            shutil.rmtree(work / "var/cache/apt/archives", ignore_errors=True)
        work.rename(out)
        stamp.write_text(recipe)
        _log(f"{suite} tree ready in {time.monotonic() - started:.0f} s: {out}")
        return out


def build_debian_root() -> Path:
    """Return the cached Debian guest userland, running debootstrap first if needed."""
    # Nothing in the guest installs packages: the apt cache goes.
    return debootstrap_root(
        build_dir() / "debian" / cache_key(), SUITE, PACKAGES, recipe_version=RECIPE_VERSION
    )


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
    src, dst = shlex.quote(f"/mnt/{tag}"), shlex.quote(f"{GUEST_ROOT}/mnt/{tag}")
    return f"mkdir -p {dst} && mount --bind {src} {dst}"


def chroot_command(command: str) -> str:
    """Wrap a shell command to run inside the Debian tree."""
    env = "env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8"
    return f"chroot {GUEST_ROOT} {env} /bin/sh -c {shlex.quote(command)}"
