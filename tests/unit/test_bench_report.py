"""The benchmark's table: statistics over rounds, ratios, queue and failure notes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyvirtiofsd.bench.report import (
    Cell,
    Stats,
    fmt_value,
    markdown_table,
    plot,
    ratio,
    summarize,
)

PEERS = ["pyvirtiofsd", "virtiofsd", "rust-virtiofsd"]


def rec(peer: str, value: float, workload: str = "getattr", depth: int = 32, queues: int = 1,
        unit: str = "ops/s", **kw: Any) -> dict[str, Any]:  # fmt: skip
    return {"peer": peer, "workload": workload, "depth": depth, "queues": queues,
            "unit": unit, "value": value, "failure": 0, **kw}  # fmt: skip


def test_stats_min_median_max() -> None:
    assert Stats.of([3.0, 1.0, 2.0]) == Stats(1.0, 2.0, 3.0, 3)
    assert Stats.of([4.0, 1.0]).median == 2.5
    with pytest.raises(ValueError):
        Stats.of([])


def test_summarize_groups_by_cell_and_peer_in_order() -> None:
    records = [
        rec("pyvirtiofsd", 100.0), rec("virtiofsd", 400.0), rec("rust-virtiofsd", 200.0),
        rec("pyvirtiofsd", 300.0), rec("virtiofsd", 100.0), rec("rust-virtiofsd", 200.0),
        rec("pyvirtiofsd", 200.0), rec("virtiofsd", 250.0), rec("rust-virtiofsd", 250.0),
        rec("pyvirtiofsd", 5.0, workload="read-128k", unit="GB/s"),
    ]  # fmt: skip
    rows = summarize(records, PEERS)
    assert [r.cell for r in rows] == [Cell("getattr", 32, 1), Cell("read-128k", 32, 1)]
    first = rows[0]
    assert first.stats["pyvirtiofsd"] == Stats(100.0, 200.0, 300.0, 3)
    assert first.stats["virtiofsd"] == Stats(100.0, 250.0, 400.0, 3)
    # the ratio is of medians: 200 / 250 and 200 / 200
    assert ratio(first, "virtiofsd") == pytest.approx(0.8)
    assert ratio(first, "rust-virtiofsd") == pytest.approx(1.0)
    second = rows[1]
    assert second.unit == "GB/s" and second.stats["virtiofsd"] is None
    assert ratio(second, "virtiofsd") is None


def test_failures_are_counted_not_averaged() -> None:
    records = [
        rec("pyvirtiofsd", 100.0), rec("pyvirtiofsd", 0.0, failure=3),
        rec("virtiofsd", 50.0), rec("rust-virtiofsd", 0.0, failure=-1),
    ]  # fmt: skip
    (row,) = summarize(records, PEERS)
    assert row.stats["pyvirtiofsd"] == Stats(100.0, 100.0, 100.0, 1)
    assert row.failures == {"pyvirtiofsd": 1, "virtiofsd": 0, "rust-virtiofsd": 1}
    assert row.stats["rust-virtiofsd"] is None
    table = markdown_table([row], PEERS)
    line = table.splitlines()[2]
    assert line.split(" | ")[4:] == ["100 (1 failed)", "50", "- (1 failed)", "2.00", "- |"]


def test_table_marks_peers_measured_on_fewer_queues() -> None:
    records = [rec("pyvirtiofsd", 2e5, queues=2, queues_used=2),
               rec("virtiofsd", 1e5, queues=2, queues_used=1),
               rec("rust-virtiofsd", 1e5, queues=2, queues_used=1)]  # fmt: skip
    table = markdown_table(summarize(records, PEERS), PEERS)
    lines = table.splitlines()
    assert lines[0] == ("| workload | depth | queues | unit | pyvirtiofsd | virtiofsd | "
                        "rust-virtiofsd | py / virtiofsd | py / rust-virtiofsd |")  # fmt: skip
    assert lines[2] == "| getattr | 32 | 2 | ops/s | 200K | 100K [1q] | 100K [1q] | 2.00 | 2.00 |"
    assert any("offers only 1 request queue" in line for line in lines)


def test_value_formatting() -> None:
    assert fmt_value(None, "ops/s") == "-"
    assert fmt_value(Stats(1500.0, 1800.0, 2000.0, 3), "ops/s") == "1.8K (1.5K-2.0K)"
    assert fmt_value(Stats(3.0e5, 3.5e5, 4.0e5, 3), "ops/s") == "350K (300K-400K)"
    assert fmt_value(Stats(2.1e6, 2.1e6, 2.1e6, 1), "ops/s") == "2.10M"
    assert fmt_value(Stats(3.1, 3.456, 3.9, 2), "GB/s") == "3.46 (3.10-3.90)"


def test_plots_are_written_per_depth_and_queues(tmp_path: Path) -> None:
    records = [rec(p, v, depth=d) for d in (1, 32) for p, v in zip(PEERS, (1.0, 2.0, 3.0),
                                                                     strict=True)]  # fmt: skip
    files = plot(summarize(records, PEERS), PEERS, tmp_path, "daemon")
    assert sorted(f.name for f in files) == ["daemon-d1-q1.png", "daemon-d32-q1.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cells_the_load_generator_may_have_limited_are_marked() -> None:
    records = [rec("pyvirtiofsd", 2e6, loadgen_busy=0.97),
               rec("pyvirtiofsd", 2e6, loadgen_busy=0.95),
               rec("virtiofsd", 5e5, loadgen_busy=0.4), rec("rust-virtiofsd", 4e5)]  # fmt: skip
    (row,) = summarize(records, PEERS)
    assert row.busy == {"pyvirtiofsd": pytest.approx(0.96), "virtiofsd": pytest.approx(0.4)}
    lines = markdown_table([row], PEERS).splitlines()
    assert lines[2].split(" | ")[4:7] == ["2.00M (2.00M-2.00M) *", "500K", "400K"]
    assert any(line.startswith("*: the load generator") for line in lines)
