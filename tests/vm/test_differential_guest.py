"""Differential test in the guest: fsdiff.py against our share and the C virtiofsd's.

The Debian userland's python3 runs ``tests/support/fsdiff.py`` (stdlib only)
inside the guest: seeded random op sequences on ``/mnt/<tag>`` (virtio-fs)
and on ``/tmp/ref-<tag>`` (guest tmpfs), compared op by op and tree by tree.
pyvirtiofsd must not diverge; the C virtiofsd's divergences are its own
behaviour and are printed next to ours, not failed on.
"""

from __future__ import annotations

import json
from pathlib import Path

from pyvirtiofsd.vm.machine import Machine, MachineConfig
from pyvirtiofsd.vm.shares import Share

SUPPORT = Path(__file__).resolve().parents[1] / "support"
SEED, COUNT, LENGTH = 1, 200, 15


def test_fsdiff_pyvirtiofsd_and_c_virtiofsd_side_by_side(
    tmp_path: Path, no_leftover_processes: None
) -> None:
    shares = []
    for tag, backend in (("pydiff", "pyvirtiofsd"), ("cdiff", "virtiofsd")):
        (tmp_path / tag).mkdir()
        shares.append(Share(tmp_path / tag, tag, backend=backend))
    results: dict[str, tuple[int, dict[str, object], float]] = {}
    with Machine(MachineConfig(shares=shares, debian=True), name="fsdiff") as vm:
        for name in ("fsdiff.py", "fsdiff_expectations.json"):
            vm.agent.write_file(f"/debian/tmp/{name}", (SUPPORT / name).read_bytes())
        for tag in ("pydiff", "cdiff"):
            r = vm.debian_run(
                f"mkdir -p /tmp/ref-{tag} && python3 /tmp/fsdiff.py --where guest "
                f"--seed {SEED} --count {COUNT} --length {LENGTH} --check-every 5 "
                f"/mnt/{tag} /tmp/ref-{tag}",
                timeout=1500,
            )
            assert r.status in (0, 1), r
            results[tag] = (r.status, json.loads(r.text), r.elapsed)
    print(f"\nfsdiff in the guest (seed {SEED}, {COUNT} x {LENGTH} ops):")
    for tag, backend in (("pydiff", "pyvirtiofsd"), ("cdiff", "C virtiofsd")):
        status, summary, took = results[tag]
        verdict = "no divergence" if status == 0 else "DIVERGED"
        print(f"  {backend:12} {summary['run']:>4} sequences in {took:6.1f} s: {verdict}")
        if status:
            print(json.dumps(summary, indent=1))
    status, summary, _ = results["pydiff"]
    assert status == 0, json.dumps(summary, indent=1)
    assert summary["run"] == COUNT
