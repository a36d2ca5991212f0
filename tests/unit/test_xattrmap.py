"""``--xattrmap`` (virtiofsd's syntax) and the privileged-name guard."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.daemon.passthrough import PassthroughFs
from pyvirtiofsd.daemon.passthrough.filesystem import RequestContext
from pyvirtiofsd.daemon.passthrough.xattrmap import (
    XattrMap,
    XattrMapError,
    XattrRule,
    parse,
    privileged_write_denied,
)

ROOT = RequestContext(0, 0, 1)
USER = RequestContext(1000, 1000, 2)
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def test_parse_rules_and_separators() -> None:
    rules = parse(" /prefix/all/trusted./user.virtiofs./\n /bad/server//trusted./ :ok:all::: ")
    assert rules == (
        XattrRule("prefix", True, True, b"trusted.", b"user.virtiofs."),
        XattrRule("bad", False, True, b"", b"trusted."),
        XattrRule("ok", True, True, b"", b""),
    )
    # :map: expands as virtiofsd documents it
    assert parse(":map:trusted.:user.virtiofs.:") == (
        XattrRule("prefix", True, True, b"trusted.", b"user.virtiofs."),
        XattrRule("bad", False, True, b"", b"trusted."),
        XattrRule("bad", True, False, b"user.virtiofs.", b""),
        XattrRule("ok", True, True, b"", b""),
    )
    assert parse(":map::user.g.:") == (
        XattrRule("prefix", True, True, b"", b"user.g."),
        XattrRule("bad", True, True, b"", b""),
    )
    for bad in ("", ":prefix:all:a:", ":nope:all:::", ":ok:both:::", "aok:all:::"):
        with pytest.raises(XattrMapError):
            parse(bad)


def test_map_both_directions() -> None:
    m = XattrMap(parse(":map:trusted.:user.virtiofs.:"))
    assert m.to_host(b"trusted.overlay.opaque") == b"user.virtiofs.trusted.overlay.opaque"
    assert m.to_host(b"user.plain") == b"user.plain"
    with pytest.raises(OSError) as e:  # the guest may not name the mapped space itself
        m.to_host(b"user.virtiofs.x")
    assert e.value.errno == errno.EPERM
    assert m.to_guest(b"user.virtiofs.trusted.a") == b"trusted.a"
    assert m.to_guest(b"trusted.host-only") is None  # the host's own trusted.* are hidden
    assert m.to_guest(b"user.plain") == b"user.plain"
    # no rule matches: refused / hidden; bad on get is ENODATA; unsupported ENOTSUP
    m = XattrMap(parse(":ok:client:user.:::bad:client:security.:::unsupported:all:system.::"))
    for name, getting, code in [
        (b"trusted.a", False, errno.EPERM),
        (b"security.x", True, errno.ENODATA),
        (b"system.posix_acl_access", False, errno.ENOTSUP),
    ]:
        with pytest.raises(OSError) as e:
            m.to_host(name, getting=getting)
        assert e.value.errno == code
    assert m.to_guest(b"user.a") is None  # no server rule at all


def test_privileged_names_only_for_guest_root() -> None:
    assert privileged_write_denied(b"trusted.overlay.x", 1000)
    assert privileged_write_denied(b"security.capability", 1000)
    assert not privileged_write_denied(b"user.x", 1000)
    assert not privileged_write_denied(b"security.capability", 0)


@pytest.fixture
def share(tmp_path: Path) -> Path:
    root = tmp_path / "share"
    root.mkdir()
    f = root / "f"
    f.write_bytes(b"x")
    os.chown(f, 1000, 1000) if os.geteuid() == 0 else None
    os.chmod(root, 0o777)
    return root


@pytest.fixture
def fs(share: Path) -> Iterator[PassthroughFs]:
    fs = PassthroughFs(share, xattr=True)
    yield fs
    fs.close()


@root_only
def test_unprivileged_caller_cannot_set_trusted_or_security_capability(
    fs: PassthroughFs, share: Path
) -> None:
    """Finding 4 of issue #10: uid 1000 set trusted.* and security.capability."""
    node = fs.lookup(1, b"f").nodeid
    cap = bytes.fromhex("0100000200200000000000000000000000000000")  # v2, cap_net_raw
    for name, value in [
        (b"trusted.overlay.opaque", b"y"),
        (b"trusted.x", b"1"),
        (b"security.capability", cap),
        (b"security.evm", b"1"),
    ]:
        with pytest.raises(OSError) as e:
            fs.setxattr(node, name, value, 0, USER)
        assert e.value.errno == errno.EPERM, name
        with pytest.raises(OSError) as e:
            fs.removexattr(node, name, USER)
        assert e.value.errno == errno.EPERM
    assert os.listxattr(share / "f") == []
    # the owner's own user.* still works, and root may set the capability
    fs.setxattr(node, b"user.note", b"ok", 0, USER)
    fs.setxattr(node, b"security.capability", cap, 0, ROOT)
    assert os.getxattr(share / "f", "security.capability") == cap
    assert fs.getxattr(node, b"user.note", 16) == b"ok"


@root_only
def test_map_applies_to_the_host_names(fs: PassthroughFs, share: Path) -> None:
    fs.xattrmap = XattrMap(parse(":map:trusted.:user.virtiofs.:"))
    node = fs.lookup(1, b"f").nodeid
    # guest trusted.* lands in the host's user namespace, so uid 1000 may set it
    fs.setxattr(node, b"trusted.overlay.opaque", b"y", 0, USER)
    assert os.getxattr(share / "f", "user.virtiofs.trusted.overlay.opaque") == b"y"
    os.setxattr(share / "f", "trusted.host", b"h")
    listed = fs.listxattr(node, 4096)
    assert isinstance(listed, bytes)
    assert listed.split(b"\0")[:-1] == [b"trusted.overlay.opaque"]
    assert fs.getxattr(node, b"trusted.overlay.opaque", 8) == b"y"
    with pytest.raises(OSError) as e:
        fs.getxattr(node, b"user.virtiofs.trusted.overlay.opaque", 8)
    assert e.value.errno == errno.ENODATA
    fs.removexattr(node, b"trusted.overlay.opaque", USER)
    assert "user.virtiofs.trusted.overlay.opaque" not in os.listxattr(share / "f")


def test_xattrs_work_without_a_proc_path(fs: PassthroughFs, share: Path) -> None:
    """The xattr calls go through the /proc/self/fd *fd*, not a path, so they
    keep working inside the sandbox (no /proc there); the caller's cwd stays."""
    cwd = os.getcwd()
    node = fs.lookup(1, b"f").nodeid
    fs.setxattr(node, b"user.a", b"1", 0, ROOT)
    assert fs.getxattr(node, b"user.a", 0) == 1
    assert os.getcwd() == cwd
