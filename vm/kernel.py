"""Build the guest kernel from Debian's linux-source-6.1, cached by content.

The recipe: unpack ``/usr/src/linux-source-6.1.tar.xz``, apply
``kernel-config/patches/series`` in order, ``make tinyconfig``, merge
``kernel-config/guest.config``, ``olddefconfig``, check that every option of
the fragment survived, and build ``bzImage``.

The result is cached under ``<build>/kernel/<key>/`` where ``key`` hashes the
source package version, the fragment, the patch series and this recipe's
version, so a second run costs nothing and any change rebuilds.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from .paths import KERNEL_CONFIG_DIR, build_dir

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT = KERNEL_CONFIG_DIR / "guest.config"
PATCH_DIR = KERNEL_CONFIG_DIR / "patches"
#: Bump when the recipe below changes in a way that changes the output.
RECIPE_VERSION = "1"


class KernelBuildError(RuntimeError):
    """The guest kernel could not be configured or built."""


@dataclass(frozen=True)
class KernelImage:
    """A built guest kernel."""

    bzimage: Path
    config: Path
    key: str
    build_seconds: float | None  # None when it came from the cache


def source_version() -> str:
    """Debian version of the kernel source package, e.g. ``6.1.158-1``."""
    if not SOURCE_TARBALL.exists():
        raise KernelBuildError(
            f"{SOURCE_TARBALL} is missing: install {SOURCE_PACKAGE} (run `make deps`)"
        )
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        # Not installed through dpkg: fall back to the tarball's identity.
        st = SOURCE_TARBALL.stat()
        out = f"file-{st.st_size}-{int(st.st_mtime)}"
    return out


def patch_series() -> list[Path]:
    """Patches listed in ``patches/series``, in order (blank lines and # skipped)."""
    series = PATCH_DIR / "series"
    if not series.exists():
        return []
    patches = []
    for line in series.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        p = PATCH_DIR / name
        if not p.is_file():
            raise KernelBuildError(f"patch {name} listed in {series} does not exist")
        patches.append(p)
    return patches


def cache_key() -> str:
    """Content hash of everything that determines the kernel image."""
    h = hashlib.sha256()
    h.update(f"recipe={RECIPE_VERSION}\n".encode())
    h.update(f"source={source_version()}\n".encode())
    h.update(b"fragment\n" + FRAGMENT.read_bytes())
    for p in patch_series():
        h.update(f"patch {p.name}\n".encode() + p.read_bytes())
    return h.hexdigest()[:16]


def fragment_options() -> dict[str, str]:
    """``CONFIG_X -> value`` pairs of the fragment (``n`` for 'is not set')."""
    opts: dict[str, str] = {}
    for line in FRAGMENT.read_text().splitlines():
        line = line.strip()
        m = re.fullmatch(r"(CONFIG_\w+)=(.*)", line)
        if m:
            opts[m.group(1)] = m.group(2)
            continue
        m = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
        if m:
            opts[m.group(1)] = "n"
    return opts


def check_config(config: Path) -> None:
    """Fail with the names of fragment options that kconfig did not keep."""
    have: dict[str, str] = {}
    for line in config.read_text().splitlines():
        m = re.fullmatch(r"(CONFIG_\w+)=(.*)", line)
        if m:
            have[m.group(1)] = m.group(2)
    missing = []
    for name, want in fragment_options().items():
        got = have.get(name, "n")
        if got != want:
            missing.append(f"{name}: wanted {want}, got {got}")
    if missing:
        raise KernelBuildError(
            "kconfig dropped options of the fragment (unmet dependencies?):\n  "
            + "\n  ".join(missing)
        )


def _log(msg: str) -> None:
    print(f"[kernel] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], cwd: Path, log: Path) -> None:
    with log.open("ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        r = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise KernelBuildError(
            f"`{' '.join(cmd)}` failed ({r.returncode}); log {log}:\n" + "\n".join(tail)
        )


def _make_with_progress(src: Path, jobs: int, log: Path) -> None:
    """Run the bzImage build, printing a progress line every 200 objects."""
    cmd = ["make", f"-j{jobs}", "bzImage"]
    started = time.monotonic()
    with log.open("ab") as f:
        f.write(("$ " + " ".join(cmd) + "\n").encode())
        proc = subprocess.Popen(cmd, cwd=src, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        objects = 0
        for raw in proc.stdout:
            f.write(raw)
            if raw.lstrip().startswith(b"CC "):
                objects += 1
                if objects % 200 == 0:
                    _log(f"compiled {objects} files ({time.monotonic() - started:.0f} s)")
        rc = proc.wait()
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise KernelBuildError(f"kernel build failed ({rc}); log {log}:\n" + "\n".join(tail))
    _log(f"compiled {objects} files in {time.monotonic() - started:.0f} s")


def build_kernel(jobs: int | None = None, force: bool = False) -> KernelImage:
    """Return the cached guest kernel, building it first if needed."""
    key = cache_key()
    root = build_dir() / "kernel"
    root.mkdir(parents=True, exist_ok=True)
    out = root / key
    bz = out / "bzImage"
    lock_path = root / ".lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if bz.exists() and not force:
            return KernelImage(bz, out / "config", key, None)
        started = time.monotonic()
        work = root / f"{key}.work"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        log = work / "build.log"
        _log(f"building guest kernel {key} from {SOURCE_PACKAGE} {source_version()}")
        _log(f"unpacking {SOURCE_TARBALL}")
        with tarfile.open(SOURCE_TARBALL) as tf:
            tf.extractall(work, filter="fully_trusted")
        (src,) = [p for p in work.iterdir() if p.is_dir()]
        for p in patch_series():
            _log(f"applying {p.name}")
            _run(["patch", "-p1", "--batch", "--forward", "-i", str(p)], src, log)
        _log("configuring (tinyconfig + guest.config)")
        _run(["make", "tinyconfig"], src, log)
        _run(
            ["scripts/kconfig/merge_config.sh", "-m", ".config", str(FRAGMENT)],
            src,
            log,
        )
        _run(["make", "olddefconfig"], src, log)
        check_config(src / ".config")
        n = jobs or os.cpu_count() or 1
        _log(f"compiling bzImage with {n} jobs (log: {log})")
        _make_with_progress(src, n, log)
        staging = root / f"{key}.staging"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        shutil.copy2(src / "arch/x86/boot/bzImage", staging / "bzImage")
        shutil.copy2(src / ".config", staging / "config")
        shutil.copy2(src / "System.map", staging / "System.map")
        shutil.copy2(log, staging / "build.log")
        elapsed = time.monotonic() - started
        (staging / "build-seconds").write_text(f"{elapsed:.1f}\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        shutil.rmtree(work)
        _log(f"guest kernel ready: {bz} ({bz.stat().st_size // 1024} KiB, {elapsed:.0f} s)")
        return KernelImage(bz, out / "config", key, elapsed)


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build (or find cached) the guest kernel.")
    ap.add_argument("-j", "--jobs", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args()
    try:
        img = build_kernel(args.jobs, args.force)
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(img.bzimage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
