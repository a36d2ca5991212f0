"""``make bench [SUITE=daemon|guest|dma|all] [BENCH_ARGS=...]``.

``daemon`` (:mod:`pyvirtiofsd.bench.daemon`): the daemon alone over its
vhost-user socket, no guest, against the C and the Rust virtiofsd.
``guest`` (:mod:`pyvirtiofsd.vm.bench`): dd in a QEMU guest, the same peers
plus 9p, and pyvirtiofsd in each DMA mode. ``dma``
(:mod:`pyvirtiofsd.bench.dma`): two shares and a NIC loaded at once in each
DMA mode with equal bounce memory, the memory shrunk until the shared pool
fails, and 1 vs 2 request queues. ``all`` runs daemon and guest into one
``<build>/bench/<stamp>/`` directory (``dma`` only when named: it boots a
guest per mode and round). Options of any suite may be given; each suite
takes its own.
"""

from __future__ import annotations

import argparse
import sys
import time

from pyvirtiofsd.vm import bench as guest
from pyvirtiofsd.vm.paths import build_dir

from . import daemon, dma

SUITES = ("daemon", "guest", "dma", "all")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pyvirtiofsd.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[daemon.build_parser(), guest.build_parser(), dma.build_parser()],
    )
    ap.add_argument("--suite", choices=SUITES, default="all")
    args = ap.parse_args(argv)
    out = build_dir() / "bench" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    texts = []
    if args.suite in ("daemon", "all"):
        texts.append(daemon.run_suite(args, out))
    if args.suite in ("guest", "all"):
        texts.append(guest.run_suite(args, out))
    if args.suite == "dma":
        texts.append(dma.run_suite(args, out))
    print("\n".join(texts), end="")
    print(f"[bench] results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
