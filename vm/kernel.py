"""Build the guest kernels from Debian's kernel source packages, cached by content.

Two versions are built side by side: Linux 6.1 (``linux-source-6.1``) and
Linux 6.12 (``linux-source-6.12``). Each has its own directory
``kernel-config/<version>/`` holding a config fragment (``guest.config``) and
a patch series (``patches/series``).

The recipe: unpack ``/usr/src/linux-source-<version>.tar.xz``, apply the
series in order, ``make tinyconfig``, merge the fragment, ``olddefconfig``,
check that every option of the fragment survived, and build ``bzImage``.

The result is cached under ``<build>/kernel/<key>/`` where ``key`` hashes the
source package version, the fragment's and patches' *contents* (not their
paths) and this recipe's version, so a second run costs nothing and any change
rebuilds. One lock serialises every build: two kernels never compile at once.
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

from .errors import VmError
from .paths import KERNEL_CONFIG_DIR, build_dir

#: Guest kernel versions this harness builds, newest first.
KERNEL_VERSIONS = ("6.12", "6.1")
#: The version a guest boots unless told otherwise.
DEFAULT_KERNEL_VERSION = "6.12"
#: Versions whose virtio-fs announces a registered tag (Linux 6.9+): a uevent
#: ACTION=add SUBSYSTEM=virtiofs TAG=<tag>, and /sys/fs/virtiofs/<n>/tag.
ANNOUNCES_VIRTIOFS_TAGS = frozenset({"6.12"})
#: Bump when the recipe below changes in a way that changes the output.
RECIPE_VERSION = "1"


class KernelBuildError(VmError):
    """The guest kernel could not be configured or built."""


@dataclass(frozen=True)
class KernelSource:
    """One guest kernel version: its Debian source package and its config dir."""

    version: str
    config_dir: Path

    @property
    def package(self) -> str:
        return f"linux-source-{self.version}"

    @property
    def tarball(self) -> Path:
        return Path(f"/usr/src/linux-source-{self.version}.tar.xz")

    @property
    def fragment(self) -> Path:
        return self.config_dir / "guest.config"

    @property
    def patch_dir(self) -> Path:
        return self.config_dir / "patches"


def kernel_source(version: str | None = None) -> KernelSource:
    """The source of guest kernel ``version`` (default: DEFAULT_KERNEL_VERSION)."""
    v = DEFAULT_KERNEL_VERSION if version is None else version
    if v not in KERNEL_VERSIONS:
        raise KernelBuildError(
            f"unknown guest kernel version {v!r} (known: {', '.join(KERNEL_VERSIONS)})"
        )
    return KernelSource(v, KERNEL_CONFIG_DIR / v)


@dataclass(frozen=True)
class KernelImage:
    """A built guest kernel."""

    bzimage: Path
    config: Path
    key: str
    build_seconds: float | None  # None when it came from the cache
    version: str = DEFAULT_KERNEL_VERSION


def source_version(src: KernelSource) -> str:
    """Debian version of the kernel source package, e.g. ``6.1.158-1``."""
    if not src.tarball.exists():
        raise KernelBuildError(f"{src.tarball} is missing: install {src.package} (run `make deps`)")
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", src.package],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        # Not installed through dpkg: fall back to the tarball's identity.
        st = src.tarball.stat()
        out = f"file-{st.st_size}-{int(st.st_mtime)}"
    return out


@dataclass(frozen=True)
class SeriesPatch:
    """One line of ``patches/series``: ``NAME [unless FILE:TEXT]``.

    ``unless FILE:TEXT`` marks a patch whose fix the source may already carry
    (a stable update backported an equivalent upstream change): when FILE of
    the unpacked tree contains TEXT, the patch is skipped, and the build log
    says so. The source package version is part of the cache key, so the
    choice is made again whenever the source changes.
    """

    path: Path
    unless_file: str | None = None
    unless_text: str | None = None

    @property
    def name(self) -> str:
        return self.path.name

    def superseded_in(self, tree: Path) -> bool:
        """Whether ``tree`` already carries this patch's fix."""
        if self.unless_file is None or self.unless_text is None:
            return False
        f = tree / self.unless_file
        return f.is_file() and self.unless_text in f.read_text(errors="replace")


def patch_series(src: KernelSource) -> list[SeriesPatch]:
    """Patches listed in ``patches/series``, in order (blank lines and # skipped)."""
    series = src.patch_dir / "series"
    if not series.exists():
        return []
    patches = []
    for line in series.read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        name, cond = fields[0], fields[1:]
        p = src.patch_dir / name
        if not p.is_file():
            raise KernelBuildError(f"patch {name} listed in {series} does not exist")
        if not cond:
            patches.append(SeriesPatch(p))
            continue
        if len(cond) != 2 or cond[0] != "unless" or ":" not in cond[1]:
            raise KernelBuildError(
                f"{series}: {line.strip()!r}: expected 'NAME' or 'NAME unless FILE:TEXT'"
            )
        file, text = cond[1].split(":", 1)
        patches.append(SeriesPatch(p, file, text))
    return patches


