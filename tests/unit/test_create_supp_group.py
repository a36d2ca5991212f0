"""FUSE_CREATE_SUPP_GROUP (7.38): the one supplementary group a creation
carries, decoded by the session and installed for the create.

Linux (``fs/fuse/dir.c`` ``get_create_supp_group``) appends a FUSE_EXT_GROUPS
record (``fuse_ext_header`` {size 16, type 32}, ``nr_groups`` 1, the group)
after the arguments of CREATE/MKNOD/MKDIR/SYMLINK when the parent
directory's group is one of the caller's groups but not its fsgid, and
``fuse_in_header.total_extlen`` counts it in 8-byte units.  These requests
are built byte for byte here; hostile ones must get EINVAL and leave the
session serving.  The setgid results are compared with a local directory
in which a thread holding that supplementary group did the same.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.daemon.fuse import abi
from pyvirtiofsd.daemon.fuse.abi import InitFlag
from pyvirtiofsd.daemon.fuse.session import FuseSession, supplied_groups
from pyvirtiofsd.daemon.passthrough import PassthroughFs, oscalls
from tests.support.fakechain import (
    CREATE,
    FORGET,
    GETATTR,
    INIT,
    LOOKUP,
    MKDIR,
    MKNOD,
    OPEN,
    SYMLINK,
    WRITE,
    FuseClient,
    Reply,
    create_body,
    mkdir_body,
    mknod_body,
    name_body,
    parse_entry,
    write_body,
)

A = 1000  # the guest user
G1 = 2000  # a supplementary group of A (A's fsgid is A)
IN_HEADER = struct.Struct("<IIQQIIIHH")
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
GROUPS_FLAG2 = int(InitFlag.CREATE_SUPP_GROUP) >> 32

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="credential switching needs root")


def groups_ext(*groups: int, size: int | None = None, kind: int = abi.FUSE_EXT_GROUPS) -> bytes:
    """One fuse_ext_header record; ``size`` defaults to the kernel's (rounded to 8)."""
    payload = struct.pack(f"<I{len(groups)}I", len(groups), *groups)
    real = -(-(8 + len(payload)) // 8) * 8
    return struct.pack("<II", real if size is None else size, kind) + payload.ljust(real - 8, b"\0")


def unknown_ext(kind: int = 77, size: int = 24) -> bytes:
    return struct.pack("<II", size, kind) + b"\xee" * (size - 8)


def ext_request(
    opcode: int,
    nodeid: int,
    body: bytes,
    ext: bytes,
    *,
    extlen: int | None = None,
    uid: int = A,
    gid: int = A,
    unique: int = 9,
) -> bytes:
    """A request with ``ext`` after its arguments (``extlen``: the header's units)."""
    units = len(ext) // 8 if extlen is None else extlen
    total = IN_HEADER.size + len(body) + len(ext)
    return IN_HEADER.pack(total, opcode, unique, nodeid, uid, gid, 42, units, 0) + body + ext


def init_738(client: FuseClient, flags2: int = GROUPS_FLAG2, minor: int = 38) -> tuple[int, int]:
    body = struct.pack("<IIIII44x", 7, minor, 1 << 17, 0xFFFF_FFFF, flags2)
    reply = client.call(INIT, 0, body)
    assert reply.ok, reply
    fields = INIT_OUT.unpack(reply.payload)
    return fields[3], fields[10]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    share = tmp_path / "share"
    share.mkdir()
    os.chmod(share, 0o777)
    return share


@pytest.fixture
def fs(root: Path) -> Iterator[PassthroughFs]:
    fs = PassthroughFs(root)
    yield fs
    fs.close()


@pytest.fixture
def client(fs: PassthroughFs) -> FuseClient:
    c = FuseClient(FuseSession(fs))
    flags, flags2 = init_738(c)
    assert flags & InitFlag.INIT_EXT and flags2 & GROUPS_FLAG2
    return c


def setgid_dir(path: Path, gid: int = G1, mode: int = 0o2777) -> Path:
    path.mkdir()
    os.chown(path, 0, gid)
    os.chmod(path, mode)
    return path


def local(
    uid: int, gid: int, groups: tuple[int, ...], where: Path, fn: Callable[[int], None]
) -> None:
    """``fn(dir_fd)`` as a local caller: fsuid/fsgid and ``groups`` on a fresh
    thread (raw, per-thread syscalls; no capabilities after the fsuid switch)."""
    errors: list[BaseException] = []
    dir_fd = os.open(where, os.O_PATH | os.O_DIRECTORY)

    def body() -> None:
        try:
            with oscalls.caller_credentials(uid, gid, creating=True):
                assert oscalls._raw_setgroups(groups) == 0
                try:
                    fn(dir_fd)
                finally:
                    assert oscalls._raw_setgroups(()) == 0
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    try:
        t = threading.Thread(target=body)
        t.start()
        t.join()
    finally:
        os.close(dir_fd)
    if errors:
        raise errors[0]


def lstat_of(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_mode, st.st_uid, st.st_gid


# --- INIT ------------------------------------------------------------------------


def test_init_738_negotiates_create_supp_group(fs: PassthroughFs) -> None:
    c = FuseClient(FuseSession(fs))
    body = struct.pack("<IIIII44x", 7, 38, 1 << 17, 0xFFFF_FFFF, 0xFFFF_FFFF)
    reply = c.call(INIT, 0, body)
    major, minor, _ra, flags, *_mid, flags2 = INIT_OUT.unpack(reply.payload)
    assert (major, minor) == (7, 38)
    assert flags & InitFlag.INIT_EXT, "flags2 is read only with INIT_EXT"
    assert flags2 == GROUPS_FLAG2, "nothing else of flags2 (no DAX, no security context)"
    assert c.session.flags & InitFlag.CREATE_SUPP_GROUP


def test_init_737_keeps_the_old_reply(fs: PassthroughFs) -> None:
    """A 6.1 guest (7.37, no flags2 bit 34): no INIT_EXT, flags2 0, as before;
    a 7.37 peer claiming the bit anyway does not get it (no extensions in 7.37)."""
    for flags2 in (0, GROUPS_FLAG2):
        c = FuseClient(FuseSession(fs))
        flags, got2 = init_738(c, flags2=flags2, minor=37)
        assert not flags & InitFlag.INIT_EXT and got2 == 0
        assert not c.session.flags & InitFlag.CREATE_SUPP_GROUP


def test_init_738_without_the_offer(fs: PassthroughFs) -> None:
    c = FuseClient(FuseSession(fs))
    flags, flags2 = init_738(c, flags2=0)
    assert not flags & InitFlag.INIT_EXT and flags2 == 0


# --- decoding --------------------------------------------------------------------


def test_decode_ext_groups() -> None:
    assert abi.decode_ext_groups(groups_ext(G1)) == (G1,)
    assert abi.decode_ext_groups(unknown_ext()) is None
    # a security context record (types 0..31) and unknown types are skipped
    assert abi.decode_ext_groups(unknown_ext(kind=1) + groups_ext(5) + unknown_ext(99, 8)) == (5,)
    assert abi.decode_ext_groups(groups_ext(1, 2, 3)) == (1, 2, 3)  # the session refuses > 1
    for bad in (
        b"\0" * 4,  # shorter than a header
        struct.pack("<II", 0, 77),  # size 0 (would loop)
        struct.pack("<II", 12, 77) + b"\0" * 4,  # not a multiple of 8
        struct.pack("<II", 24, 77) + b"\0" * 8,  # past the end
        groups_ext(G1) + groups_ext(G1),  # two group records
        groups_ext(G1, size=24) + b"\0" * 8,  # size does not match nr_groups
        struct.pack("<IIII", 16, abi.FUSE_EXT_GROUPS, 0xFFFF_FFFF, 1),  # huge nr_groups
    ):
        with pytest.raises(abi.MalformedRequest):
            abi.decode_ext_groups(bad)


def test_session_strips_the_extension_from_every_creation(client: FuseClient, root: Path) -> None:
    """Names, symlink targets and modes come out exactly as without the record."""
    ext = groups_ext(G1)
    sent = [
        (CREATE, create_body(b"f", os.O_WRONLY | os.O_CREAT, 0o100640)),
        (MKNOD, mknod_body(b"p", stat.S_IFIFO | 0o640)),
        (MKDIR, mkdir_body(b"d", 0o750)),
        (SYMLINK, b"s\0target/with/parts\0"),
    ]
    for opcode, body in sent:
        reply = client.raw(ext_request(opcode, 1, body, ext))
        assert reply.ok, (opcode, reply)
        assert supplied_groups() is None, "the group lives for one request only"
    assert sorted(os.listdir(root)) == ["d", "f", "p", "s"]
    assert os.readlink(root / "s") == "target/with/parts"
    assert stat.S_IMODE(os.stat(root / "f").st_mode) == 0o640
    assert stat.S_ISFIFO(os.stat(root / "p").st_mode)
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o750


def test_lookup_with_an_unknown_extension_looks_up_the_name(client: FuseClient, root: Path) -> None:
    (root / "hello").write_bytes(b"hi")
    # a hostile guest's LOOKUP: the name, then a record of an unknown type
    # ending in a NUL (read as part of the name it would make a bad one)
    ext = struct.pack("<II", 16, 0x7E7E7E7E) + b"\x7e" * 7 + b"\0"
    reply = client.raw(ext_request(LOOKUP, 1, name_body(b"hello"), ext))
    assert reply.ok, reply
    assert parse_entry(reply.payload).size == 2


def test_write_payload_ends_before_the_extension(client: FuseClient, root: Path) -> None:
    (root / "w").write_bytes(b"")
    w = client.lookup(1, b"w")
    opened = client.call(OPEN, w.nodeid, struct.pack("<II", os.O_WRONLY, 0))
    assert opened.ok
    fh = struct.unpack_from("<Q", opened.payload)[0]
    body = write_body(fh, 0, b"payload")
    reply = client.raw(ext_request(WRITE, w.nodeid, body, unknown_ext(size=16), uid=0, gid=0))
    assert reply.ok and struct.unpack_from("<I", reply.payload)[0] == 7
    assert (root / "w").read_bytes() == b"payload"
    # a WRITE whose size reaches into the extension is malformed
    body = struct.pack("<QQIIQII", fh, 0, 7 + 16, 0, 0, 0, 0) + b"payload"
    reply = client.raw(ext_request(WRITE, w.nodeid, body, unknown_ext(size=16), uid=0, gid=0))
    assert reply.error == -errno.EINVAL


def served_after(client: FuseClient, reply: Reply) -> int:
    """The reply's errno; the session still answers a plain GETATTR."""
    assert supplied_groups() is None
    assert client.call(GETATTR, 1, struct.pack("<IIQ", 0, 0, 0)).ok
    return reply.error


def test_hostile_extensions_are_einval(client: FuseClient, root: Path) -> None:
    body = mkdir_body(b"x")
    good = groups_ext(G1)
    cases = {
        "extlen past the request": ext_request(MKDIR, 1, body, good, extlen=200),
        "extlen past the arguments too": ext_request(MKDIR, 1, b"", good, extlen=3),
        "extlen larger than any body": ext_request(MKDIR, 1, body, good, extlen=0xFFFF),
        "record size 0": ext_request(MKDIR, 1, body, struct.pack("<II", 0, 32) + b"\0" * 8),
        "record size 12": ext_request(MKDIR, 1, body, struct.pack("<II", 12, 77) + b"\0" * 8),
        "record past extlen": ext_request(MKDIR, 1, body, struct.pack("<II", 32, 77) + b"\0" * 8),
        "two groups": ext_request(MKDIR, 1, body, groups_ext(G1, 2001)),
        "no group": ext_request(MKDIR, 1, body, groups_ext()),
        "two group records": ext_request(MKDIR, 1, body, good + good),
        "groups on LOOKUP": ext_request(LOOKUP, 1, name_body(b"x"), good),
        "groups on GETATTR": ext_request(GETATTR, 1, struct.pack("<IIQ", 0, 0, 0), good),
    }
    for label, raw in cases.items():
        reply = client.raw(raw)
        assert served_after(client, reply) == -errno.EINVAL, label
    assert not (root / "x").exists(), "nothing was created by a refused request"


def test_groups_without_negotiation_are_einval(fs: PassthroughFs, root: Path) -> None:
    c = FuseClient(FuseSession(fs))
    init_738(c, flags2=0)
    reply = c.raw(ext_request(MKDIR, 1, mkdir_body(b"x"), groups_ext(G1)))
    assert served_after(c, reply) == -errno.EINVAL
    # an unknown record is still skipped there (the spec lets a daemon ignore it)
    assert c.raw(ext_request(MKDIR, 1, mkdir_body(b"y"), unknown_ext())).ok
    assert (root / "y").is_dir() and not (root / "x").exists()


def test_forget_with_a_bad_extlen_gets_no_reply(client: FuseClient, root: Path) -> None:
    (root / "n").write_bytes(b"")
    n = client.lookup(1, b"n")
    reply = client.raw(ext_request(FORGET, n.nodeid, struct.pack("<Q", 1), b"", extlen=9))
    assert reply.used == 0


# --- the create keeps S_ISGID as a local disk does ----------------------------


@needs_root
@pytest.mark.parametrize("how", ["create", "mknod"])
def test_setgid_at_creation_matches_local(
    client: FuseClient, root: Path, tmp_path: Path, how: str
) -> None:
    """uid A (fsgid A, supplementary G1) creates a file asking for 02775 in a
    setgid directory of G1: a local disk keeps S_ISGID (A is in G1), and so
    does the share once the guest sends G1; without the record it is cleared."""
    ref = setgid_dir(tmp_path / "ref")
    setgid_dir(root / "sg")
    sg = client.lookup(1, b"sg").nodeid

    def make(dir_fd: int, name: str) -> None:
        if how == "create":
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o2775, dir_fd=dir_fd))
        else:
            os.mknod(name, stat.S_IFIFO | 0o2775, dir_fd=dir_fd)

    local(A, A, (G1,), ref, lambda d: make(d, "f"))
    local(A, A, (), ref, lambda d: make(d, "nog"))  # A not in G1: cleared locally too
    if how == "create":
        body = create_body(b"f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o102775)
        plain = create_body(b"nog", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o102775)
    else:
        body = mknod_body(b"f", stat.S_IFIFO | 0o2775)
        plain = mknod_body(b"nog", stat.S_IFIFO | 0o2775)
    opcode = CREATE if how == "create" else MKNOD
    assert client.raw(ext_request(opcode, sg, body, groups_ext(G1))).ok
    assert client.raw(ext_request(opcode, sg, plain, b"")).ok
    assert lstat_of(ref / "f") == lstat_of(root / "sg/f")
    assert os.lstat(root / "sg/f").st_mode & stat.S_ISGID, "kept: the creator is in G1"
    assert lstat_of(ref / "nog") == lstat_of(root / "sg/nog")
    assert not os.lstat(root / "sg/nog").st_mode & stat.S_ISGID
    # the worker thread holds no group afterwards
    with open("/proc/thread-self/status") as f:
        groups = [line.split()[1:] for line in f if line.startswith("Groups:")]
    assert groups == [[]]


@needs_root
def test_mkdir_and_symlink_with_the_group_match_local(
    client: FuseClient, root: Path, tmp_path: Path
) -> None:
    ref = setgid_dir(tmp_path / "ref")
    setgid_dir(root / "sg")
    sg = client.lookup(1, b"sg").nodeid

    def make(dir_fd: int) -> None:
        os.mkdir("d", 0o2775, dir_fd=dir_fd)
        os.symlink("d", "s", dir_fd=dir_fd)

    local(A, A, (G1,), ref, make)
    assert client.raw(ext_request(MKDIR, sg, mkdir_body(b"d", 0o2775), groups_ext(G1))).ok
    assert client.raw(ext_request(SYMLINK, sg, b"s\0d\0", groups_ext(G1))).ok
    for name in ("d", "s"):
        assert lstat_of(ref / name) == lstat_of(root / "sg" / name), name


# --- the C fast path leaves requests with extensions to Python ------------------


async def test_fast_path_leaves_extensions_to_python(tmp_path: Path) -> None:
    """The whole device (fake front-end, real rings, the C fast path on): a
    LOOKUP hit and a GETATTR are answered in C, but the same requests with
    ``total_extlen`` set go to Python, which skips an unknown record and
    refuses a group record on a non-creation (C would have answered both)."""
    from tests.support.fakechain import OUT_HEADER
    from tests.unit.test_device_frontend import Rig, running_device

    async def raw(rig: Rig, data: bytes) -> tuple[int, bytes]:
        head = rig.q.add_chain([data], [4096])
        ((got, used_len),) = await rig.submit()
        assert got == head
        rec = rig.q.chains[head]
        out = b"".join(rig.ram.read(gpa, n) for gpa, n in rec.writable)[:used_len]
        length, error, _unique = OUT_HEADER.unpack_from(out)
        assert length == used_len
        return error, out[OUT_HEADER.size :]

    async with running_device(tmp_path) as rig:
        assert (await rig.fuse(INIT, 0, struct.pack("<IIIII44x", 7, 38, 1 << 17, 0, 4)))[0] == 0
        err, payload = await rig.fuse(LOOKUP, 1, name_body(b"file.bin"))
        assert err == 0
        nodeid = parse_entry(payload).nodeid
        fast = rig.devices[0].fast
        assert fast is not None
        before = fast.stats()
        assert (await rig.fuse(LOOKUP, 1, name_body(b"file.bin")))[0] == 0
        assert (await rig.fuse(GETATTR, nodeid, struct.pack("<IIQ", 0, 0, 0)))[0] == 0
        in_c = fast.stats()
        assert (in_c.lookup, in_c.getattr) == (before.lookup + 1, before.getattr + 1)
        ext = struct.pack("<II", 16, 0x7E7E7E7E) + b"\x7e" * 7 + b"\0"
        err, payload = await raw(rig, ext_request(LOOKUP, 1, name_body(b"file.bin"), ext, uid=0))
        assert err == 0 and parse_entry(payload).nodeid == nodeid
        getattr_body = struct.pack("<IIQ", 0, 0, 0)
        err, _ = await raw(rig, ext_request(GETATTR, nodeid, getattr_body, groups_ext(G1), uid=0))
        assert err == -errno.EINVAL
        after = fast.stats()
        assert (after.lookup, after.getattr) == (in_c.lookup, in_c.getattr), "none served in C"


@needs_root
def test_the_group_is_translated_to_the_host(root: Path) -> None:
    """--translate-gid: the group in the record is a guest id like the fsgid."""
    from pyvirtiofsd.daemon.idmap import IdMap, IdTranslation

    ids = IdTranslation(IdMap(), IdMap.parse([f"map:3000:{G1}:1"]))
    fs = PassthroughFs(root)
    try:
        c = FuseClient(FuseSession(fs, ids=ids))
        init_738(c)
        setgid_dir(root / "sg")
        sg = c.lookup(1, b"sg").nodeid
        body = mknod_body(b"p", stat.S_IFIFO | 0o2775)
        assert c.raw(ext_request(MKNOD, sg, body, groups_ext(3000))).ok
        assert os.lstat(root / "sg/p").st_mode & stat.S_ISGID, "host G1 counted"
        body = mknod_body(b"q", stat.S_IFIFO | 0o2775)
        assert c.raw(ext_request(MKNOD, sg, body, groups_ext(G1 + 1))).ok
        assert not os.lstat(root / "sg/q").st_mode & stat.S_ISGID, "another group: cleared"
    finally:
        fs.close()
