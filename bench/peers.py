"""The daemons a benchmark compares: pyvirtiofsd, the C virtiofsd, the Rust virtiofsd.

The C virtiofsd is QEMU 7.2's (``/usr/lib/qemu/virtiofsd``, Debian 12). The
Rust virtiofsd is Debian 13's ``virtiofsd`` package (1.13): a minimal trixie
root with that package is debootstrapped into ``<build>/peers/trixie-virtiofsd``
once (cached by recipe, see :func:`pyvirtiofsd.vm.debian.debootstrap_root`) and
the binary runs on this host through that root's own dynamic loader and
libraries. Not in a chroot: its namespace sandbox fails there (CleanMount
EINVAL), on the host it works.

Every daemon is handed an already bound, listening unix socket (``--fd``), so
a front-end can connect the moment the process is started: no socket file to
wait for.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pyvirtiofsd.vm.debian import debootstrap_root
from pyvirtiofsd.vm.paths import build_dir

__all__ = [
    "C_VIRTIOFSD",
    "PEERS",
    "PeerUnavailable",
    "RustVirtiofsd",
    "peer_argv",
    "rust_root",
    "rust_virtiofsd",
]

C_VIRTIOFSD = Path(os.environ.get("PYVIRTIOFSD_C_VIRTIOFSD", "/usr/lib/qemu/virtiofsd"))
RUST_SUITE = "trixie"
RUST_PACKAGES = ("virtiofsd",)
#: Bump when the way the Rust peer's root is built changes (forces a rebuild).
RUST_RECIPE_VERSION = "1"
#: Every daemon a benchmark knows, in the order rounds visit them.
PEERS = ("pyvirtiofsd", "virtiofsd", "rust-virtiofsd")


class PeerUnavailable(RuntimeError):
    """A peer daemon cannot be run on this machine (missing binary, no root to build it)."""


def rust_root() -> Path:
    """The cached trixie root holding the Rust virtiofsd (debootstrapped on first use)."""
    return debootstrap_root(
        build_dir() / "peers" / "trixie-virtiofsd",
        RUST_SUITE,
        RUST_PACKAGES,
        recipe_version=RUST_RECIPE_VERSION,
    )


@dataclass(frozen=True)
class RustVirtiofsd:
    """How to start the Rust virtiofsd from a trixie root on this (older) host."""

    root: Path

    @property
    def loader(self) -> Path:
        return self.root / "usr/lib64/ld-linux-x86-64.so.2"

    @property
    def binary(self) -> Path:
        return self.root / "usr/libexec/virtiofsd"

    def prefix(self) -> list[str]:
        """argv up to and including the binary; the daemon's own options follow."""
        libs = self.root / "usr/lib/x86_64-linux-gnu"
        return [str(self.loader), "--library-path", str(libs), str(self.binary)]


def rust_virtiofsd() -> RustVirtiofsd:
    rust = RustVirtiofsd(rust_root())
    if not rust.binary.exists() or not rust.loader.exists():
        raise PeerUnavailable(f"no Rust virtiofsd in {rust.root} (remove it to rebuild)")
    return rust


def peer_argv(
    peer: str, fd: int, shared_dir: Path, extra: Sequence[str] = (), *, cache: str = "auto"
) -> list[str]:
    """Command line of ``peer`` serving ``shared_dir`` on the inherited listening ``fd``.

    Each peer gets its closest equivalent of the same configuration: one
    thread per request queue where the peer has a choice (the Rust
    virtiofsd's ``--thread-pool-size 0``), no sandbox beyond what works
    unprivileged-in-a-container here, cache policy ``cache``.
    """
    if peer == "pyvirtiofsd":
        argv = [sys.executable, "-m", "pyvirtiofsd.daemon", "--fd", str(fd),
                "--shared-dir", str(shared_dir), "--cache", cache]  # fmt: skip
    elif peer == "virtiofsd":
        if not C_VIRTIOFSD.exists():
            raise PeerUnavailable(f"{C_VIRTIOFSD} is missing (qemu-system-common)")
        argv = [str(C_VIRTIOFSD), f"--fd={fd}", "-o", f"source={shared_dir}",
                "-o", "sandbox=chroot", "-o", f"cache={cache}"]  # fmt: skip
    elif peer == "rust-virtiofsd":
        rust_cache = {"none": "never"}.get(cache, cache)
        argv = [*rust_virtiofsd().prefix(), "--fd", str(fd), "--shared-dir", str(shared_dir),
                "--thread-pool-size", "0", "--cache", rust_cache]  # fmt: skip
    else:
        raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    return [*argv, *extra]
