"""Where the project's sources and build outputs live.

The build directory defaults to ``build/`` at the repository root and can be
moved with ``PYVIRTIOFSD_BUILD_DIR``. Everything generated (kernel, initramfs,
guest agent, run directories) goes below it; nothing outside the repository
and the build directory is written.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Repository root (the folder holding ``vm/``, ``daemon/``, ``dma/``).
REPO_ROOT = Path(__file__).resolve().parent.parent

KERNEL_CONFIG_DIR = REPO_ROOT / "kernel-config"
GUEST_SRC_DIR = Path(__file__).resolve().parent / "guest"


def build_dir() -> Path:
    """The build directory, created on first use."""
    d = Path(os.environ.get("PYVIRTIOFSD_BUILD_DIR", REPO_ROOT / "build")).resolve()
    d.mkdir(parents=True, exist_ok=True)
    return d
