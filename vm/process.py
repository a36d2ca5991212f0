"""Child processes the harness owns (QEMU, device backends).

Every child gets ``PR_SET_PDEATHSIG(SIGKILL)`` so that even a harness killed
with SIGKILL leaves nothing behind, and :meth:`ChildProcess.stop` escalates
from SIGTERM to SIGKILL with a bounded wait.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("pyvirtiofsd.vm")

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class ChildProcess:
    """A started child with its output sent to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        pass_fds: Sequence[int] = (),
        env: dict[str, str] | None = None,
        interactive: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log_file = None if interactive else log_path.open("ab")
        log.debug("starting %s: %s", name, " ".join(self.argv))
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=None if interactive else subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=self._log_file,
                pass_fds=tuple(pass_fds),
                env=env,
                preexec_fn=_die_with_parent,
            )
        except FileNotFoundError as e:
            self._close_log()
            raise FileNotFoundError(
                e.errno, f"{name}: cannot run {self.argv[0]} (run `make deps`?)"
            ) from e
        except BaseException:
            self._close_log()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def returncode(self) -> int | None:
        return self.popen.poll()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 5.0) -> int:
        """Terminate (SIGTERM, then SIGKILL after ``grace`` seconds) and reap."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, self.pid)
                self.popen.kill()
                self.popen.wait()
        self._close_log()
        rc = self.popen.returncode
        assert rc is not None
        return rc

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def pid_exists(pid: int) -> bool:
    """True if ``pid`` names a live (not yet reaped or zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return out
