"""The README's benchmark tables are the rendering of the JSON in benchmarks/measured/ (one source)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from benchmarks import report

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tables_are_rendered_from_the_measured_json():
    results = report.measured_results()
    if not results:
        pytest.skip("no benchmark results in benchmarks/measured/ yet")
    text = README.read_text()
    assert report.replace_blocks(text, report.render(results)) == text, \
        "README's benchmark tables differ from benchmarks/measured/: python benchmarks/report.py"


def test_the_gpu_tables_are_rendered_from_the_measured_cuda_json():
    """docs/gpu.md's tables come from benchmarks/measured/cuda/ (H200 runs), each saying how MoRA was differentiated."""
    folder = README.parent / "benchmarks" / "measured" / "cuda"
    results = report.measured_results(folder)
    assert {r["settings"]["device"] for r in results} == {"cuda"} and len(results) == 6
    doc = README.parent / "docs" / "gpu.md"
    text = doc.read_text()
    assert report.replace_blocks(text, report.render(results)) == text, \
        "docs/gpu.md differs from benchmarks/measured/cuda/: python benchmarks/report.py --snapshot " \
        "benchmarks/measured/cuda --readme docs/gpu.md"
    assert text.count("MoRA's backward: `plain`") == 3 and text.count("MoRA's backward: `functions`") == 2


def test_every_measured_result_has_the_schema_the_tables_read():
    for result in report.measured_results():
        assert {"settings", "environment", "clock", "load_average"} <= set(result)
        if result.get("kind", "adapters") == "adapters":
            assert {"entries", "noise", "all_met", "targets"} <= set(result)
            for e in result["entries"]:
                assert {"shape", "tokens", "rank", "method", "step_s", "ratios", "verdicts",
                        "flop_bound_vs_bare"} <= set(e)
        else:
            assert [a["name"] for a in result["arms"]][:2] == ["bare", "LoRA"]


def test_replace_blocks_needs_the_markers():
    with pytest.raises(ValueError, match="bench:adapters"):
        report.replace_blocks("no markers here", {"adapters": "table"})
    text = "a\n<!-- bench:model -->\nold\n<!-- /bench:model -->\nb"
    assert report.replace_blocks(text, {"model": "new"}) == "a\n<!-- bench:model -->\nnew\n<!-- /bench:model -->\nb"


def test_a_new_result_replaces_only_the_old_results_it_overlaps(tmp_path):
    """make bench's parts each snapshot their own result: one part's run keeps the other parts' files."""
    snapshot = tmp_path / "measured"
    snapshot.mkdir()
    committed = {p.name: json.loads(p.read_text()) for p in report.MEASURED.glob("adapters_*.json")}
    for name, result in committed.items():
        (snapshot / name).write_text(json.dumps(result))
    (snapshot / "model.json").write_text((report.MEASURED / "model.json").read_text())
    part = copy.deepcopy(committed["adapters_float32_t2048.json"])  # one shape of the 2,048-token run
    part["settings"]["shapes"] = [[4096, 4096]]
    part["entries"] = [e for e in part["entries"] if (e["in_features"], e["out_features"]) == (4096, 4096)]
    new = tmp_path / "adapters_float32_t2048_4096x4096.json"
    new.write_text(json.dumps(part))
    readme = tmp_path / "README.md"
    readme.write_text("".join(f"<!-- bench:{kind} -->\n<!-- /bench:{kind} -->\n" for kind in ("adapters", "model")))
    report.main([str(new), "--snapshot", str(snapshot), "--readme", str(readme)])
    left = {p.name for p in snapshot.glob("*.json")}
    assert left == set(committed) - {"adapters_float32_t2048.json"} | {new.name, "model.json"}
    t256 = committed["adapters_float32_t256.json"]
    assert report.overlaps(t256, committed["adapters_float32_t256_4096x11008_r7.json"])  # one shape, more rounds
    assert not report.overlaps(committed["adapters_float32_t256.json"], committed["adapters_bfloat16.json"])
    assert readme.read_text().count("**float32**") == len([n for n in left if n.startswith("adapters_float32")])
