"""The DMA contention suite's parts that need no guest: bounce sizing, what the
guest reports (dmesg, fio JSON, stats), verdicts, the shrink search, the
tables and plots, the arguments, and the NIC's loopback peer."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from pyvirtiofsd.bench import dma
from pyvirtiofsd.bench.__main__ import main as bench_main

MIB = 1 << 20
KIB = 1 << 10


# -- bounce memory ---------------------------------------------------------------
def test_windows_are_whole_segments_summing_to_the_total() -> None:
    seg = 256 * KIB
    assert dma.windows_for(64 * MIB) == {"a": 86 * seg, "b": 85 * seg, "net": 85 * seg}
    assert dma.windows_for(2 * MIB) == {"a": 3 * seg, "b": 3 * seg, "net": 2 * seg}
    assert dma.windows_for(MIB) == {"a": 2 * seg, "b": seg, "net": seg}
    for total in (MIB, 4 * MIB, 64 * MIB, 1 << 30):
        assert sum(dma.windows_for(total).values()) == total
    # not a power of two: the guest would round the shared pool up, unequal memory
    for bad in (48 * MIB, 3 * MIB, 0, -MIB):
        with pytest.raises(ValueError, match="power of two"):
            dma.windows_for(bad)
    with pytest.raises(ValueError, match="less than one 256 KiB segment per device"):
        dma.windows_for(512 * KIB)


@pytest.mark.parametrize("total", [MIB, 4 * MIB, 64 * MIB])
def test_shared_pool_and_windows_hold_the_same_bounce_memory(total: int) -> None:
    (shared,) = dma.bounce_kernel_args("shared", total)
    (per_device,) = dma.bounce_kernel_args("per-device", total)
    slabs = int(shared.removeprefix("swiotlb="))
    assert slabs * 2048 == total == sum(dma.windows_for(total).values())
    assert slabs & (slabs - 1) == 0  # a power of two: the kernel keeps it as it is
    assert int(per_device.removeprefix("virtio_swiotlb=")) == total
    assert dma.bounce_kernel_args("off", total) == ()
    with pytest.raises(ValueError, match="unknown DMA mode"):
        dma.bounce_kernel_args("dedicated", total)
    with pytest.raises(ValueError, match="power of two"):
        dma.bounce_kernel_args("shared", 3 * MIB)


def test_shrink_sizes_halve_powers_of_two_down_to_1_mib() -> None:
    assert dma.shrink_sizes(32 * MIB) == [32 * MIB, 16 * MIB, 8 * MIB, 4 * MIB, 2 * MIB, MIB]
    assert dma.shrink_sizes(3 * MIB) == [2 * MIB, MIB]  # rounded down to a power of two
    assert dma.shrink_sizes(512 * KIB) == []


# -- what the guest reports ------------------------------------------------------
DMESG = """\
[   12.000001] virtio-pci 0000:00:08.0: swiotlb buffer is full (sz: 4096 bytes), total 512 (slots), used 500 (slots)
[   12.000002] virtio-pci 0000:00:08.0: swiotlb buffer is full (sz: 4096 bytes), total 512 (slots), used 510 (slots)
[   12.000003] virtio-pci 0000:00:0a.0: swiotlb buffer is full (sz: 1536 bytes), total 512 (slots), used 512 (slots)
[   17.100000] swiotlb_tbl_map_single: 41 callbacks suppressed
[   17.100001] virtio-fs: virtio_fs_enqueue_req() failed -12
[   22.200000] swiotlb_tbl_map_single: 9 callbacks suppressed
[   22.300000] virtio-fs: virtio_fs_enqueue_req() failed -12
"""  # noqa: E501


def test_count_full_per_device_suppressed_and_enqueue_failures() -> None:
    counts = dma.count_full(DMESG)
    assert counts == {"0000:00:08.0": 2, "0000:00:0a.0": 1, "suppressed": 50, "enqueue_failed": 2}
    assert dma.total_full(counts) == 53
    assert dma.count_full("[ 1.0] virtio-pci 0000:00:08.0: probed\n") == {
        "suppressed": 0,
        "enqueue_failed": 0,
    }


def fio_json(**job: Any) -> str:
    base = {"jobname": "j", "error": 0, "job_runtime": 2000}
    return "fio-3.33 note: both iodepth >= 1 and synchronous I/O engine\n" + json.dumps(
        {"fio version": "fio-3.33", "jobs": [{**base, **job}]}
    )


def test_parse_fio_read_write_and_mixed_sides() -> None:
    pct = {"50.000000": 250000, "99.000000": 4000000}
    rw = dma.parse_fio(fio_json(
        read={"io_bytes": 6 * MIB, "iops": 3.0, "clat_ns": {"percentile": pct}},
        write={"io_bytes": 2 * MIB, "iops": 1.0, "clat_ns": {"percentile": {}}},
    ))  # fmt: skip
    (job,) = rw
    assert (job.read_bytes, job.write_bytes, job.iops) == (6 * MIB, 2 * MIB, 4.0)
    assert job.mib_s == pytest.approx(4.0)  # 8 MiB in 2 s
    assert (job.p50_us, job.p99_us) == (250.0, 4000.0)  # from the side with more bytes
    assert job.errors == 0
    mixed = dma.parse_fio(fio_json(
        read={"io_bytes": 0}, write={"io_bytes": 0}, total_err=7, error=5,
        mixed={"io_bytes": 4 * MIB, "iops": 512.0, "clat_ns": {"percentile": pct}},
    ))[0]  # fmt: skip
    assert (mixed.read_bytes, mixed.iops, mixed.p99_us, mixed.errors) == (4 * MIB, 512.0, 4000.0, 7)
    # without --continue_on_error: the error code only says "failed"
    assert dma.parse_fio(fio_json(error=5, read={}, write={}))[0].errors == 1
    with pytest.raises(ValueError, match="no JSON"):
        dma.parse_fio("fio: failed to open /mnt/b/rand.bin\n")


def test_queue_delta_between_stats_snapshots(tmp_path: Path) -> None:
    f = tmp_path / "stats.json"
    assert dma._queue_requests(f) == {}  # not written yet
    f.write_text(json.dumps({"pid": 1, "queues": {"0": {"requests": 3}, "1": {"requests": 10},
                                                  "2": {"requests": 4}}}))  # fmt: skip
    before = dma._queue_requests(f)
    assert before == {0: 3, 1: 10, 2: 4}
    assert dma.queue_delta(before, {0: 3, 1: 110, 2: 54, 3: 0}) == {"0": 0, "1": 100, "2": 50}
    assert dma.request_shares([{"0": 0, "1": 100, "2": 50}, {"0": 9, "1": 50, "2": 50}]) == (
        "q1 58%, q2 42%"
    )
    assert dma.request_shares([{"0": 5}]) == "-"


# -- verdicts and the shrink search ------------------------------------------------
def rec(mode: str = "shared", size: int = 64 * MIB, *, a: float = 10.0, b: float = 1.0,
        net: float = 5.0, full: int = 0, errors: int = 0, enqueue: int = 0,
        failure: str | None = None, **kw: Any) -> dict[str, Any]:  # fmt: skip
    r: dict[str, Any] = {
        "mode": mode, "total_bytes": size, "a_mib_s": a, "b_mib_s": b, "b_iops": b * 256,
        "b_p50_us": 300.0, "b_p99_us": 3000.0, "net_mib_s": net,
        "full": {"0000:00:08.0": full, "suppressed": 0, "enqueue_failed": enqueue},
        "errors": {"a": errors, "b": 0}, "hiwater": {}, "nslabs": {},
        "a_read_mib_s": a * 0.4, "a_write_mib_s": a * 0.6, **kw,
    }  # fmt: skip
    if failure:
        r["failure"] = failure
    return r


def test_verdict_fail_degraded_ok() -> None:
    assert dma.aggregate(rec()) == 16.0
    assert dma.verdict(rec(), None) == "ok"
    assert dma.verdict(rec(), 16.0) == "ok"
    assert dma.verdict(rec(a=2.0), 16.0) == "degraded"  # 8 < 0.8 x 16
    assert dma.verdict(rec(full=1), 16.0) == "degraded"
    assert dma.verdict(rec(errors=3), 16.0) == "fail"
    assert dma.verdict(rec(enqueue=1), 16.0) == "fail"
    assert dma.verdict(rec(net=0.0), 16.0) == "fail"  # a silent NIC
    assert dma.verdict(rec(failure="MachineError: boot"), 16.0) == "fail"


class FakeGuest:
    """shared fails from 4 MiB down, degrades at 8 MiB; per-device fails below 2 MiB."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, mode: str, size: int) -> dict[str, Any]:
        self.calls.append((mode, size))
        if mode == "shared":
            if size <= 4 * MIB:
                return rec(mode, size, errors=5, full=30)
            if size <= 8 * MIB:
                return rec(mode, size, full=2)
            return rec(mode, size)
        if size < 2 * MIB:
            return rec(mode, size, enqueue=4)
        return rec(mode, size, a=9.0)


