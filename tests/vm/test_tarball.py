"""Unpack a real source tarball in the guest onto a share; every byte arrives.

The tarball is ``include/`` and ``scripts/`` of the Debian kernel source
(/usr/src/linux-source-6.1.tar.xz): about 6,000 files, 41 MB, regular files
with 0644 and 0755 modes and a few symlinks. It is extracted once on the host
into a cache below the build directory and repacked as an uncompressed .tar,
offered to the guest on a read-only 9p share, and unpacked by GNU tar in the
Debian userland onto the share under test (pyvirtiofsd, or the C virtiofsd as
the reference). After a remount (so nothing comes from the guest's page cache)
the guest hashes every file; the names, types, modes, sizes, mtimes, link
targets and SHA-256 sums must equal both the tar members and the host files.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from pyvirtiofsd.vm import debian
from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.paths import build_dir
from pyvirtiofsd.vm.shares import Share

BACKENDS = ["pyvirtiofsd", "virtiofsd"]
SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
TOP = "linux-source-6.1"
SUBTREES = ("include", "scripts")

Entry = tuple[str, str, int, str, int]  # kind, mode, size, sha256 or link target, mtime


def source_tarball() -> Path:
    """The cached, uncompressed tarball (built once from the kernel source)."""
    cache = build_dir() / "tarball"
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{TOP}-{'-'.join(SUBTREES)}.tar"
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        if not SOURCE.exists():
            pytest.fail(f"{SOURCE} is missing: apt-get install linux-source-6.1 (make deps)")
        work = cache / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        members = [f"{TOP}/{s}" for s in SUBTREES]
        subprocess.run(["tar", "-xJf", str(SOURCE), "-C", str(work), *members], check=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run(
            [
                "tar",
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "-cf",
                str(tmp),
                "-C",
                str(work),
                TOP,
            ],
            check=True,
        )
        tmp.rename(out)
        shutil.rmtree(work)
        return out


def tar_manifest(tarball: Path) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    with tarfile.open(tarball) as tf:
        for m in tf:
            name = m.name.rstrip("/")
            mode = oct(m.mode & 0o7777)
            if m.isfile():
                f = tf.extractfile(m)
                assert f is not None
                out[name] = ("f", mode, m.size, hashlib.sha256(f.read()).hexdigest(), int(m.mtime))
            elif m.isdir():
                out[name] = ("d", mode, 0, "", int(m.mtime))
            elif m.issym():
                out[name] = ("l", "0o777", 0, m.linkname, int(m.mtime))
            else:
                raise AssertionError(f"unexpected member type in {tarball}: {m.name}")
    return out


def host_manifest(root: Path) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root / TOP):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            mode = oct(stat.S_IMODE(st.st_mode))
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ("f", mode, st.st_size, h, int(st.st_mtime))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", mode, 0, "", int(st.st_mtime))
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", mode, 0, os.readlink(p), int(st.st_mtime))
            else:
                out[rel] = ("?", mode, 0, "", 0)
    out[TOP] = (
        "d",
        oct(stat.S_IMODE((root / TOP).stat().st_mode)),
        0,
        "",
        int((root / TOP).stat().st_mtime),
    )
    return out


def guest_manifest(find_out: str, sums_out: str) -> dict[str, Entry]:
    """Parse GNU find's ``%y|%m|%s|%T@|%P|%l`` lines and sha256sum's output."""
    sums = {}
    for line in sums_out.splitlines():
        h, _, path = line.partition("  ")
        sums[path.removeprefix("./")] = h
    out: dict[str, Entry] = {}
    for line in find_out.splitlines():
        kind, mode, size, mtime, path, link = line.split("|", 5)
        mt = int(float(mtime))
        if kind == "f":
            out[path] = ("f", oct(int(mode, 8)), int(size), sums.get(path, "<no sum>"), mt)
        elif kind == "d":
            out[path] = ("d", oct(int(mode, 8)), 0, "", mt)
        elif kind == "l":
            out[path] = ("l", "0o777", 0, link, mt)
        else:
            out[path] = ("?", mode, 0, "", 0)
    return out


def _diff(a: dict[str, Entry], b: dict[str, Entry]) -> list[str]:
    msgs = [f"only in first: {k}" for k in sorted(set(a) - set(b))[:10]]
    msgs += [f"only in second: {k}" for k in sorted(set(b) - set(a))[:10]]
    msgs += [f"{k}: {a[k]} != {b[k]}" for k in sorted(set(a) & set(b)) if a[k] != b[k]][:20]
    return msgs


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_source_tarball(
    backend: str, tmp_path: Path, perf_table, record_property, no_leftover_processes: None
) -> None:
    tarball = source_tarball()
    expected = tar_manifest(tarball)
    nfiles = sum(1 for e in expected.values() if e[0] == "f")
    nlinks = sum(1 for e in expected.values() if e[0] == "l")
    assert nfiles > 5000 and nlinks > 10 and any(e[1] == "0o755" for e in expected.values())
    src = tmp_path / "src"
    src.mkdir()
    if tarball.stat().st_dev == src.stat().st_dev:
        os.link(tarball, src / "src.tar")
    else:
        shutil.copyfile(tarball, src / "src.tar")
    root = tmp_path / "share"
    root.mkdir()
    os.chmod(root, 0o777)
    target = Share(root, "tgt", backend=backend)
    shares = [Share(src, "src", backend="9p", readonly=True), target]
    with Machine(MachineConfig(shares=shares, debian=True), name=f"tarball-{backend}") as vm:
        x = vm.debian_run("tar -xf /mnt/src/src.tar -C /mnt/tgt", timeout=600)
        assert x.status == 0, x.stderr.decode()[-4000:]
        # remount: everything read below comes from the daemon, not the page cache
        vm.agent.run("umount /debian/mnt/tgt && umount /mnt/tgt", check=True, timeout=120)
        vm.mount(target)
        vm.agent.run(debian.bind_share_script("tgt"), check=True)
        started = time.monotonic()
        f = vm.debian_run(f"cd /mnt/tgt && find {TOP} -printf '%y|%m|%s|%T@|%p|%l\\n'", timeout=300)
        s = vm.debian_run(
            f"cd /mnt/tgt && find {TOP} -type f -print0 | xargs -0 sha256sum", timeout=600
        )
        hash_wall = time.monotonic() - started
        assert f.status == 0 and s.status == 0, (f.stderr + s.stderr).decode()[-4000:]
    guest = guest_manifest(f.text, s.text)
    host = host_manifest(root)
    assert len(guest) == len(expected), (len(guest), len(expected))
    assert sum(1 for e in guest.values() if e[0] == "l") == nlinks
    assert not _diff(guest, expected), "\n".join(_diff(guest, expected))
    assert not _diff(host, expected), "\n".join(_diff(host, expected))
    mib = tarball.stat().st_size / (1 << 20)
    text = (
        f"{nfiles} files + {nlinks} symlinks ({mib:.0f} MiB tar): untar {x.elapsed:.1f} s "
        f"({mib / x.elapsed:.1f} MiB/s), find+sha256 after remount {s.elapsed + f.elapsed:.1f} s "
        f"(host wall {hash_wall:.1f} s)"
    )
    print(f"[tarball] {backend}: {text}", flush=True)
    record_property(f"tarball-{backend}", text)
    perf_table.append(("untar+sha256", backend, text))
