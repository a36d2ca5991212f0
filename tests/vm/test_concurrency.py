"""Concurrent guest processes churn one tree on a share; nothing is lost or leaked.

Four guest processes create, write, append, truncate, rename and delete files
and directories in one tree for a bounded time, racing each other. Afterwards
the tree the guest sees (names, types, modes, sizes, SHA-256 of every file)
must equal the host directory, and once the guest unmounts the share the
daemon must hold exactly as many file descriptors as right after the mount
(no per-inode fd left open). Run against pyvirtiofsd and the C virtiofsd.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.process import children_of
from pyvirtiofsd.vm.shares import Share

BACKENDS = ["pyvirtiofsd", "virtiofsd"]
TAG = "conc"
WORKERS = 4
SECONDS = 60

WORKLOAD = r"""
import errno, json, os, random, sys, time, traceback
root, nworkers, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
TOP = [os.path.join(root, "d%d" % i) for i in range(4)]
for d in TOP:
    os.makedirs(d, exist_ok=True)
RACES = (errno.ENOENT, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR)

def dirs(rnd):
    top = rnd.choice(TOP)
    subs = [e.path for e in os.scandir(top) if e.is_dir(follow_symlinks=False)]
    return rnd.choice(subs) if subs and rnd.random() < 0.3 else top

def worker(wid):
    rnd = random.Random(wid * 7919)
    ops = dict.fromkeys(("create", "mkdir", "pwrite", "append", "truncate", "rename",
                         "unlink", "rmdir", "raced"), 0)
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            d = dirs(rnd)
            p = rnd.random()
            if p < 0.25:
                n += 1
                with open(os.path.join(d, "w%d-%d" % (wid, n)), "xb") as f:
                    f.write(rnd.randbytes(rnd.randrange(0, 65536)))
                ops["create"] += 1
                continue
            if p < 0.28 and d in TOP:
                n += 1
                os.mkdir(os.path.join(d, "s%d-%d" % (wid, n)))
                ops["mkdir"] += 1
                continue
            names = os.listdir(d)
            if not names:
                continue
            victim = os.path.join(d, rnd.choice(names))
            if p < 0.55:
                if os.path.isdir(victim):
                    os.rmdir(victim)
                    ops["rmdir"] += 1
                else:
                    os.unlink(victim)
                    ops["unlink"] += 1
            elif p < 0.70:
                target = os.path.join(rnd.choice(TOP), rnd.choice(names) if rnd.random() < 0.3
                                      else "r%d-%d" % (wid, n))
                n += 1
                os.rename(victim, target)
                ops["rename"] += 1
            elif p < 0.82:
                fd = os.open(victim, os.O_WRONLY)
                try:
                    os.pwrite(fd, rnd.randbytes(rnd.randrange(1, 16384)), rnd.randrange(0, 65536))
                finally:
                    os.close(fd)
                ops["pwrite"] += 1
            elif p < 0.92:
                with open(victim, "ab") as f:
                    f.write(rnd.randbytes(rnd.randrange(1, 8192)))
                ops["append"] += 1
            else:
                os.truncate(victim, rnd.randrange(0, 32768))
                ops["truncate"] += 1
        except OSError as e:
            if e.errno not in RACES:
                raise
            ops["raced"] += 1
    return ops

# os.fork and pipes: multiprocessing's locks need /dev/shm, absent in this guest
children = []
for i in range(nworkers):
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        status = 1
        try:
            os.write(wfd, json.dumps(worker(i)).encode())
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(wfd)
    children.append((pid, rfd))
results, bad = [], []
for pid, rfd in children:
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not data:
        bad.append(status)
    else:
        results.append(json.loads(data))
total = {k: sum(r[k] for r in results) for k in results[0]} if results else {}
print(json.dumps({"ops": total, "bad_exits": bad}))
"""

LISTING = r"""
import hashlib, json, os, stat, sys
root = sys.argv[1]
out = {}
for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
        p = os.path.join(dirpath, name)
        st = os.lstat(p)
        rel = os.path.relpath(p, root)
        if stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                h = hashlib.sha256(f.read()).hexdigest()
            out[rel] = ["f", oct(stat.S_IMODE(st.st_mode)), st.st_size, h]
        else:
            kind = "d" if stat.S_ISDIR(st.st_mode) else "?"
            out[rel] = [kind, oct(stat.S_IMODE(st.st_mode)), 0, ""]
