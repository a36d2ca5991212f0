"""The daemon's settings, in one place: frozen, validated once, when built.

:class:`FsConfig` is what the passthrough filesystem serves and how (the share,
the cache policy, read-only, xattrs, locks ...); the vhost-user device
(:func:`pyvirtiofsd.daemon.service.make_device`) and the host mount
(``pyvirtiofsd mount``) both build their :class:`PassthroughFs` from one.
:class:`ServiceConfig` adds what only the vhost-user service needs (queues,
thread pool, window, stats file).

The command line (:mod:`.cli`) builds them once, at start-up, so a bad value
is an error before the daemon listens, never when a front-end connects. Every
check raises :class:`ConfigError` naming the option.

A new filesystem setting is one field of :class:`FsConfig` (with its check in
``__post_init__``), read in ``PassthroughFs.__init__`` and set by the CLI.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .idmap import IDENTITY as IDENTITY_IDS
from .idmap import IdTranslation
from .passthrough.xattrmap import IDENTITY, XattrMap

__all__ = [
    "DEFAULT_NUM_REQUEST_QUEUES",
    "DEFAULT_POLL_MAX_NS",
    "DEFAULT_THREAD_POOL_SIZE",
    "INODE_FILE_HANDLES_MODES",
    "MAX_POLL_MAX_NS",
    "MAX_REQUEST_QUEUES",
    "MAX_THREAD_POOL_SIZE",
    "CachePolicy",
    "ConfigError",
    "FsConfig",
    "ServiceConfig",
]

#: Python workers serving the requests the C fast path does not (--thread-pool-size).
DEFAULT_THREAD_POOL_SIZE = 4
MAX_THREAD_POOL_SIZE = 1024
#: Adaptive polling of each request queue before its runner sleeps
#: (--poll-max-ns): at most this long per wait, as QEMU's iothread
#: poll-max-ns (whose default this is); 0 never polls.
DEFAULT_POLL_MAX_NS = 32768
MAX_POLL_MAX_NS = 1_000_000
#: Request queues offered to the front-end (--num-request-queues).
DEFAULT_NUM_REQUEST_QUEUES = 16
#: The device's ceiling: virtio-fs's num_request_queues is a le32, but each
#: queue costs a runner thread and an eventfd pair; QEMU's own cap is lower.
MAX_REQUEST_QUEUES = 255


#: --inode-file-handles values (passthrough/filehandles.py's MODES)
INODE_FILE_HANDLES_MODES = ("never", "prefer", "mandatory")


class ConfigError(ValueError):
    """A setting that cannot be served; the message names the option."""


class CachePolicy(enum.StrEnum):
    """``--cache``: how long the guest may trust what it was told (virtiofsd's
    policies, with its timeouts)."""

    #: nothing cached: 0 s timeouts, every file opened with DIRECT_IO, no READDIRPLUS
    NEVER = "never"
    #: metadata for a day, file data not at all (DIRECT_IO)
    METADATA = "metadata"
    #: 1 s timeouts, the page cache revalidated on open
    AUTO = "auto"
    #: a day, and the page cache kept across opens (KEEP_CACHE)
    ALWAYS = "always"

    @classmethod
    def parse(cls, text: str) -> CachePolicy:
        """A policy by name; ``none`` is virtiofsd's ``-o cache=none`` (never)."""
        if text == "none":
            return cls.NEVER
        try:
            return cls(text)
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise ConfigError(f"bad cache policy {text!r} (one of {names})") from None

    @property
    def timeout(self) -> float:
        """Entry and attribute timeout, seconds (virtiofsd's)."""
        return {"never": 0.0, "metadata": 86400.0, "auto": 1.0, "always": 86400.0}[self.value]

    @property
    def data(self) -> str:
        """What it means for file data: ``never`` (DIRECT_IO), ``auto`` or ``always``."""
        return "never" if self in (CachePolicy.NEVER, CachePolicy.METADATA) else self.value


