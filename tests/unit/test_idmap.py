"""``--translate-uid``/``--translate-gid`` (virtiofsd 1.13's grammar), the
``--uid-map``/``--gid-map`` ranges, and ids translated where they cross:
request credentials, SETATTR's owner and every attribute in a reply."""

from __future__ import annotations

import errno
import os
import re
import selectors
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pyvirtiofsd.daemon import sandbox
from pyvirtiofsd.daemon.cli import build_parser
from pyvirtiofsd.daemon.fuse.session import FuseSession
from pyvirtiofsd.daemon.idmap import (
    IdMap,
    IdMapError,
    IdRule,
    IdTranslation,
    NamespaceMap,
    parse_namespace_map,
    parse_rule,
)
from pyvirtiofsd.daemon.passthrough import PassthroughFs
from tests.support.fakechain import (
    CREATE,
    GETATTR,
    LOOKUP,
    MKDIR,
    OPENDIR,
    READDIRPLUS,
    SETATTR,
    FuseClient,
    init_body,
    name_body,
    parse_attr,
    parse_dirents,
    parse_entry,
    read_body,
)
from tests.unit.test_device_frontend import INIT, running_device

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (files of other owners)")
UID, GID = 11, 12  # indexes in a fuse_attr tuple
U32_MAX = 0xFFFF_FFFF


# --- grammar --------------------------------------------------------------------


def test_every_rule_type_parses() -> None:
    assert parse_rule("map:0:1000:1") == IdRule("map", 0, 1000, 1)
    assert parse_rule("guest:5:6:7") == IdRule("guest", 5, 6, 7)
    assert parse_rule("host:5:6:7") == IdRule("host", 5, 6, 7)
    assert parse_rule("squash-guest:0:1000:4294967295") == IdRule("squash-guest", 0, 1000, U32_MAX)
    assert parse_rule("squash-host:1:2:3") == IdRule("squash-host", 1, 2, 3)
    assert parse_rule("forbid-guest:2000:10") == IdRule("forbid-guest", 2000, None, 10)
    # any separator that is not a letter, digit, - or _, the same throughout;
    # the type is case-insensitive; a "+" sign is a number, as Rust's parse
    assert parse_rule("MAP/0/1000/1") == IdRule("map", 0, 1000, 1)
    assert parse_rule("Squash-Guest,+1,2,3") == IdRule("squash-guest", 1, 2, 3)
    assert str(parse_rule("forbid-guest:2:3")) == "forbid-guest:2:3"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "expected TYPE:NUMBERS"),
        ("map", "expected TYPE:NUMBERS"),
        ("mop:0:1:2", "unknown type 'mop'"),
        ("map:0:1", "map takes 3 numbers, got 2"),
        ("map:0:1:2:3", "map takes 3 numbers, got 4"),
        ("forbid-guest:1:2:3", "forbid-guest takes 2 numbers, got 3"),
        ("map:0:x:1", "'x'"),
        ("map:0:-1:1", "'-1'"),
        ("map:0::1", "''"),
        ("map:0/1/2", "'0/1/2'"),  # one separator throughout
        ("map:4294967296:0:1", "more than 32 bits"),
        ("map:4294967295:0:1", "range overflow"),
        ("guest:0:4294967290:10", "range overflow"),  # the targets must fit too
        ("squash-guest:1:0:4294967295", "range overflow"),
        ("forbid-guest:4294967290:6", "range overflow"),
    ],
)
def test_bad_rules_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(IdMapError) as err:
        parse_rule(spec)
    assert message in str(err.value)


def test_overlaps_within_one_direction_are_refused() -> None:
    with pytest.raises(IdMapError, match="guest-to-host mapping 'squash-guest:1:5:1' overlaps"):
        IdMap.parse(["map:0:1000:2", "squash-guest:1:5:1"])
    with pytest.raises(IdMapError, match="host-to-guest"):
        IdMap.parse(["map:0:1000:2", "host:1001:7:1"])  # map's host side is 1000..1001
    with pytest.raises(IdMapError, match="guest-to-host"):
        IdMap.parse(["forbid-guest:10:5", "guest:14:0:1"])
    # the two directions are independent; an empty range maps nothing
    m = IdMap.parse(["guest:0:1000:1", "host:0:1000:1", "map:5:5:0", "map:5:6:1"])
    assert m.to_host(5) == 6


