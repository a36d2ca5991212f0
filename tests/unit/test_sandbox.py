"""The daemon's confinement: rlimit, capabilities, no_new_privs, namespaces, seccomp.

Each check runs the real ``pyvirtiofsd`` (or the module under test) in a
child process: what it changes cannot be undone in the test process.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.daemon import capabilities, limits, sandbox
from pyvirtiofsd.daemon.capabilities import CAP_NAMES, DEFAULT_CAPS, ModcapsError, apply_modcaps

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
DEFAULT_MASK = sum(1 << CAP_NAMES[n] for n in DEFAULT_CAPS)


def _namespaces_work() -> bool:
    if os.geteuid() != 0:
        return False
    r = subprocess.run(["unshare", "-m", "-p", "-n", "-f", "true"], capture_output=True)
    return r.returncode == 0


needs_ns = pytest.mark.skipif(not _namespaces_work(), reason="cannot create namespaces here")


def py(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )


def status_fields(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


# --- --rlimit-nofile ---------------------------------------------------------------


def test_rlimit_default_raises_the_soft_limit() -> None:
    r = py("""
        import resource
        from pyvirtiofsd.daemon import limits
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        print(hard, *limits.raise_nofile_limit(None), *resource.getrlimit(resource.RLIMIT_NOFILE))
    """)
    assert r.returncode == 0, r.stderr
    old_hard, soft, hard, real_soft, real_hard = map(int, r.stdout.split())
    assert (soft, hard) == (real_soft, real_hard)
    assert hard >= old_hard
    assert soft == min(limits.DEFAULT_NOFILE, limits.nr_open(), hard)
    assert soft > 256


def test_rlimit_explicit_and_zero() -> None:
    r = py("""
        import resource
        from pyvirtiofsd.daemon import limits
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
        print(*limits.raise_nofile_limit(0))
        print(*limits.raise_nofile_limit(4096))
    """)
    assert r.returncode == 0, r.stderr
    keep, explicit = r.stdout.splitlines()
    assert int(keep.split()[0]) == 300
    assert explicit.split() == ["4096", "4096"]
    with pytest.raises(ValueError):
        limits.raise_nofile_limit(limits.nr_open() + 1)


# --- capabilities ----------------------------------------------------------------------


def test_modcaps_syntax() -> None:
    caps = apply_modcaps(DEFAULT_CAPS, "+sys_admin:-mknod:-CAP_SETFCAP")
    assert "sys_admin" in caps and "mknod" not in caps and "setfcap" not in caps
    assert apply_modcaps(DEFAULT_CAPS, None) == DEFAULT_CAPS
    for bad in ("sys_admin", "+nope", "+", "+chown:mknod"):
        with pytest.raises(ModcapsError):
            apply_modcaps(DEFAULT_CAPS, bad)


@root_only
def test_restrict_keeps_exactly_the_default_set() -> None:
    r = py("""
        from pyvirtiofsd.daemon import capabilities
        capabilities.restrict(capabilities.DEFAULT_CAPS)
        capabilities.set_no_new_privs()
        print(open("/proc/self/status").read())
    """)
    assert r.returncode == 0, r.stderr
    st = dict(line.split(":\t", 1) for line in r.stdout.splitlines() if ":\t" in line)
    _, permitted, _ = capabilities.current()
    want = DEFAULT_MASK & permitted
    assert int(st["CapEff"], 16) == want
    assert int(st["CapPrm"], 16) == want
    assert int(st["CapBnd"], 16) == want
    assert int(st["CapInh"], 16) == 0 and int(st["CapAmb"], 16) == 0
    assert st["NoNewPrivs"].strip() == "1"
    assert not want >> CAP_NAMES["sys_admin"] & 1


def test_restrict_refuses_a_threaded_process() -> None:
    r = py("""
        import threading
        from pyvirtiofsd.daemon import capabilities
        ev = threading.Event()
        t = threading.Thread(target=ev.wait); t.start()
        try:
            capabilities.restrict(capabilities.DEFAULT_CAPS)
        except RuntimeError as e:
            print("refused", e)
        ev.set(); t.join()
    """)
    assert r.stdout.startswith("refused"), (r.stdout, r.stderr)


# --- the daemon, confined ------------------------------------------------------------------


class Daemon:
    def __init__(self, proc: subprocess.Popen[bytes], sock: Path) -> None:
        self.proc = proc
        self.sock = sock
        self.log = b""

    def wait_for(self, needle: bytes, timeout: float = 30) -> None:
        self.wait_count(needle, 1, timeout)

    def wait_count(self, needle: bytes, count: int, timeout: float = 30) -> None:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        fd = self.proc.stderr.fileno()
        while self.log.count(needle) < count:
            left = deadline - time.monotonic()
            assert left > 0, self.log.decode(errors="replace")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"daemon exited before {needle!r}:\n{self.log.decode()}")
                self.log += chunk

    def finish(self, timeout: float = 30) -> int:
        assert self.proc.stderr is not None
        rest = self.proc.stderr.read()
        self.log += rest
        return self.proc.wait(timeout)

    def child_pid(self) -> int:
        """The sandboxed process (the outer one's only child)."""
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            (pid,) = f.read().split()
        return int(pid)


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[object]:
    started: list[subprocess.Popen[bytes]] = []
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_text("hi")

    def start(*args: str, code: str | None = None) -> Daemon:
        sock = tmp_path / f"vu{len(started)}.sock"
        argv = ["--socket-path", str(sock), "--shared-dir", str(share), *args]
        if code is None:
            cmd = [sys.executable, "-m", "pyvirtiofsd.daemon", *argv]
        else:
            cmd = [sys.executable, "-c", textwrap.dedent(code), *argv]
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        started.append(proc)
        return Daemon(proc, sock)

    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)


