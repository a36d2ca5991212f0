"""daemon/config.py: the one home of the filesystem and service settings,
checked when built and served as built by the device and the host mount."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from pyvirtiofsd.daemon import hostmount
from pyvirtiofsd.daemon.config import (
    MAX_POLL_MAX_NS,
    MAX_REQUEST_QUEUES,
    MAX_THREAD_POOL_SIZE,
    CachePolicy,
    ConfigError,
    FsConfig,
    ServiceConfig,
)
from pyvirtiofsd.daemon.fuse.abi import InitFlag, OpenOutFlag
from pyvirtiofsd.daemon.fuse.filesystem import RequestContext
from pyvirtiofsd.daemon.passthrough import PassthroughFs
from pyvirtiofsd.daemon.passthrough.xattrmap import IDENTITY, XattrMap
from pyvirtiofsd.daemon.service import make_device

ROOT = RequestContext(0, 0, 0)


@pytest.mark.parametrize(
    ("name", "policy", "timeout", "direct_io"),
    [
        ("never", CachePolicy.NEVER, 0.0, True),
        ("none", CachePolicy.NEVER, 0.0, True),  # virtiofsd's -o cache=none
        ("metadata", CachePolicy.METADATA, 86400.0, True),
        ("auto", CachePolicy.AUTO, 1.0, False),
        ("always", CachePolicy.ALWAYS, 86400.0, False),
    ],
)
def test_cache_policies_are_virtiofsds(
    tmp_path: Path, name: str, policy: CachePolicy, timeout: float, direct_io: bool
) -> None:
    config = FsConfig(shared_dir=tmp_path, cache=name)  # type: ignore[arg-type]
    assert config.cache is policy
    assert config.entry_timeout_s == config.attr_timeout_s == timeout
    assert config.direct_io is direct_io
    (tmp_path / "f").write_bytes(b"x")
    fs = PassthroughFs(config)
    try:
        entry = fs.lookup(1, b"f")
        assert entry.entry_valid == entry.attr_valid == int(timeout)
        opened = fs.open(entry.nodeid, os.O_RDONLY, ROOT)
        assert bool(opened.open_flags & OpenOutFlag.DIRECT_IO) is direct_io
        assert bool(opened.open_flags & OpenOutFlag.KEEP_CACHE) is (policy is CachePolicy.ALWAYS)
        # cache=never: no READDIRPLUS either, as virtiofsd
        offered = fs.init(InitFlag(0xFFFF_FFFF))
        assert bool(offered & InitFlag.DO_READDIRPLUS) is (policy is not CachePolicy.NEVER)
    finally:
        fs.close()


def test_bad_values_are_refused_when_built(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cache policy 'sometimes'.*metadata"):
        FsConfig(shared_dir=tmp_path, cache="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="entry_timeout"):
        FsConfig(shared_dir=tmp_path, entry_timeout=-1)
    with pytest.raises(ConfigError, match="readonly"):
        FsConfig(shared_dir=tmp_path, readonly="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="inode_file_handles"):
        FsConfig(shared_dir=tmp_path, inode_file_handles="sometimes")
    for n in (0, MAX_REQUEST_QUEUES + 1, True):
        with pytest.raises(ConfigError, match="num_request_queues"):
            ServiceConfig(shared_dir=tmp_path, num_request_queues=n)
    for n in (-1, MAX_THREAD_POOL_SIZE + 1):
        with pytest.raises(ConfigError, match="thread_pool_size"):
            ServiceConfig(shared_dir=tmp_path, thread_pool_size=n)
    for n in (-1, MAX_POLL_MAX_NS + 1, True):
        with pytest.raises(ConfigError, match="poll_max_ns"):
            ServiceConfig(shared_dir=tmp_path, poll_max_ns=n)
    with pytest.raises(ConfigError, match="inode_fds"):
        ServiceConfig(shared_dir=tmp_path, inode_fds=0)
    with pytest.raises(ConfigError, match="window"):
        ServiceConfig(shared_dir=tmp_path, window=(0x1000, 0))
    with pytest.raises(TypeError, match="cahce"):
        ServiceConfig(shared_dir=tmp_path, cahce="auto")
    with pytest.raises(TypeError, match="not both"):
        ServiceConfig(FsConfig(shared_dir=tmp_path), readonly=True)


def test_frozen_and_normalised(tmp_path: Path) -> None:
    config = FsConfig(shared_dir=str(tmp_path), inode_file_handles="fallback")  # type: ignore[arg-type]
    assert config.shared_dir == tmp_path and isinstance(config.shared_dir, Path)
    assert config.inode_file_handles == "prefer"  # virtiofsd's deprecated alias
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.readonly = True  # type: ignore[misc]
    service = ServiceConfig(config, num_request_queues=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        service.num_request_queues = 3  # type: ignore[misc]
    # a mapping xattrmap needs xattrs served (virtiofsd: --xattrmap implies --xattr)
    mapped = FsConfig(shared_dir=tmp_path, xattrmap=XattrMap.from_option(":map::user.virtiofs.:"))
    assert mapped.xattr and not FsConfig(shared_dir=tmp_path, xattrmap=IDENTITY).xattr
    # flat settings build the same FsConfig; replace() re-points the share only
    flat = ServiceConfig(shared_dir=tmp_path, readonly=True, num_request_queues=2)
    assert flat.fs == FsConfig(shared_dir=tmp_path, readonly=True)
    moved = flat.replace(shared_dir=Path("/"))
    assert moved.fs == dataclasses.replace(flat.fs, shared_dir=Path("/"))
    assert moved.num_request_queues == 2 and flat.shared_dir == tmp_path


def test_init_offers_what_the_config_allows(tmp_path: Path) -> None:
    every = InitFlag(0xFFFF_FFFF)

    def offered(**settings: object) -> InitFlag:
        fs = PassthroughFs(tmp_path, **settings)
        try:
            return fs.init(every)
        finally:
            fs.close()

    default = offered()
    assert default & InitFlag.DO_READDIRPLUS and default & InitFlag.HANDLE_KILLPRIV_V2
    no_rdp = offered(readdirplus=False)
    assert not no_rdp & (InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO)
    assert no_rdp | InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO == default
    assert offered(killpriv_v2=False) == default & ~InitFlag.HANDLE_KILLPRIV_V2
    assert offered(writeback=True) & InitFlag.WRITEBACK_CACHE
    assert not offered(writeback=True, readonly=True) & InitFlag.WRITEBACK_CACHE


def test_the_device_serves_the_config_it_is_given(tmp_path: Path) -> None:
    config = ServiceConfig(shared_dir=tmp_path, cache="metadata", readonly=True, thread_pool_size=0)
    device = make_device(config)
    try:
        fs = device.session.fs
        assert isinstance(fs, PassthroughFs)
        assert fs.config is config.fs
        assert fs.readonly and fs.cache == "never" and fs.entry_timeout == (86400, 0)
    finally:
        device.close()


def test_the_host_mount_takes_the_same_cache_policies() -> None:
    choices = next(a.choices for a in hostmount.build_parser()._actions if a.dest == "cache")
    assert choices is not None
    assert set(choices) == {p.value for p in CachePolicy} | {"none"}
    for name in choices:
        CachePolicy.parse(name)