SIZES = [32 * MIB, 16 * MIB, 8 * MIB, 4 * MIB, 2 * MIB, MIB]


def test_shrink_stops_after_the_size_where_shared_failed() -> None:
    guest = FakeGuest()
    recs = dma.shrink_search(list(reversed(SIZES)), guest)  # any order: largest first
    sizes_run = [s for _, s in guest.calls]
    assert sizes_run == sorted(sizes_run, reverse=True)
    assert set(sizes_run) == {32 * MIB, 16 * MIB, 8 * MIB, 4 * MIB}
    # both modes at every size, the order rotated from size to size
    assert guest.calls[:4] == [("shared", 32 * MIB), ("per-device", 32 * MIB),
                               ("per-device", 16 * MIB), ("shared", 16 * MIB)]  # fmt: skip
    assert [r["verdict"] for r in recs if r["mode"] == "shared"] == ["ok", "ok", "degraded", "fail"]
    b = dma.breakpoints(recs)
    assert b["shared"] == {"degrades": 8 * MIB, "fails": 4 * MIB, "smallest": 4 * MIB}
    assert b["per-device"] == {"degrades": None, "fails": None, "smallest": 4 * MIB}


def test_shrink_until_both_runs_only_the_survivor_after_shared_failed() -> None:
    guest = FakeGuest()
    recs = dma.shrink_search(SIZES, guest, until="both")
    after = [c for c in guest.calls if c[1] < 4 * MIB]
    assert after == [("per-device", 2 * MIB), ("per-device", MIB)]
    b = dma.breakpoints(recs)
    assert b["per-device"] == {"degrades": MIB, "fails": MIB, "smallest": MIB}
    assert b["shared"]["fails"] == 4 * MIB
    with pytest.raises(ValueError, match="until"):
        dma.shrink_search(SIZES, guest, until="off")


