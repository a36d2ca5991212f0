"""WindowAllocator: per-device swiotlb windows inside the guest's range below 4 GiB."""

from __future__ import annotations

import itertools
import pickle
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtiofsd.daemon.cli import parse_swiotlb
from pyvirtiofsd.dma import (
    DmaError,
    Window,
    WindowAllocator,
    WindowError,
    WindowExhausted,
    WindowFragmented,
)
from pyvirtiofsd.dma.windows import FOUR_GIB, OWNER_MAX, PAGE, SEGMENT, SLAB

KiB = 1 << 10
MiB = 1 << 20
BASE = 0x200_0000  # 32 MiB: segment aligned, as a guest's alloc_contig_pages range usually is
BDF = "0000:00:05.0"


def no_overlaps(ws: list[Window], base: int, end: int) -> None:
    assert ws == sorted(ws, key=lambda w: w.base)
    for w in ws:
        assert base <= w.base and w.end <= end and w.size > 0
    for a, b in itertools.pairwise(ws):
        assert a.end <= b.base, (a, b)


# ---------------------------------------------------------------- basics


def test_exports_and_hierarchy() -> None:
    assert issubclass(WindowError, DmaError)
    assert issubclass(WindowExhausted, WindowError)
    assert issubclass(WindowFragmented, WindowError)
    assert SLAB == 2048 and SEGMENT == 262144 and PAGE == 4096 and OWNER_MAX == 63


def test_first_window_and_formats() -> None:
    a = WindowAllocator(BASE, 64 * MiB)
    assert (a.base, a.size, a.free_bytes, a.largest_free, len(a)) == (BASE, 64 * MiB, 64 * MiB,
                                                                      64 * MiB, 0)  # fmt: skip
    w = a.allocate(BDF, 16 * MiB)
    assert w == Window(BDF, BASE, 16 * MiB)
    assert w.end == BASE + 16 * MiB
    assert w.swiotlb_arg() == "0x2000000,16777216"
    assert parse_swiotlb(w.swiotlb_arg()) == (w.base, w.size)
    assert w.assign_line() == "0000:00:05.0 0x2000000 16777216"
    assert a.get(BDF) == w and BDF in a and "nope" not in a and "bad owner" not in a
    assert a.free_bytes == 48 * MiB and len(a) == 1
    assert "0x2000000" in repr(a)


def test_size_rounded_up_to_segment() -> None:
    a = WindowAllocator(BASE, 4 * MiB)
    assert a.allocate("a", 1).size == SEGMENT
    assert a.allocate("b", SEGMENT + 1).size == 2 * SEGMENT
    assert a.allocate("c", SEGMENT).size == SEGMENT
    assert [w.base for w in a.windows()] == [BASE, BASE + SEGMENT, BASE + 3 * SEGMENT]


def test_windows_sorted_by_base() -> None:
    a = WindowAllocator(BASE, 4 * MiB)
    for o in "abcd":
        a.allocate(o, MiB)
    a.free("b")
    a.allocate("e", SEGMENT)  # lands in b's hole, before c and d
    ws = a.windows()
    assert [w.owner for w in ws] == ["a", "e", "c", "d"]
    no_overlaps(ws, BASE, BASE + 4 * MiB)


# ---------------------------------------------------------------- exhaustion / fragmentation


def test_exhaustion() -> None:
    a = WindowAllocator(BASE, 4 * MiB)
    a.allocate("a", 3 * MiB)
    a.allocate("b", MiB)
    assert a.free_bytes == 0 and a.largest_free == 0
    with pytest.raises(WindowExhausted, match="not enough free space") as e:
        a.allocate("c", 1)
    assert (e.value.requested, e.value.free_bytes, e.value.largest_free) == (1, 0, 0)
    a.free("b")
    with pytest.raises(WindowExhausted) as e:
        a.allocate("c", MiB + 1)  # rounds up past the 1 MiB free
    assert e.value.free_bytes == MiB
    assert a.allocate("c", MiB) == Window("c", BASE + 3 * MiB, MiB)


