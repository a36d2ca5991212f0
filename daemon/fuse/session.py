"""One FUSE session: decode a request chain, dispatch it, encode the reply.

:meth:`FuseSession.handle` is the whole interface to the transport.  It is
called concurrently from one worker thread per request queue and never
raises: every guest-caused problem becomes an errno reply, decided in one
place (:meth:`FuseSession._dispatch`):

* ``OSError`` from the filesystem -> ``-errno``;
* :class:`~.errors.FuseError` (malformed request, not initialised,
  unsupported opcode, bad protocol version) -> its ``errno``, with a warning
  logged for malformed requests;
* any other exception is a bug of ours: logged with its traceback, ``-EIO``.

Requests without a reply (FORGET, BATCH_FORGET, INTERRUPT) return 0 used
bytes.  So does a request whose writable part cannot hold the reply: nothing
usable can be written, the failure is logged.

Opcodes that answer ENOSYS (the guest then stops sending most of them or
falls back):

* BMAP (block-device-backed fuseblk only), IOCTL, POLL;
* NOTIFY_REPLY (we never send notifications), SETUPMAPPING/REMOVEMAPPING
  (DAX is not offered), TMPFILE (the guest then answers O_TMPFILE with
  EOPNOTSUPP);
* GETXATTR/SETXATTR/LISTXATTR/REMOVEXATTR when the filesystem was built
  without ``xattr`` (the guest remembers and stops asking);
* any opcode this table does not know.

Request extensions (7.38): ``fuse_in_header.total_extlen`` 8-byte units at
the end of a request are a chain of ``fuse_ext_header`` records, split off
before the handler sees the body (any opcode; a WRITE's payload ends before
them).  Unknown types (and a security context, types 0..31, which we never
negotiate) are skipped by their size.  FUSE_EXT_GROUPS, which the kernel
attaches to CREATE/MKNOD/MKDIR/SYMLINK when FUSE_CREATE_SUPP_GROUP was
negotiated, is exactly one group (the parent directory's, when the caller is
in it but it is not the fsgid); the handler's thread sees it in host ids
through :func:`supplied_groups`.  Anything else -- a length past the
request, a record not 8-byte sized or overrunning, two group records, a
group count other than one, groups on another opcode or without the flag
-- is EINVAL with a warning.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from typing import NamedTuple, Protocol

from ..idmap import IDENTITY, IdTranslation
from . import abi
from .abi import InHeader, InitFlag, InitOut, Opcode
from .errors import (
    FuseError,
    MalformedRequest,
    NotInitialized,
    ProtocolVersionError,
    UnsupportedOperation,
)
from .filesystem import Filesystem, LockWait, RequestContext

__all__ = ["SUPPORTED_INIT_FLAGS", "FuseSession", "RequestChain", "supplied_groups"]

logger = logging.getLogger("pyvirtiofsd.fuse")

_OUT = abi.OUT_HEADER.size
#: Largest request body read into memory (everything but WRITE's payload):
#: room for two PATH_MAX names plus a 64 KiB xattr value.
MAX_BODY = (1 << 16) + 2 * 4096 + 256
#: INTERRUPTs remembered for requests not seen yet (see ``_interrupt``).
_EARLY_INTERRUPTS = 64
#: The requests the kernel attaches FUSE_EXT_GROUPS to (``get_create_ext``).
_CREATING = frozenset({Opcode.CREATE, Opcode.MKNOD, Opcode.MKDIR, Opcode.SYMLINK, Opcode.TMPFILE})


class _Supplied(threading.local):
    groups: tuple[int, ...] | None = None


_supplied = _Supplied()


def supplied_groups() -> tuple[int, ...] | None:
    """The supplementary groups (host ids) the guest sent with the request
    this thread is serving (FUSE_EXT_GROUPS on a creation), else None."""
    return _supplied.groups


class FastPathSwitch(Protocol):
    """The session turns the C fast path (:class:`~pyvirtiofsd.dma.FastPath`) on and off."""

    ready: bool


class RequestChain(Protocol):
    """One virtio descriptor chain carrying one FUSE request (see the transport)."""

    readable_len: int
    writable_len: int

    def read(self, offset: int = 0, length: int | None = None) -> bytes: ...

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None: ...

    def preadv(self, fd: int, file_offset: int, length: int, offset: int) -> int: ...

    def pwritev(self, fd: int, file_offset: int, length: int, offset: int) -> int: ...


class InPlace(NamedTuple):
    """A reply whose ``length`` payload bytes the handler already put after the header."""

    length: int


class _NoReply:
    """Marker: the request has no reply at all (not even a header)."""


NO_REPLY = _NoReply()

Reply = bytes | InPlace | _NoReply
_Handler = Callable[["FuseSession", InHeader, bytes, RequestChain], Reply]

#: What this session can serve, offered to the filesystem at INIT (ANDed
#: with what the guest offers); the filesystem picks what it wants
#: (:meth:`~.filesystem.Filesystem.init`).  Of flags2 only
#: CREATE_SUPP_GROUP (7.38+; INIT_EXT is set in the reply when a flags2 bit
#: is chosen).  Not here: DAX, security contexts, SETXATTR_EXT, SPLICE_* (no
#: pipes over virtio), HANDLE_KILLPRIV v1, EXPORT_SUPPORT, POSIX_ACL,
#: DONT_MASK, EXPLICIT_INVAL_DATA.
SUPPORTED_INIT_FLAGS = (
    InitFlag.ASYNC_READ
    | InitFlag.POSIX_LOCKS
    | InitFlag.ATOMIC_O_TRUNC
    | InitFlag.BIG_WRITES
    | InitFlag.FLOCK_LOCKS
    | InitFlag.AUTO_INVAL_DATA
    | InitFlag.DO_READDIRPLUS
    | InitFlag.READDIRPLUS_AUTO
    | InitFlag.ASYNC_DIO
    | InitFlag.PARALLEL_DIROPS
    | InitFlag.HANDLE_KILLPRIV_V2
    | InitFlag.MAX_PAGES
    | InitFlag.CACHE_SYMLINKS
    | InitFlag.WRITEBACK_CACHE
    | InitFlag.SUBMOUNTS
    | InitFlag.CREATE_SUPP_GROUP
)


_HANDLERS: dict[int, _Handler] = {}


def _op(opcode: Opcode) -> Callable[[_Handler], _Handler]:
    def register(fn: _Handler) -> _Handler:
        _HANDLERS[opcode] = fn
        return fn

    return register


#: Bytes of a request read at once (header, body, extensions): more than any
#: body but WRITE's payload and the rare long SETXATTR value or RENAME names.
_FIRST_READ = 1024


def _part(chain: RequestChain, first: bytes, offset: int, length: int) -> bytes:
    """``length`` bytes of the request at ``offset``: from ``first`` (its
    first bytes, read already) when they are there, else from the chain."""
    if offset + length <= len(first):
        return first[offset : offset + length]
    return chain.read(offset, length)


def _name(body: bytes) -> bytes:
    """The body as exactly one NUL-terminated name."""
    if not body or body[-1] != 0:
        raise MalformedRequest("name is not NUL-terminated")
    name = body[:-1]
    if b"\0" in name:
        raise MalformedRequest("name contains NUL")
    return name


def _two_names(body: bytes) -> tuple[bytes, bytes]:
    """The body as exactly two NUL-terminated strings."""
    if not body or body[-1] != 0:
        raise MalformedRequest("second name is not NUL-terminated")
    first, sep, rest = body.partition(b"\0")
    if not sep or not rest:
        raise MalformedRequest("second name missing")
    return first, _name(rest)


_NO_ENTRY = abi.EntryOut(0, 0, 0, 0, 0, 0, abi.Attr(*([0] * 16)))


class _ReplyBudget:
    """A READDIR reply's room, counted in the records of one kind (plus or not)."""

    __slots__ = ("_size", "room")

    def __init__(self, room: int, plus: bool) -> None:
        self.room = room
        self._size = abi.direntplus_size if plus else abi.dirent_size

    def take(self, name: bytes) -> bool:
        n = self._size(name)
        if n > self.room:
            return False
        self.room -= n
        return True