def test_shrink_reference_is_the_contention_runs_aggregate() -> None:
    # per-device gives 9 + 1 + 5 = 15 MiB/s; against a reference of 20 that is 0.75: degraded
    recs = dma.shrink_search([32 * MIB], FakeGuest(), references={"per-device": 20.0})
    assert {r["mode"]: r["verdict"] for r in recs} == {"shared": "ok", "per-device": "degraded"}


# -- tables and plots ------------------------------------------------------------
def contention_records() -> list[dict[str, Any]]:
    out = []
    for rnd, (off, shared, per) in enumerate([(30.0, 10.0, 14.0), (28.0, 12.0, 15.0),
                                              (32.0, 11.0, 16.0)]):  # fmt: skip
        out.append(rec("off", a=off, round=rnd))
        out.append(rec("shared", a=shared, full=4, round=rnd,
                       hiwater={"global": 700}, nslabs={"global": 768}))  # fmt: skip
        out.append(rec("per-device", a=per, round=rnd,
                       hiwater={"a": 250, "b": 10, "net": 120},
                       nslabs={"a": 256, "b": 256, "net": 256}))  # fmt: skip
    out.append(rec("shared", failure="MachineError: guest agent not ready", round=3))
    return out


def test_contention_table_medians_ranges_and_ratios() -> None:
    table = dma.contention_table(contention_records())
    lines = table.splitlines()
    assert lines[0] == "| metric | off | shared | per-device | per-device / shared | shared / off |"
    a = next(ln for ln in lines if ln.startswith("| share A"))
    assert a.split(" | ")[1:] == [
        "30.0 (28.0-32.0)", "11.0 (10.0-12.0)", "15.0 (14.0-16.0)", "1.36x", "0.37x |",
    ]  # fmt: skip
    agg = next(ln for ln in lines if ln.startswith("| aggregate"))
    assert "| 21.0 (20.0-22.0) | 1.24x |" in agg  # 15+1+5 vs 11+1+5: 21/17
    full = next(ln for ln in lines if ln.startswith('| "buffer is full"'))
    assert full.split(" | ")[1:4] == ["0", "4", "0"]
    assert "| high-water global (slots) | - | 700 / 768 | - |" in table
    assert "| high-water a (slots) | - | - | 250 / 256 |" in table
    assert "| runs (failed) | 3 (0) | 4 (1) | 3 (0) |" in table


def test_shrink_and_queues_tables() -> None:
    recs = dma.shrink_search(SIZES, FakeGuest(), until="both")
    table = dma.shrink_table(recs)
    assert (
        "| 4 MiB | A 1.5 / B 1.25 / NIC 1.25 | **fail**: 16.0 MiB/s (A 4 r + 6 w, "
        "B 256 IOPS p99 3000 us, NIC 5.0), full 30, errors 5 |"
    ) in table
    assert "| 1 MiB | A 0.5 / B 0.25 / NIC 0.25 | (not run) | **fail**" in table
    assert "- shared: degrades at 8 MiB, fails at 4 MiB (smallest run: 4 MiB)" in table
    assert "- per-device: degrades at 1 MiB, fails at 1 MiB (smallest run: 1 MiB)" in table
    queues = [
        {"workload": "randread", "queues": 1, "round": 0, "iops": 1000.0, "queue_counts": {}},
        {"workload": "randread", "queues": 2, "round": 0, "iops": 1500.0,
         "queue_counts": {"0": 1, "1": 500, "2": 500}},
        {"workload": "randwrite", "queues": 1, "round": 0, "iops": 400.0, "queue_counts": {}},
        {"workload": "randwrite", "queues": 2, "round": 0, "failure": "MachineError: x"},
    ]  # fmt: skip
    qt = dma.queues_table(queues)
    assert "| randread | 1000 | 1500 | 1.50x | q1 50%, q2 50% |" in qt
    assert "| randwrite | 400 | - | - | - |" in qt
    assert "- failed: randwrite 2q round 0: MachineError: x" in qt