def test_fragmentation_names_largest_extent() -> None:
    a = WindowAllocator(BASE, 4 * MiB)
    a.allocate("A", MiB)
    a.allocate("B", MiB)
    a.allocate("C", 2 * MiB - SEGMENT)  # leaves a 256 KiB tail
    a.free("B")
    assert a.free_bytes == MiB + SEGMENT and a.largest_free == MiB
    with pytest.raises(WindowFragmented, match="largest free extent 0x100000 bytes") as e:
        a.allocate("D", MiB + SEGMENT)  # bigger than B's hole, not bigger than total free
    err = e.value
    assert (err.requested, err.free_bytes, err.largest_free, err.largest_fit) == (
        MiB + SEGMENT, MiB + SEGMENT, MiB, MiB)  # fmt: skip
    assert a.get("D") is None and len(a) == 2
    assert a.allocate("D", MiB).base == BASE + MiB


def test_fragmentation_by_alignment() -> None:
    # 2 MiB free in one piece, but not at a 2 MiB-aligned address.
    a = WindowAllocator(BASE, 4 * MiB)
    a.allocate("a", MiB)
    a.allocate("b", MiB, align=MiB)
    a.free("a")
    a.allocate("c", MiB)
    a.free("b")  # free: [BASE+1M, BASE+4M) = 3 MiB, one extent
    assert a.largest_free == 3 * MiB
    assert a.largest_fit(align=2 * MiB) == 2 * MiB
    assert a.largest_fit(align=4 * MiB) == 0
    with pytest.raises(WindowFragmented, match=r"\(0x0 usable at this alignment\)"):
        a.allocate("d", MiB, align=4 * MiB)


def test_errors_pickle() -> None:
    a = WindowAllocator(BASE, MiB)
    with pytest.raises(WindowExhausted) as e:
        a.allocate("a", 2 * MiB)
    back = pickle.loads(pickle.dumps(e.value))
    assert type(back) is WindowExhausted and str(back) == str(e.value)
    assert back.free_bytes == MiB and back.requested == 2 * MiB


# ---------------------------------------------------------------- alignment


@pytest.mark.parametrize("align", [SLAB, PAGE, 8 * KiB, 64 * KiB, SEGMENT, MiB, 16 * MiB])
def test_results_aligned(align: int) -> None:
    a = WindowAllocator(BASE + PAGE, 128 * MiB - PAGE)  # page aligned only
    for i in range(6):
        w = a.allocate(f"dev{i}", 300 * KiB, align=align)
        assert w.base % max(align, PAGE) == 0
        assert w.size % SEGMENT == 0 and w.size >= 300 * KiB
    no_overlaps(a.windows(), a.base, a.base + a.size)


def test_unaligned_range_base() -> None:
    base = BASE + 5 * PAGE  # page aligned, not segment aligned
    a = WindowAllocator(base, 4 * MiB)
    w = a.allocate("a", MiB)
    assert w.base == BASE + SEGMENT  # first segment-aligned address inside the range
    small = a.allocate("b", SEGMENT, align=PAGE)  # the 236 KiB head is too small for a segment
    assert small.base == w.end
    # The 236 KiB head stays free (too small for any window); the tail is the largest extent.
    assert a.largest_free == (base + 4 * MiB) - small.end
    assert a.free_bytes == 4 * MiB - MiB - SEGMENT


def test_slab_align_means_page() -> None:
    a = WindowAllocator(BASE, MiB)
    a.allocate("a", SEGMENT)
    w = a.allocate("b", SEGMENT, align=SLAB)
    assert w.base % PAGE == 0


@pytest.mark.parametrize("align", [0, 1, 1024, 3 * PAGE, SEGMENT + PAGE, SLAB - 1])
def test_bad_align_refused(align: int) -> None:
    a = WindowAllocator(BASE, MiB)
    with pytest.raises(WindowError, match="power of two of at least 2 KiB"):
        a.allocate("a", SEGMENT, align=align)
    assert len(a) == 0


@pytest.mark.parametrize("align", [-1, 1 << 64])
def test_align_out_of_u64_refused(align: int) -> None:
    with pytest.raises(WindowError, match="align"):
        WindowAllocator(BASE, MiB).allocate("a", SEGMENT, align=align)


def test_huge_align() -> None:
    # 2**63 is a valid power of two: only address 0 satisfies it.
    with pytest.raises(WindowFragmented):
        WindowAllocator(BASE, MiB).allocate("a", SEGMENT, align=1 << 63)
    assert WindowAllocator(0, MiB).allocate("a", SEGMENT, align=1 << 63).base == 0


# ---------------------------------------------------------------- free / reuse / owners


