"""Rootless mode in a real guest: pyvirtiofsd runs as an unprivileged host
user, and files the guest creates as root and as its users get the owners
the id translation and the user namespace give them on the host.

One boot, two hot-plugged shares, each served by a daemon started as the
host user ``UID`` (QEMU stays root; it connects to sockets the harness made):

* ``rlnone`` -- ``--sandbox none``: guest root is the daemon's user
  (``map:0:UID:1``, both ways), guest bob (1001) is ``forbid-guest``.
* ``rlns`` -- ``--sandbox namespace`` in a user namespace with
  ``--uid-map``/``--gid-map`` (newuidmap/newgidmap, the user's
  /etc/subuid range), plus ``map:1000:2000:1`` and
  ``squash-guest:1001:5000:1`` on top: the guest's ids go through both.
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.shares import Share, vhost_user_device

#: The unprivileged host user the daemons run as (created if missing).
USER, UID, GID = "pvd-rootless", 65533, 65533
#: Its subordinate ids (/etc/subuid, /etc/subgid), unless it already has some.
SUB_START, SUB_COUNT = 300000, 65536

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="creating the unprivileged test user needs root"
)


def _ensure_subids(path: Path, name: str) -> int:
    """The user's first subordinate range's start, adding ours if it has none."""
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        owner, _, rest = line.partition(":")
        start, _, count = rest.partition(":")
        if owner in (name, str(UID)) and int(count) >= SUB_COUNT:
            return int(start)
    with path.open("a") as f:
        f.write(f"{name}:{SUB_START}:{SUB_COUNT}\n")
    return SUB_START


def ensure_user() -> tuple[int, int]:
    """Idempotently: the group, the user and their subordinate ids; returns
    the (uid, gid) subordinate range starts."""
    try:
        grp.getgrgid(GID)
    except KeyError:
        subprocess.run(["groupadd", "--system", "--gid", str(GID), USER], check=True)
    try:
        name = pwd.getpwuid(UID).pw_name
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--uid", str(UID), "--gid", str(GID), "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", USER],
            check=True,
        )  # fmt: skip
        name = USER
    return _ensure_subids(Path("/etc/subuid"), name), _ensure_subids(Path("/etc/subgid"), name)


def _die_with_parent() -> None:
    # setpriv's uid change clears it again: then the daemon exits when QEMU
    # (which keeps its own) dies and the front-end goes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


@dataclass
class Rootless:
    vm: Machine
    work: Path
    sub_uid: int
    sub_gid: int
    daemons: list[subprocess.Popen[bytes]]

    def share(self, tag: str) -> Path:
        return self.work / tag

    def sh(self, cmd: str, user: str | None = None) -> tuple[int, str]:
        full = f"su {user} -c {cmd!r}" if user else cmd
        r = self.vm.agent.run(full, timeout=60)
        return r.status, (r.stdout + r.stderr).decode(errors="replace")

    def ok(self, cmd: str, user: str | None = None) -> str:
        status, out = self.sh(cmd, user)
        assert status == 0, (cmd, user, out)
        return out.strip()

    def start(self, tag: str, *args: str) -> None:
        """Serve ``share(tag)`` by a daemon running as UID, hot-plug and mount it."""
        host_dir = self.share(tag)
        host_dir.mkdir()
        os.chown(host_dir, UID, GID)
        sock = self.work / f"{tag}.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        log = (self.vm.log_dir / f"{tag}-rootless.log").open("ab")
        try:
            listener.bind(str(sock))
            listener.listen(1)
            # setpriv keeps its capabilities only until the exec (the
            # interpreter may lie below a directory UID cannot search);
            # the daemon runs with none (checked in the tests).
            argv = ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups",
                    sys.executable, "-m", "pyvirtiofsd.daemon", "--fd", str(listener.fileno()),
                    "--shared-dir", str(host_dir), "--log-level", "debug", *args]  # fmt: skip
            self.daemons.append(
                subprocess.Popen(
                    argv,
                    pass_fds=[listener.fileno()],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd="/",
                    preexec_fn=_die_with_parent,
                )
            )
        finally:
            listener.close()
            log.close()
        share = Share(host_dir, tag, backend="pyvirtiofsd")
        dev = vhost_user_device(share, tag, sock, self.vm.config.cpus)
        self.vm.qmp_command("chardev-add", **dev.qmp_chardev_add())
        self.vm.qmp_command("device_add", **dev.qmp_device_add())
        self.vm.mount_when_ready(share, timeout=60)

    def daemon_creds(self, index: int) -> tuple[set[int], int]:
        """Real/effective/saved/fs uids of a daemon as the host sees them, and
        its permitted capabilities (as the host's user namespace counts them)."""
        status = Path(f"/proc/{self.daemons[index].pid}/status").read_text().splitlines()
        uids = next(x for x in status if x.startswith("Uid:"))
        cap_prm = next(x for x in status if x.startswith("CapPrm:"))
        return {int(v) for v in uids.split()[1:]}, int(cap_prm.split()[1], 16)


@pytest.fixture(scope="module")
def rootless() -> Iterator[Rootless]:
    sub_uid, sub_gid = ensure_user()
    # Under /tmp, not pytest's tmp_path: that lies below a 0700 directory the
    # daemon's user cannot enter.
    work = Path(tempfile.mkdtemp(prefix="pvd-rootless-"))
    os.chmod(work, 0o755)
    with Machine(MachineConfig(), name="rootless") as vm:
        r = Rootless(vm, work, sub_uid, sub_gid, [])
        try:
            r.start(
                "rlnone",
                "--sandbox", "none",
                "--translate-uid", f"map:0:{UID}:1",
                "--translate-gid", f"map:0:{GID}:1",
                "--translate-uid", "forbid-guest:1001:1",
            )  # fmt: skip
            r.start(
                "rlns",
                "--sandbox", "namespace",
                "--uid-map", f":0:{UID}:1:", "--uid-map", f":1:{sub_uid}:{SUB_COUNT}:",
                "--gid-map", f":0:{GID}:1:", "--gid-map", f":1:{sub_gid}:{SUB_COUNT}:",
                "--translate-uid", "map:1000:2000:1",
                "--translate-gid", "map:1000:2000:1",
                "--translate-uid", "squash-guest:1001:5000:1",
            )  # fmt: skip
            yield r
        finally:
            for p in r.daemons:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
            for p in r.daemons:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
    shutil.rmtree(work, ignore_errors=True)


def _owner(path: Path) -> tuple[int, int]:
    st = path.lstat()
    return st.st_uid, st.st_gid


def test_translated_owners_without_sandbox(rootless: Rootless) -> None:
    r, m, host = rootless, "/mnt/rlnone", rootless.share("rlnone")
    assert r.daemon_creds(0) == ({UID}, 0)
    (host / "hostfile").write_text("h")
    os.chown(host / "hostfile", UID, GID)
    (host / "stranger").write_text("s")
    os.chown(host / "stranger", 4321, 4321)
    # guest root creates: the host file is the daemon user's, the guest sees root
    r.ok(f"mkdir {m}/pub && chmod 1777 {m}/pub && echo r > {m}/rootfile")
    assert _owner(host / "rootfile") == _owner(host / "pub") == (UID, GID)
    assert r.ok(f"stat -c %u:%g {m}/rootfile {m}/pub {m}/hostfile").split() == ["0:0"] * 3
    assert r.ok(f"stat -c %u:%g {m}/stranger") == "4321:4321"  # unmapped: unchanged
    # a guest user creates (an unprivileged daemon can give it no other owner)
    r.ok(f"echo a > {m}/pub/alice", "alice")
    assert _owner(host / "pub/alice") == (UID, GID)
    assert (host / "pub/alice").read_text() == "a\n"
    # forbid-guest: bob may not act with his uid at all
    status, out = r.sh(f"echo b > {m}/pub/bob", "bob")
    assert status != 0 and "not permitted" in out, out
    assert not (host / "pub/bob").exists()


def test_user_namespace_and_translation_compose(rootless: Rootless) -> None:
    r, m, host = rootless, "/mnt/rlns", rootless.share("rlns")
    uids, _ = r.daemon_creds(1)  # the outer process; its capabilities count in its namespace
    assert uids == {UID}
    (host / "stranger").write_text("s")
    os.chown(host / "stranger", 4321, 4321)  # outside the namespace's map
    r.ok(f"mkdir {m}/pub && chmod 1777 {m}/pub && echo r > {m}/rootfile")
    assert _owner(host / "rootfile") == (UID, GID)  # namespace root = the daemon's user
    assert r.ok(f"stat -c %u:%g {m}/rootfile") == "0:0"
    assert r.ok(f"stat -c %u:%g {m}/stranger") == "65534:65534"  # the overflow id
    # alice (1000) -> 2000 in the namespace (--translate-*) -> subordinate id 1999 on the host
    r.ok(f"echo a > {m}/pub/alice", "alice")
    assert _owner(host / "pub/alice") == (r.sub_uid + 1999, r.sub_gid + 1999)
    assert r.ok(f"stat -c %u:%g {m}/pub/alice") == "1000:1000"
    # bob (1001): uid squashed to 5000, gid 1001 only through the namespace
    r.ok(f"echo b > {m}/pub/bob", "bob")
    assert _owner(host / "pub/bob") == (r.sub_uid + 4999, r.sub_gid + 1000)
    assert r.ok(f"stat -c %u:%g {m}/pub/bob") == "5000:1001"
    # SETATTR's new owner goes the same way: guest 1000 -> ns 2000 -> host
    r.ok(f"chown 1000:1000 {m}/rootfile")
    assert _owner(host / "rootfile") == (r.sub_uid + 1999, r.sub_gid + 1999)
    assert r.ok(f"stat -c %u:%g {m}/rootfile") == "1000:1000"
