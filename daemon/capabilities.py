"""Capabilities the daemon keeps, ``--modcaps``, and no_new_privs.

The binding is ``ctypes`` to glibc's ``capget``/``capset``/``prctl``, as in
``passthrough/oscalls.py``: the calls are three, libcap's Python bindings
(python-prctl, ``cap-ng``) need a C build against Debian's -dev packages and
add nothing here, and PyPI has no maintained typed alternative.

What the passthrough needs, per call site (see DESIGN.md, "Sandbox"):

``CHOWN``         SETATTR uid/gid (``fchownat``) asked by guest root.
``DAC_OVERRIDE``  guest root opens/creates/unlinks regardless of modes;
                  lookups through directories the daemon could not search.
``DAC_READ_SEARCH`` the same for reads and searches, and
                  ``open_by_handle_at`` (inode file handles).
``FOWNER``        utimes/chmod/xattrs of files guest root does not own.
``FSETID``        keep setuid/setgid bits when guest root writes or chmods;
                  dropped per request (``without_fsetid``) when the guest
                  asks for the kill.
``SETGID``        ``setfsgid`` to the caller, ``setgroups(0)`` per worker.
``SETUID``        ``setfsuid`` to the caller.
``MKNOD``         MKNOD of device nodes (``--allow-device-nodes``).
``SETFCAP``       guest root sets ``security.capability`` (``setcap``).

Not kept: ``SYS_ADMIN`` (``trusted.*`` and most ``security.*`` xattrs would
act on the host; mounts happen before the drop), ``SYS_RESOURCE`` (the
rlimit is raised before the drop), and everything else.  ``--modcaps``
adds or removes names, virtiofsd's syntax: ``+sys_admin:-mknod``.

Capabilities are per thread: :func:`restrict` must run while the process
has one thread (every later thread inherits the reduced sets).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading

from . import procfs

__all__ = [
    "CAP_NAMES",
    "DEFAULT_CAPS",
    "ModcapsError",
    "apply_modcaps",
    "cap_last_cap",
    "current",
    "restrict",
    "set_effective",
    "set_no_new_privs",
]

log = logging.getLogger("pyvirtiofsd")

_libc = ctypes.CDLL(None, use_errno=True)

#: capability(7) numbers, lower-case names without ``cap_``.
CAP_NAMES: dict[str, int] = {
    "chown": 0,
    "dac_override": 1,
    "dac_read_search": 2,
    "fowner": 3,
    "fsetid": 4,
    "kill": 5,
    "setgid": 6,
    "setuid": 7,
    "setpcap": 8,
    "linux_immutable": 9,
    "net_bind_service": 10,
    "net_broadcast": 11,
    "net_admin": 12,
    "net_raw": 13,
    "ipc_lock": 14,
    "ipc_owner": 15,
    "sys_module": 16,
    "sys_rawio": 17,
    "sys_chroot": 18,
    "sys_ptrace": 19,
    "sys_pacct": 20,
    "sys_admin": 21,
    "sys_boot": 22,
    "sys_nice": 23,
    "sys_resource": 24,
    "sys_time": 25,
    "sys_tty_config": 26,
    "mknod": 27,
    "lease": 28,
    "audit_write": 29,
    "audit_control": 30,
    "setfcap": 31,
    "mac_override": 32,
    "mac_admin": 33,
    "syslog": 34,
    "wake_alarm": 35,
    "block_suspend": 36,
    "audit_read": 37,
    "perfmon": 38,
    "bpf": 39,
    "checkpoint_restore": 40,
}

#: What the passthrough needs (module docstring has the call sites).
DEFAULT_CAPS: frozenset[str] = frozenset(
    {
        "chown",
        "dac_override",
        "dac_read_search",
        "fowner",
        "fsetid",
        "setgid",
        "setuid",
        "mknod",
        "setfcap",
    }
)

_CAP_VERSION_3 = 0x20080522
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4


class ModcapsError(ValueError):
    """A ``--modcaps`` string that does not parse."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_libc.capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4


def _check(ret: int, what: str) -> int:
    if ret < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return ret


def _prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, 0, 0), f"prctl({option})")


def cap_last_cap() -> int:
    """The highest capability number this kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return max(CAP_NAMES.values())


def apply_modcaps(base: frozenset[str], spec: str | None) -> frozenset[str]:
    """``base`` changed by ``+name`` / ``-name`` items separated by ``:``."""
    if not spec:
        return base
    caps = set(base)
    for item in spec.split(":"):
        if len(item) < 2 or item[0] not in "+-":
            raise ModcapsError(f"--modcaps: {item!r} is not +name or -name")
        name = item[1:].lower().removeprefix("cap_")
        if name not in CAP_NAMES:
            raise ModcapsError(f"--modcaps: unknown capability {item[1:]!r}")
        (caps.add if item[0] == "+" else caps.discard)(name)
    return frozenset(caps)


def _mask(names: frozenset[str]) -> int:
    mask = 0
    for name in names:
        mask |= 1 << CAP_NAMES[name]
    return mask


def current() -> tuple[int, int, int]:
    """This thread's (effective, permitted, inheritable) masks."""
    hdr = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(hdr), data), "capget")
    eff = data[0].effective | data[1].effective << 32
    prm = data[0].permitted | data[1].permitted << 32
    inh = data[0].inheritable | data[1].inheritable << 32
    return eff, prm, inh


def set_effective(mask: int) -> None:
    """This thread's effective set (capset is per thread); permitted stays."""
    hdr = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(hdr), data), "capget")
    for i in (0, 1):
        data[i].effective = mask >> (32 * i) & 0xFFFF_FFFF
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


def restrict(keep: frozenset[str], *, who: str = "daemon") -> int:
    """Reduce the process to ``keep``: effective = permitted = ``keep`` (as far
    as it was permitted), no inheritable or ambient capabilities, and every
    other capability dropped from the bounding set.  Returns the new mask."""
    if threading.active_count() != 1 or procfs.thread_count() != 1:
        raise RuntimeError("capabilities must be dropped while the process has one thread")
    effective, permitted, _ = current()
    mask = _mask(keep) & permitted
    # The bounding set first: PR_CAPBSET_DROP needs CAP_SETPCAP, which goes next.
    # Without it (a daemon that is not root) the bounding set stays as it is:
    # no_new_privs, set next, already keeps every exec from gaining anything.
    if effective >> CAP_NAMES["setpcap"] & 1:
        for cap in range(cap_last_cap() + 1):
            if not mask >> cap & 1 and _libc.prctl(_PR_CAPBSET_READ, cap, 0, 0, 0) == 1:
                _prctl(_PR_CAPBSET_DROP, cap)
    else:
        log.debug("capabilities: no CAP_SETPCAP, the bounding set is left as it is")
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    hdr = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in (0, 1):
        word = mask >> (32 * i) & 0xFFFF_FFFF
        data[i].effective = data[i].permitted = word
        data[i].inheritable = 0
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")
    kept = sorted(n for n, c in CAP_NAMES.items() if mask >> c & 1)
    log.info("capabilities kept (%s): %s", who, ", ".join(kept) or "none")
    return mask


def set_no_new_privs() -> None:
    """``PR_SET_NO_NEW_PRIVS``: no exec can ever gain privileges (setuid,
    file capabilities); also what lets seccomp load without CAP_SYS_ADMIN."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    if _libc.prctl(_PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) != 1:
        raise OSError("PR_SET_NO_NEW_PRIVS did not take effect")
