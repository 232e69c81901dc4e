"""Smoke test of benchmarks/bench_adapters.py: the --quick run completes and its JSON is whole."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_adapters.py"


def load_bench():
    # benchmarks/ is a script folder, not a package: load the file by path. Registering it in
    # sys.modules first lets its dataclass resolve its own module.
    spec = importlib.util.spec_from_file_location("bench_adapters", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_writes_every_entry(tmp_path):
    bench = load_bench()
    out = tmp_path / "b.json"
    bench.main(["--quick", "--out", str(out), "--device", "cpu"])
    result = json.loads(out.read_text())

    entries = {(e["shape"], e["rank"], e["method"]): e for e in result["entries"]}
    expected = {(f"{k}->{d}", rank, method) for k, d in bench.QUICK_SHAPES
                for rank in (8, 32) for method in bench.METHODS}
    assert set(entries) == expected
    for key, entry in entries.items():
        assert entry["step_s"] > 0, key
        assert entry["memory"]["saved_activation_bytes"] > 0, key
        if entry["method"] != "bare":
            assert entry["delta_weight_s"] > 0, key
        assert entry["ratios"], key
        assert all(math.isfinite(v) and v > 0 for v in entry["ratios"].values()), key
    assert result["environment"]["num_threads"] >= 1
