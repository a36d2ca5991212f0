"""pyvirtiofsd-vm's run command, with the Machine replaced by a recording fake."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from pyvirtiofsd.vm import cli
from pyvirtiofsd.vm.agent import CommandResult
from pyvirtiofsd.vm.kernel import KERNEL_VERSIONS, KernelImage
from pyvirtiofsd.vm.machine import MachineConfig
from pyvirtiofsd.vm.swiotlb import SwiotlbError


class FakeAgent:
    def __init__(self) -> None:
        self.commands: list[str] = []

    def run(self, command: str, **kw: Any) -> CommandResult:
        self.commands.append(command)
        return CommandResult(command, 3, b"guest out\n", b"")


class FakeMachine:
    seen: list[FakeMachine] = []

    def __init__(self, config: MachineConfig, name: str = "guest") -> None:
        self.config = config
        self.agent = FakeAgent()
        self.boot_seconds = 1.0
        self.accel = "tcg"
        self.log_dir = Path("/nonexistent")
        FakeMachine.seen.append(self)

    def __enter__(self) -> FakeMachine:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        pass


def test_run_passes_options_and_returns_the_guest_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "Machine", FakeMachine)
    FakeMachine.seen.clear()
    rc = cli.main(["run", "--share", f"{tmp_path}:data", "--backend", "9p", "--iommu-platform",
                   "--queues", "2", "--dma-mode", "shared", "--kernel", "/k/bzImage",
                   "--kernel-arg", "swiotlb=force", "--cmd", "ls /mnt/data"])  # fmt: skip
    assert rc == 3
    assert capsys.readouterr().out == "guest out\n"
    (vm,) = FakeMachine.seen
    (share,) = vm.config.shares
    assert (share.host_dir, share.tag, share.backend) == (tmp_path, "data", "9p")
    assert share.iommu_platform and share.num_request_queues == 2
    assert vm.config.kernel == Path("/k/bzImage")
    assert list(vm.config.kernel_args) == ["swiotlb=force"]
    assert not vm.config.interactive
    assert vm.config.dma_mode == "shared"
    assert vm.agent.commands == ["ls /mnt/data"]


def test_run_refuses_a_missing_share(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--share", str(tmp_path / "nope"), "--cmd", "true"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_run_passes_the_kernel_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "Machine", FakeMachine)
    FakeMachine.seen.clear()
    cli.main(["run", "--share", str(tmp_path), "--kernel-version", "6.12", "--cmd", "true"])
    cli.main(["run", "--share", str(tmp_path), "--cmd", "true"])
    assert [vm.config.kernel_version for vm in FakeMachine.seen] == ["6.12", None]
    with pytest.raises(SystemExit):
        cli.main(["run", "--kernel-version", "5.10", "--cmd", "true"])


def test_build_builds_every_kernel_version_unless_told_one(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    built: list[str | None] = []

    def fake_build(jobs: int | None = None, force: bool = False,
                   version: str | None = None) -> KernelImage:  # fmt: skip
        built.append(version)
        return KernelImage(Path(f"/k/{version}/bzImage"), Path("/k/config"), "key", 12.0)

    monkeypatch.setattr(cli, "build_kernel", fake_build)
    monkeypatch.setattr(cli, "build_initramfs", lambda: Path("/i/initramfs"))
    assert cli.main(["build"]) == 0
    assert built == list(KERNEL_VERSIONS)
    assert "built in 12 s" in capsys.readouterr().out
    built.clear()
    assert cli.main(["build", "--kernel-version", "6.1"]) == 0
    assert built == ["6.1"]


def test_run_reports_any_harness_error_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class RefusedWindow(FakeMachine):
        def __enter__(self) -> FakeMachine:
            raise SwiotlbError("guest refused swiotlb assignment")

    monkeypatch.setattr(cli, "Machine", RefusedWindow)
    assert cli.main(["run", "--share", str(tmp_path), "--cmd", "true"]) == 1
    assert "error: guest refused swiotlb assignment" in capsys.readouterr().err
