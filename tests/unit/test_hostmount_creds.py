"""The credential model through the host mount (``pyvirtiofsd mount``): a
caller whose access comes from a supplementary group gets what a local
directory gives.

The same operations (``OPS``) run in a child process as uid 65533, gid 65532,
supplementary groups {65532, 65531} (util-linux ``setpriv``), once under the
mount and once in a plain local directory; every step's errno and the final
tree (type, mode, owner, group, size) must be equal.  The host mount knows
the caller's groups (``/proc/<pid>/status``), so here even S_ISGID asked of
``open(O_CREAT)`` in a setgid directory matches.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.daemon.hostmount import is_mounted, mounted

pytestmark = pytest.mark.skipif(
    not (
        os.path.exists("/dev/fuse")
        and shutil.which("fusermount3")
        and shutil.which("setpriv")
        and os.path.exists("/usr/bin/python3")
        and os.geteuid() == 0
    ),
    reason="needs /dev/fuse, fusermount3, setpriv, /usr/bin/python3 and root",
)

UID, GID, SUPP = 65533, 65532, 65531
OTHER = 2000  # a group the caller is not in

#: Run by /usr/bin/python3 as the caller, in the directory under test.
OPS = r"""
import json, os, stat, sys
os.chdir(sys.argv[1])
UID, SUPP, OTHER = map(int, sys.argv[2:5])
os.umask(0o022)
steps = []
def step(label, fn, *args):
    try:
        fn(*args)
        steps.append([label, 0])
    except OSError as e:
        steps.append([label, e.errno])
def create(path, mode):
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
def append(path):
    with open(path, "a") as f:
        f.write("z")
step("create", create, "grp/f", 0o644)
step("mkdir", os.mkdir, "grp/d")
step("mkfifo", os.mkfifo, "grp/p")
step("symlink", os.symlink, "f", "grp/s")
step("link", os.link, "grp/f", "grp/h")
step("rename", os.rename, "grp/h", "grp/h2")
step("rename-dir", os.rename, "grp/d", "sg/d2")
step("unlink", os.unlink, "grp/s")
step("sg-create", create, "sg/f", 0o644)
step("sg-create-setgid", create, "sg/g", 0o2755)
step("sg-mkdir", os.mkdir, "sg/d")
step("sg-mkfifo", os.mkfifo, "sg/p")
step("sg-symlink", os.symlink, "f", "sg/s")
step("sg-link", os.link, "sg/f", "sg/h")
step("sg-chmod", os.chmod, "sg/f", 0o2755)
step("other-sg-create-setgid", create, "osg/g", 0o2755)
step("rmdir", os.rmdir, "sg/d2")
step("chgrp", os.chown, "suidgid", -1, SUPP)
step("chown", os.chown, "suid", UID, SUPP)
step("chgrp-sgid", os.chown, "sgid", -1, SUPP)
step("chgrp-not-member", os.chown, "owned", -1, OTHER)
step("chown-not-owner", os.chown, "grp/shared", UID, -1)
step("chmod", os.chmod, "owned", 0o640)
step("chmod-not-owner", os.chmod, "grp/shared", 0o666)
step("utimes", os.utime, "owned", (981173106, 981173106))
step("truncate", os.truncate, "grp/shared", 2)
step("append", append, "grp/shared")
tree = []
for dirpath, dirs, files in sorted(os.walk(".")):
    for name in sorted(dirs + files):
        p = os.path.join(dirpath, name)
        st = os.lstat(p)
        size = None if stat.S_ISDIR(st.st_mode) else st.st_size
        tree.append([p, st.st_mode, st.st_uid, st.st_gid, size])
print(json.dumps({"steps": steps, "tree": tree, "owned_mtime": os.stat("owned").st_mtime_ns}))
"""


def setup(top: Path) -> None:
    """As root: the directories and files the caller works on."""
    for name, gid, mode in (("grp", SUPP, 0o770), ("sg", SUPP, 0o2770), ("osg", OTHER, 0o2777)):
        (top / name).mkdir()
        os.chown(top / name, 0, gid)
        os.chmod(top / name, mode)
    (top / "grp/shared").write_text("data")
    os.chown(top / "grp/shared", 0, SUPP)
    os.chmod(top / "grp/shared", 0o660)
    for name, mode in (("suidgid", 0o6755), ("suid", 0o4755), ("sgid", 0o2755), ("owned", 0o644)):
        (top / name).write_text("#!/bin/sh\n")
        os.chown(top / name, UID, GID)
        os.chmod(top / name, mode)


def run_as_caller(top: Path) -> dict[str, object]:
    r = subprocess.run(
        [
            *("setpriv", f"--reuid={UID}", f"--regid={GID}", f"--groups={GID},{SUPP}"),
            *("/usr/bin/python3", "-c", OPS, str(top), str(UID), str(SUPP), str(OTHER)),
        ],
        capture_output=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr.decode()
    out: dict[str, object] = json.loads(r.stdout)
    return out


@pytest.fixture(scope="module")
def mount_and_ref() -> Iterator[tuple[Path, Path, Path]]:
    base = Path(tempfile.mkdtemp(prefix="creds-host-"))
    os.chmod(base, 0o755)
    share, mnt, ref = base / "share", base / "mnt", base / "ref"
    for d in (share, mnt, ref):
        d.mkdir(mode=0o755)
    try:
        with mounted(share, mnt):
            yield share, mnt, ref
    finally:
        if is_mounted(mnt):
            os.system(f"umount -l {mnt}")
        shutil.rmtree(base)


def test_supplementary_groups_and_setgid_match_a_local_directory(
    mount_and_ref: tuple[Path, Path, Path],
) -> None:
    share, mnt, ref = mount_and_ref
    for top in (mnt / "c1", ref / "c1"):
        top.mkdir(mode=0o755)
        setup(top)
    ours, local = run_as_caller(mnt / "c1"), run_as_caller(ref / "c1")
    assert ours["steps"] == local["steps"]
    assert ours["tree"] == local["tree"]
    assert ours["owned_mtime"] == local["owned_mtime"]
    steps = dict(ours["steps"])  # type: ignore[arg-type]
    for ok in ("create", "mkdir", "link", "rename-dir", "sg-create-setgid", "chgrp", "truncate"):
        assert steps[ok] == 0, (ok, steps)
    for refused in ("chgrp-not-member", "chown-not-owner", "chmod-not-owner"):
        assert steps[refused] != 0, (refused, steps)
    tree = {row[0]: row[1:] for row in ours["tree"]}  # type: ignore[union-attr]
    # chgrp into a supplementary group: allowed, and setuid/setgid cleared
    assert tree["./suidgid"][:3] == [stat.S_IFREG | 0o755, UID, SUPP]
    # open(O_CREAT, 02755) in a setgid directory of a supplementary group keeps
    # S_ISGID; in one of a group the caller is not in, it goes
    assert tree["./sg/g"][:3] == [stat.S_IFREG | 0o2755, UID, SUPP]
    assert tree["./osg/g"][:3] == [stat.S_IFREG | 0o755, UID, OTHER]
    # the share itself holds the same
    st = os.lstat(share / "c1/sg/d")
    assert (st.st_uid, st.st_gid) == (UID, SUPP) and st.st_mode & stat.S_ISGID
