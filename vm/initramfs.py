"""Build the test guest's initramfs: busybox-static userland plus the agent.

The archive is written directly in the kernel's ``newc`` cpio format by
:class:`CpioWriter`, so no root is needed for device nodes and the result is
byte-for-byte reproducible. It is cached under ``<build>/initramfs/`` by a
hash of everything that goes in.

Extra static binaries (test tools) can be added with ``extra_files``.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import VmError
from .paths import GUEST_SRC_DIR, build_dir

BUSYBOX = Path("/bin/busybox")
AGENT_SOURCE = GUEST_SRC_DIR / "agent.c"
UEVENT_WAIT_SOURCE = GUEST_SRC_DIR / "uevent-wait.c"
ACPI_POWERD_SOURCE = GUEST_SRC_DIR / "acpi-powerd.c"
#: Static C programs of the guest: install path -> source.
GUEST_PROGRAMS = {
    "sbin/pva-agent": AGENT_SOURCE,
    "sbin/pva-uevent-wait": UEVENT_WAIT_SOURCE,
    "sbin/pva-acpid": ACPI_POWERD_SOURCE,
}
RECIPE_VERSION = "1"

ETC_PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "daemon:x:1:1:daemon:/:/bin/false\n"
    "nobody:x:65534:65534:nobody:/:/bin/false\n"
    "alice:x:1000:1000:test user:/tmp:/bin/sh\n"
    "bob:x:1001:1001:test user:/tmp:/bin/sh\n"
    "carol:x:65533:65532:test user:/tmp:/bin/sh\n"
)
#: Supplementary groups for the credential tests: carol's primary group is
#: 65532 and she is also in 65531 (the issue's uid 65534 / egid 65532 /
#: groups {65532, 65531} case); alice is in 2000 and 65531, bob only in 2000.
ETC_GROUP = (
    "root:x:0:\ndaemon:x:1:\nnogroup:x:65534:\nalice:x:1000:\nbob:x:1001:\n"
    "share:x:2000:alice,bob\ncrew:x:65531:alice,carol\ncarol:x:65532:carol\n"
)
ETC_PROFILE = 'export PATH=/sbin:/bin:/usr/sbin:/usr/bin\nexport PS1="pva-guest:\\w# "\n'


class InitramfsError(VmError):
    """The initramfs or the guest agent could not be built."""


@dataclass(frozen=True)
class ExtraFile:
    """A host file to place in the image (e.g. a static test tool)."""

    source: Path
    dest: str  # absolute path in the guest
    mode: int = 0o755


class CpioWriter:
    """Minimal writer of the ``newc`` (SVR4, no CRC) cpio format."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1
        self._seen: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.lstrip("/")
        if name in self._seen:
            raise InitramfsError(f"duplicate path in initramfs: /{name}")
        self._seen.add(name)
        encoded = name.encode() + b"\0"
        fields = [
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,
            0,  # mtime: fixed for reproducibility
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        ]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._out.write(header + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self._out.getvalue()


def build_agent(out_dir: Path, source: Path = AGENT_SOURCE) -> Path:
    """Compile the guest agent (or another guest program) as a static binary."""
    out = out_dir / f"{source.stem}.{os.getpid()}"
    cmd = ["cc", "-static", "-Os", "-Wall", "-Wextra", "-o", str(out), str(source)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise InitramfsError(f"building {source.name} for the guest failed:\n{r.stderr}")
    return out


def busybox_applets() -> list[str]:
    """Install paths of busybox's applets, e.g. ``bin/ls``, ``usr/sbin/chroot``."""
    r = subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True)
    return [line.strip() for line in r.stdout.splitlines() if line.strip()]


def _key(extra: Sequence[ExtraFile]) -> str:
    h = hashlib.sha256(f"recipe={RECIPE_VERSION}\n".encode())
    for p in (BUSYBOX, *GUEST_PROGRAMS.values(), GUEST_SRC_DIR / "inittab",
              GUEST_SRC_DIR / "rc.sysinit"):  # fmt: skip
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(Path(__file__).read_bytes())
    for e in extra:
        h.update(f"{e.dest}:{e.mode:o}\0".encode() + e.source.read_bytes())
    return h.hexdigest()[:16]


def _parents(path: str) -> Iterable[str]:
    parts = path.strip("/").split("/")[:-1]
    for i in range(1, len(parts) + 1):
        yield "/".join(parts[:i])


def build_initramfs(extra_files: Sequence[ExtraFile] = ()) -> Path:
    """Return the path of the (cached) gzip-compressed initramfs."""
    if not BUSYBOX.exists():
        raise InitramfsError(f"{BUSYBOX} is missing: install busybox-static (run `make deps`)")
    if shutil.which("cc") is None:
        raise InitramfsError("no C compiler (cc) to build the guest agent: run `make deps`")
    root = build_dir() / "initramfs"
    root.mkdir(parents=True, exist_ok=True)
    key = _key(extra_files)
    out = root / f"initramfs-{key}.cpio.gz"
    # Several test sessions may build the same image at once: one builds, the
    # others wait and reuse it.
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            _write_initramfs(root, out, extra_files)
    return out


def _write_initramfs(root: Path, out: Path, extra_files: Sequence[ExtraFile]) -> None:
    programs = {dest: build_agent(root, src) for dest, src in GUEST_PROGRAMS.items()}

    cpio = CpioWriter()
    dirs = {
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "mnt",
        "root",
        "var",
        "opt",
    }
    applets = busybox_applets()
    wanted = [*applets, *programs, *(e.dest for e in extra_files)]
    for p in wanted:
        dirs.update(_parents(p))
    for d in sorted(dirs):
        cpio.directory(d, 0o1777 if d == "tmp" else 0o755)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    for a in applets:
        if a != "bin/busybox":
            cpio.symlink(a, "/bin/busybox")
    cpio.symlink("init", "/bin/busybox")
    for dest, binary in programs.items():
        cpio.file(dest, binary.read_bytes(), 0o755)
        binary.unlink()
    cpio.file("etc/inittab", (GUEST_SRC_DIR / "inittab").read_bytes())
    cpio.file("etc/rc.sysinit", (GUEST_SRC_DIR / "rc.sysinit").read_bytes(), 0o755)
    cpio.file("etc/passwd", ETC_PASSWD.encode())
    cpio.file("etc/group", ETC_GROUP.encode())
    cpio.file("etc/profile", ETC_PROFILE.encode())
    for e in extra_files:
        cpio.file(e.dest, e.source.read_bytes(), e.mode)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
        gz.write(cpio.finish())
    os.replace(tmp, out)


def main() -> int:
    try:
        print(build_initramfs())
    except InitramfsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
