"""The fast fuzz driver (``driver.py``) on each harness, with a budget.

``make test`` gives each harness ``PYVIRTIOFSD_FUZZ_INPUTS`` inputs (default
3000); ``make fuzz`` runs this file under ASan + UBSan (``scripts/sanitize.sh``)
with 10^6 and keeps the figures in ``build/fuzz/<harness>.json``.
``PYVIRTIOFSD_FUZZ_SECONDS`` bounds each harness's wall time instead: the
count reached is then reported, not asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import driver

INPUTS = int(os.environ.get("PYVIRTIOFSD_FUZZ_INPUTS", "3000"))
SECONDS = os.environ.get("PYVIRTIOFSD_FUZZ_SECONDS")
OUT = Path(os.environ.get("PYVIRTIOFSD_BUILD_DIR", driver.ROOT / "build")) / "fuzz"


@pytest.mark.parametrize("harness", sorted(driver.HARNESSES))
def test_harness_finds_nothing(harness: str, request: pytest.FixtureRequest) -> None:
    out = OUT / f"{harness}.json"
    argv = [harness, "--inputs", str(INPUTS), "--coverage", str(min(INPUTS, 20_000))]
    argv += ["--json", str(out), "--seed", os.environ.get("PYVIRTIOFSD_FUZZ_SEED", "1")]
    if SECONDS:
        argv += ["--seconds", SECONDS]
    # A fresh interpreter (the sanitizer environment is inherited): code an
    # earlier test ran once (first-use set-up) would be missing from coverage.
    capman = request.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled():
        rc = subprocess.run(
            [sys.executable, "-m", "tests.fuzz.driver", *argv], cwd=driver.ROOT
        ).returncode
    figures = json.loads(out.read_text())
    assert figures["crashes"] == 0 and rc == 0, figures
    if not SECONDS:
        assert figures["inputs"] >= INPUTS, figures
    assert figures["coverage"]["percent"] > 40, figures
