"""The wheel: every module and data file of the four packages, built without a
setuptools warning, and an installed copy that runs and finds its data.

Offline: ``pip wheel --no-build-isolation`` uses this venv's setuptools, wheel
and cffi (the dev extra), ``--no-index`` keeps pip off the network.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
PACKAGES = ("bench", "daemon", "dma", "vm")
#: what setuptools and pip print when something is off (package data outside
#: a listed package, "name as your package", deprecated configuration)
WARNING = re.compile(r"warn|deprecat|absent from|name as", re.IGNORECASE)


def _pip(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PIP_NO_INDEX": "1", "PIP_ROOT_USER_ACTION": "ignore"},
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A wheel built from a clean copy of the sources (no build/ or egg-info
    left in the checkout); returns it and the build's output."""
    src = tmp_path_factory.mktemp("src")
    junk = shutil.ignore_patterns("__pycache__", "*.so", "*.o", "_core.c", "*.egg-info")
    for name in PACKAGES:
        shutil.copytree(REPO / name, src / name, ignore=junk)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    r = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src), cwd=src)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = dist.glob("pyvirtiofsd-*.whl")
    return whl, r.stdout + r.stderr


def test_the_build_prints_no_warning(wheel: tuple[Path, str]) -> None:
    _, output = wheel
    assert not [line for line in output.splitlines() if WARNING.search(line)], output


def test_the_wheel_holds_every_module_and_data_file(wheel: tuple[Path, str]) -> None:
    whl, _ = wheel
    names = set(zipfile.ZipFile(whl).namelist())
    expected = set()
    for top in PACKAGES:
        for path in (REPO / top).rglob("*"):
            rel = path.relative_to(REPO)
            if not path.is_file() or "__pycache__" in rel.parts or path.name == "_core.c":
                continue  # _core.c: cffi's generated source, built into _core*.so
            shipped = path.suffix in (".py", ".c", ".h", ".json") or path.name == "py.typed"
            if shipped or rel.parts[:2] == ("vm", "guest"):
                expected.add(f"pyvirtiofsd/{rel}")
    assert "pyvirtiofsd/daemon/data/50-pyvirtiofsd.json" in expected
    assert "pyvirtiofsd/daemon/fuse/session.py" in expected
    assert expected - names == set()
    assert any(re.fullmatch(r"pyvirtiofsd/dma/_core\..*\.so", n) for n in names), names


def test_an_installed_wheel_runs_and_finds_its_data(
    wheel: tuple[Path, str], tmp_path: Path
) -> None:
    whl, _ = wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    r = _pip("--python", str(python), "install", "--no-deps", str(whl), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    # The dependencies (trio, cffi ...) come from this venv's site-packages,
    # after the throwaway venv's own: its pyvirtiofsd is the wheel's.
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    )  # fmt: skip
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = (
        "import importlib.resources, json, pyvirtiofsd.daemon as d;"
        "print(d.__file__);"
        "print(json.loads((importlib.resources.files(d) / 'data' / '50-pyvirtiofsd.json')"
        ".read_text())['type'])"
    )
    r = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    where, kind = r.stdout.split()
    assert Path(where).is_relative_to(venv) and kind == "fs"
    script = venv / "bin" / "pyvirtiofsd"
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("pyvirtiofsd "), r.stderr
    r = subprocess.run(
        [str(script), "--print-capabilities"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and '"type": "fs"' in r.stdout, r.stderr
