"""Smoke test of the benchmarks: their --quick runs complete and their JSON is whole."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import bench_adapters as bench
from benchmarks import bench_model, report

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_benchmark_writes_every_entry(tmp_path):
    out = tmp_path / "b.json"
    bench.main(["--quick", "--out", str(out), "--device", "cpu"])
    result = json.loads(out.read_text())

    entries = {(e["shape"], e["tokens"], e["rank"], e["method"]): e for e in result["entries"]}
    expected = {(f"{k}->{d}", tokens, rank, method) for k, d in bench.QUICK_SHAPES for tokens in (64, 256)
                for rank in (8, 32) for method in bench.METHODS}
    assert set(entries) == expected
    for key, entry in entries.items():
        assert entry["step_s"] > 0, key
        assert entry["memory"]["saved_activation_bytes"] > 0, key
        assert entry["flop_bound_vs_bare"] >= 1.0, key
        if not entry["method"].startswith("bare"):
            assert entry["delta_weight_s"] > 0, key
        assert all(math.isfinite(v) and v > 0 for v in entry["ratios"].values()), key
        assert bool(entry["verdicts"]) == (entry["method"] in bench.OPERATORS), key
        timed_alone = entry["method"] in bench.OPERATORS or entry["method"] in bench.STRAIGHTFORWARD.values()
        assert (entry.get("adapter_s", 0) > 0) == timed_alone, key
    assert result["environment"]["num_threads"] >= 1 and result["clock"] == "thread CPU time"
    assert result["noise"]["max_abs_deviation"] is not None
    assert result["noise"]["adapter_max_abs_deviation"] is not None
    assert "| 256→256 | 64 | 8 (64) |" in report.adapter_table(result)


def test_quick_model_benchmark(tmp_path):
    out = tmp_path / "m.json"
    bench_model.main(["--quick", "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [a["name"] for a in result["arms"]] == [name for name, _, _ in bench_model.ARMS]
    assert result["arms"][0]["vs_bare"] == 1.0 and result["arms"][0]["trainable_params"] == 0
    assert all(a["step_s"] > 0 and a["trainable_params"] > 0 for a in result["arms"][1:])
    assert "| MoRA rotate |" in report.model_table(result)


def test_operator_counts_are_the_dispatched_kernels(tmp_path):
    """count_ops: the bare layer's step is its two GEMMs, our sharing launches fewer than the straightforward one
    where r̂ divides k (r = 8 at 256→256: r̂ = 64), no adapter waits for the device."""
    from benchmarks import count_ops

    result = count_ops.main(["--shapes", "256x256", "--ranks", "8", "--tokens", "16", "--out", str(tmp_path / "c.json")])
    rows = {(row["rank"], row["method"]): row for row in result["rows"]}
    assert rows[(None, "bare")]["step"]["by_op"] == {"mm": 2}   # forward W x, backward ∂x = ∂y W (W frozen)
    assert all(row["step"]["host_syncs"] == 0 for row in rows.values())
    assert rows[(8, "share")]["step"]["ops"] < rows[(8, "share-sf")]["step"]["ops"]
    assert {"adapter", "delta_weight"} <= set(rows[(8, "rotate")])


def test_operator_ab_against_a_revision_runs_both(tmp_path):
    """ab_operators: the working tree's operators against HEAD's, one ratio per configuration."""
    from benchmarks import ab_operators

    result = ab_operators.main(["--rev", "HEAD", "--shapes", "64x96", "--ranks", "2", "--tokens", "16", "--rounds",
                                "1", "--out", str(tmp_path / "ab.json")])
    assert [row["operator"] for row in result["rows"]] == ["truncate", "share", "decouple", "rotate"]
    assert all(row["ratio"] > 0 and len(row["times"]["rev"]) == 1 for row in result["rows"])