@needs_ns
def test_namespace_sandbox_confines_the_daemon(daemon_factory: object, tmp_path: Path) -> None:
    d: Daemon = daemon_factory("--sandbox", "namespace", "--seccomp", "kill")  # type: ignore[operator]
    d.wait_for(b"serving /")
    child = d.child_pid()
    st = status_fields(child)
    assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == int(st["CapBnd"], 16)
    assert int(st["CapEff"], 16) == DEFAULT_MASK & capabilities.current()[1]
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    # pid 1 of its own pid namespace; its root is the share; new mount/net/ipc/uts
    assert st["NSpid"].split()[-1] == "1"
    root, share = os.stat(f"/proc/{child}/root"), os.stat(tmp_path / "share")
    assert (root.st_dev, root.st_ino) == (share.st_dev, share.st_ino)
    assert sorted(os.listdir(f"/proc/{child}/root")) == ["hello"]
    for ns in ("mnt", "net", "ipc", "uts", "pid"):
        assert os.readlink(f"/proc/{child}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    # the outer process stays outside, without capabilities, and forwards SIGTERM
    assert os.readlink(f"/proc/{d.proc.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    outer = status_fields(d.proc.pid)
    assert int(outer["CapEff"], 16) == int(outer["CapBnd"], 16) == 0
    assert outer["NoNewPrivs"] == "1"
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0, d.log.decode()
    assert b"shutting down" in d.log
    assert not d.sock.exists()  # the outer process removed the socket file


@needs_ns
def test_front_end_disconnect_under_the_sandbox(daemon_factory: object) -> None:
    """A front-end connects and goes: accept, recvmsg, teardown all pass the filter."""
    d: Daemon = daemon_factory("--sandbox", "namespace", "--seccomp", "kill")  # type: ignore[operator]
    d.wait_for(b"serving /")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(d.sock))
    assert d.finish() == 0, d.log.decode()
    assert b"front-end gone; exiting" in d.log


# A daemon whose service makes a system call outside the allowlist (an
# AF_INET socket) where it would start serving: everything before that is
# the real start-up (rlimit, sandbox, capabilities, no_new_privs, seccomp).
FORBIDDEN = """
    import socket, sys
    from pyvirtiofsd.daemon import cli, service
    async def run_service(listener, config):
        print("about to break the rules", file=sys.stderr, flush=True)
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        print("still alive", file=sys.stderr, flush=True)
    service.run_service = run_service
    sys.exit(cli.main(sys.argv[1:]))
"""


@needs_ns
def test_forbidden_syscall_kills_the_sandboxed_daemon_and_is_logged(
    daemon_factory: object,
) -> None:
    d: Daemon = daemon_factory("--sandbox", "namespace", "--seccomp", "kill", code=FORBIDDEN)  # type: ignore[operator]
    code = d.finish()
    log = d.log.decode()
    assert "about to break the rules" in log
    assert "still alive" not in log
    assert code == 128 + signal.SIGSYS, log
    assert "killed by SIGSYS: a system call outside the seccomp allowlist" in log


@root_only
def test_unsandboxed_daemon_under_seccomp_removes_its_socket(daemon_factory: object) -> None:
    d: Daemon = daemon_factory("--sandbox", "none", "--seccomp", "kill")  # type: ignore[operator]
    d.wait_for(b"serving")
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0, d.log.decode()
    assert not d.sock.exists()


@root_only
def test_forbidden_syscall_kills_an_unsandboxed_daemon(daemon_factory: object) -> None:
    d: Daemon = daemon_factory("--sandbox", "none", "--seccomp", "kill", code=FORBIDDEN)  # type: ignore[operator]
    code = d.finish()
    assert code == -signal.SIGSYS, d.log.decode()
    # with --seccomp none the same call is fine
    d = daemon_factory("--sandbox", "none", "--seccomp", "none", code=FORBIDDEN)  # type: ignore[operator]
    assert d.finish() == 0
    assert b"still alive" in d.log


@root_only
def test_chroot_sandbox(daemon_factory: object, tmp_path: Path) -> None:
    d: Daemon = daemon_factory("--sandbox", "chroot", "--seccomp", "kill")  # type: ignore[operator]
    d.wait_for(b"serving /")
    assert os.readlink(f"/proc/{d.proc.pid}/root") == str(tmp_path / "share")
    assert status_fields(d.proc.pid)["Seccomp"] == "2"
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0, d.log.decode()


def test_cli_logs_the_limit(daemon_factory: object) -> None:
    d: Daemon = daemon_factory("--sandbox", "none", "--seccomp", "none", "--rlimit-nofile", "2048")  # type: ignore[operator]
    d.wait_for(b"open-file limit: soft 2048, hard 2048")
    d.wait_for(b"serving")
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0


def test_default_mode_by_privilege() -> None:
    assert sandbox.default_mode() == ("namespace" if os.geteuid() == 0 else "none")


@root_only
def test_seccomp_trap_and_log_modes(daemon_factory: object) -> None:
    # trap: SIGSYS, faulthandler prints the Python stacks, then the process dies
    d: Daemon = daemon_factory("--sandbox", "none", "--seccomp", "trap", code=FORBIDDEN)  # type: ignore[operator]
    code = d.finish()
    log = d.log.decode()
    assert code == -signal.SIGSYS, log
    assert "run_service" in log and "most recent call first" in log, log
    assert "still alive" not in log
    # log: the kernel records the call and lets it through
    d = daemon_factory("--sandbox", "none", "--seccomp", "log", code=FORBIDDEN)  # type: ignore[operator]
    assert d.finish() == 0
    assert b"still alive" in d.log


@root_only
def test_stats_file_runs_unsandboxed(daemon_factory: object, tmp_path: Path) -> None:
    """The stats file is rewritten by path, which the sandbox cannot reach."""
    d: Daemon = daemon_factory("--stats-file", str(tmp_path / "stats.json"))  # type: ignore[operator]
    d.wait_for(b"serving")
    assert os.readlink(f"/proc/{d.proc.pid}/root") == "/"
    with open(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children") as f:
        assert f.read() == ""  # no sandboxed child: this process serves
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0
    d = daemon_factory("--stats-file", str(tmp_path / "s.json"), "--sandbox", "chroot")  # type: ignore[operator]
    assert d.finish() == 1
    assert b"--stats-file needs --sandbox none" in d.log


@needs_ns
def test_keep_listening_serves_the_next_front_end_inside_the_sandbox(
    daemon_factory: object,
) -> None:
    """Each front-end gets a fresh filesystem: its root ("/") and /proc fd are
    reopened inside the sandbox."""
    d: Daemon = daemon_factory("--keep-listening")  # type: ignore[operator]
    d.wait_for(b"serving /")
    for n in (1, 2):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(d.sock))
        d.wait_count(b"front-end disconnected", n)
    assert d.proc.poll() is None
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0, d.log.decode()
    assert b"Traceback" not in d.log


@root_only
def test_modcaps_reaches_the_running_daemon(daemon_factory: object) -> None:
    d: Daemon = daemon_factory("--sandbox", "none", "--modcaps", "+sys_admin:-mknod")  # type: ignore[operator]
    d.wait_for(b"serving")
    eff = int(status_fields(d.proc.pid)["CapEff"], 16)
    want = (DEFAULT_MASK | 1 << CAP_NAMES["sys_admin"]) & ~(1 << CAP_NAMES["mknod"])
    assert eff == want & capabilities.current()[1]
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish() == 0
    bad = daemon_factory("--modcaps", "+nonsense")  # type: ignore[operator]
    assert bad.finish() == 1
    assert b"unknown capability" in bad.log


def test_a_late_import_is_logged() -> None:
    r = py("""
        import logging, sys
        logging.basicConfig(level=logging.INFO)
        from pyvirtiofsd.daemon import sandbox
        sandbox.preload()
        assert "pyvirtiofsd.daemon.seccomp" in sys.modules
        assert "pyvirtiofsd.daemon.hostmount" not in sys.modules
        try:
            import no_such_module_here  # noqa: F401
        except ImportError:
            print("refused")
    """)
    assert r.stdout.strip() == "refused", r.stderr
    assert "module no_such_module_here was not imported before the sandbox" in r.stderr
