"""Fixtures for tests that boot a real QEMU guest (TCG; KVM where it works)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtiofsd.vm.initramfs import build_initramfs
from pyvirtiofsd.vm.kernel import build_kernel
from pyvirtiofsd.vm.machine import resolve_kernel_version
from pyvirtiofsd.vm.process import children_of


@pytest.fixture(scope="session", autouse=True)
def guest_image() -> None:
    """Build (or find cached) kernel and initramfs once, before any boot.

    The kernel is the version the machines boot: ``$PYVIRTIOFSD_KERNEL_VERSION``
    or the default.
    """
    build_kernel(version=resolve_kernel_version(None))
    build_initramfs()


@pytest.fixture
def no_leftover_processes() -> Iterator[None]:
    """Assert the test left no child process of the test runner behind."""
    before = set(children_of(os.getpid()))
    yield
    leftover = set(children_of(os.getpid())) - before
    assert not leftover, f"processes left behind: {sorted(leftover)}"


@pytest.fixture
def share_dir(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def perf_table(request: pytest.FixtureRequest) -> Iterator[list[tuple[str, str, str]]]:
    """Rows (workload, backend, numbers) printed side by side at the end of the session.

    Tests comparing pyvirtiofsd with the C virtiofsd append to it; the table is
    written to the terminal even without ``-s``.
    """
    rows: list[tuple[str, str, str]] = []
    yield rows
    if not rows:
        return
    lines = ["", "== pyvirtiofsd vs C virtiofsd (guest-side numbers) =="]
    for workload, backend, numbers in sorted(rows):
        lines.append(f"{workload:<22} {backend:<12} {numbers}")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        print("\n".join(lines), flush=True)
