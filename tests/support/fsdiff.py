"""Differential filesystem testing: one op sequence, two directories, compare.

Standard library only: this file also runs as a script inside a Debian
guest (python3.11, no third-party modules)::

    python3 fsdiff.py --seed S --count N --length L [--xattr] SHARE REF

applies N seeded random sequences of L operations to SHARE (a virtio-fs or
FUSE mount) and REF (a directory on a local filesystem), prints a JSON
summary and, on a divergence, the smallest failing sequence found by delta
reduction (exit 1).  On the host, hypothesis generates the sequences
(``tests/unit/test_differential_host.py``) from the same vocabulary.

An operation is a plain tuple ``(name, *args)`` of strings and ints, so a
sequence is a list that can be printed, pasted into a test and replayed with
:func:`run_sequence`.  After every operation the results are compared (the
value, or the exception type and errno); at the end, and every
``check_every`` operations, the whole tree: names, types, modes, sizes of
non-directories, link counts, hard-link groups, symlink targets, file
contents and (with xattrs) user.* attributes.

Not compared, because they legitimately differ between two filesystems:
st_dev/st_ino values (only which names share an inode), atime/ctime, mtime
unless just set explicitly (``utime`` reports the times it set), directory
sizes and st_blocks.  Anything else that must be tolerated is listed, with
its reason, in ``fsdiff_expectations.json`` next to this file.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import json
import os
import random
import stat
import sys
from collections.abc import Callable, Sequence
from typing import Any

Op = tuple[Any, ...]
Result = tuple[Any, ...]

# --- vocabulary (shared with the hypothesis strategy) ---------------------------

PATHS = ("a", "b", "c", "d", "d/a", "d/b", "e/a")
SLOTS = (0, 1, 2)
#: open(2) flag variants by name; every creating one takes a mode.
OPEN_FLAGS = {
    "r": os.O_RDONLY,
    "w": os.O_WRONLY,
    "rw": os.O_RDWR,
    "trunc": os.O_RDWR | os.O_TRUNC,
    "append": os.O_WRONLY | os.O_APPEND,
    "nofollow": os.O_RDONLY | os.O_NOFOLLOW,
    "dir": os.O_RDONLY | os.O_DIRECTORY,
    "creat": os.O_RDWR | os.O_CREAT,
    "excl": os.O_RDWR | os.O_CREAT | os.O_EXCL,
    "ctrunc": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
}
MODES = (0o644, 0o600, 0o755, 0o444, 0o000, 0o4755, 0o2775, 0o1777, 0o777)
OFFSETS = (0, 1, 100, 4095, 4096, 5000, 70000)
LENGTHS = (0, 1, 100, 4096, 5000)
SIZES = (0, 1, 100, 4096, 10000)
#: Symlink targets: all relative and without "..", or absolute and dangling,
#: so following one never leaves the tree under test.
TARGETS = ("a", "b", "d", "d/a", "missing", "/nonexistent-fsdiff/x")
TIMES_NS = (0, 1_000_000_000_123_456_789, 1_600_000_000_999_999_999, 4_102_444_800_000_000_001)
XATTR_NAMES = ("user.a", "user.b")
XATTR_VALUES = (b"", b"v", b"x" * 300)
RENAME_FLAGS = {"plain": 0, "noreplace": 1, "exchange": 2}
XATTR_FLAGS = (0, os.XATTR_CREATE, os.XATTR_REPLACE)

#: operation name -> tuple of argument pools (each argument drawn from one).
OPS: dict[str, tuple[Sequence[Any], ...]] = {
    "open": (SLOTS, PATHS, tuple(OPEN_FLAGS), MODES),
    "close": (SLOTS,),
    "pwrite": (SLOTS, OFFSETS, LENGTHS, range(256)),
    "pread": (SLOTS, OFFSETS, LENGTHS),
    "ftruncate": (SLOTS, SIZES),
    "fstat": (SLOTS,),
    "write_file": (PATHS, OFFSETS, LENGTHS, range(256)),
    "read_file": (PATHS,),
    "truncate": (PATHS, SIZES),
    "rename": (PATHS, PATHS, tuple(RENAME_FLAGS)),
    "link": (PATHS, PATHS),
    "symlink": (TARGETS, PATHS),
    "readlink": (PATHS,),
    "unlink": (PATHS,),
    "mkdir": (PATHS, MODES),
    "rmdir": (PATHS,),
    "chmod": (PATHS, MODES),
    "utime": (PATHS, TIMES_NS, TIMES_NS, (True, False)),
    "stat": (PATHS,),
    "lstat": (PATHS,),
    "listdir": (("", "d", "e", "a"),),
    "scandir": (("", "d", "e"),),
    "setxattr": (PATHS, XATTR_NAMES, XATTR_VALUES, XATTR_FLAGS),
    "getxattr": (PATHS, XATTR_NAMES),
    "listxattr": (PATHS,),
    "removexattr": (PATHS, XATTR_NAMES),
    "mkfifo": (PATHS, MODES),
    "chown": (PATHS, (0, 1000), (0, 1000), (True, False)),
    "copy_range": (SLOTS, SLOTS, OFFSETS, OFFSETS, LENGTHS),
    "lseek": (SLOTS, OFFSETS, ("data", "hole")),
    "fsync": (SLOTS,),
    "access": (PATHS, (os.F_OK, os.R_OK, os.W_OK, os.X_OK, os.R_OK | os.W_OK)),
}
XATTR_OPS = frozenset({"setxattr", "getxattr", "listxattr", "removexattr"})
#: Relative weights: creating things first, so that the rest has targets.
WEIGHTS = {"open": 8, "pwrite": 5, "pread": 2, "write_file": 3, "mkdir": 3}


def op_names(xattr: bool) -> list[str]:
    return [n for n in OPS if xattr or n not in XATTR_OPS]


def random_op(rng: random.Random, xattr: bool = False) -> Op:
    names = op_names(xattr)
    name = rng.choices(names, weights=[WEIGHTS.get(n, 1) for n in names])[0]
    return (name, *(rng.choice(list(pool)) for pool in OPS[name]))


def random_sequence(rng: random.Random, length: int, xattr: bool = False) -> list[Op]:
    return [random_op(rng, xattr) for _ in range(length)]


# --- the system calls ------------------------------------------------------------

#: Every open is non-blocking (a FIFO must not hang the run; regular files ignore it).
_NB = os.O_CLOEXEC | os.O_NONBLOCK
_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100


def renameat2(old: str, new: str, flags: int) -> None:
    if flags == 0:
        os.rename(old, new)
        return
    if _libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), old, None, new)


def _data(length: int, seed: int) -> bytes:
    return bytes((seed + i) % 251 for i in range(length))


def _stat_view(st: os.stat_result) -> tuple[Any, ...]:
    """What two filesystems must agree on for one inode (no times, no ino/dev)."""
    kind = stat.S_IFMT(st.st_mode)
    size = None if kind == stat.S_IFDIR else st.st_size
    return (kind, stat.S_IMODE(st.st_mode), size, st.st_nlink, st.st_uid, st.st_gid)


class Side:
    """One directory under test and the fds its open ops hold (by slot)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.fds: dict[int, int] = {}

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def close_all(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def reset(self) -> None:
        """Close every fd and empty the directory."""
        self.close_all()
        for name in os.listdir(self.root):
            _remove(os.path.join(self.root, name))

    def fd(self, slot: int) -> int:
        if slot not in self.fds:
            raise OSError(errno.EBADF, "no such slot")
        return self.fds[slot]

    def apply(self, op: Op) -> Result:
        """Run ``op``; ``("ok", value)`` or ``("err", "ENOENT")``."""
        try:
            return ("ok", getattr(self, "op_" + op[0])(*op[1:]))
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            return ("err", type(exc).__name__, name)

    # one method per operation name; each returns a comparable value

    def op_open(self, slot: int, rel: str, flags: str, mode: int) -> None:
        if slot in self.fds:
            os.close(self.fds.pop(slot))
        self.fds[slot] = os.open(self.path(rel), OPEN_FLAGS[flags] | _NB, mode)

    def op_close(self, slot: int) -> None:
        os.close(self.fd(slot))
        del self.fds[slot]

    def op_pwrite(self, slot: int, offset: int, length: int, seed: int) -> int:
        return os.pwrite(self.fd(slot), _data(length, seed), offset)

    def op_pread(self, slot: int, offset: int, length: int) -> bytes:
        return os.pread(self.fd(slot), length, offset)

    def op_ftruncate(self, slot: int, size: int) -> None:
        os.ftruncate(self.fd(slot), size)

    def op_fstat(self, slot: int) -> tuple[Any, ...]:
        return _stat_view(os.fstat(self.fd(slot)))

    def op_write_file(self, rel: str, offset: int, length: int, seed: int) -> int:
        fd = os.open(self.path(rel), os.O_WRONLY | os.O_CREAT | _NB, 0o644)
        try:
            return os.pwrite(fd, _data(length, seed), offset)
        finally:
            os.close(fd)

    def op_read_file(self, rel: str) -> bytes:
        fd = os.open(self.path(rel), os.O_RDONLY | _NB)
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def op_truncate(self, rel: str, size: int) -> None:
        os.truncate(self.path(rel), size)

    def op_rename(self, old: str, new: str, flags: str) -> None:
        renameat2(self.path(old), self.path(new), RENAME_FLAGS[flags])

    def op_link(self, old: str, new: str) -> None:
        os.link(self.path(old), self.path(new), follow_symlinks=False)

    def op_symlink(self, target: str, rel: str) -> None:
        os.symlink(target, self.path(rel))

    def op_readlink(self, rel: str) -> str:
        return os.readlink(self.path(rel))

    def op_unlink(self, rel: str) -> None:
        os.unlink(self.path(rel))

    def op_mkdir(self, rel: str, mode: int) -> None:
        os.mkdir(self.path(rel), mode)

    def op_rmdir(self, rel: str) -> None:
        os.rmdir(self.path(rel))

    def op_chmod(self, rel: str, mode: int) -> None:
        os.chmod(self.path(rel), mode)

    def op_utime(self, rel: str, atime: int, mtime: int, follow: bool) -> tuple[int, int]:
        path = self.path(rel)
        os.utime(path, ns=(atime, mtime), follow_symlinks=follow)
        st = os.stat(path, follow_symlinks=follow)
        return (st.st_atime_ns, st.st_mtime_ns)

    def op_stat(self, rel: str) -> tuple[Any, ...]:
        return _stat_view(os.stat(self.path(rel)))

    def op_lstat(self, rel: str) -> tuple[Any, ...]:
        return _stat_view(os.lstat(self.path(rel)))

    def op_listdir(self, rel: str) -> list[str]:
        return sorted(os.listdir(self.path(rel)))

    def op_scandir(self, rel: str) -> list[tuple[str, bool, bool]]:
        with os.scandir(self.path(rel)) as it:
            return sorted((e.name, e.is_dir(follow_symlinks=False), e.is_symlink()) for e in it)

    def op_setxattr(self, rel: str, name: str, value: bytes, flags: int) -> None:
        os.setxattr(self.path(rel), name, value, flags, follow_symlinks=False)

    def op_getxattr(self, rel: str, name: str) -> bytes:
        return os.getxattr(self.path(rel), name, follow_symlinks=False)

    def op_listxattr(self, rel: str) -> list[str]:
        return sorted(
            n for n in os.listxattr(self.path(rel), follow_symlinks=False) if n.startswith("user.")
        )

    def op_removexattr(self, rel: str, name: str) -> None:
        os.removexattr(self.path(rel), name, follow_symlinks=False)

    def op_mkfifo(self, rel: str, mode: int) -> None:
        os.mkfifo(self.path(rel), mode)

    def op_chown(self, rel: str, uid: int, gid: int, follow: bool) -> None:
        os.chown(self.path(rel), uid, gid, follow_symlinks=follow)

    def op_copy_range(self, src: int, dst: int, off_in: int, off_out: int, length: int) -> int:
        return os.copy_file_range(self.fd(src), self.fd(dst), length, off_in, off_out)

    def op_lseek(self, slot: int, offset: int, whence: str) -> int:
        return os.lseek(self.fd(slot), offset, os.SEEK_DATA if whence == "data" else os.SEEK_HOLE)

    def op_fsync(self, slot: int) -> None:
        os.fsync(self.fd(slot))

    def op_access(self, rel: str, mask: int) -> bool:
        return os.access(self.path(rel), mask)

    # --- the whole tree -----------------------------------------------------------

    def snapshot(self, xattr: bool) -> dict[str, Any]:
        """Every name under the root with what must match, and the hard-link groups."""
        entries: dict[str, Any] = {}
        inodes: dict[int, list[str]] = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root)
                st = os.lstat(full)
                info: dict[str, Any] = {"stat": _stat_view(st)}
                if stat.S_ISLNK(st.st_mode):
                    info["target"] = os.readlink(full)
                elif stat.S_ISREG(st.st_mode):
                    with open(full, "rb") as f:
                        info["data"] = f.read()
                    inodes.setdefault(st.st_ino, []).append(rel)
                if xattr and not stat.S_ISLNK(st.st_mode):
                    info["xattr"] = _xattrs(full)
                entries[rel] = info
        groups = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
        return {"entries": entries, "links": groups}