def cache_key(src: KernelSource) -> str:
    """Content hash of everything that determines the kernel image.

    It covers file contents and patch names, never the config directory's
    path, and the source package version tells the versions apart.
    """
    h = hashlib.sha256()
    h.update(f"recipe={RECIPE_VERSION}\n".encode())
    h.update(f"source={source_version(src)}\n".encode())
    h.update(b"fragment\n" + src.fragment.read_bytes())
    for p in patch_series(src):
        h.update(f"patch {p.name} {p.unless_file}:{p.unless_text}\n".encode())
        h.update(p.path.read_bytes())
    return h.hexdigest()[:16]


def fragment_options(src: KernelSource) -> dict[str, str]:
    """``CONFIG_X -> value`` pairs of the fragment (``n`` for 'is not set')."""
    opts: dict[str, str] = {}
    for line in src.fragment.read_text().splitlines():
        line = line.strip()
        m = re.fullmatch(r"(CONFIG_\w+)=(.*)", line)
        if m:
            opts[m.group(1)] = m.group(2)
            continue
        m = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
        if m:
            opts[m.group(1)] = "n"
    return opts


def check_config(src: KernelSource, config: Path) -> None:
    """Fail with the names of fragment options that kconfig did not keep."""
    have: dict[str, str] = {}
    for line in config.read_text().splitlines():
        m = re.fullmatch(r"(CONFIG_\w+)=(.*)", line)
        if m:
            have[m.group(1)] = m.group(2)
    missing = []
    for name, want in fragment_options(src).items():
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


def build_kernel(
    jobs: int | None = None, force: bool = False, version: str | None = None
) -> KernelImage:
    """Return the cached guest kernel ``version``, building it first if needed."""
    src = kernel_source(version)
    key = cache_key(src)
    root = build_dir() / "kernel"
    root.mkdir(parents=True, exist_ok=True)
    out = root / key
    bz = out / "bzImage"
    lock_path = root / ".lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if bz.exists() and not force:
            return KernelImage(bz, out / "config", key, None, src.version)
        started = time.monotonic()
        work = root / f"{key}.work"
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
        log = work / "build.log"
        _log(f"building guest kernel {src.version} ({key}): {src.package} {source_version(src)}")
        _log(f"unpacking {src.tarball}")
        with tarfile.open(src.tarball) as tf:
            tf.extractall(work, filter="fully_trusted")
        (tree,) = [p for p in work.iterdir() if p.is_dir()]
        for p in patch_series(src):
            if p.superseded_in(tree):
                _log(f"skipping {p.name}: {p.unless_file} already has {p.unless_text}")
                continue
            _log(f"applying {p.name}")
            _run(["patch", "-p1", "--batch", "--forward", "-i", str(p.path)], tree, log)
        _log(f"configuring (tinyconfig + {src.version}/guest.config)")
        configure(src, tree, log)
        n = jobs or os.cpu_count() or 1
        _log(f"compiling bzImage with {n} jobs (log: {log})")
        _make_with_progress(tree, n, log)
        staging = root / f"{key}.staging"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        shutil.copy2(tree / "arch/x86/boot/bzImage", staging / "bzImage")
        shutil.copy2(tree / ".config", staging / "config")
        shutil.copy2(tree / "System.map", staging / "System.map")
        shutil.copy2(log, staging / "build.log")
        elapsed = time.monotonic() - started
        (staging / "build-seconds").write_text(f"{elapsed:.1f}\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        shutil.rmtree(work)
        _log(
            f"guest kernel {src.version} ready: {bz} "
            f"({bz.stat().st_size // 1024} KiB, built in {elapsed:.0f} s)"
        )
        return KernelImage(bz, out / "config", key, elapsed, src.version)


def configure(src: KernelSource, tree: Path, log: Path) -> None:
    """tinyconfig + the fragment + olddefconfig in a patched ``tree``; check it."""
    _run(["make", "tinyconfig"], tree, log)
    _run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(src.fragment)], tree, log)
    _run(["make", "olddefconfig"], tree, log)
    check_config(src, tree / ".config")


def build_all(jobs: int | None = None) -> list[KernelImage]:
    """Every guest kernel version, one after the other."""
    return [build_kernel(jobs, version=v) for v in KERNEL_VERSIONS]


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Build (or find cached) a guest kernel.")
    ap.add_argument("-j", "--jobs", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument(
        "--version",
        dest="kernel_version",
        choices=KERNEL_VERSIONS,
        default=DEFAULT_KERNEL_VERSION,
        help=f"kernel version (default {DEFAULT_KERNEL_VERSION})",
    )
    args = ap.parse_args()
    try:
        img = build_kernel(args.jobs, args.force, args.kernel_version)
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(img.bzimage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