def test_namespace_ranges() -> None:
    assert parse_namespace_map(":0:100000:65536:") == NamespaceMap(0, 100000, 65536)
    assert str(NamespaceMap(1, 2, 3)) == ":1:2:3:"
    for bad in ("0:100000:65536", ":0:100000:65536", ":0:1:0:", ":a:1:1:", "x0:1:1:", ":0:1:1:y"):
        with pytest.raises(IdMapError, match=re.escape(repr(bad))):
            parse_namespace_map(bad)
    with pytest.raises(IdMapError, match="overflow"):
        parse_namespace_map(":4294967000:0:1000:")


# --- translation ----------------------------------------------------------------


def test_translation_both_ways() -> None:
    m = IdMap.parse(
        [
            "map:0:1000:1",  # guest root is host 1000 and back
            "map:100:5000:10",  # guest 100..109 <-> host 5000..5009
            "guest:200:7000:1",  # one way: guest 200 -> host 7000
            "host:8000:300:2",  # one way: host 8000..8001 -> guest 300..301
            "squash-guest:1000:1000:1000",  # guest 1000..1999 -> host 1000
            "squash-host:60000:65534:5000",  # host 60000..64999 -> guest 65534
            "forbid-guest:2000:1",
        ]
    )
    assert not m.identity
    assert (m.to_host(0), m.to_guest(1000)) == (1000, 0)
    assert (m.to_host(105), m.to_guest(5009)) == (5005, 109)
    assert m.to_host(110) == 110 and m.to_guest(5010) == 5010  # past the range: unchanged
    assert m.to_host(200) == 7000 and m.to_guest(7000) == 7000  # guest: one way only
    assert m.to_guest(8001) == 301 and m.to_host(301) == 301  # host: one way only
    assert m.to_host(1000) == m.to_host(1999) == 1000 and m.to_host(2001) == 2001
    assert m.to_guest(60000) == m.to_guest(64999) == 65534 and m.to_guest(65000) == 65000
    with pytest.raises(PermissionError) as err:
        m.to_host(2000)
    assert err.value.errno == errno.EPERM
    assert m.to_guest(2000) == 2000  # forbid-guest says nothing about host ids
    assert IdMap().identity and IdMap().to_host(5) == 5 and IdTranslation().identity


def test_squash_the_whole_id_space() -> None:
    m = IdMap.parse(["squash-guest:0:1000:4294967295"])
    assert m.to_host(0) == m.to_host(U32_MAX - 1) == 1000
    assert m.to_guest(1000) == 1000  # host -> guest untouched


