"""Choose the accelerator: KVM where it really works, TCG otherwise.

``/dev/kvm`` opening is not enough: on these machines (nested KVM) a VM can be
created but the guest hangs in kernel decompression. ``auto`` therefore boots
the guest kernel once under KVM with an early console and uses KVM only if the
kernel prints its banner within a few seconds. The verdict is cached per host
boot (``/proc/sys/kernel/random/boot_id``) in the build directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

from .paths import build_dir
from .qemu import QEMU_BINARY

log = logging.getLogger("pyvirtiofsd.vm")

ACCELS = ("auto", "kvm", "tcg")
_KVM_GET_API_VERSION = 0xAE00
PROBE_SECONDS = 10.0


def kvm_device_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == 12
    except OSError:
        return False
    finally:
        os.close(fd)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm_boot(kernel: Path, qemu: str = QEMU_BINARY, seconds: float = PROBE_SECONDS) -> bool:
    """Boot ``kernel`` under KVM until its banner appears, or give up."""
    with tempfile.TemporaryDirectory(prefix="pva-kvm-probe-") as d:
        console = Path(d) / "console"
        console.touch()
        argv = [
            qemu, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
            "-accel", "kvm", "-cpu", "host", "-m", "256M",
            "-kernel", str(kernel), "-append", "console=ttyS0 earlyprintk=ttyS0 panic=-1",
            "-serial", f"file:{console}",
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if b"Linux version" in console.read_bytes():
                    return True
                if proc.poll() is not None:
                    return False
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(0.2)  # bounded wait between reads of the console file
            return False
        finally:
            proc.kill()
            proc.wait()


def choose_accel(requested: str, kernel: Path) -> str:
    """Resolve ``auto`` to ``kvm`` or ``tcg``; pass explicit choices through."""
    if requested not in ACCELS:
        raise ValueError(f"unknown accelerator {requested!r}; choose from {', '.join(ACCELS)}")
    if requested != "auto":
        return requested
    if not kvm_device_usable():
        return "tcg"
    cache = build_dir() / "accel-probe.json"
    key = f"{_boot_id()}:{kernel.resolve()}"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return str(cached["accel"])
    except (OSError, ValueError, KeyError):
        pass
    log.info(
        "probing whether KVM boots a guest here (up to %.0f s, once per host boot)", PROBE_SECONDS
    )
    accel = "kvm" if probe_kvm_boot(kernel) else "tcg"
    if accel == "tcg":
        log.info("KVM does not boot guests on this host: using TCG")
    cache.write_text(json.dumps({"key": key, "accel": accel}))
    return accel
