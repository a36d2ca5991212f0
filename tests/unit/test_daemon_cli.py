"""The pyvirtiofsd command line: virtiofsd compatibility and its JSON outputs."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from pyvirtiofsd.daemon import cli

# docs/interop/vhost-user.json (QEMU 8.2+) as JSON Schema: VHostUserBackendCapabilities
# is a union on "type"; the "fs" branch (VHostUserBackendCapabilitiesFs) has one
# member, "features", a list of VHostUserBackendFsFeature.
BACKEND_TYPES = ["9p", "balloon", "block", "caif", "console", "crypto", "gpu", "input", "net",
                 "rng", "rpmsg", "rproc-serial", "scsi", "vsock", "fs"]  # fmt: skip
FS_FEATURES = ["migrate-precopy", "separate-options"]
CAPABILITIES_SCHEMA = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"enum": BACKEND_TYPES}},
    "if": {"properties": {"type": {"const": "fs"}}},
    "then": {
        "required": ["features"],
        "properties": {
            "type": {},
            "features": {"type": "array", "items": {"enum": FS_FEATURES}, "uniqueItems": True},
        },
        "additionalProperties": False,
    },
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
    # libvirt passes --shared-dir, --cache ... (not one -o) only where it sees
    # "separate-options"; no migration, so no "migrate-precopy"
    assert caps == {"type": "fs", "features": ["separate-options"]}
    # virtiofsd 1.13's print_capabilities() layout, line for line
    assert r.stdout == '{\n  "type": "fs",\n  "features": [\n    "separate-options"\n  ]\n}\n'
    # the schema is not a rubber stamp
    for bad in ({"type": "fs", "features": ["x"]}, {"type": "fs"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, CAPABILITIES_SCHEMA)


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


# --- a drop-in for virtiofsd 1.13's command line -----------------------------------

#: virtiofsd 1.13.2's options (src/main.rs, struct Opt, and clap's -h/-V), each
#: with a value it accepts (None: a flag). Written from its source, not from cli.py.
VIRTIOFSD_113: dict[str, str | None] = {
    "--shared-dir": "/srv", "--tag": "fs0", "--socket": "/run/vfs.sock",
    "--socket-path": "/run/vfs.sock", "--socket-group": "root", "--fd": "3",
    "--thread-pool-size": "2", "--xattr": None, "--posix-acl": None,
    "--xattrmap": ":map::user.virtiofs.:", "--sandbox": "chroot", "--readonly": None,
    "--seccomp": "log", "--announce-submounts": None, "--no-announce-submounts": None,
    "--inode-file-handles": "prefer", "--cache": "metadata", "--allow-mmap": None,
    "--no-readdirplus": None, "--writeback": None, "--allow-direct-io": None,
    "--print-capabilities": None, "--modcaps": "+sys_admin:-mknod", "--log-level": "debug",
    "--syslog": None, "--rlimit-nofile": "4096", "-o": "cache=always", "-d": None,
    "--no-killpriv-v2": None, "--killpriv-v2": None, "-f": None, "--security-label": None,
    "--uid-map": ":0:100000:65536:", "--gid-map": ":0:100000:65536:",
    "--translate-uid": "map:0:1000:1", "--translate-gid": "map:0:1000:1",
    "--preserve-noatime": None, "--migration-mode": "file-handles",
    "--migration-on-error": "guest-error", "--migration-verify-handles": None,
    "--migration-confirm-paths": None, "--help": None, "--version": None,
}  # fmt: skip

#: what a served option sets (the attribute of the parsed arguments, its value)
EFFECT: dict[str, tuple[str, object]] = {
    "--shared-dir": ("shared_dir", "/srv"), "--socket": ("socket_path", "/run/vfs.sock"),
    "--socket-path": ("socket_path", "/run/vfs.sock"), "--fd": ("fd", 3),
    "--thread-pool-size": ("thread_pool_size", 2), "--xattr": ("xattr", True),
    "--sandbox": ("sandbox", "chroot"), "--readonly": ("readonly", True),
    "--seccomp": ("seccomp", "log"), "--announce-submounts": ("announce_submounts", True),
    "--no-announce-submounts": ("announce_submounts", False),
    "--inode-file-handles": ("inode_file_handles", "prefer"),
    "--cache": ("cache", cli.CachePolicy.METADATA), "--no-readdirplus": ("readdirplus", False),
    "--writeback": ("writeback", True), "--allow-direct-io": ("allow_direct_io", True),
    "--print-capabilities": ("print_capabilities", True),
    "--modcaps": ("modcaps", "+sys_admin:-mknod"),
    "--log-level": ("log_level", "debug"), "--syslog": ("syslog", True),
    "--rlimit-nofile": ("rlimit_nofile", 4096), "-o": ("cache", cli.CachePolicy.ALWAYS),
    "-d": ("log_level", "debug"), "--no-killpriv-v2": ("killpriv_v2", False),
    "--killpriv-v2": ("killpriv_v2", True), "-f": ("foreground", True),
    "--socket-group": ("socket_group", "root"),
}  # fmt: skip


def parse(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int | None, str]:
    """cli.parse_args: (None, "") when accepted, else (exit status, stderr)."""
    try:
        cli.parse_args(list(argv))
    except SystemExit as e:
        return int(e.code or 0), capsys.readouterr().err
    return None, ""


def test_every_virtiofsd_option_has_a_status() -> None:
    assert set(cli.VIRTIOFSD_OPTIONS) == set(VIRTIOFSD_113)
    statuses = {status for status, _ in cli.VIRTIOFSD_OPTIONS.values()}
    assert statuses <= {cli.IMPLEMENTED, cli.REFUSED, cli.NO_EFFECT}


@pytest.mark.parametrize("option", sorted(VIRTIOFSD_113))
def test_each_option_is_served_or_refused_by_name_in_both_forms(
    capsys: pytest.CaptureFixture[str], option: str
) -> None:
    value = VIRTIOFSD_113[option]
    status, _ = cli.VIRTIOFSD_OPTIONS[option]
    forms = [[option]] if value is None else [[option, value]]
    if value is not None and option.startswith("--"):
        forms.append([f"{option}={value}"])
    elif value is not None:
        forms.append([f"{option}{value}"])  # -ocache=always, as getopt/clap take it
    for form in forms:
        if option in ("--help", "--version"):
            code, _ = parse(capsys, *form)
            assert code == 0
            continue
        if status == cli.REFUSED:
            code, err = parse(capsys, *form)
            assert code == 2, form
            assert option in err and "not supported by pyvirtiofsd" in err, err
            continue
        args = cli.parse_args(form)
        if option in EFFECT:
            attr, expected = EFFECT[option]
            assert getattr(args, attr) == expected, form
        elif option in ("--xattrmap",):
            assert args.xattrmap.rules
        else:  # the id maps: one rule each
            assert len(getattr(args, option.lstrip("-").replace("-", "_"))) == 1


#: virtiofsd 1.13's -o names (parse_compat); posix_acl and security_label are refused here
COMPAT_113 = [
    "xattrmap=:map::user.virtiofs.:", "cache=auto", "cache=always", "cache=none",
    "cache=metadata", "loglevel=debug", "loglevel=info", "loglevel=warn", "loglevel=err",
    "sandbox=namespace", "sandbox=chroot", "source=/srv", "modcaps=+sys_admin", "xattr",
    "no_xattr", "readdirplus", "no_readdirplus", "writeback", "no_writeback",
    "allow_direct_io", "no_allow_direct_io", "announce_submounts", "killpriv_v2",
    "no_killpriv_v2", "posix_acl", "no_posix_acl", "security_label", "no_security_label",
    "no_posix_lock", "no_flock",
]  # fmt: skip


def test_compat_options(capsys: pytest.CaptureFixture[str]) -> None:
    for opt in COMPAT_113:
        code, err = parse(capsys, "-o", opt)
        if opt in ("posix_acl", "security_label"):
            assert code == 2 and f"-o {opt}" in err and "not supported" in err, err
        else:
            assert code is None, (opt, err)
    args = cli.parse_args(
        ["-o", "source=/srv,cache=none,loglevel=warn,no_readdirplus,xattr", "-o", "writeback"]
    )
    assert (args.shared_dir, args.cache, args.log_level) == ("/srv", cli.CachePolicy.NEVER, "warn")
    assert not args.readdirplus and args.xattr and args.writeback and args.compat_options
    bad_ones = [("cache=X", "cache=X"), ("bogus", "bogus"), ("loglevel=loud", "loud"),
                ("sandbox=jail", "jail"), ("xattr=1", "xattr")]  # fmt: skip
    for bad, named in bad_ones:
        code, err = parse(capsys, "-o", f"source=/srv,{bad}")
        assert code == 2 and named in err, (bad, err)


#: bad values, each an error at start-up naming the option (virtiofsd's or ours)
BAD_VALUES = [
    ("-o", "cache=X"), ("--cache", "sometimes"), ("--num-request-queues", "0"),
    ("--num-request-queues", "256"), ("--thread-pool-size", "-1"),
    ("--thread-pool-size", "lots"), ("--thread-pool-size", "1025"), ("--log-level", "loud"),
    ("--sandbox", "jail"), ("--seccomp", "maybe"), ("--inode-file-handles", "always"),
    ("--xattrmap", ":bogus:"), ("--modcaps", "+nope"), ("-o", "modcaps=+nope"),
    ("--rlimit-nofile", "-5"),
    ("--socket-group", "no-such-group-here"), ("--fd", "-1"), ("--translate-uid", "map:1"),
    ("--uid-map", "0:1"), ("--swiotlb", "0x1000"), ("--poll-max-ns", "-1"),
    ("--poll-max-ns", "2000000"),
]  # fmt: skip


@pytest.mark.parametrize(("option", "value"), BAD_VALUES)
def test_bad_values_fail_at_start_before_listening(tmp_path: Path, option: str, value: str) -> None:
    sock = tmp_path / "vu.sock"
    r = run_cli("--socket-path", str(sock), "--shared-dir", str(tmp_path), option, value)
    # exit 2 (usage), but 1 for --modcaps, as virtiofsd (it checks them after parsing)
    assert r.returncode == (1 if "modcaps" in option + value else 2), r.stderr
    named = value.partition("=")[0] if option == "-o" else option  # -o cache=X: "cache"
    assert named in r.stderr and "Traceback" not in r.stderr, r.stderr
    # refused before anything was made: no socket, no pid file for a client to wait on
    assert not sock.exists() and not Path(f"{sock}.pid").exists()


def test_help_names_every_option_it_takes() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for option in VIRTIOFSD_113:
        assert option in r.stdout, option
    for option in ("--posix-lock", "--flock", "--num-request-queues", "--keep-listening"):
        assert option in r.stdout


def test_readme_table_is_the_option_table() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`-"):
            rows[cells[0].strip("`").split()[0]] = (cells[1], cells[2])
    assert rows == cli.VIRTIOFSD_OPTIONS


class Daemon:
    """A pyvirtiofsd started as a client would: wait for its pid file."""

    def __init__(self, *args: str, prefix: tuple[str, ...] = (), **kw: object) -> None:
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "pyvirtiofsd.daemon", *args],
            stderr=subprocess.PIPE, text=True, **kw,  # type: ignore[call-overload]
        )  # fmt: skip

    def wait_for(self, needle: str) -> str:
        """stderr up to the line holding ``needle`` (bounded by the daemon's
        own start-up: EOF if it died)."""
        assert self.proc.stderr is not None
        seen = []
        for line in self.proc.stderr:
            seen.append(line)
            if needle in line:
                return "".join(seen)
        raise AssertionError(f"no {needle!r} in: {''.join(seen)}")

    def hang_up(self, sock: Path) -> int:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        s.close()
        return self.proc.wait(30)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.mark.parametrize("sandbox", ["none", "namespace"])
def test_pid_file_as_virtiofsd_writes_it(tmp_path: Path, sandbox: str) -> None:
    """<socket>.pid: 0600, the pid and a newline, flock-ed; a second daemon on
    the same socket fails on it; gone once the daemon exits."""
    sock, share = tmp_path / "vu.sock", tmp_path / "share"
    share.mkdir()
    pid_path = Path(f"{sock}.pid")
    # virtme-ng 1.42's command line, then our own sandbox
    d = Daemon("--no-announce-submounts", "--socket-path", str(sock), "--shared-dir",
               str(share), "--sandbox", sandbox, "--cache", "always")  # fmt: skip
    try:
        d.wait_for("serving")
        assert pid_path.read_text() == f"{d.proc.pid}\n"
        assert pid_path.stat().st_mode & 0o777 == 0o600
        with open(pid_path) as f, pytest.raises(BlockingIOError):
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = run_cli("--socket-path", str(sock), "--shared-dir", str(share))
        assert second.returncode == 1 and f"{sock}.pid" in second.stderr, second.stderr
        assert pid_path.read_text() == f"{d.proc.pid}\n"  # the first one's, untouched
        assert d.hang_up(sock) == 0
        assert not pid_path.exists() and not sock.exists()
    finally:
        d.kill()


def test_fd_writes_no_pid_file(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "vu.sock"))
    listener.listen()
    d = Daemon("--fd", str(listener.fileno()), "--shared-dir", str(tmp_path), "--sandbox",
               "none", pass_fds=[listener.fileno()])  # fmt: skip
    try:
        d.wait_for("serving")
        assert sorted(os.listdir(tmp_path)) == ["vu.sock"]
    finally:
        d.kill()
        listener.close()


# Inside a private mount namespace, /dev is a folder of ours holding a syslog
# socket (and the device nodes Python needs): /dev/log without touching the host's.
PRIVATE_DEV = (
    'for n in null zero urandom random; do : > "$D/$n"; mount --bind /dev/$n "$D/$n"; done; '
    'mount --rbind "$D" /dev && exec "$@"'
)


@pytest.mark.parametrize("sandbox", ["none", "namespace"])
def test_syslog(tmp_path: Path, sandbox: str) -> None:
    """--syslog: the records go to /dev/log, connected before the sandbox (what
    is logged after pivot_root arrives too), none on stderr."""
    dev, share, sock = tmp_path / "dev", tmp_path / "share", tmp_path / "vu.sock"
    dev.mkdir()
    share.mkdir()
    log_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log_sock.bind(str(dev / "log"))
    log_sock.settimeout(60)
    d = Daemon("--syslog", "--socket-path", str(sock), "--shared-dir", str(share),
               "--sandbox", sandbox, prefix=("unshare", "-m", "sh", "-c", PRIVATE_DEV, "sh"),
               env={**os.environ, "D": str(dev)})  # fmt: skip
    try:
        records = []
        while not any("serving" in r for r in records):
            records.append(log_sock.recv(8192).decode())
        serving = next(r for r in records if "serving" in r)
        # <14>: facility user (1) * 8 + info (6)
        assert serving.startswith("<14>pyvirtiofsd[") and "INFO" in serving, serving
        if sandbox == "namespace":
            assert "serving / " in serving  # logged from inside the pivot_root
        assert d.hang_up(sock) == 0
        assert d.proc.stderr is not None
        err = d.proc.stderr.read()
        assert "serving" not in err and "INFO" not in err, err
    finally:
        d.kill()
        log_sock.close()


def test_syslog_unreachable_falls_back_to_stderr(tmp_path: Path) -> None:
    dev, share, sock = tmp_path / "dev", tmp_path / "share", tmp_path / "vu.sock"
    dev.mkdir()
    share.mkdir()
    d = Daemon("--syslog", "--socket-path", str(sock), "--shared-dir", str(share),
               "--sandbox", "none", prefix=("unshare", "-m", "sh", "-c", PRIVATE_DEV, "sh"),
               env={**os.environ, "D": str(dev)})  # fmt: skip
    try:
        out = d.wait_for("serving")
        assert "can't enable syslog" in out, out
        assert d.hang_up(sock) == 0
    finally:
        d.kill()
