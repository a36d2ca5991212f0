"""Host side of the guest agent channel (see ``vm/guest/agent.c``).

The harness listens on a unix socket; QEMU connects to it as the backend of
a virtio-serial port; ``pva-agent`` in the guest opens the port and sends a
HELLO frame, which is the guest's readiness signal. Requests are answered one
at a time, in order.
"""

from __future__ import annotations

import shlex
import socket
import struct
import time
from dataclasses import dataclass
from enum import IntEnum

from .errors import VmError

MAGIC = b"PVA1"
HEADER = struct.Struct("<4sIII")
EXEC_RESULT = struct.Struct("<iIIQ")  # status, stdout len, stderr len, elapsed ns
MAX_PAYLOAD = 256 << 20


class FrameType(IntEnum):
    HELLO = 1
    EXEC = 2
    EXEC_RESULT = 3
    READ = 4
    FILE_DATA = 5
    WRITE = 6
    WRITE_RESULT = 7
    PING = 8
    PONG = 9
    ERROR = 10


class AgentError(VmError):
    """The agent channel failed: timeout, disconnect or a protocol error."""


class GuestCommandError(AgentError):
    """A guest command exited non-zero while ``check=True``."""

    def __init__(self, result: CommandResult) -> None:
        self.result = result
        super().__init__(
            f"guest command {result.command!r} exited {result.status}\n"
            f"stdout: {result.stdout[-2000:].decode(errors='replace')}\n"
            f"stderr: {result.stderr[-2000:].decode(errors='replace')}"
        )


@dataclass(frozen=True)
class CommandResult:
    command: str
    status: int  # exit code, or -signal
    stdout: bytes
    stderr: bytes
    elapsed: float = 0.0  # seconds, measured in the guest from fork to exit

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


class GuestAgent:
    """A connected agent channel. Not thread-safe: one request at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._next_id = 1
        self.kernel_release: str | None = None

    def close(self) -> None:
        self._sock.close()

    # -- framing -----------------------------------------------------------
    def _recv_exact(self, n: int, deadline: float) -> bytes:
        chunks = []
        while n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError("timed out waiting for the guest agent")
            self._sock.settimeout(left)
            try:
                b = self._sock.recv(min(n, 1 << 20))
            except TimeoutError:
                raise AgentError("timed out waiting for the guest agent") from None
            except OSError as e:
                raise AgentError(f"agent channel failed: {e}") from e
            if not b:
                raise AgentError("agent channel closed (QEMU exited?)")
            chunks.append(b)
            n -= len(b)
        return b"".join(chunks)

    def _recv_frame(self, deadline: float) -> tuple[FrameType, int, bytes]:
        magic, ftype, fid, length = HEADER.unpack(self._recv_exact(HEADER.size, deadline))
        if magic != MAGIC or length > MAX_PAYLOAD:
            raise AgentError(f"bad frame from agent (magic {magic!r}, length {length})")
        try:
            t = FrameType(ftype)
        except ValueError:
            raise AgentError(f"unknown frame type {ftype} from agent") from None
        return t, fid, self._recv_exact(length, deadline)

    def _request(
        self, ftype: FrameType, payload: bytes, expect: FrameType, timeout: float
    ) -> bytes:
        fid = self._next_id
        self._next_id += 1
        deadline = time.monotonic() + timeout
        self._sock.settimeout(timeout)
        try:
            self._sock.sendall(HEADER.pack(MAGIC, ftype, fid, len(payload)) + payload)
        except OSError as e:
            raise AgentError(f"sending to the guest agent failed: {e}") from e
        while True:
            t, rid, data = self._recv_frame(deadline)
            if t == FrameType.HELLO:
                # The agent restarted (e.g. after a channel hiccup); keep waiting.
                self.kernel_release = data.decode(errors="replace")
                continue
            if rid != fid:
                raise AgentError(f"agent answered request {rid}, expected {fid}")
            if t == FrameType.ERROR:
                raise AgentError(f"agent refused the request: {data.decode(errors='replace')}")
            if t != expect:
                raise AgentError(f"agent answered {t.name}, expected {expect.name}")
            return data

    # -- API ---------------------------------------------------------------
    def wait_ready(self, timeout: float) -> str:
        """Wait for the agent's HELLO; returns the guest kernel release."""
        deadline = time.monotonic() + timeout
        t, _, data = self._recv_frame(deadline)
        if t != FrameType.HELLO:
            raise AgentError(f"expected HELLO from the agent, got {t.name}")
        self.kernel_release = data.decode(errors="replace")
        return self.kernel_release

    def ping(self, timeout: float = 10.0) -> None:
        token = str(time.monotonic_ns()).encode()
        if self._request(FrameType.PING, token, FrameType.PONG, timeout) != token:
            raise AgentError("agent echoed a different PING payload")

    def run(
        self,
        command: str | list[str],
        *,
        timeout: float = 120.0,
        input: bytes = b"",
        check: bool = False,
    ) -> CommandResult:
        """Run ``command`` with ``/bin/sh -c`` in the guest, as root in ``/``.

        The guest kills the command's session after ``timeout`` seconds
        (status -9); the host gives up a little later.
        """
        cmd = command if isinstance(command, str) else shlex.join(command)
        body = cmd.encode()
        guest_timeout = max(1, int(timeout))
        payload = struct.pack("<II", guest_timeout, len(body)) + body + input
        data = self._request(FrameType.EXEC, payload, FrameType.EXEC_RESULT, timeout + 30)
        if len(data) < EXEC_RESULT.size:
            raise AgentError("short EXEC_RESULT from agent")
        status, olen, elen, elapsed_ns = EXEC_RESULT.unpack_from(data)
        h = EXEC_RESULT.size
        if h + olen + elen != len(data):
            raise AgentError("EXEC_RESULT lengths do not add up")
        result = CommandResult(cmd, status, data[h : h + olen], data[h + olen :], elapsed_ns / 1e9)
        if check and status != 0:
            raise GuestCommandError(result)
        return result

    def read_file(self, path: str, timeout: float = 60.0) -> bytes:
        data = self._request(FrameType.READ, path.encode(), FrameType.FILE_DATA, timeout)
        (err,) = struct.unpack_from("<i", data)
        if err:
            raise OSError(err, f"guest: cannot read {path}")  # an errno subclass, e.g. ENOENT
        return data[4:]

    def write_file(
        self, path: str, content: bytes, mode: int = 0o644, timeout: float = 60.0
    ) -> None:
        p = path.encode()
        payload = struct.pack("<II", mode, len(p)) + p + content
        data = self._request(FrameType.WRITE, payload, FrameType.WRITE_RESULT, timeout)
        (err,) = struct.unpack_from("<i", data)
        if err:
            raise OSError(err, f"guest: cannot write {path}")
