"""``--seccomp kill|log|trap|none``: a system-call allowlist for the daemon.

Binding: ``ctypes`` to Debian's ``libseccomp.so.2`` (package ``libseccomp2``,
installed by ``scripts/install-system-deps.sh``).  Six functions are used;
the daemon's Python is not Debian's, so Debian's ``python3-seccomp`` cannot
be imported from the virtualenv, and PyPI's ``pyseccomp`` is an untyped
ctypes wrapper of the same library.  libseccomp (not a hand-written BPF
program) resolves names per architecture and handles the x32/i386 ABIs.

Actions for a call outside :data:`ALLOWED`:

``kill``  SECCOMP_RET_KILL_PROCESS; the kernel logs it (audit type=1326,
          ``/proc/sys/kernel/seccomp/actions_logged``) and the sandbox's
          outer process logs the SIGSYS death.
``log``   allowed, but logged by the kernel: how the list was found.
``trap``  SIGSYS; :mod:`faulthandler` prints every thread's Python stack
          to stderr, then the signal's default action ends the process (a
          trapped call would otherwise "return" its own syscall number).
``none``  no filter.

The filter covers every thread (TSYNC) and is loaded after
``PR_SET_NO_NEW_PRIVS``.  :data:`ALLOWED` is what the sandboxed daemon
was seen to call: the VM tests (read/write, POSIX semantics, locks,
submounts, fio, stress-ng, dbench, per-device DMA) under ``--seccomp log``
(no audit record left) and ``strace -f -c`` attached to the serving
process (CPython 3.11, trio's epoll loop, cffi, the C core in
``dma/src``).  Kept although not seen there: exit/exit_group and
rt_sigreturn (thread and process exit, signal return), tgkill
(``abort``, ``raise``), writev (glibc's fatal-error message before an
abort: assert, heap checks), the time calls behind the vDSO,
nanosleep/clock_nanosleep (``time.sleep``), getrandom, mremap (glibc
realloc of large blocks), dup, pread64/pwrite64, renameat2 (RENAME2
flags), sendmsg/getsockopt, statx and sched_yield.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import faulthandler
import logging
import os
import signal
import sys

__all__ = ["ALLOWED", "MODES", "SeccompError", "install", "load_library"]

log = logging.getLogger("pyvirtiofsd")

MODES = ("kill", "log", "trap", "none")

_SCMP_ACT_KILL_PROCESS = 0x8000_0000
_SCMP_ACT_TRAP = 0x0003_0000
_SCMP_ACT_LOG = 0x7FFC_0000
_SCMP_ACT_ALLOW = 0x7FFF_0000
_SCMP_FLTATR_CTL_TSYNC = 4
_NR_SCMP_ERROR = -1

_ACTIONS = {"kill": _SCMP_ACT_KILL_PROCESS, "log": _SCMP_ACT_LOG, "trap": _SCMP_ACT_TRAP}

#: Every system call the daemon makes once it serves (see the docstring).
ALLOWED: tuple[str, ...] = (
    # memory (CPython's allocator, thread stacks, the guest memory table)
    "brk",
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    # threads and their synchronisation
    "clone3",
    "futex",
    "set_robust_list",
    "rseq",
    "gettid",
    "exit",
    "exit_group",
    "sched_yield",
    "restart_syscall",
    "sched_getaffinity",
    # signals (trio's wakeup fd, CPython's handlers, thread start-up)
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "getpid",
    "tgkill",
    # trio's event loop and the vhost-user socket
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "socketpair",
    "accept4",
    "recvmsg",
    "sendmsg",
    "recvfrom",
    "sendto",
    "getsockopt",
    "setsockopt",
    "getsockname",
    "eventfd2",
    # the C core's wait for kicks, eventfd reads and writes
    "poll",
    "read",
    "write",
    "writev",
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "close",
    "dup",
    "fcntl",
    "ioctl",
    "lseek",
    # the passthrough filesystem
    "openat",
    "name_to_handle_at",  # --inode-file-handles (passthrough/filehandles.py)
    "open_by_handle_at",
    "newfstatat",
    "statx",
    "fstatfs",
    "getdents64",
    "readlinkat",
    "mkdirat",
    "mknodat",
    "symlinkat",
    "linkat",
    "unlinkat",
    "renameat",
    "renameat2",
    "fchmodat",
    "fchownat",
    "utimensat",
    "ftruncate",
    "fallocate",
    "fsync",
    "fdatasync",
    "syncfs",
    "flock",
    "copy_file_range",
    "setxattr",
    "getxattr",
    "listxattr",
    "removexattr",
    "fchdir",
    "umask",
    "unshare",
    # per-request credentials
    "setfsuid",
    "setfsgid",
    "setgroups",
    "capget",
    "capset",
    "geteuid",
    "prctl",
    # time (vDSO first; the syscalls are its fallback), randomness
    "clock_gettime",
    "clock_nanosleep",
    "nanosleep",
    "gettimeofday",
    "getrandom",
)


class SeccompError(OSError):
    """libseccomp is missing, or refused to build or load the filter."""


_lib: ctypes.CDLL | None = None


def load_library() -> ctypes.CDLL:
    """libseccomp, loaded once; call it before entering the sandbox (after
    ``pivot_root`` no library can be found)."""
    global _lib
    if _lib is None:
        _lib = _load_library()
    return _lib


def _load_library() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise SeccompError(f"cannot load libseccomp ({name}): {e}") from e
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.restype = None
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_rule_add.restype = ctypes.c_int
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_attr_set.restype = ctypes.c_int
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_load.restype = ctypes.c_int
    return lib


def _ok(ret: int, what: str) -> None:
    if ret < 0:  # libseccomp returns -errno
        raise SeccompError(-ret, f"{what}: {os.strerror(-ret)}")


def install(mode: str, allowed: tuple[str, ...] = ALLOWED) -> int:
    """Load the filter for ``mode``; return how many calls it allows."""
    if mode == "none":
        return 0
    if mode not in _ACTIONS:
        raise ValueError(f"unknown seccomp mode {mode!r}")
    lib = load_library()
    if mode == "trap":
        faulthandler.register(signal.SIGSYS, file=sys.stderr, all_threads=True, chain=True)
    ctx = lib.seccomp_init(_ACTIONS[mode])
    if not ctx:
        raise SeccompError("seccomp_init failed")
    count = 0
    try:
        _ok(lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_TSYNC, 1), "seccomp_attr_set(TSYNC)")
        for name in allowed:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr == _NR_SCMP_ERROR:
                log.debug("seccomp: %s does not exist on this architecture", name)
                continue
            _ok(lib.seccomp_rule_add(ctx, _SCMP_ACT_ALLOW, nr, 0), f"seccomp_rule_add({name})")
            count += 1
        _ok(lib.seccomp_load(ctx), "seccomp_load")
    finally:
        lib.seccomp_release(ctx)
    log.info("seccomp: %s for any system call outside %d allowed", mode, count)
    return count