print(json.dumps(out))
"""


def host_listing(root: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256(p.read_bytes()).hexdigest()
                out[rel] = ["f", oct(stat.S_IMODE(st.st_mode)), st.st_size, h]
            else:
                kind = "d" if stat.S_ISDIR(st.st_mode) else "?"
                out[rel] = [kind, oct(stat.S_IMODE(st.st_mode)), 0, ""]
    return out


def fds(pid: int) -> dict[str, str]:
    d = f"/proc/{pid}/fd"
    out = {}
    for n in os.listdir(d):
        with contextlib.suppress(FileNotFoundError):  # closed while listing
            out[n] = os.readlink(f"{d}/{n}")
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_churn_keeps_tree_and_fds(
    backend: str, tmp_path: Path, perf_table, record_property, no_leftover_processes: None
) -> None:
    root = tmp_path / "share"
    root.mkdir()
    os.chmod(root, 0o777)
    share = Share(root, TAG, backend=backend)
    mnt = f"/mnt/{TAG}"
    with Machine(MachineConfig(shares=[share], debian=True), name=f"churn-{backend}") as vm:
        pid = vm.daemons[0].process.pid
        # pyvirtiofsd's namespace sandbox serves from a child of the process
        # we started: count the fds of the one that holds the inodes
        pid = (children_of(pid) or [pid])[0]
        vm.agent.run(f"stat {mnt}", check=True)  # the root only: no child lookups
        baseline = fds(pid)
        vm.agent.write_file("/debian/tmp/churn.py", WORKLOAD.encode())
        vm.agent.write_file("/debian/tmp/listing.py", LISTING.encode())
        r = vm.debian_run(
            f"python3 /tmp/churn.py {mnt}/tree {WORKERS} {SECONDS}",
            timeout=SECONDS + 120,
        )
        assert r.status == 0, f"workload failed ({r.status}):\n{r.stderr.decode()[-4000:]}"
        result = json.loads(r.text.strip().splitlines()[-1])
        assert result["bad_exits"] == [], r.stderr.decode()[-4000:]
        ops = result["ops"]
        assert ops["create"] > 100 and ops["rename"] > 20 and ops["unlink"] > 20, ops
        busy = fds(pid)
        g = vm.debian_run(f"python3 /tmp/listing.py {mnt}/tree", timeout=300)
        assert g.status == 0, g.stderr.decode()[-4000:]
        guest_tree = json.loads(g.text)
        host_tree = host_listing(root / "tree")
        # unmount (bind in the chroot, then the share): the guest forgets every inode
        vm.agent.run(f"umount /debian{mnt} && umount {mnt}", check=True, timeout=120)
        after_umount = fds(pid)
        vm.mount(share)
        vm.agent.run(f"stat {mnt}", check=True)  # the root only: no child lookups
        after_remount = fds(pid)
        alive = vm.daemons[0].process.alive()
    assert alive
    assert len(guest_tree) > 50, len(guest_tree)
    only_guest = sorted(set(guest_tree) - set(host_tree))
    only_host = sorted(set(host_tree) - set(guest_tree))
    assert not only_guest and not only_host, (only_guest[:20], only_host[:20])
    differ = sorted(k for k in guest_tree if guest_tree[k] != host_tree[k])
    assert not differ, [(k, guest_tree[k], host_tree[k]) for k in differ[:20]]
    nfiles = sum(1 for v in host_tree.values() if v[0] == "f")
    ndirs = len(host_tree) - nfiles
    total_ops = sum(v for k, v in ops.items() if k != "raced")
    text = (
        f"{total_ops} ops in {r.elapsed:.0f} s ({total_ops / r.elapsed:.0f}/s; {ops}); "
        f"tree {nfiles} files {ndirs} dirs; daemon fds: mounted {len(baseline)}, "
        f"busy {len(busy)}, unmounted {len(after_umount)}, remounted {len(after_remount)}"
    )
    print(f"[churn] {backend}: {text}", flush=True)
    record_property(f"churn-{backend}", text)
    perf_table.append(("churn 4 procs", backend, text))
    extra = {k: v for k, v in after_umount.items() if baseline.get(k) != v}
    assert len(after_umount) <= len(baseline), f"fds left after umount: {extra}"
    assert len(after_remount) == len(baseline), (
        f"baseline {sorted(baseline.values())}\nremounted {sorted(after_remount.values())}"
    )
