"""virtme-ng as a real client: ``vng`` boots our 6.12 guest kernel with
pyvirtiofsd as the ``virtiofsd`` it finds on PATH.

One boot serves the module.  ``vng --run <bzImage> --disable-kvm --rwdir=RW
--exec CMD`` exports the host's ``/`` (read-only, the guest's root) and RW
(read-write), each through a daemon of its own that vng starts itself: it
first checks that ``virtiofsd --version`` exits 0, then runs it in the
background with its own command line and waits about 3 s for
``<socket>.pid``; without that file it silently falls back to 9p.  The
``virtiofsd`` on PATH is a shim that records its argv and execs the venv's
pyvirtiofsd, so the pid vng reads (and SIGTERMs at exit) is the daemon's.

The guest's script I/O (stdout, exit code) travels over virtio-serial ports
that the host's udevd names in the guest (/dev/virtio-ports/virtme.*).
"""

from __future__ import annotations

import contextlib
import os
import select
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.vm.kernel import build_kernel

pytestmark = pytest.mark.vm

#: vng, its run and the guest command together (TCG, 2 shared cores).
VNG_TIMEOUT = 300.0
#: A daemon still running this long after vng returned is left behind.
EXIT_GRACE = 15.0

VENV_BIN = Path(sys.executable).parent

SHIM = """#!/bin/sh
# virtiofsd for virtme-ng: record this invocation, then become pyvirtiofsd
# (exec keeps the pid, so <socket>.pid names this process).
printf '%s\\0' "$@" > "{log_dir}/argv.$$"
exec "{daemon}" "$@"
"""


@dataclass(frozen=True)
class VngRun:
    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    #: (pid, argv) of every ``virtiofsd`` vng ran, in start order
    invocations: list[tuple[int, list[str]]]
    token: str
    share: Path
    rwdir: Path

    def daemons(self) -> list[tuple[int, list[str]]]:
        return [(pid, argv) for pid, argv in self.invocations if "--socket-path" in argv]


def _invocations(log_dir: Path) -> list[tuple[int, list[str]]]:
    found = []
    for f in log_dir.glob("argv.*"):
        argv = f.read_bytes().split(b"\0")[:-1]
        found.append((f.stat().st_mtime_ns, int(f.suffix[1:]), [a.decode() for a in argv]))
    return [(pid, argv) for _, pid, argv in sorted(found)]


def _vng() -> Path:
    vng = VENV_BIN / "vng"
    if not vng.exists():
        pytest.fail(f"{vng} is missing: install the dev extra (pip install -e '.[dev]')")
    return vng


@pytest.fixture(scope="module")
def vng_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VngRun]:
    kernel = build_kernel(version="6.12")
    base = tmp_path_factory.mktemp("vng")
    shim_dir = base / "bin"
    shim_dir.mkdir()
    log_dir = base / "argv"
    log_dir.mkdir()
    shim = shim_dir / "virtiofsd"
    shim.write_text(SHIM.format(log_dir=log_dir, daemon=VENV_BIN / "pyvirtiofsd"))
    shim.chmod(0o755)

    token = uuid.uuid4().hex
    share = base / "share"
    share.mkdir()
    (share / "marker").write_text(f"host-marker {token}\n")
    rwdir = base / "rw"
    rwdir.mkdir()
    guest_cmd = (
        f"cat {share}/marker; "
        'awk \'$2 == "/" {print "root-fstype", $3}\' /proc/mounts; '
        f'awk \'$2 == "{rwdir}" {{print "rwdir-fstype", $3}}\' /proc/mounts; '
        f"echo guest-wrote-{token} > {rwdir}/from-guest; "
        "echo vng-exec-done; exit 7"
    )
    command = [
        str(_vng()),
        "--run",
        str(kernel.bzimage),
        "--disable-kvm",
        "--cpus",
        "2",
        "--memory",
        "512M",
        f"--rwdir={rwdir}",
        # boot console, virtme-ng-init and the daemons' logs on stderr, and
        # vng's own "fallback to 9p" message
        "--verbose",
        "--exec",
        guest_cmd,
    ]
    env = dict(os.environ)
    env["PATH"] = f"{shim_dir}:{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    started = time.monotonic()
    # Its own session: on a timeout, vng, QEMU and the daemons go together.
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=base,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=VNG_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"vng did not finish in {VNG_TIMEOUT:.0f} s; stderr tail:\n{err[-3000:]}\n"
            f"stdout tail:\n{out[-2000:]}"
        )
    run = VngRun(
        command=command,
        returncode=proc.returncode,
        stdout=out,
        stderr=err,
        seconds=time.monotonic() - started,
        invocations=_invocations(log_dir),
        token=token,
        share=share,
        rwdir=rwdir,
    )
    print(f"\nvng command line: {shlex.join(command)}")
    print(f"vng took {run.seconds:.1f} s, exit status {run.returncode}")
    for pid, argv in run.invocations:
        print(f"virtiofsd invoked by vng (pid {pid}): virtiofsd {shlex.join(argv)}")
    yield run


