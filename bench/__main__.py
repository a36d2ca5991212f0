"""``make bench [SUITE=daemon|guest|all] [BENCH_ARGS=...]``.

``daemon`` (:mod:`pyvirtiofsd.bench.daemon`): the daemon alone over its
vhost-user socket, no guest, against the C and the Rust virtiofsd.
``guest`` (:mod:`pyvirtiofsd.vm.bench`): dd in a QEMU guest, the same peers
plus 9p, and pyvirtiofsd in each DMA mode. ``all`` runs both into one
``<build>/bench/<stamp>/`` directory. Options of either suite may be given;
each suite takes its own.
"""

from __future__ import annotations

import argparse
import sys
import time

from pyvirtiofsd.vm import bench as guest
from pyvirtiofsd.vm.paths import build_dir

from . import daemon

SUITES = ("daemon", "guest", "all")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pyvirtiofsd.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[daemon.build_parser(), guest.build_parser()],
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
    print("\n".join(texts), end="")
    print(f"[bench] results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