def test_reuse_after_free() -> None:
    a = WindowAllocator(BASE, 16 * MiB)
    w1 = a.allocate("a", MiB)
    w2 = a.allocate("b", 2 * MiB)
    a.allocate("c", MiB)
    assert a.free("b") == w2
    assert a.get("b") is None
    assert a.allocate("b", 2 * MiB) == w2  # same base back
    assert a.free("a") == w1
    assert a.allocate("a2", MiB).base == w1.base


def test_free_unknown() -> None:
    a = WindowAllocator(BASE, MiB)
    with pytest.raises(WindowError, match="owner has no window"):
        a.free(BDF)
    a.allocate(BDF, SEGMENT)
    a.free(BDF)
    with pytest.raises(WindowError, match="owner has no window"):
        a.free(BDF)
    assert a.free_bytes == MiB


def test_duplicate_owner() -> None:
    a = WindowAllocator(BASE, 4 * MiB)
    w = a.allocate(BDF, MiB)
    with pytest.raises(WindowError, match="already has a window"):
        a.allocate(BDF, MiB)
    assert a.windows() == [w] and a.free_bytes == 3 * MiB


@pytest.mark.parametrize("owner", ["", "x" * (OWNER_MAX + 1), "a b", "a\nb", "a\0b", "dév", "\t"])
def test_bad_owner(owner: str) -> None:
    a = WindowAllocator(BASE, MiB)
    with pytest.raises(WindowError, match="owner id"):
        a.allocate(owner, SEGMENT)
    with pytest.raises(WindowError, match="owner id"):
        a.free(owner)
    with pytest.raises(WindowError, match="owner id"):
        a.get(owner)
    assert owner not in a


def test_owner_limits() -> None:
    a = WindowAllocator(BASE, MiB)
    long = "x" * OWNER_MAX
    assert a.allocate(long, SEGMENT).owner == long
    assert a.get(long) is not None
    with pytest.raises(TypeError):
        a.allocate(b"0000:00:05.0", SEGMENT)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        a.allocate("a", 1.0)  # type: ignore[arg-type]


# ---------------------------------------------------------------- sizes, range, overflow


@pytest.mark.parametrize("size", [0, -1, 1 << 64, 1 << 100])
def test_bad_size_refused(size: int) -> None:
    with pytest.raises(WindowError) as e:
        WindowAllocator(BASE, MiB).allocate("a", size)
    assert not isinstance(e.value, WindowExhausted)


@pytest.mark.parametrize("size", [(1 << 64) - 1, (1 << 64) - SEGMENT, 1 << 63, 1 << 32, MiB + 1])
def test_huge_size_exhausted(size: int) -> None:
    a = WindowAllocator(BASE, MiB)
    with pytest.raises(WindowExhausted) as e:
        a.allocate("a", size)
    assert e.value.requested == size and len(a) == 0


def test_boundary_at_4gib() -> None:
    a = WindowAllocator(FOUR_GIB - 16 * MiB, 16 * MiB)
    w = a.allocate("a", 16 * MiB)
    assert w.end == FOUR_GIB
    assert w.swiotlb_arg() == "0xff000000,16777216"
    with pytest.raises(WindowExhausted):
        a.allocate("b", 1)
    whole = WindowAllocator(0, FOUR_GIB)
    assert whole.allocate("all", FOUR_GIB) == Window("all", 0, FOUR_GIB)


@pytest.mark.parametrize(
    ("base", "size"),
    [
        (FOUR_GIB - 16 * MiB, 16 * MiB + PAGE),  # ends above 4 GiB
        (FOUR_GIB, PAGE),
        (0, FOUR_GIB + 1),
        ((1 << 64) - PAGE, 2 * PAGE),  # base + size wraps u64
        ((1 << 64) - PAGE, (1 << 64) - 1),
        (BASE, 0),  # empty
        (BASE + 1, MiB),  # not page aligned
        (BASE + SLAB, MiB),
    ],
)
def test_bad_range_refused(base: int, size: int) -> None:
    with pytest.raises(WindowError, match="swiotlb range"):
        WindowAllocator(base, size)


@pytest.mark.parametrize(("base", "size"), [(-PAGE, MiB), (BASE, -1), (1 << 64, PAGE),
                                            (BASE, 1 << 64)])  # fmt: skip
def test_range_out_of_u64_refused(base: int, size: int) -> None:
    with pytest.raises(WindowError):
        WindowAllocator(base, size)