def _diagnosis(run: VngRun) -> str:
    return (
        f"vng exit {run.returncode}\nstdout:\n{run.stdout[-2000:]}\n"
        f"stderr tail:\n{run.stderr[-3000:]}\ninvocations: {run.invocations}"
    )


def _require_daemons(run: VngRun) -> list[tuple[int, list[str]]]:
    daemons = run.daemons()
    if not daemons:
        pytest.fail(
            "vng started no virtiofsd (it runs one only if `virtiofsd --version` "
            "exits 0)\n" + _diagnosis(run)
        )
    if "fallback to 9p" in run.stderr:
        pytest.fail(
            "vng gave up on a daemon: no <socket>.pid within its wait (~1.5 s)\n" + _diagnosis(run)
        )
    return daemons


def test_vng_checks_the_daemon_version_first(vng_run: VngRun) -> None:
    assert vng_run.invocations, "vng never ran the virtiofsd on PATH\n" + _diagnosis(vng_run)
    _, first = vng_run.invocations[0]
    assert first == ["--version"], _diagnosis(vng_run)


def test_vng_starts_pyvirtiofsd_with_its_command_line(vng_run: VngRun) -> None:
    daemons = _require_daemons(vng_run)
    assert len(daemons) == 2, "expected a daemon for / and one for --rwdir\n" + _diagnosis(vng_run)
    (_, root), (_, rw) = daemons
    sock = root[root.index("--socket-path") + 1]
    assert root == [
        "--syslog",
        "--no-announce-submounts",
        "--readonly",
        "--socket-path",
        sock,
        "--shared-dir",
        "/",
        "--sandbox",
        "none",
        "--cache",
        "always",
    ]
    sock = rw[rw.index("--socket-path") + 1]
    assert rw == [
        "--syslog",
        "--no-announce-submounts",
        "--socket-path",
        sock,
        "--shared-dir",
        str(vng_run.rwdir),
        "--sandbox",
        "none",
        "--cache",
        "auto",
    ]


def test_guest_boots_from_pyvirtiofsd_and_the_output_comes_back(vng_run: VngRun) -> None:
    _require_daemons(vng_run)
    lines = vng_run.stdout.splitlines()
    assert f"host-marker {vng_run.token}" in lines, _diagnosis(vng_run)
    assert "root-fstype virtiofs" in lines, _diagnosis(vng_run)
    assert "rwdir-fstype virtiofs" in lines, _diagnosis(vng_run)
    assert lines[-1] == "vng-exec-done", _diagnosis(vng_run)
    # the guest command's exit status is vng's
    assert vng_run.returncode == 7, _diagnosis(vng_run)


def test_guest_writes_reach_the_host_rwdir(vng_run: VngRun) -> None:
    _require_daemons(vng_run)
    written = vng_run.rwdir / "from-guest"
    assert written.exists(), _diagnosis(vng_run)
    assert written.read_text() == f"guest-wrote-{vng_run.token}\n"


def test_no_daemon_outlives_vng(vng_run: VngRun) -> None:
    left = []
    for pid, argv in vng_run.daemons():
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue  # gone (and reaped) already
        try:
            # readable once the process has exited, zombie or not
            if not select.select([fd], [], [], EXIT_GRACE)[0]:
                left.append((pid, argv))
        finally:
            os.close(fd)
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"daemons still running {EXIT_GRACE:.0f} s after vng returned: {left}"