class FuseSession:
    """The FUSE protocol state of one virtio-fs device.

    ``max_write`` (bytes, >= 4096) and ``max_pages`` (1..65535, the kernel
    caps it at 256) are announced at INIT and bound the size of one
    READ/WRITE; ``init_flags``, when given, overrides what ``fs.init()``
    would want (tests).  ``ids`` translates uids/gids where they cross
    (``--translate-uid``/``--translate-gid``): the caller of every request
    that acts with credentials and SETATTR's new owner guest -> host, every
    attribute in a reply host -> guest; when it is not the identity the C
    fast path stays off (it answers GETATTR/LOOKUP with host ids).
    """

    def __init__(
        self,
        fs: Filesystem,
        *,
        max_write: int = 1 << 20,
        max_pages: int = 256,
        init_flags: InitFlag | None = None,
        fast: FastPathSwitch | None = None,
        ids: IdTranslation = IDENTITY,
    ) -> None:
        if max_write < 4096 or max_write > 0xFFFF_FFFF:
            raise ValueError(f"max_write {max_write} out of range")
        if not 1 <= max_pages <= 0xFFFF:
            raise ValueError(f"max_pages {max_pages} out of range")
        self.fs = fs
        #: the C fast path serving this session's commonest requests, if any:
        #: on only between INIT and DESTROY/reset.
        self.fast = fast
        self.ids = ids
        self._translate = not ids.identity
        self.max_write = max_write
        self.max_pages = max_pages
        self.init_flags = init_flags
        self._state_lock = threading.Lock()
        self.initialized = False
        self.proto_minor = 0
        self.flags = InitFlag(0)
        # Blocking lock requests now waiting, by unique (INTERRUPT finds them
        # here), and INTERRUPTs that came before their request (the guest may
        # send both at once and they can be served in either order), each
        # tagged with the lock manager's epoch so that a reset forgets them.
        # Both guarded by _state_lock.
        self._lock_waits: dict[int, LockWait] = {}
        self._early_interrupts: dict[int, int] = {}

    # --- entry point ----------------------------------------------------------

    def handle(self, chain: RequestChain) -> int:
        """Process one request chain; returns the number of bytes written (used length)."""
        try:
            return self._handle(chain)
        except Exception:  # the chain itself failed (or a bug of ours): fail this request
            logger.exception("internal error while handling a FUSE request")
        try:
            return self._send(chain, 0, -errno.EIO, b"")
        except Exception:
            logger.exception("cannot send an error reply either; dropping the request")
            return 0

    def _handle(self, chain: RequestChain) -> int:
        readable = chain.readable_len
        if readable < abi.IN_HEADER.size:
            logger.warning("request of %d bytes is shorter than fuse_in_header", readable)
            return self._send(chain, 0, -errno.EINVAL, b"")
        # One read for the header and, nearly always, the whole body: a
        # request handed to Python costs a C call and a copy per read.
        first = chain.read(0, min(readable, _FIRST_READ))
        hdr = abi.IN_HEADER.decode(first)
        if not abi.IN_HEADER.size <= hdr.len <= readable:
            logger.warning(
                "fuse_in_header.len %d inconsistent with %d readable bytes (opcode %d)",
                hdr.len,
                readable,
                hdr.opcode,
            )
            return self._send(chain, hdr.unique, -errno.EINVAL, b"")
        ext_len = hdr.total_extlen * abi.EXT_ALIGN
        ext: bytes | MalformedRequest = b""
        if ext_len > hdr.len - abi.IN_HEADER.size or ext_len > MAX_BODY:
            ext = MalformedRequest(
                f"total_extlen {hdr.total_extlen} (x8) past the {hdr.len}-byte request"
            )
            ext_len = 0
        elif ext_len:
            ext = _part(chain, first, hdr.len - ext_len, ext_len)
            if len(ext) != ext_len:
                logger.warning("chain returned %d of %d extension bytes", len(ext), ext_len)
                return self._send(chain, hdr.unique, -errno.EIO, b"")
        body_len = hdr.len - abi.IN_HEADER.size - ext_len
        if hdr.opcode == Opcode.WRITE:
            # The payload stays in guest memory: pwritev reads it from the chain.
            body_len = min(body_len, abi.WRITE_IN.size)
        elif body_len > MAX_BODY:
            logger.warning("request body of %d bytes (opcode %d) refused", body_len, hdr.opcode)
            return self._send(chain, hdr.unique, -errno.EINVAL, b"")
        body = _part(chain, first, abi.IN_HEADER.size, body_len) if body_len else b""
        if len(body) != body_len:
            logger.warning("chain returned %d of %d body bytes", len(body), body_len)
            return self._send(chain, hdr.unique, -errno.EIO, b"")
        return self._dispatch(hdr, body, chain, ext)

    def _dispatch(
        self, hdr: InHeader, body: bytes, chain: RequestChain, ext: bytes | MalformedRequest = b""
    ) -> int:
        """Run the handler; the one place where failures become errno replies.

        ``ext``: the request's extensions (or why they are malformed)."""
        no_reply = hdr.opcode in (Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT)
        try:
            handler = _HANDLERS.get(hdr.opcode)
            if handler is None:
                raise UnsupportedOperation(f"opcode {hdr.opcode} not supported")
            if not self.initialized and hdr.opcode != Opcode.INIT:
                raise NotInitialized(f"opcode {hdr.opcode} before INIT")
            if isinstance(ext, MalformedRequest):
                raise ext
            _supplied.groups = self._ext_groups(hdr, ext) if ext else None
            try:
                reply = handler(self, hdr, body, chain)
            finally:
                _supplied.groups = None
        except FuseError as exc:
            if isinstance(exc, MalformedRequest):
                logger.warning("malformed request (opcode %d): %s", hdr.opcode, exc)
            else:
                logger.debug("request (opcode %d) refused: %s", hdr.opcode, exc)
            err = exc.errno
        except OSError as exc:
            err = exc.errno or errno.EIO
        except Exception:  # a bug of ours: keep serving, fail this request
            logger.exception("internal error in the handler of opcode %d", hdr.opcode)
            err = errno.EIO
        else:
            if isinstance(reply, _NoReply):
                return 0
            if isinstance(reply, InPlace):
                return self._send_header(chain, hdr.unique, 0, reply.length)
            return self._send(chain, hdr.unique, 0, reply)
        if no_reply:
            return 0
        return self._send(chain, hdr.unique, -err, b"")

    # --- reply encoding ---------------------------------------------------------

    def _send(self, chain: RequestChain, unique: int, error: int, payload: bytes) -> int:
        total = _OUT + len(payload)
        if total > chain.writable_len:
            logger.warning(
                "reply of %d bytes does not fit the %d writable bytes (unique %d)",
                total,
                chain.writable_len,
                unique,
            )
            return 0
        chain.write(abi.OUT_HEADER.encode(abi.OutHeader(total, error, unique)) + payload)
        return total

    def _send_header(self, chain: RequestChain, unique: int, error: int, length: int) -> int:
        total = _OUT + length
        if total > chain.writable_len:  # the handler wrote past what we allowed: our bug
            raise AssertionError(f"in-place reply of {total} bytes exceeds the chain")
        chain.write(abi.OUT_HEADER.encode(abi.OutHeader(total, error, unique)))
        return total

    @staticmethod
    def _room(chain: RequestChain) -> int:
        """Payload bytes the writable part can take after the header."""
        return max(chain.writable_len - _OUT, 0)

    def _ext_groups(self, hdr: InHeader, ext: bytes) -> tuple[int, ...] | None:
        """FUSE_EXT_GROUPS of ``ext``, checked, in host ids (see the module doc)."""
        groups = abi.decode_ext_groups(ext)
        if groups is None:
            return None
        if hdr.opcode not in _CREATING:
            raise MalformedRequest(f"FUSE_EXT_GROUPS on opcode {hdr.opcode}")
        if not self.flags & InitFlag.CREATE_SUPP_GROUP:
            raise MalformedRequest("FUSE_EXT_GROUPS without FUSE_CREATE_SUPP_GROUP")
        if len(groups) != 1:
            raise MalformedRequest(f"FUSE_EXT_GROUPS with {len(groups)} groups, not 1")
        if not self._translate:
            return groups
        return tuple(self.ids.gid.to_host(g) for g in groups)

    # --- ids (--translate-uid / --translate-gid) -------------------------------

    def _ctx(self, hdr: InHeader) -> RequestContext:
        """The caller, in host ids (a forbidden guest id: EPERM)."""
        if not self._translate:
            return RequestContext(hdr.uid, hdr.gid, hdr.pid)
        return RequestContext(self.ids.uid.to_host(hdr.uid), self.ids.gid.to_host(hdr.gid), hdr.pid)

    def _guest_attr(self, attr: abi.Attr) -> abi.Attr:
        return attr._replace(
            uid=self.ids.uid.to_guest(attr.uid), gid=self.ids.gid.to_guest(attr.gid)
        )

    def _entry(self, entry: abi.EntryOut) -> abi.EntryOut:
        """A reply's entry with the owner as the guest sees it."""
        if not self._translate:
            return entry
        return entry._replace(attr=self._guest_attr(entry.attr))

    def _attr(self, out: abi.AttrOut) -> abi.AttrOut:
        if not self._translate:
            return out
        return out._replace(attr=self._guest_attr(out.attr))

    # --- session lifecycle ------------------------------------------------------

    @_op(Opcode.INIT)
    def _init(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        # fuse.h, "Version negotiation": same major -> both use the smaller
        # minor; kernel major newer -> reply with our major only and expect a
        # new INIT; kernel major older than ours -> we cannot fall back.
        init = abi.decode_init_in(body)
        with self._state_lock:
            if self.initialized:
                # The guest restarted without unmounting (a reset, a crash):
                # its inodes and handles died with it.  Start over, as after
                # DESTROY (virtiofsd does the same: "Handle hard reboot").
                logger.info("INIT on an initialised session: the guest restarted; state dropped")
                if self.fast is not None:
                    self.fast.ready = False  # before the tables go
                self.fs.destroy()
                self.initialized = False
            if init.major > abi.KERNEL_VERSION:
                logger.info("guest offers FUSE %d.%d; asking for 7", init.major, init.minor)
                return abi.INIT_OUT.encode(
                    InitOut(abi.KERNEL_VERSION, abi.KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0)
                )
            if init.major < abi.KERNEL_VERSION or init.minor < abi.MIN_KERNEL_MINOR_VERSION:
                raise ProtocolVersionError(
                    f"guest FUSE {init.major}.{init.minor} is older than "
                    f"{abi.KERNEL_VERSION}.{abi.MIN_KERNEL_MINOR_VERSION}"
                )
            minor = min(init.minor, abi.KERNEL_MINOR_VERSION)
            offered = init.flags
            if init.flags & InitFlag.INIT_EXT:
                offered |= init.flags2 << 32
            if minor < 38:  # request extensions came with 7.38
                offered &= ~int(InitFlag.CREATE_SUPP_GROUP)
            if self.init_flags is not None:
                flags = InitFlag(offered & self.init_flags)
            else:
                flags = InitFlag(self.fs.init(InitFlag(offered & SUPPORTED_INIT_FLAGS)) & offered)
            if int(flags) >> 32:  # the kernel reads flags2 only with INIT_EXT
                flags |= InitFlag.INIT_EXT
            max_pages = self.max_pages if flags & InitFlag.MAX_PAGES else 0
            out = InitOut(
                major=abi.KERNEL_VERSION,
                minor=minor,
                max_readahead=init.max_readahead,
                flags=int(flags) & 0xFFFF_FFFF,
                max_background=0,  # 0: kernel defaults
                congestion_threshold=0,
                max_write=self.max_write,
                time_gran=1,  # nanosecond timestamps
                max_pages=max_pages,
                map_alignment=0,
                flags2=int(flags) >> 32,
            )
            self.proto_minor = minor
            self.flags = flags
            self.initialized = True
            if self.fast is not None and not self._translate:
                self.fast.ready = True
        logger.info("FUSE session initialised: protocol 7.%d", minor)
        logger.debug(
            "INIT flags offered %#x, chosen %#x (%s); max_write %d, max_pages %d, max_readahead %d",
            offered,
            int(flags),
            flags,
            self.max_write,
            max_pages,
            init.max_readahead,
        )
        return abi.encode_init_out(out, minor)

    def reset(self) -> None:
        """Back to the pre-INIT state: every inode (but the root) and handle dropped.

        DESTROY does this; the device calls it too when the front-end resets
        or goes away, since the guest's references die with it.
        """
        with self._state_lock:
            if self.fast is not None:
                self.fast.ready = False  # before the tables go
            self.fs.destroy()
            self.initialized = False
            self.proto_minor = 0
            self.flags = InitFlag(0)

    def close(self) -> None:
        """Reset and release the filesystem's fds, the root's included."""
        self.reset()
        self.fs.close()

    @_op(Opcode.DESTROY)
    def _destroy(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        self.reset()
        logger.info("FUSE session destroyed")
        return b""

    # --- no-reply requests ------------------------------------------------------

    @_op(Opcode.FORGET)
    def _forget(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        self.fs.forget(hdr.nodeid, abi.FORGET_IN.decode(body).nlookup)
        return NO_REPLY

    @_op(Opcode.BATCH_FORGET)
    def _batch_forget(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        count = abi.BATCH_FORGET_IN.decode(body).nitems
        start = abi.BATCH_FORGET_IN.size
        present = (len(body) - start) // abi.FORGET_ONE.size
        if present < count:
            logger.warning("BATCH_FORGET announces %d entries, carries %d", count, present)
        items = [
            abi.FORGET_ONE.decode(body, start + i * abi.FORGET_ONE.size)
            for i in range(min(count, present))
        ]
        self.fs.batch_forget(items)
        return NO_REPLY

    @_op(Opcode.INTERRUPT)
    def _interrupt(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        # Only a waiting SETLKW can be interrupted (it then answers EINTR);
        # every other request runs to completion quickly and the INTERRUPT is
        # dropped.  One for a request not seen yet is remembered (a few, by
        # FIFO) so that the SETLKW is cancelled as it starts.  No reply, as
        # fuse.h allows.  (virtio-fs in Linux 6.1 does not send INTERRUPT.)
        target = abi.INTERRUPT_IN.decode(body).unique
        with self._state_lock:
            wait = self._lock_waits.get(target)
            if wait is None:
                self._early_interrupts[target] = self.fs.lock_epoch
                while len(self._early_interrupts) > _EARLY_INTERRUPTS:
                    del self._early_interrupts[next(iter(self._early_interrupts))]
        if wait is not None:
            wait.cancel(errno.EINTR)
        return NO_REPLY

    # --- read-only operations ---------------------------------------------------

    @_op(Opcode.LOOKUP)
    def _lookup(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        return self._entry(self.fs.lookup(hdr.nodeid, _name(body))).encode()

    @_op(Opcode.GETATTR)
    def _getattr(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.GETATTR_IN.decode(body)
        fh = arg.fh if arg.getattr_flags & abi.GETATTR_FH else None
        return self._attr(self.fs.getattr(hdr.nodeid, fh)).encode()

    @_op(Opcode.READLINK)
    def _readlink(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        return self.fs.readlink(hdr.nodeid)

    @_op(Opcode.OPEN)
    def _open(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.OPEN_IN.decode(body)
        return abi.OPEN_OUT.encode(
            self.fs.open(hdr.nodeid, arg.flags, self._ctx(hdr), arg.open_flags)
        )

    @_op(Opcode.READ)
    def _read(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.READ_IN.decode(body)
        size = min(arg.size, self._room(chain))

        def into(fd: int, file_offset: int, length: int) -> int:
            return chain.preadv(fd, file_offset, length, _OUT)

        return InPlace(self.fs.read(arg.fh, arg.offset, size, into))

    @_op(Opcode.FLUSH)
    def _flush(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.FLUSH_IN.decode(body)
        self.fs.flush(arg.fh, arg.lock_owner)
        return b""

    @_op(Opcode.RELEASE)
    def _release(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.RELEASE_IN.decode(body)
        self.fs.release(arg.fh, arg.release_flags, arg.lock_owner)
        return b""

    @_op(Opcode.OPENDIR)
    def _opendir(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        return abi.OPEN_OUT.encode(self.fs.opendir(hdr.nodeid, abi.OPEN_IN.decode(body).flags))

    @_op(Opcode.READDIR)
    def _readdir(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.READ_IN.decode(body)
        budget = _ReplyBudget(min(arg.size, self._room(chain)), plus=False)
        out = bytearray()
        for de in self.fs.readdir(arg.fh, arg.offset, budget):
            out += abi.encode_dirent(de.ino, de.off, de.dtype, de.name)
        return bytes(out)

    @_op(Opcode.READDIRPLUS)
    def _readdirplus(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.READ_IN.decode(body)
        budget = _ReplyBudget(min(arg.size, self._room(chain)), plus=True)
        out = bytearray()
        for de, entry in self.fs.readdirplus(arg.fh, arg.offset, budget):
            # nodeid 0 for "." and "..": no entry, the kernel takes no reference
            out += abi.encode_direntplus(
                self._entry(entry) if entry else _NO_ENTRY, de.ino, de.off, de.dtype, de.name
            )
        return bytes(out)

    @_op(Opcode.RELEASEDIR)
    def _releasedir(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        self.fs.releasedir(abi.RELEASE_IN.decode(body).fh)
        return b""

    @_op(Opcode.STATFS)
    def _statfs(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        return abi.KSTATFS.encode(self.fs.statfs(hdr.nodeid))

    @_op(Opcode.ACCESS)
    def _access(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        mask = abi.ACCESS_IN.decode(body).mask
        self.fs.access(hdr.nodeid, mask, self._ctx(hdr))
        return b""

    # --- modifying operations ---------------------------------------------------

    @_op(Opcode.SETATTR)
    def _setattr(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.SETATTR_IN.decode(body)
        if self._translate and arg.valid & (abi.FATTR_UID | abi.FATTR_GID):
            uid = self.ids.uid.to_host(arg.uid) if arg.valid & abi.FATTR_UID else arg.uid
            gid = self.ids.gid.to_host(arg.gid) if arg.valid & abi.FATTR_GID else arg.gid
            arg = arg._replace(uid=uid, gid=gid)
        return self._attr(self.fs.setattr(hdr.nodeid, arg, self._ctx(hdr))).encode()

    @_op(Opcode.MKNOD)
    def _mknod(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.MKNOD_IN.decode(body)
        name = _name(body[abi.MKNOD_IN.size :])
        return self._entry(
            self.fs.mknod(hdr.nodeid, name, arg.mode, arg.rdev, self._ctx(hdr))
        ).encode()

    @_op(Opcode.MKDIR)
    def _mkdir(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.MKDIR_IN.decode(body)
        name = _name(body[abi.MKDIR_IN.size :])
        return self._entry(self.fs.mkdir(hdr.nodeid, name, arg.mode, self._ctx(hdr))).encode()

    @_op(Opcode.SYMLINK)
    def _symlink(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        name, target = _two_names(body)  # the new entry's name first, then the target
        return self._entry(self.fs.symlink(hdr.nodeid, name, target, self._ctx(hdr))).encode()

    @_op(Opcode.LINK)
    def _link(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.LINK_IN.decode(body)
        name = _name(body[abi.LINK_IN.size :])
        return self._entry(self.fs.link(arg.oldnodeid, hdr.nodeid, name, self._ctx(hdr))).encode()

    @_op(Opcode.UNLINK)
    def _unlink(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        self.fs.unlink(hdr.nodeid, _name(body), self._ctx(hdr))
        return b""

    @_op(Opcode.RMDIR)
    def _rmdir(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        self.fs.rmdir(hdr.nodeid, _name(body), self._ctx(hdr))
        return b""

    @_op(Opcode.RENAME)
    def _rename(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.RENAME_IN.decode(body)
        old, new = _two_names(body[abi.RENAME_IN.size :])
        self.fs.rename(hdr.nodeid, old, arg.newdir, new, 0, self._ctx(hdr))
        return b""

    @_op(Opcode.RENAME2)
    def _rename2(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.RENAME2_IN.decode(body)
        old, new = _two_names(body[abi.RENAME2_IN.size :])
        self.fs.rename(hdr.nodeid, old, arg.newdir, new, arg.flags, self._ctx(hdr))
        return b""

    @_op(Opcode.CREATE)
    def _create(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.CREATE_IN.decode(body)
        name = _name(body[abi.CREATE_IN.size :])
        entry, opened = self.fs.create(
            hdr.nodeid, name, arg.flags, arg.mode, self._ctx(hdr), arg.open_flags
        )
        return self._entry(entry).encode() + abi.OPEN_OUT.encode(opened)

    @_op(Opcode.WRITE)
    def _write(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.WRITE_IN.decode(body)
        start = abi.IN_HEADER.size + abi.WRITE_IN.size
        end = hdr.len - hdr.total_extlen * abi.EXT_ALIGN  # extensions follow the payload
        if arg.size > end - start:
            raise MalformedRequest(f"WRITE of {arg.size} bytes carries {end - start} payload bytes")

        def source(fd: int, file_offset: int, length: int) -> int:
            return chain.pwritev(fd, file_offset, length, start)

        written = self.fs.write(
            arg.fh, arg.offset, arg.size, arg.write_flags, source, self._ctx(hdr)
        )
        return abi.WRITE_OUT.encode(abi.WriteOut(written, 0))

    @_op(Opcode.FSYNC)
    def _fsync(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.FSYNC_IN.decode(body)
        self.fs.fsync(arg.fh, bool(arg.fsync_flags & abi.FSYNC_FDATASYNC))
        return b""

    @_op(Opcode.FSYNCDIR)
    def _fsyncdir(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.FSYNC_IN.decode(body)
        self.fs.fsync(arg.fh, bool(arg.fsync_flags & abi.FSYNC_FDATASYNC), isdir=True)
        return b""

    @_op(Opcode.FALLOCATE)
    def _fallocate(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.FALLOCATE_IN.decode(body)
        self.fs.fallocate(arg.fh, arg.offset, arg.length, arg.mode, self._ctx(hdr))
        return b""

    @_op(Opcode.LSEEK)
    def _lseek(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.LSEEK_IN.decode(body)
        offset = self.fs.lseek(arg.fh, arg.offset, arg.whence)
        return abi.LSEEK_OUT.encode(abi.LseekOut(offset))

    @_op(Opcode.COPY_FILE_RANGE)
    def _copy_file_range(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.COPY_FILE_RANGE_IN.decode(body)
        copied = self.fs.copy_file_range(
            arg.fh_in, arg.off_in, arg.fh_out, arg.off_out, arg.len, arg.flags, self._ctx(hdr)
        )
        return abi.WRITE_OUT.encode(abi.WriteOut(copied, 0))

    @_op(Opcode.SYNCFS)
    def _syncfs(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        abi.SYNCFS_IN.decode(body)
        self.fs.syncfs(hdr.nodeid)
        return b""

    # --- extended attributes ----------------------------------------------------

    @_op(Opcode.SETXATTR)
    def _setxattr(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.SETXATTR_IN.decode(body)
        name, sep, value = body[abi.SETXATTR_IN.size :].partition(b"\0")
        if not sep:
            raise MalformedRequest("xattr name is not NUL-terminated")
        if len(value) != arg.size:
            raise MalformedRequest(f"xattr value of {len(value)} bytes, {arg.size} announced")
        self.fs.setxattr(hdr.nodeid, name, value, arg.flags, self._ctx(hdr))
        return b""

    @_op(Opcode.GETXATTR)
    def _getxattr(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.GETXATTR_IN.decode(body)
        name = _name(body[abi.GETXATTR_IN.size :])
        return self._xattr_reply(self.fs.getxattr(hdr.nodeid, name, arg.size))

    @_op(Opcode.LISTXATTR)
    def _listxattr(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.GETXATTR_IN.decode(body)
        return self._xattr_reply(self.fs.listxattr(hdr.nodeid, arg.size))

    @staticmethod
    def _xattr_reply(result: bytes | int) -> bytes:
        """Size probing (request size 0) answers fuse_getxattr_out, else the data."""
        if isinstance(result, int):
            return abi.GETXATTR_OUT.encode(abi.GetxattrOut(result, 0))
        return result

    @_op(Opcode.REMOVEXATTR)
    def _removexattr(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        self.fs.removexattr(hdr.nodeid, _name(body), self._ctx(hdr))
        return b""

    # --- locks --------------------------------------------------------------------

    def _check_lock_flags(self, lk_flags: int) -> bool:
        """Whether this is a flock request; ENOSYS unless INIT negotiated that kind."""
        flock = bool(lk_flags & abi.LK_FLOCK)
        if not self.flags & (InitFlag.FLOCK_LOCKS if flock else InitFlag.POSIX_LOCKS):
            kind = "flock" if flock else "POSIX"
            raise UnsupportedOperation(f"{kind} locks not negotiated")
        return flock

    @_op(Opcode.GETLK)
    def _getlk(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        arg = abi.LK_IN.decode(body)
        if not self.flags & InitFlag.POSIX_LOCKS:
            raise UnsupportedOperation("POSIX locks not negotiated")
        return abi.LK_OUT.encode(self.fs.getlk(hdr.nodeid, arg.fh, arg.owner, arg.lock))

    @_op(Opcode.SETLK)
    def _setlk(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        return self._lock(hdr, body, wait=False)

    @_op(Opcode.SETLKW)
    def _setlkw(self, hdr: InHeader, body: bytes, chain: RequestChain) -> Reply:
        return self._lock(hdr, body, wait=True)

    def _lock(self, hdr: InHeader, body: bytes, *, wait: bool) -> Reply:
        arg = abi.LK_IN.decode(body)
        flock = self._check_lock_flags(arg.lk_flags)
        if not wait:
            self.fs.setlk(hdr.nodeid, arg.fh, arg.owner, arg.lock, flock=flock, wait=None)
            return b""
        # SETLKW blocks this thread until granted, INTERRUPTed or reset.  The
        # wait is registered under _state_lock, which reset() holds while it
        # destroys the filesystem: either reset sees (and cancels) it, or
        # this sees the session gone.
        with self._state_lock:
            if not self.initialized:
                raise NotInitialized("SETLKW after DESTROY")
            lock_wait = self.fs.lock_wait()
            self._lock_waits[hdr.unique] = lock_wait
            early = self._early_interrupts.pop(hdr.unique, None)
        if early == self.fs.lock_epoch:
            lock_wait.cancel(errno.EINTR)
        try:
            with lock_wait:
                self.fs.setlk(hdr.nodeid, arg.fh, arg.owner, arg.lock, flock=flock, wait=lock_wait)
        finally:
            with self._state_lock:
                if self._lock_waits.get(hdr.unique) is lock_wait:
                    del self._lock_waits[hdr.unique]
        return b""