def test_range_not_a_segment_multiple() -> None:
    # A tail shorter than a segment is never handed out.
    a = WindowAllocator(BASE, MiB + 3 * PAGE)
    a.allocate("a", MiB)
    assert a.free_bytes == a.largest_free == 3 * PAGE and a.largest_fit(align=PAGE) == 0
    with pytest.raises(WindowExhausted):
        a.allocate("b", 1, align=PAGE)


# ---------------------------------------------------------------- model-based


def align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


class Model:
    """Pure-Python first fit with the same rules as the C core."""

    def __init__(self, base: int, size: int) -> None:
        self.base, self.end = base, base + size
        self.ws: dict[str, Window] = {}

    def allocate(self, owner: str, size: int, align: int) -> Window | str:
        if owner in self.ws:
            return "duplicate"
        rsize = align_up(size, SEGMENT)
        ordered = sorted(self.ws.values(), key=lambda w: w.base)
        if rsize > (self.end - self.base) - sum(w.size for w in ordered):
            return "exhausted"
        a = max(align, PAGE)
        starts = [self.base] + [w.end for w in ordered]
        stops = [w.base for w in ordered] + [self.end]
        for start, stop in zip(starts, stops, strict=True):
            b = align_up(start, a)
            if b < stop and stop - b >= rsize:
                self.ws[owner] = Window(owner, b, rsize)
                return self.ws[owner]
        return "fragmented"

    def free(self, owner: str) -> Window | None:
        return self.ws.pop(owner, None)


OWNERS = [f"0000:00:{i:02x}.0" for i in range(8)]
ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("alloc"),
            st.sampled_from(OWNERS),
            st.one_of(st.integers(1, 6 * MiB), st.sampled_from([SEGMENT, MiB, 2 * MiB])),
            st.sampled_from([SLAB, PAGE, 64 * KiB, SEGMENT, MiB, 2 * MiB]),
        ),
        st.tuples(st.just("free"), st.sampled_from(OWNERS), st.just(0), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, head=st.integers(0, 63), size_segments=st.integers(1, 48))
def test_random_sequence_matches_model(
    ops: list[tuple[str, str, int, int]], head: int, size_segments: int
) -> None:
    base = BASE + head * PAGE
    size = size_segments * SEGMENT + (head * PAGE) % SEGMENT
    a, m = WindowAllocator(base, size), Model(base, size)
    errors = {"exhausted": WindowExhausted, "fragmented": WindowFragmented}
    for op, owner, n, align in ops:
        if op == "alloc":
            want = m.allocate(owner, n, align)
            if isinstance(want, Window):
                assert a.allocate(owner, n, align) == want
            else:
                with pytest.raises(errors.get(want, WindowError)) as e:
                    a.allocate(owner, n, align)
                if want == "duplicate":
                    assert type(e.value) is WindowError
        else:
            gone = m.free(owner)
            if gone is None:
                with pytest.raises(WindowError):
                    a.free(owner)
            else:
                assert a.free(owner) == gone
        ws = a.windows()
        assert ws == sorted(m.ws.values(), key=lambda w: w.base)
        no_overlaps(ws, base, base + size)
        assert a.free_bytes == size - sum(w.size for w in ws)


# ---------------------------------------------------------------- threads


def test_threads_never_overlap() -> None:
    size = 32 * MiB  # smaller than the threads' peak demand: some requests fail
    a = WindowAllocator(BASE, size)
    stop = threading.Event()
    failures: list[BaseException] = []

    def worker(t: int) -> None:
        held: dict[str, Window] = {}
        try:
            for i in range(300):
                owner = f"t{t}-{i % 3}"
                if owner in held:
                    assert a.free(owner) == held.pop(owner)
                try:
                    w = a.allocate(owner, (1 + (i * 7 + t) % 9) * SEGMENT,
                                   align=[PAGE, SEGMENT, MiB][i % 3])  # fmt: skip
                except (WindowExhausted, WindowFragmented):
                    continue
                assert a.get(owner) == w
                held[owner] = w
            for owner, w in held.items():
                assert a.free(owner) == w
        except BaseException as e:
            failures.append(e)

    def checker() -> None:
        try:
            while not stop.is_set():
                no_overlaps(a.windows(), BASE, BASE + size)
        except BaseException as e:
            failures.append(e)

    chk = threading.Thread(target=checker)
    chk.start()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stop.set()
    chk.join()
    assert not failures, failures
    assert a.windows() == [] and a.free_bytes == size and a.largest_free == size
