"""The pyvirtiofsd command line: virtiofsd compatibility and its JSON outputs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from pyvirtiofsd.daemon import cli

# docs/interop/vhost-user.json (QEMU 7.2) as JSON Schema: VHostUserBackendCapabilities
# is a union on "type"; the "fs" branch has no members besides the base.
BACKEND_TYPES = ["9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net",
                 "rng", "rpmsg", "rproc-serial", "scsi", "vsock", "fs"]  # fmt: skip
CAPABILITIES_SCHEMA = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"enum": BACKEND_TYPES}},
    "if": {"properties": {"type": {"const": "fs"}}},
    "then": {"properties": {"type": {}}, "additionalProperties": False},
}
DESCRIPTOR_SCHEMA = {
    "type": "object",
    "required": ["description", "type", "binary"],
    "additionalProperties": False,
    "properties": {
        "description": {"type": "string"},
        "type": {"enum": BACKEND_TYPES},
        "binary": {"type": "string", "pattern": "^/"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
}


def run_cli(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyvirtiofsd.daemon", *args],
        capture_output=True,
        text=True,
        timeout=60,
        **kw,  # type: ignore[call-overload]
    )


def test_print_capabilities_matches_qemu_schema() -> None:
    r = run_cli("--print-capabilities")
    assert r.returncode == 0
    caps = json.loads(r.stdout)
    jsonschema.validate(caps, CAPABILITIES_SCHEMA)
    assert caps == {"type": "fs"}
    # the schema is not a rubber stamp
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"type": "fs", "features": ["x"]}, CAPABILITIES_SCHEMA)


def test_backend_descriptors_match_qemu_schema() -> None:
    shipped = Path(cli.__file__).parent / "data" / "50-pyvirtiofsd.json"
    jsonschema.validate(json.loads(shipped.read_text()), DESCRIPTOR_SCHEMA)
    r = run_cli("--print-backend-descriptor")
    assert r.returncode == 0
    desc = json.loads(r.stdout)
    jsonschema.validate(desc, DESCRIPTOR_SCHEMA)
    assert desc["type"] == "fs" and os.path.exists(desc["binary"])


def test_help_and_version() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for opt in ("--socket-path", "--fd", "--shared-dir", "--thread-pool-size", "--log-level",
                "--print-capabilities", "--socket-group", "--swiotlb"):  # fmt: skip
        assert opt in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("pyvirtiofsd ")


def test_bad_usage_is_a_clear_error(tmp_path: Path) -> None:
    r = run_cli("--socket-path", str(tmp_path / "s"))
    assert r.returncode == 2 and "--shared-dir" in r.stderr
    r = run_cli("--shared-dir", str(tmp_path))
    assert r.returncode == 2 and "--socket-path" in r.stderr
    r = run_cli("--socket-path", str(tmp_path / "s"), "--shared-dir", str(tmp_path / "nope"))
    assert r.returncode == 1 and "not a directory" in r.stderr
    r = run_cli("--fd", "0", "--shared-dir", str(tmp_path))
    assert r.returncode == 1 and "cannot listen" in r.stderr
    r = run_cli("--socket-path", str(tmp_path / "s"), "-o", "source=/x,bogus=1")
    assert r.returncode != 0 and "bogus" in r.stderr
    r = run_cli("--swiotlb", "0x1000", "--shared-dir", str(tmp_path), "--fd", "3")
    assert r.returncode == 2 and "0x<base>,<size>" in r.stderr


def test_swiotlb_parsing() -> None:
    assert cli.parse_swiotlb("0x40000000,67108864") == (0x40000000, 64 << 20)
    assert cli.parse_swiotlb("0x1000,0x2000") == (0x1000, 0x2000)
    for bad in ("0x1000", "x,1", "0x1000,0", "-1,5"):
        with pytest.raises(Exception, match=r"window|expected|bad"):
            cli.parse_swiotlb(bad)


def test_daemon_exits_when_front_end_disconnects(tmp_path: Path) -> None:
    """virtiofsd semantics: serve one front-end, exit 0 when it hangs up."""
    path = tmp_path / "vu.sock"
    share = tmp_path / "share"
    share.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvirtiofsd.daemon", "--socket-path", str(path),
         "-o", f"source={share}", "--log-level", "debug"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        # the daemon logs once it is listening; read until then (bounded by the timeout below)
        for line in proc.stderr:
            if "serving" in line:
                break
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        # GET_FEATURES
        s.sendall((1).to_bytes(4, "little") + (1).to_bytes(4, "little") + bytes(4))
        reply = s.recv(64)
        assert len(reply) == 20
        feats = int.from_bytes(reply[12:20], "little")
        assert feats & (1 << 32) and feats & (1 << 33)  # VERSION_1, ACCESS_PLATFORM
        s.close()
        assert proc.wait(30) == 0
        assert not path.exists()  # socket file removed on exit
    finally:
        proc.kill()
        proc.wait()
