"""``pyvirtiofsd mount``: the passthrough filesystem on the host, through /dev/fuse.

A developer tool and the fast test path: the very :class:`PassthroughFs`
that serves guests over virtio is mounted on the host with pyfuse3, so the
host kernel's FUSE client (with ``default_permissions``, as a virtiofs guest
mounts) drives it::

    pyvirtiofsd mount --shared-dir /srv/share /mnt/view [--readonly] [--xattr]
        [--cache auto|always|never] [--foreground] [--ready-fd N]

Without ``--foreground`` the command returns once the mount is up and the
server keeps running in the background (stdio on /dev/null from then on:
use ``--foreground`` to see its log); ``--ready-fd N`` gets ``ready\\n``
written to it once the filesystem is mounted (a pipe the caller waits on).
SIGTERM/SIGINT unmount and exit 0.

The virtio path does not depend on this module.  What differs from a guest
(libfuse3 and pyfuse3 stand between the kernel and the filesystem):

* pyfuse3 does not pass ``write_flags`` nor a caller to WRITE, so writes run
  as the daemon and setuid/setgid are not cleared for a non-root writer
  (libfuse asks for HANDLE_KILLPRIV v1 and leaves that to the filesystem).
* ``utimensat(UTIME_NOW)`` reaches us as an explicit time (pyfuse3 reads the
  clock); SETATTR runs as the daemon, so the kernel's check stands.
* The caller's supplementary groups come from ``/proc/<pid>/status`` (a
  guest does not send them): a file made in a setgid directory keeps a
  requested S_ISGID exactly when the caller is in the directory's group.
* XATTR_CREATE/XATTR_REPLACE are checked by pyfuse3 with a GETXATTR first.
* The RequestContext's ``umask`` is informational: without DONT_MASK the
  kernel has already applied it to the mode it sends.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

import pyfuse3
import trio

from .config import CachePolicy, FsConfig
from .fuse.abi import (
    FATTR_ATIME,
    FATTR_FH,
    FATTR_GID,
    FATTR_MODE,
    FATTR_MTIME,
    FATTR_SIZE,
    FATTR_UID,
    Attr,
    EntryOut,
    SetattrIn,
)
from .passthrough import oscalls
from .passthrough.filesystem import PassthroughFs, RequestContext

__all__ = ["HostOperations", "build_parser", "is_mounted", "main", "mounted"]

log = logging.getLogger("pyvirtiofsd.hostmount")

_P = ParamSpec("_P")
_T = TypeVar("_T")
_NS = 1_000_000_000
_READDIR_CHUNK = 1 << 16  # bytes read from the host directory at a time
_READDIR_BATCH = 256  # entries asked of the passthrough at a time
_XATTR_MAX = 1 << 16


def _call(fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """The one place an ``OSError`` of the filesystem becomes an errno reply."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc


def _ctx(ctx: pyfuse3.RequestContext) -> RequestContext:
    return RequestContext(ctx.uid, ctx.gid, ctx.pid)


def _attrs(
    attr: Attr, nodeid: int, entry: float = 0.0, attr_valid: float = 0.0
) -> pyfuse3.EntryAttributes:
    """fuse_attr -> pyfuse3's EntryAttributes; pyfuse3 uses ``st_ino`` as the node id."""
    out = pyfuse3.EntryAttributes()
    out.st_ino = pyfuse3.InodeT(nodeid)
    out.generation = 0
    out.entry_timeout = entry
    out.attr_timeout = attr_valid
    out.st_mode = pyfuse3.ModeT(attr.mode)
    out.st_nlink = attr.nlink
    out.st_uid = attr.uid
    out.st_gid = attr.gid
    out.st_rdev = attr.rdev  # libfuse copies it raw: new_encode_dev form, as fuse_attr wants
    out.st_size = attr.size
    out.st_blksize = attr.blksize
    out.st_blocks = attr.blocks
    out.st_atime_ns = attr.atime * _NS + attr.atimensec
    out.st_mtime_ns = attr.mtime * _NS + attr.mtimensec
    out.st_ctime_ns = attr.ctime * _NS + attr.ctimensec
    return out


def _entry(e: EntryOut) -> pyfuse3.EntryAttributes:
    return _attrs(
        e.attr,
        e.nodeid,
        e.entry_valid + e.entry_valid_nsec / _NS,
        e.attr_valid + e.attr_valid_nsec / _NS,
    )