def test_options_parse_on_the_command_line(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        [
            "--translate-uid",
            "map:0:1000:1",
            "--translate-uid=forbid-guest:5:1",
            "--translate-gid",
            "squash-guest:0:1000:10",
            "--uid-map",
            ":0:1000:1:",
            "--gid-map=:0:1000:1:",
        ]
    )
    assert args.translate_uid == [IdRule("map", 0, 1000, 1), IdRule("forbid-guest", 5, None, 1)]
    assert args.translate_gid == [IdRule("squash-guest", 0, 1000, 10)]
    assert args.uid_map == args.gid_map == [NamespaceMap(0, 1000, 1)]
    # bad values are start-up errors, with the reason
    daemon = [sys.executable, "-m", "pyvirtiofsd.daemon", "--socket-path",
              str(tmp_path / "s.sock"), "--shared-dir", str(tmp_path)]  # fmt: skip
    r = subprocess.run([*daemon, "--translate-uid", "map:0:1"], capture_output=True, timeout=60)
    assert r.returncode == 2 and b"map takes 3 numbers, got 2" in r.stderr
    r = subprocess.run([*daemon, "--uid-map", "0:1:1"], capture_output=True, timeout=60)
    assert r.returncode == 2 and b"expected :namespace_id:host_id:count:" in r.stderr
    r = subprocess.run(
        [*daemon, "--translate-gid", "map:0:1:2", "--translate-gid", "guest:1:9:1"],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 2 and b"overlaps 'map:0:1:2'" in r.stderr, r.stderr


# --- sandbox rules for unprivileged daemons --------------------------------------


def test_sandbox_refuses_what_cannot_work(tmp_path: Path) -> None:
    def cleanup() -> None:
        raise AssertionError("nothing may be entered")

    if os.geteuid() == 0:
        with pytest.raises(ValueError, match="--uid-map/--gid-map need --sandbox namespace"):
            sandbox.enter(
                "namespace", tmp_path, parent_cleanup=cleanup, uid_map=[NamespaceMap(0, 1, 1)]
            )
    with pytest.raises(ValueError, match="--uid-map/--gid-map need --sandbox namespace"):
        sandbox.enter("none", tmp_path, parent_cleanup=cleanup, gid_map=[NamespaceMap(0, 1, 1)])


@root_only
def test_unprivileged_chroot_is_refused_at_start() -> None:
    # pytest's tmp_path lies under a 0700 directory the daemon's user cannot enter
    with tempfile.TemporaryDirectory(prefix="pvd-idmap-") as d:
        os.chmod(d, 0o777)
        r = subprocess.run(
            ["setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups",
             sys.executable, "-m", "pyvirtiofsd.daemon", "--socket-path", f"{d}/s.sock",
             "--shared-dir", d, "--sandbox", "chroot"],
            capture_output=True,
            timeout=60,
            cwd="/",
        )  # fmt: skip
    assert r.returncode == 1 and b"--sandbox chroot needs root" in r.stderr, r.stderr


# --- the session applies it ------------------------------------------------------


def _create_body(name: bytes, mode: int = 0o644) -> bytes:
    return struct.pack("<IIII", os.O_WRONLY | os.O_CREAT, 0o100000 | mode, 0, 0) + name_body(name)


def _setattr_body(uid: int, gid: int) -> bytes:
    valid = 1 << 1 | 1 << 2  # FATTR_UID | FATTR_GID
    return struct.pack("<IIQQQQQQIIIIIIII", valid, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, uid, gid, 0)


@root_only
def test_session_translates_credentials_setattr_and_replies(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "hostfile").write_text("x")
    os.chown(share / "hostfile", 1234, 1234)
    ids = IdTranslation(
        IdMap.parse(["map:1000:1234:1", "squash-host:0:4242:1", "forbid-guest:2000:1"]),
        IdMap.parse(["map:1000:1234:1", "squash-host:0:4242:1"]),
    )
    client = FuseClient(FuseSession(PassthroughFs(share), ids=ids))
    client.init()
    # a guest user creates: the host file is the mapped owner's, the reply the guest's
    reply = client.call(CREATE, 1, _create_body(b"made"), uid=1000, gid=1000)
    assert reply.ok, reply.error
    entry = parse_entry(reply.payload)
    assert (entry.attr[UID], entry.attr[GID]) == (1000, 1000)
    st = (share / "made").stat()
    assert (st.st_uid, st.st_gid) == (1234, 1234)
    # a host-owned file as the guest sees it, by LOOKUP, GETATTR and READDIRPLUS
    host_entry = client.lookup(1, b"hostfile")
    assert (host_entry.attr[UID], host_entry.attr[GID]) == (1000, 1000)
    reply = client.call(GETATTR, host_entry.nodeid, bytes(16))
    assert parse_attr(reply.payload, 16)[UID : GID + 1] == (1000, 1000)
    fh = client.opendir(1)
    plus = {d.name: d.entry for d in client.readdir_all(1, fh, 4096, plus=True)}
    made, hostfile = plus[b"made"], plus[b"hostfile"]
    assert made is not None and hostfile is not None
    assert made.attr[UID] == hostfile.attr[UID] == 1000
    # host root (the share's owner) squashed to 4242
    root = parse_attr(client.call(GETATTR, 1, bytes(16)).payload, 16)
    assert root[UID : GID + 1] == (4242, 4242)
    # SETATTR by guest root: the new owner guest 1000 is host 1234
    os.chown(share / "made", 0, 0)
    reply = client.call(SETATTR, entry.nodeid, _setattr_body(1000, 1000))
    assert reply.ok, reply.error
    assert parse_attr(reply.payload, 16)[UID : GID + 1] == (1000, 1000)
    assert (share / "made").stat().st_uid == 1234
    # a forbidden guest id: EPERM, nothing created; as a new owner too
    reply = client.call(MKDIR, 1, struct.pack("<II", 0o755, 0) + name_body(b"no"), uid=2000)
    assert reply.error == -errno.EPERM and not (share / "no").exists()
    reply = client.call(SETATTR, entry.nodeid, _setattr_body(2000, 1000))
    assert reply.error == -errno.EPERM and (share / "made").stat().st_uid == 1234


# --- the whole device: replies translated, the C fast path kept off ---------------


def _owner(payload: bytes, offset: int) -> tuple[int, int]:
    attr = parse_attr(payload, offset)
    return attr[UID], attr[GID]


@pytest.mark.parametrize("translated", [False, True])
async def test_device_replies_carry_guest_ids(tmp_path: Path, translated: bool) -> None:
    ids = IdTranslation(IdMap.parse(["map:777:0:1"]), IdMap.parse(["map:778:0:1"]))
    config = {"ids": ids} if translated else {}
    async with running_device(tmp_path, **config) as rig:
        os.chown(rig.share / "file.bin", 0, 0)
        assert (await rig.fuse(INIT, 0, init_body()))[0] == 0
        err, payload = await rig.fuse(LOOKUP, 1, name_body(b"file.bin"))
        assert err == 0
        entry = parse_entry(payload)
        expect = (777, 778) if translated else (0, 0)
        assert (entry.attr[UID], entry.attr[GID]) == expect
        for _ in range(3):  # a known inode: the C fast path would answer these
            err, payload = await rig.fuse(GETATTR, entry.nodeid, bytes(16))
            assert err == 0 and _owner(payload, 16) == expect
            err, payload = await rig.fuse(LOOKUP, 1, name_body(b"file.bin"))
            assert err == 0 and _owner(payload, 40) == expect
        err, payload = await rig.fuse(OPENDIR, 1, struct.pack("<II", os.O_RDONLY, 0))
        fh = struct.unpack_from("<Q", payload)[0]
        err, payload = await rig.fuse(READDIRPLUS, 1, read_body(fh, 0, 4096))
        listed = {d.name: d.entry for d in parse_dirents(payload, plus=True)}
        plus_entry = listed[b"file.bin"]
        assert err == 0 and plus_entry is not None
        assert (plus_entry.attr[UID], plus_entry.attr[GID]) == expect
        stats = rig.devices[0].fast
        assert stats is not None
        served = stats.stats()
        if translated:  # off: every GETATTR/LOOKUP went through the session
            assert served.getattr == served.lookup == 0
        else:  # on: the check above would have seen untranslated C replies
            assert served.getattr >= 3 and served.lookup >= 3


def _start_unprivileged(share: str, *args: str) -> str:
    """Run the daemon as uid 65533 until it serves, then SIGTERM it; its log."""
    argv = ["setpriv", "--reuid", "65533", "--regid", "65533", "--clear-groups",
            sys.executable, "-m", "pyvirtiofsd.daemon", "--socket-path", f"{share}/s.sock",
            "--shared-dir", share, *args]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd="/")
    assert proc.stderr is not None
    log = b""
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stderr, selectors.EVENT_READ)
            deadline = time.monotonic() + 60
            while b"serving" not in log and time.monotonic() < deadline:
                if sel.select(deadline - time.monotonic()):
                    chunk = os.read(proc.stderr.fileno(), 65536)
                    if not chunk:
                        break
                    log += chunk
        assert b"serving" in log, log.decode()
        proc.terminate()
        assert proc.wait(30) == 0, log.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()
    return log.decode()


@root_only
def test_unprivileged_daemon_starts_in_each_usable_sandbox() -> None:
    with tempfile.TemporaryDirectory(prefix="pvd-idmap-") as d:
        os.chmod(d, 0o777)
        log = _start_unprivileged(d, "--sandbox", "none", "--modcaps", "+sys_admin")
        assert "capabilities kept (daemon): none" in log
        assert "--modcaps: the daemon is not root" in log
        log = _start_unprivileged(d, "--sandbox", "namespace", "--translate-uid", "map:0:65533:1")
        assert "sandbox: user namespace, uid map :0:65533:1:, gid map :0:65533:1:" in log
        assert "root is " in log and "seccomp: kill" in log
        assert not os.path.exists(f"{d}/s.sock")  # the outer process removed it


def test_a_refused_user_namespace_names_the_host_settings() -> None:
    err = sandbox._unshare_user_failed(errno.EPERM)
    assert err.errno == errno.EPERM and "use --sandbox none" in str(err)
    assert any(p.removeprefix("/proc/sys/").replace("/", ".") in str(err) and os.path.exists(p)
               for p in sandbox.USERNS_SYSCTLS) or "none of" in str(err)  # fmt: skip
