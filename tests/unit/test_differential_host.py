"""Differential test: the passthrough (host pyfuse3 mount) against a local directory.

Hypothesis draws op sequences from the vocabulary in ``tests/support/fsdiff.py``
and shrinks any divergence to a minimal one; the falsifying example it prints
is a ready-to-run reproducer::

    from tests.support import fsdiff
    fsdiff.run_sequence(MOUNTED_SHARE, REF_DIR, [...], xattr=True)

Runs are derandomized by default (the same 2,000 sequences every time, so CI
is reproducible); ``FSDIFF_SEED=<n>`` explores a different, random set and
prints the seed to rerun it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, seed, settings
from hypothesis import strategies as st

from pyvirtiofsd.daemon.hostmount import is_mounted, mounted
from tests.support import fsdiff

pytestmark = pytest.mark.skipif(
    not (os.path.exists("/dev/fuse") and shutil.which("fusermount3") and os.geteuid() == 0),
    reason="needs /dev/fuse, fusermount3 and root",
)

EXAMPLES = int(os.environ.get("FSDIFF_EXAMPLES", "2000"))
MAX_LENGTH = 40
SEED = os.environ.get("FSDIFF_SEED")


def _op(name: str) -> st.SearchStrategy[fsdiff.Op]:
    return st.tuples(st.just(name), *(st.sampled_from(list(pool)) for pool in fsdiff.OPS[name]))


def op_strategy(xattr: bool = True) -> st.SearchStrategy[fsdiff.Op]:
    # Heavier ops are listed more than once; one_of shrinks towards the front.
    names: list[str] = []
    for name in fsdiff.op_names(xattr):
        names += [name] * fsdiff.WEIGHTS.get(name, 1)
    return st.one_of([_op(n) for n in names])


# Hypothesis keeps single lists short (about 7 ops on average here); two
# concatenated lists double that and still shrink independently to nothing.
_half = st.lists(op_strategy(), max_size=MAX_LENGTH // 2)
sequences = st.tuples(_half, _half).map(lambda t: t[0] + t[1]).filter(bool)


@pytest.fixture(scope="module")
def share_and_ref() -> Iterator[tuple[str, str]]:
    base = Path(tempfile.mkdtemp(prefix="fsdiff-host-"))
    share, mnt, ref = base / "share", base / "mnt", base / "ref"
    for d in (share, mnt, ref):
        d.mkdir()
    try:
        with mounted(share, mnt, "--xattr"):
            yield str(mnt), str(ref)
    finally:
        if is_mounted(mnt):
            os.system(f"umount -l {mnt}")
        shutil.rmtree(base)


_stats = {"sequences": 0, "ops": 0, "started": 0.0}


@pytest.fixture(scope="module", autouse=True)
def _report() -> Iterator[None]:
    yield
    if _stats["sequences"]:
        took = time.monotonic() - _stats["started"]
        print(
            f"\nfsdiff host: {_stats['sequences']} sequences, {_stats['ops']} ops in {took:.1f} s"
        )


def _settings() -> settings:
    return settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=SEED is None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _seeded(fn):  # type: ignore[no-untyped-def]
    return seed(int(SEED))(fn) if SEED is not None else fn


@_seeded
@_settings()
@given(ops=sequences)
def test_passthrough_matches_local_fs(share_and_ref: tuple[str, str], ops: list[fsdiff.Op]) -> None:
    share, ref = share_and_ref
    if not _stats["started"]:
        _stats["started"] = time.monotonic()
        print(
            f"fsdiff: {'derandomized' if SEED is None else f'FSDIFF_SEED={SEED}'}, "
            f"{EXAMPLES} examples, up to {MAX_LENGTH} ops"
        )
    _stats["sequences"] += 1
    _stats["ops"] += len(ops)
    note(f"reproducer: fsdiff.run_sequence(share, ref, {ops!r}, xattr=True)")
    fsdiff.run_sequence(share, ref, ops, xattr=True, check_every=8, where="host")


def test_detects_and_reduces_a_divergence(tmp_path: Path) -> None:
    """The engine is not vacuous: a read-only share diverges, reduced to one op."""
    share, mnt, ref = tmp_path / "share", tmp_path / "mnt", tmp_path / "ref"
    for d in (share, mnt, ref):
        d.mkdir()
    ops: list[fsdiff.Op] = [
        ("stat", "a"),
        ("listdir", ""),
        ("mkdir", "d", 0o755),
        ("lstat", "d"),
        ("open", 0, "d/a", "creat", 0o644),
    ]
    with mounted(share, mnt, "--readonly"):
        with pytest.raises(fsdiff.Divergence) as err:
            fsdiff.run_sequence(str(mnt), str(ref), ops)
        assert err.value.index == 2
        assert err.value.share == ("err", "OSError", "EROFS")
        reduced, final = fsdiff.minimal_failure(str(mnt), str(ref), ops, err.value, xattr=False)
    assert reduced == [("mkdir", "d", 0o755)]
    assert final.index == 0