class _Batch:
    """A readdir batch of at most ``_READDIR_BATCH`` entries (pyfuse3 takes what it wants)."""

    room = _READDIR_CHUNK

    def __init__(self) -> None:
        self._left = _READDIR_BATCH

    def take(self, name: bytes) -> bool:
        if not self._left:
            return False
        self._left -= 1
        return True


def _read_full(fd: int, buf: bytearray, offset: int, length: int) -> int:
    """preadv until ``length`` bytes or EOF (FUSE short reads mean EOF)."""
    view = memoryview(buf)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:length]], offset + done)
        if n == 0:
            break
        done += n
    return done


def _write_full(fd: int, data: bytes, offset: int, length: int) -> int:
    view = memoryview(data)
    done = 0
    while done < length:
        done += os.pwrite(fd, view[done:length], offset + done)
    return done


class HostOperations(pyfuse3.Operations):
    """pyfuse3 handlers over :class:`PassthroughFs`: each maps to one method.

    Node ids are the passthrough's (root 1 = ``pyfuse3.ROOT_INODE``); every
    entry handed to the kernel (LOOKUP, CREATE, MKDIR, ..., each READDIRPLUS
    entry pyfuse3 accepted) counts one lookup, dropped by FORGET.
    """

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: PassthroughFs, *, direct_io: bool = False) -> None:
        super().__init__()
        self.fs = fs
        # The callers are host processes: their supplementary groups are in
        # /proc/<pid>/status, so setgid and kill decisions use all of them.
        fs.caller_groups = oscalls.supplementary_groups
        self.direct_io = direct_io
        self._dirs: dict[int, int] = {}  # dir handle -> its node id
        self._root_ctx = RequestContext(0, 0, 0)

    def _file_info(self, fh: int) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), direct_io=self.direct_io)

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return _entry(_call(self.fs.lookup, parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        _call(self.fs.batch_forget, inode_list)

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        out = _call(self.fs.getattr, inode)
        return _attrs(out.attr, inode, 0.0, out.attr_valid + out.attr_valid_nsec / _NS)

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        valid = 0
        if fields.update_mode:
            valid |= FATTR_MODE
        if fields.update_uid:
            valid |= FATTR_UID
        if fields.update_gid:
            valid |= FATTR_GID
        if fields.update_size:
            valid |= FATTR_SIZE
        if fields.update_atime:
            valid |= FATTR_ATIME
        if fields.update_mtime:
            valid |= FATTR_MTIME
        if fh is not None:
            valid |= FATTR_FH
        atime, atimensec = divmod(attr.st_atime_ns, _NS) if fields.update_atime else (0, 0)
        mtime, mtimensec = divmod(attr.st_mtime_ns, _NS) if fields.update_mtime else (0, 0)
        arg = SetattrIn(
            valid=valid,
            padding=0,
            fh=fh or 0,
            size=attr.st_size if fields.update_size else 0,
            lock_owner=0,
            atime=atime & 0xFFFF_FFFF_FFFF_FFFF,
            mtime=mtime & 0xFFFF_FFFF_FFFF_FFFF,
            ctime=0,
            atimensec=atimensec,
            mtimensec=mtimensec,
            ctimensec=0,
            mode=attr.st_mode if fields.update_mode else 0,
            unused4=0,
            uid=attr.st_uid if fields.update_uid else 0,
            gid=attr.st_gid if fields.update_gid else 0,
            unused5=0,
        )
        out = _call(self.fs.setattr, inode, arg, _ctx(ctx))
        return _attrs(out.attr, inode, 0.0, out.attr_valid + out.attr_valid_nsec / _NS)

    async def readlink(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        return _call(self.fs.readlink, inode)

    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: int,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        # libfuse hands over the kernel's u32 (new_encode_dev form) unchanged.
        return _entry(_call(self.fs.mknod, parent_inode, name, mode, rdev, _ctx(ctx)))

    async def mkdir(
        self, parent_inode: pyfuse3.InodeT, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return _entry(_call(self.fs.mkdir, parent_inode, name, mode, _ctx(ctx)))

    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        _call(self.fs.unlink, parent_inode, name, _ctx(ctx))

    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        _call(self.fs.rmdir, parent_inode, name, _ctx(ctx))

    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        target: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return _entry(_call(self.fs.symlink, parent_inode, name, target, _ctx(ctx)))

    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: bytes,
        parent_inode_new: pyfuse3.InodeT,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        _call(
            self.fs.rename,
            parent_inode_old,
            name_old,
            parent_inode_new,
            name_new,
            flags,
            _ctx(ctx),
        )

    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return _entry(_call(self.fs.link, inode, new_parent_inode, new_name, _ctx(ctx)))

    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        return self._file_info(_call(self.fs.open, inode, flags, _ctx(ctx)).fh)

    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        entry, opened = _call(self.fs.create, parent_inode, name, flags, mode, _ctx(ctx))
        return self._file_info(opened.fh), _entry(entry)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        buf = bytearray(size)
        n = _call(self.fs.read, fh, off, size, lambda fd, o, n: _read_full(fd, buf, o, n))
        return bytes(buf[:n])

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        # pyfuse3 gives no caller and no write_flags: written as the daemon.
        return _call(
            self.fs.write,
            fh,
            off,
            len(buf),
            0,
            lambda fd, o, n: _write_full(fd, buf, o, n),
            self._root_ctx,
        )

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        _call(self.fs.flush, fh, 0)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        _call(self.fs.release, fh)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        _call(self.fs.fsync, fh, datasync)

    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        fh = _call(self.fs.opendir, inode, os.O_RDONLY | os.O_DIRECTORY).fh
        self._dirs[fh] = inode
        return pyfuse3.FileHandleT(fh)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        """READDIRPLUS: each entry the kernel accepted counts one lookup.

        Offsets are the passthrough's (the host's ``d_off``); ``.`` and ``..``
        are left to the kernel.
        """
        parent = self._dirs[fh]
        offset = start_id
        while True:
            entries = _call(self.fs.readdir, fh, offset, _Batch())
            if not entries:
                return
            for de in entries:
                name, next_off = de.name, de.off
                offset = next_off
                if name in (b".", b".."):
                    continue
                try:
                    entry = _call(self.fs.lookup, parent, name)
                except pyfuse3.FUSEError as exc:
                    if exc.errno == errno.ENOENT:
                        continue  # gone since it was listed
                    raise
                if not pyfuse3.readdir_reply(token, name, _entry(entry), next_off):
                    self.fs.forget(entry.nodeid, 1)
                    return

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self._dirs.pop(fh, None)
        _call(self.fs.releasedir, fh)

    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        _call(self.fs.fsync, fh, datasync, isdir=True)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = _call(self.fs.statfs, pyfuse3.ROOT_INODE)
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.bsize
        out.f_frsize = st.frsize
        out.f_blocks = st.blocks
        out.f_bfree = st.bfree
        out.f_bavail = st.bavail
        out.f_files = st.files
        out.f_ffree = st.ffree
        out.f_favail = st.ffree
        out.f_namemax = st.namelen
        return out

    async def access(self, inode: pyfuse3.InodeT, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        try:
            self.fs.access(inode, mode, _ctx(ctx))
        except PermissionError:
            return False
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from exc
        return True

    async def setxattr(
        self, inode: pyfuse3.InodeT, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        _call(self.fs.setxattr, inode, name, value, 0, _ctx(ctx))

    async def getxattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> bytes:
        value = _call(self.fs.getxattr, inode, name, _XATTR_MAX)
        assert isinstance(value, bytes)
        return value

    async def listxattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> list[bytes]:
        data = _call(self.fs.listxattr, inode, _XATTR_MAX)
        assert isinstance(data, bytes)
        return [n for n in data.split(b"\0") if n]

    async def removexattr(
        self, inode: pyfuse3.InodeT, name: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        _call(self.fs.removexattr, inode, name, _ctx(ctx))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pyvirtiofsd mount",
        description="Mount the passthrough filesystem on the host through /dev/fuse (pyfuse3).",
    )
    ap.add_argument("--shared-dir", required=True, metavar="DIR", help="directory to serve")
    ap.add_argument("mountpoint", metavar="MOUNTPOINT")
    ap.add_argument("--readonly", action="store_true", help="refuse every modification")
    ap.add_argument("--xattr", action="store_true", help="pass extended attributes through")
    ap.add_argument("--cache", choices=[*(p.value for p in CachePolicy), "none"], default="auto")
    ap.add_argument(
        "-f", "--foreground", action="store_true", help="stay in the foreground until unmounted"
    )
    ap.add_argument(
        "--ready-fd",
        type=int,
        metavar="N",
        help="write 'ready\\n' to this inherited fd once mounted, then close it",
    )
    ap.add_argument("--log-level", choices=("error", "warning", "info", "debug"), default="warning")
    return ap


def _signal_ready(fds: list[int], detach: bool) -> None:
    if detach:
        # Background mode: let go of the caller's terminal/pipes once mounted.
        null = os.open(os.devnull, os.O_RDWR)
        for std in (0, 1, 2):
            os.dup2(null, std)
        os.close(null)
    for fd in fds:
        try:
            os.write(fd, b"ready\n")
        except OSError as exc:
            log.warning("ready fd %d: %s", fd, exc)
        os.close(fd)


async def _serve(ready: list[int], detach: bool) -> None:
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("signal %d: unmounting", signum)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(on_signal)
        _signal_ready(ready, detach)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()  # unmounted from outside


def serve(args: argparse.Namespace, ready: list[int], *, detach: bool = False) -> int:
    # The same settings object the vhost-user device serves from (daemon/config.py).
    config = FsConfig(
        shared_dir=args.shared_dir,
        cache=CachePolicy.parse(args.cache),
        readonly=args.readonly,
        xattr=args.xattr,
    )
    fs = PassthroughFs(config)
    ops = HostOperations(fs, direct_io=config.direct_io)
    options = set(pyfuse3.default_options)  # default_permissions
    options |= {"fsname=pyvirtiofsd", "subtype=pyvirtiofsd"}
    if os.geteuid() == 0:
        options.add("allow_other")  # other users reach it; the kernel checks their permissions
    try:
        pyfuse3.init(ops, args.mountpoint, options)
    except BaseException:
        fs.close()
        raise
    try:
        trio.run(_serve, ready, detach)
    finally:
        pyfuse3.close(unmount=True)
        fs.close()
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="[%(asctime)s] [pyvirtiofsd mount] %(levelname)s %(name)s: %(message)s",
    )
    if not os.path.isdir(args.shared_dir):
        print(f"pyvirtiofsd: {args.shared_dir} is not a directory", file=sys.stderr)
        return 1
    ready = [] if args.ready_fd is None else [args.ready_fd]
    if args.foreground:
        return serve(args, ready)
    # Background: the child mounts and serves; we return once it says ready.
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        for fd in ready:
            os.close(fd)
        with os.fdopen(rfd, "rb") as pipe:
            ok = pipe.read() == b"ready\n"
        if not ok:
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status) or 1
        return 0
    os.close(rfd)
    os.setsid()
    try:
        code = serve(args, [*ready, wfd], detach=True)
    except BaseException:
        log.exception("mount failed")
        code = 1
    os._exit(code)


# --- for tests and scripts: a mount owned by a context manager ------------------------


def is_mounted(mountpoint: str | Path) -> bool:
    """Whether ``mountpoint`` appears in /proc/self/mounts."""
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mounts") as f:
        # Spaces etc. are octal-escaped there; our test paths have none.
        return any(line.split()[1] == target for line in f)


@contextmanager
def mounted(
    shared_dir: str | Path, mountpoint: str | Path, *options: str, timeout: float = 30.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``pyvirtiofsd mount`` in a child process for the body.

    Returns once the child reports ``ready`` on a pipe (``--ready-fd``); on
    exit unmounts with ``fusermount3 -u`` (the child then exits), reaps the
    child, and as a last resort signals it and detaches the mount.
    """
    rfd, wfd = os.pipe()
    cmd = [
        sys.executable,
        "-m",
        "pyvirtiofsd.daemon",
        "mount",
        "--foreground",
        "--ready-fd",
        str(wfd),
        "--shared-dir",
        str(shared_dir),
        *options,
        str(mountpoint),
    ]
    with tempfile.TemporaryFile() as errlog:
        try:
            proc = subprocess.Popen(cmd, pass_fds=(wfd,), stderr=errlog)
        except BaseException:
            os.close(rfd)
            raise
        finally:
            os.close(wfd)
        try:
            with os.fdopen(rfd, "rb") as pipe:
                ready = pipe.read() == b"ready\n"  # EOF: the child wrote it, or died
            if not ready:
                proc.communicate(timeout=timeout)
                errlog.seek(0)
                text = errlog.read().decode(errors="replace")
                raise RuntimeError(f"pyvirtiofsd mount failed ({proc.returncode}): {text}")
            yield proc
        finally:
            _unmount_and_reap(proc, mountpoint, timeout)


def _unmount_and_reap(
    proc: subprocess.Popen[bytes], mountpoint: str | Path, timeout: float
) -> None:
    try:
        if proc.poll() is None and is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
        try:
            proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    finally:
        if is_mounted(mountpoint):
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