def _xattrs(path: str) -> dict[str, bytes] | str:
    try:
        names = sorted(
            n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user.")
        )
        return {n: os.getxattr(path, n, follow_symlinks=False) for n in names}
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _remove(path: str) -> None:
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        os.chmod(path, 0o700)
        for name in os.listdir(path):
            _remove(os.path.join(path, name))
        os.rmdir(path)
    else:
        os.unlink(path)


# --- expectations -------------------------------------------------------------------

EXPECTATIONS_FILE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "fsdiff_expectations.json"
)


def load_expectations(path: str = EXPECTATIONS_FILE) -> list[dict[str, Any]]:
    """Known, explained differences: ``{"op", "share", "ref", "where", "reason"}``
    each: ``share``/``ref`` are the errno names (or "ok") the two sides give
    (left out: any), ``where`` the runs it applies to ("host": the pyfuse3
    mount, "guest")."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return []
    known: list[dict[str, Any]] = data.get("results", [])
    for item in known:
        if not item.get("reason"):
            raise ValueError(f"expectation without a reason: {item}")
    return known


def _outcome(result: Result) -> str:
    return "ok" if result[0] == "ok" else str(result[2])


def _expected(op: Op, share: Result, ref: Result, known: list[dict[str, Any]], where: str) -> bool:
    return any(
        k["op"] == op[0]
        and k.get("share", _outcome(share)) == _outcome(share)
        and k.get("ref", _outcome(ref)) == _outcome(ref)
        and where in k.get("where", ("host", "guest"))
        for k in known
    )


# --- running and comparing ----------------------------------------------------------


class Divergence(AssertionError):
    """The two sides disagreed; ``index`` is the op (or len(ops) for the final tree)."""

    def __init__(self, index: int, ops: Sequence[Op], what: str, share: Any, ref: Any) -> None:
        self.index = index
        self.ops = list(ops)
        self.what = what
        self.share = share
        self.ref = ref
        super().__init__(self.describe())

    def describe(self) -> str:
        where = (
            f"op {self.index} {self.ops[self.index]!r}"
            if self.index < len(self.ops)
            else "final tree"
        )
        return f"{self.what} differs at {where}:\n  share: {self.share!r}\n  ref:   {self.ref!r}"

    def as_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "what": self.what,
            "share": repr(self.share),
            "ref": repr(self.ref),
        }


def _diff_tree(a: dict[str, Any], b: dict[str, Any]) -> tuple[Any, Any]:
    """Only the parts of two snapshots that differ (for a readable report)."""
    ea, eb = a["entries"], b["entries"]
    da = {k: ea.get(k) for k in sorted(set(ea) | set(eb)) if ea.get(k) != eb.get(k)}
    db = {k: eb.get(k) for k in da}
    if a["links"] != b["links"]:
        da["<links>"], db["<links>"] = a["links"], b["links"]
    return da, db


def run_sequence(
    share_root: str,
    ref_root: str,
    ops: Sequence[Op],
    *,
    xattr: bool = False,
    check_every: int = 0,
    known: list[dict[str, Any]] | None = None,
    where: str = "host",
) -> None:
    """Empty both roots, apply ``ops`` to each; :class:`Divergence` on the first difference."""
    known = load_expectations() if known is None else known
    share, ref = Side(share_root), Side(ref_root)
    share.reset()
    ref.reset()
    try:
        for i, op in enumerate(ops):
            rs, rr = share.apply(op), ref.apply(op)
            if rs != rr and not _expected(op, rs, rr, known, where):
                raise Divergence(i, ops, "result", rs, rr)
            if check_every and (i + 1) % check_every == 0:
                _check_trees(share, ref, ops, i, xattr)
        share.close_all()
        ref.close_all()
        _check_trees(share, ref, ops, len(ops), xattr)
    finally:
        share.close_all()
        ref.close_all()


def _check_trees(share: Side, ref: Side, ops: Sequence[Op], index: int, xattr: bool) -> None:
    ts, tr = share.snapshot(xattr), ref.snapshot(xattr)
    if ts != tr:
        ds, dr = _diff_tree(ts, tr)
        raise Divergence(index, ops, "tree", ds, dr)


def reduce_failure(fails: Callable[[list[Op]], bool], ops: list[Op]) -> list[Op]:
    """Delta reduction: drop chunks, then single ops, while ``fails`` still holds."""
    current = list(ops)
    chunk = max(1, len(current) // 2)
    while chunk >= 1:
        i = 0
        changed = False
        while i < len(current):
            candidate = current[:i] + current[i + chunk :]
            if candidate and fails(candidate):
                current = candidate
                changed = True
            else:
                i += chunk
        if chunk == 1 and not changed:
            break
        chunk = chunk // 2 if chunk > 1 else (1 if changed else 0)
    return current


def minimal_failure(
    share_root: str,
    ref_root: str,
    ops: list[Op],
    err: Divergence,
    *,
    xattr: bool,
    where: str = "host",
) -> tuple[list[Op], Divergence]:
    """The shortest failing prefix, then delta-reduced."""
    prefix = ops[: err.index + 1]

    def fails(candidate: list[Op]) -> bool:
        try:
            run_sequence(share_root, ref_root, candidate, xattr=xattr, where=where)
        except Divergence:
            return True
        return False

    if not fails(prefix):
        prefix = ops
    reduced = reduce_failure(fails, prefix)
    try:
        run_sequence(share_root, ref_root, reduced, xattr=xattr, where=where)
    except Divergence as final:
        return reduced, final
    return ops, err  # flaky: keep the original


def _jsonable(op: Op) -> list[Any]:
    return [v.decode("latin-1") if isinstance(v, bytes) else v for v in op]


def from_json(items: list[list[Any]]) -> list[Op]:
    """Inverse of the JSON form printed by the script (bytes come back as latin-1 text)."""
    out: list[Op] = []
    for item in items:
        name, args = item[0], item[1:]
        pools = OPS[name]
        out.append(
            (
                name,
                *(
                    a.encode("latin-1") if isinstance(a, str) and isinstance(pool[0], bytes) else a
                    for a, pool in zip(args, pools, strict=True)
                ),
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("share")
    ap.add_argument("ref")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--length", type=int, default=20)
    ap.add_argument("--xattr", action="store_true")
    ap.add_argument("--check-every", type=int, default=0)
    ap.add_argument(
        "--where", default="guest", help="which expectations apply: guest (default) or host"
    )
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    summary: dict[str, Any] = {
        "seed": args.seed,
        "count": args.count,
        "length": args.length,
        "run": 0,
    }
    for n in range(args.count):
        ops = random_sequence(rng, args.length, args.xattr)
        try:
            run_sequence(
                args.share,
                args.ref,
                ops,
                xattr=args.xattr,
                check_every=args.check_every,
                where=args.where,
            )
        except Divergence as err:
            reduced, final = minimal_failure(
                args.share, args.ref, ops, err, xattr=args.xattr, where=args.where
            )
            summary.update(
                run=n + 1,
                failed_sequence=n,
                divergence=final.as_json(),
                reproducer=[_jsonable(op) for op in reduced],
            )
            print(json.dumps(summary, indent=1))
            return 1
        summary["run"] = n + 1
    summary["divergences"] = 0
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
