"""Resource limits set once at start-up (``--rlimit-nofile``), as virtiofsd.

Every inode the guest looks up holds an O_PATH fd, every open file and
directory another, and each started queue a few eventfds: a guest walking a
large tree (``find``, ``git status``) needs far more fds than the 1,024 soft
limit systemd hands out.  Like virtiofsd the daemon raises the soft limit to
``min(1,000,000, /proc/sys/fs/nr_open, hard limit)``; running as root
(CAP_SYS_RESOURCE) it raises the hard limit to that value too.  An explicit
``--rlimit-nofile N`` sets both limits to N (0 leaves them alone).

This runs before capabilities are dropped: CAP_SYS_RESOURCE is not kept.
"""

from __future__ import annotations

import logging
import resource

__all__ = ["DEFAULT_NOFILE", "nr_open", "raise_nofile_limit"]

log = logging.getLogger("pyvirtiofsd")

#: virtiofsd's target for the open-file limit.
DEFAULT_NOFILE = 1_000_000


def inode_fd_budget(soft_nofile: int) -> int:
    """How many inode fds the passthrough keeps open (``--inode-file-handles``
    evicts past it): half the open-file soft limit, the rest for handles,
    directories and the daemon's own, and never fewer than 16."""
    return max(16, soft_nofile // 2)


def nr_open() -> int:
    """The kernel's ceiling for RLIMIT_NOFILE (``/proc/sys/fs/nr_open``)."""
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20  # the kernel's default


def raise_nofile_limit(requested: int | None) -> tuple[int, int]:
    """Apply ``--rlimit-nofile`` and return the resulting (soft, hard) limits.

    ``None``: the default above.  ``0``: keep the inherited limits.  ``N``:
    soft = hard = N (a hard limit above the current one needs
    CAP_SYS_RESOURCE; without it the soft limit goes as high as allowed).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if requested == 0:
        log.info("open-file limit left at soft %d, hard %d", soft, hard)
        return soft, hard
    target = min(DEFAULT_NOFILE, nr_open()) if requested is None else requested
    if requested is not None and target > nr_open():
        raise ValueError(f"--rlimit-nofile {target} exceeds /proc/sys/fs/nr_open ({nr_open()})")
    new_hard = max(hard, target) if hard != resource.RLIM_INFINITY else hard
    if requested is not None:
        new_hard = target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, new_hard))
    except (OSError, ValueError):
        # Not privileged: raise the hard limit only as far as it already goes.
        capped = min(target, hard) if hard != resource.RLIM_INFINITY else target
        resource.setrlimit(resource.RLIMIT_NOFILE, (capped, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    log.info("open-file limit: soft %d, hard %d", soft, hard)
    return soft, hard
