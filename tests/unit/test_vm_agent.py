"""Host side of the agent protocol against a scripted fake guest."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from pyvirtiofsd.vm.agent import HEADER, MAGIC, AgentError, FrameType, GuestAgent


def frame(t: FrameType, fid: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, t, fid, len(payload)) + payload


def recv_frame(s: socket.socket) -> tuple[int, int, bytes]:
    hdr = b""
    while len(hdr) < HEADER.size:
        hdr += s.recv(HEADER.size - len(hdr))
    _, t, fid, n = HEADER.unpack(hdr)
    body = b""
    while len(body) < n:
        body += s.recv(n - len(body))
    return t, fid, body


@pytest.fixture
def pair() -> Iterator[tuple[GuestAgent, socket.socket]]:
    a, b = socket.socketpair()
    agent = GuestAgent(a)
    yield agent, b
    agent.close()
    b.close()


def serve(guest: socket.socket, fn: Callable[[socket.socket], None]) -> threading.Thread:
    t = threading.Thread(target=fn, args=(guest,), daemon=True)
    t.start()
    return t


def test_hello_then_exec(pair: tuple[GuestAgent, socket.socket]) -> None:
    agent, guest = pair

    def script(s: socket.socket) -> None:
        s.sendall(frame(FrameType.HELLO, 0, b"6.1.0"))
        t, fid, body = recv_frame(s)
        assert t == FrameType.EXEC
        _timeout, clen = struct.unpack_from("<II", body)
        assert body[8 : 8 + clen] == b"echo hi" and body[8 + clen :] == b"in"
        s.sendall(
            frame(
                FrameType.EXEC_RESULT, fid, struct.pack("<iIIQ", 3, 3, 1, 1_500_000_000) + b"hi\nE"
            )
        )

    th = serve(guest, script)
    assert agent.wait_ready(5) == "6.1.0"
    r = agent.run("echo hi", input=b"in", timeout=5)
    th.join()
    assert (r.status, r.stdout, r.stderr, r.elapsed) == (3, b"hi\n", b"E", 1.5)


def test_mismatched_id_and_bad_magic_are_errors(pair: tuple[GuestAgent, socket.socket]) -> None:
    agent, guest = pair

    def script(s: socket.socket) -> None:
        _, fid, _ = recv_frame(s)
        s.sendall(frame(FrameType.PONG, fid + 1, b""))

    th = serve(guest, script)
    with pytest.raises(AgentError, match="answered request"):
        agent.ping(timeout=5)
    th.join()
    guest.sendall(b"XXXX" + b"\0" * 12)
    with pytest.raises(AgentError, match="bad frame"):
        agent.wait_ready(5)


def test_timeout_and_disconnect(pair: tuple[GuestAgent, socket.socket]) -> None:
    agent, guest = pair
    with pytest.raises(AgentError, match="timed out"):
        agent.wait_ready(0.2)
    guest.close()
    with pytest.raises(AgentError, match="closed"):
        agent.wait_ready(5)


def test_read_file_errors(pair: tuple[GuestAgent, socket.socket]) -> None:
    agent, guest = pair

    def script(s: socket.socket) -> None:
        _, fid, _ = recv_frame(s)
        s.sendall(frame(FrameType.FILE_DATA, fid, struct.pack("<i", 2)))
        _, fid, _ = recv_frame(s)
        s.sendall(frame(FrameType.FILE_DATA, fid, struct.pack("<i", 13)))
        _, fid, _ = recv_frame(s)
        s.sendall(frame(FrameType.FILE_DATA, fid, struct.pack("<i", 0) + b"data"))

    th = serve(guest, script)
    with pytest.raises(FileNotFoundError):
        agent.read_file("/a")
    with pytest.raises(PermissionError):
        agent.read_file("/b")
    assert agent.read_file("/c") == b"data"
    th.join()