def _flag(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, not {value!r}")


@dataclass(frozen=True, kw_only=True)
class FsConfig:
    """What the passthrough filesystem serves, and how."""

    #: the share (resolved by the caller where it matters: inside the sandbox it is "/")
    shared_dir: Path
    cache: CachePolicy = CachePolicy.AUTO
    #: entry/attribute timeouts in seconds; None: the cache policy's
    entry_timeout: float | None = None
    attr_timeout: float | None = None
    readonly: bool = False
    #: serve extended attributes (else the xattr operations answer ENOSYS);
    #: a non-identity xattrmap turns it on, as in virtiofsd
    xattr: bool = False
    xattrmap: XattrMap = IDENTITY
    writeback: bool = False
    posix_locks: bool = False
    flock: bool = False
    allow_device_nodes: bool = False
    allow_direct_io: bool = False
    announce_submounts: bool = False
    #: offer READDIRPLUS (never with cache=never, as virtiofsd)
    readdirplus: bool = True
    #: negotiate FUSE_HANDLE_KILLPRIV_V2 (the daemon clears setuid/setgid on write)
    killpriv_v2: bool = True
    #: --inode-file-handles: never (O_PATH fds), prefer, mandatory (see
    #: passthrough/filehandles.py; virtiofsd's "fallback" is prefer)
    inode_file_handles: str = "never"
    #: --translate-uid/--translate-gid: applied where ids cross, by the FUSE
    #: session of the vhost-user device (``pyvirtiofsd mount`` serves host ids)
    ids: IdTranslation = IDENTITY_IDS
    # Settings still to come (uid/gid translation) are fields here, checked
    # below; the CLI refuses their options until then.

    def __post_init__(self) -> None:
        object.__setattr__(self, "shared_dir", Path(self.shared_dir))
        if not isinstance(self.cache, CachePolicy):
            object.__setattr__(self, "cache", CachePolicy.parse(str(self.cache)))
        for name in ("entry_timeout", "attr_timeout"):
            t = getattr(self, name)
            if t is not None and (not isinstance(t, int | float) or not 0 <= t < 1 << 32):
                raise ConfigError(f"{name} must be 0 .. 2^32 seconds, not {t!r}")
        for f in dataclasses.fields(self):
            if f.type == "bool":
                _flag(getattr(self, f.name), f.name)
        if self.inode_file_handles == "fallback":
            object.__setattr__(self, "inode_file_handles", "prefer")
        if self.inode_file_handles not in INODE_FILE_HANDLES_MODES:
            raise ConfigError(
                f"bad inode_file_handles {self.inode_file_handles!r} "
                f"(one of {', '.join(INODE_FILE_HANDLES_MODES)})"
            )
        if not isinstance(self.ids, IdTranslation):
            raise ConfigError(f"ids must be an IdTranslation, not {self.ids!r}")
        if not isinstance(self.xattrmap, XattrMap):
            raise ConfigError(f"xattrmap must be an XattrMap, not {self.xattrmap!r}")
        if self.xattrmap is not IDENTITY and self.xattrmap.rules is not None:
            object.__setattr__(self, "xattr", True)

    @property
    def entry_timeout_s(self) -> float:
        return self.cache.timeout if self.entry_timeout is None else self.entry_timeout

    @property
    def attr_timeout_s(self) -> float:
        return self.cache.timeout if self.attr_timeout is None else self.attr_timeout

    @property
    def serves_readdirplus(self) -> bool:
        return self.readdirplus and self.cache is not CachePolicy.NEVER

    @property
    def direct_io(self) -> bool:
        """Whether file data bypasses the page cache (of the guest, or of the
        host for ``pyvirtiofsd mount``)."""
        return self.cache.data == "never"

    def describe(self) -> str:
        """One line for the log."""
        extras = [f"cache={self.cache.value}"]
        extras += [
            name
            for name in ("readonly", "xattr", "writeback", "posix_locks", "flock")
            if getattr(self, name)
        ]
        return f"{self.shared_dir} ({', '.join(extras)})"


_FS_FIELDS = frozenset(f.name for f in dataclasses.fields(FsConfig))


@dataclass(frozen=True, init=False)
class ServiceConfig:
    """The vhost-user service: the filesystem plus the device's own settings.

    ``ServiceConfig(fs=FsConfig(...), num_request_queues=2)``; for short, the
    filesystem's settings may be given flat instead of ``fs``
    (``ServiceConfig(shared_dir=p, readonly=True)``), building its FsConfig.
    """

    fs: FsConfig
    num_request_queues: int = DEFAULT_NUM_REQUEST_QUEUES
    #: strict window mode (--swiotlb): (guest-physical base, size)
    window: tuple[int, int] | None = None
    thread_pool_size: int = DEFAULT_THREAD_POOL_SIZE
    poll_max_ns: int = DEFAULT_POLL_MAX_NS
    stats_file: Path | None = None
    keep_listening: bool = False
    #: inode fds kept open at most (--inode-file-handles prefer/mandatory);
    #: the CLI sets half the open-file limit it raised (getrlimit is not
    #: in the seccomp allowlist); None: PassthroughFs reads the limit itself
    inode_fds: int | None = None

    def __init__(
        self,
        fs: FsConfig | None = None,
        *,
        num_request_queues: int = DEFAULT_NUM_REQUEST_QUEUES,
        window: tuple[int, int] | None = None,
        thread_pool_size: int = DEFAULT_THREAD_POOL_SIZE,
        poll_max_ns: int = DEFAULT_POLL_MAX_NS,
        stats_file: Path | None = None,
        keep_listening: bool = False,
        inode_fds: int | None = None,
        **fs_settings: Any,
    ) -> None:
        unknown = set(fs_settings) - _FS_FIELDS
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        if fs is None:
            fs = FsConfig(**fs_settings)
        elif fs_settings:
            raise TypeError("give fs or its settings, not both")
        set_ = object.__setattr__
        set_(self, "fs", fs)
        set_(self, "num_request_queues", num_request_queues)
        set_(self, "window", window)
        set_(self, "thread_pool_size", thread_pool_size)
        set_(self, "poll_max_ns", poll_max_ns)
        set_(self, "stats_file", None if stats_file is None else Path(stats_file))
        set_(self, "keep_listening", keep_listening)
        set_(self, "inode_fds", inode_fds)
        self._check()

    def _check(self) -> None:
        n = self.num_request_queues
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_REQUEST_QUEUES:
            raise ConfigError(f"num_request_queues must be 1..{MAX_REQUEST_QUEUES}, not {n!r}")
        n = self.thread_pool_size
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_THREAD_POOL_SIZE:
            raise ConfigError(f"thread_pool_size must be 0..{MAX_THREAD_POOL_SIZE}, not {n!r}")
        n = self.poll_max_ns
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_POLL_MAX_NS:
            raise ConfigError(f"poll_max_ns must be 0..{MAX_POLL_MAX_NS}, not {n!r}")
        if self.window is not None:
            base, size = self.window
            if size <= 0 or base < 0 or base + size > 1 << 64:
                raise ConfigError(f"bad swiotlb window {base:#x}+{size:#x}")
        _flag(self.keep_listening, "keep_listening")
        fds = self.inode_fds
        if fds is not None and (isinstance(fds, bool) or not isinstance(fds, int) or fds < 1):
            raise ConfigError(f"inode_fds must be at least 1, not {fds!r}")

    def replace(self, **changes: Any) -> ServiceConfig:
        """A copy with some settings changed (flat filesystem settings allowed)."""
        fs_changes = {k: v for k, v in changes.items() if k in _FS_FIELDS}
        own = {k: v for k, v in changes.items() if k not in _FS_FIELDS}
        fs = dataclasses.replace(self.fs, **fs_changes) if fs_changes else self.fs
        kw: dict[str, Any] = {
            "num_request_queues": self.num_request_queues,
            "window": self.window,
            "thread_pool_size": self.thread_pool_size,
            "poll_max_ns": self.poll_max_ns,
            "stats_file": self.stats_file,
            "keep_listening": self.keep_listening,
            "inode_fds": self.inode_fds,
        }
        kw.update(own)
        return ServiceConfig(fs, **kw)

    # kept short for logs
    @property
    def shared_dir(self) -> Path:
        return self.fs.shared_dir