def test_plots_are_written(tmp_path: Path) -> None:
    result = {
        "contention": contention_records(),
        "shrink": dma.shrink_search(SIZES, FakeGuest()),
        "queues": [{"workload": "randread", "queues": q, "round": 0, "iops": 100.0 * q}
                   for q in (1, 2)],
    }  # fmt: skip
    paths = dma.plot(result, tmp_path)
    assert [p.name for p in paths] == ["dma-contention.png", "dma-shrink.png", "dma-queues.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert dma.plot({"contention": [], "shrink": [], "queues": []}, tmp_path) == []


# -- arguments -------------------------------------------------------------------
def parse(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(parents=[dma.build_parser()])
    return dma.resolve_args(ap.parse_args(list(argv)))


def test_arguments_defaults_quick_and_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse()
    assert (args.dma_parts, args.dma_rounds, args.dma_duration) == (list(dma.PARTS), 3, 20.0)
    assert args.dma_shrink_mib is None
    quick = parse("--dma-quick", "--dma-parts", "shrink,queues")
    assert (quick.dma_rounds, quick.dma_duration) == (1, 8.0)
    assert quick.dma_shrink_mib == [4.0, 2.0, 1.0] and quick.dma_parts == ["shrink", "queues"]
    assert parse("--dma-shrink-mib", "8,1", "--dma-bounce-mib", "2").dma_shrink_mib == [8.0, 1.0]
    # an option given explicitly wins over --dma-quick
    mine = parse("--dma-quick", "--dma-rounds", "2", "--dma-shrink-mib", "8")
    assert (mine.dma_rounds, mine.dma_duration, mine.dma_shrink_mib) == (2, 8.0, [8.0])
    for bad in (["--dma-parts", "contention,latency"], ["--dma-rounds", "0"],
                ["--dma-duration", "-1"], ["--dma-shrink-mib", "3,x"],
                ["--dma-shrink-mib", "0"], ["--dma-shrink-until", "off"]):  # fmt: skip
        with pytest.raises(SystemExit):
            parse(*bad)
    err = capsys.readouterr().err
    assert "unknown part 'latency'" in err and "want > 0" in err
    with pytest.raises(SystemExit, match="less than one 256 KiB segment"):
        parse("--dma-bounce-mib", "0.5")
    with pytest.raises(SystemExit, match="power of two"):
        parse("--dma-bounce-mib", "48")
    with pytest.raises(SystemExit, match="power of two"):
        parse("--dma-shrink-mib", "4,3")


def test_bench_entry_point_knows_the_dma_suite(capsys: pytest.CaptureFixture[str]) -> None:
    # every suite's options side by side: the parsers must not clash
    with pytest.raises(SystemExit) as e:
        bench_main(["--suite", "dma", "--dma-quick", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "{daemon,guest,dma,all}" in out and "--dma-shrink-until" in out
    with pytest.raises(SystemExit):
        bench_main(["--suite", "dma", "--dma-parts", "nope"])


# -- the NIC's far end -------------------------------------------------------------
def test_loopback_peer_sinks_and_sources_on_127_0_0_1_only() -> None:
    peer = dma.LoopbackPeer()
    try:
        netdev = peer.netdev()
        assert netdev.startswith("user,id=n0,restrict=on,")
        assert netdev.endswith(f"guestfwd=tcp:10.0.2.100:9-tcp:127.0.0.1:{peer.port}")
        assert peer.listener.getsockname()[0] == "127.0.0.1"
        with socket.create_connection(("127.0.0.1", peer.port), timeout=10) as c:
            c.sendall(b"x" * 100_000)
            got = b""
            while len(got) < 200_000:
                chunk = c.recv(1 << 16)
                assert chunk, "the peer closed the connection"
                got += chunk
            assert set(got) == {0}
            c.shutdown(socket.SHUT_WR)  # the peer sees EOF once it read everything
            while c.recv(1 << 16):
                pass
        assert peer.received == 100_000
        assert peer.sent >= 200_000
    finally:
        peer.close()
