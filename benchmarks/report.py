"""The README's benchmark tables, rendered from the benchmarks' JSON (the one source of their numbers).

``python benchmarks/report.py RESULT.json … --snapshot benchmarks/measured --readme README.md`` copies
each result into ``benchmarks/measured/`` (the files behind the README, committed; a new result replaces the
old ones it overlaps: a layer benchmark those of its device and dtype that share a (shape, tokens, rank) with it,
so ``make bench``'s parts keep each other's files; a whole-model one every old whole-model one) and rewrites the
README between the markers ``<!-- bench:adapters -->`` / ``<!-- /bench:adapters -->`` (layer
benchmark, bench_adapters.py) and ``<!-- bench:model -->`` / ``<!-- /bench:model -->`` (whole-model
step, bench_model.py). tests/test_bench_report.py fails when the README and the snapshot differ.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
from pathlib import Path

OPERATORS = ("truncate", "share", "decouple", "rotate")
MEASURED = Path(__file__).resolve().parent / "measured"


# Timed ratios carry the run's timing noise; memory is counted, not timed. A timed ratio above its target by no
# more than the noise band of the same run cannot be told from one that meets it: such a row reads "tie", and only
# a ratio beyond target + band is a miss. A run measures its noise two ways, and the band is the wider of them:
# - A/A: the bare layer timed against itself (steps and ΔW builds) and the sharing adapter timed against itself
#   (adapters alone). One pair is one draw of the noise: two idle runs of the same code moved the same 256-token
#   cells by up to 0.09 while their A/A pairs read 0.021 and 0.005 (README, "Benchmark").
# - Rounds: the spread of every configuration's times over its rounds (pooled), turned into two standard errors
#   of a ratio of two medians (see rounds_band): what the medians of that many rounds can resolve.
TIMED_TARGETS = ("step_vs_straightforward", "adapter_vs_straightforward", "delta_weight_vs_straightforward",
                 "delta_weight_vs_copy")
SHORT_NAMES = dict(step_vs_straightforward="step", adapter_vs_straightforward="adapter",
                   delta_weight_vs_straightforward="ΔW×sf", delta_weight_vs_copy="ΔW/copy", memory_vs_lora="mem")


def configuration_rounds(entries: list[dict], field: str) -> list[list[float]]:
    """Each configuration's times over its rounds (``field``: step_s_all or adapter_s_all) in a layer benchmark's
    entries; the bare layer, repeated per rank, counts once."""
    rounds = {}
    for e in entries:
        if e.get(field):
            rank = None if e["method"].startswith("bare") else e["rank"]
            rounds[(e["shape"], e["tokens"], rank, e["method"])] = e[field]
    return list(rounds.values())


def rounds_band(rounds: list[list[float]]) -> float:
    """Two standard errors of the ratio of two medians, from the pooled spread of configurations' rounds.

    σ² is the mean over configurations of the variance of log time across rounds. A median of R draws has
    standard error ≈ √(π/2)·σ/√R (normal draws), and the log-ratio of two independent medians √2 times that.
    Configurations of one round carry no spread and are left out; 0.0 when none is left.
    """
    rounds = [times for times in rounds if len(times) >= 2]
    if not rounds:
        return 0.0
    sigma = math.sqrt(statistics.mean(statistics.variance([math.log(t) for t in times]) for times in rounds))
    fewest = min(len(times) for times in rounds)
    return 2 * math.sqrt(2) * math.sqrt(math.pi / 2) * sigma / math.sqrt(fewest)


def noise_bands(result: dict) -> dict[str, float]:
    """{timed target: its band} of one run: the wider of the A/A deviation and :func:`rounds_band`.

    Steps and ΔW builds take the steps' band, the adapters alone their own (results from before the adapter
    timing have no adapter band; ΔW rounds are not kept, and ΔW's margins are wide).
    """
    noise, entries = result["noise"], result.get("entries", [])
    step = max(noise["max_abs_deviation"] or 0.0, rounds_band(configuration_rounds(entries, "step_s_all")))
    adapter = max(noise.get("adapter_max_abs_deviation") or 0.0,
                  rounds_band(configuration_rounds(entries, "adapter_s_all")))
    return {name: adapter if name == "adapter_vs_straightforward" else step for name in TIMED_TARGETS}


def target_outcomes(entries: list[dict], bands: dict[str, float]) -> dict[str, str]:
    """{target: 'met' | 'tie' | 'missed'} over the MoRA operator rows ``entries`` (the worst row decides)."""
    rank = {"met": 0, "tie": 1, "missed": 2}
    worst: dict[str, str] = {}
    for e in entries:
        for name, verdict in e["verdicts"].items():
            ratio, limit = e["ratios"][name], verdict["max"]
            outcome = ("met" if ratio <= limit else
                       "tie" if name in TIMED_TARGETS and ratio <= limit + bands[name] else "missed")
            worst[name] = max(worst.get(name, "met"), outcome, key=rank.__getitem__)
    return worst


def verdict_text(entries: list[dict], bands: dict[str, float]) -> str:
    """'ok', 'tie step (within ±band)' or 'MISS step, mem' for MoRA operator rows."""
    outcomes = target_outcomes(entries, bands)
    missed = [SHORT_NAMES[n] for n, o in outcomes.items() if o == "missed"]
    if missed:
        return "MISS " + ", ".join(missed)
    tied_by_band: dict[float, list[str]] = {}
    for name, outcome in outcomes.items():
        if outcome == "tie":
            tied_by_band.setdefault(bands[name], []).append(SHORT_NAMES[name])
    return "tie " + "; ".join(f"{', '.join(names)} (within ±{band:.3f})"
                              for band, names in tied_by_band.items()) if tied_by_band else "ok"


def overall_verdict(result: dict) -> str:
    """Whether every MoRA row of a run meets every target: yes, within the noise band, or no."""
    outcomes = target_outcomes([e for e in result["entries"] if e["verdicts"]], noise_bands(result)).values()
    return "no" if "missed" in outcomes else "within the noise band" if "tie" in outcomes else "yes"


def _cell(entry: dict, ratio: str, digits: int = 2) -> str:
    value = entry["ratios"].get(ratio)
    return "–" if value is None else f"{value:.{digits}f}"


def _bare_cell(entry: dict) -> str:
    return f"{entry['ratios']['step_vs_bare']:.2f} ({entry['flop_bound_vs_bare']:.2f})"


def _joined_cell(entries: list[dict], ratio: str) -> str:
    """'0.97 / 1.02 / …' over ``entries``, or '–' for a run from before the ratio was measured."""
    if not all(ratio in e["ratios"] for e in entries):
        return "–"
    return " / ".join(f"{e['ratios'][ratio]:.2f}" for e in entries)


def adapter_rows(result: dict) -> list[str]:
    """One row per (shape, tokens, rank): ×straightforward of each operator, ×bare beside its FLOP bound."""
    bands = noise_bands(result)
    groups: dict[tuple, dict] = {}
    for e in result["entries"]:
        groups.setdefault((e["in_features"], e["out_features"], e["tokens"], e["rank"]), {})[e["method"]] = e
    rows = []
    for (k, d, tokens, rank), by in groups.items():
        ops = [by[op] for op in OPERATORS]
        r_hats = sorted({e["r_hat"] for e in ops})
        cells = [f"{k}→{d}", f"{tokens:,}", f"{rank} ({'/'.join(map(str, r_hats))})",
                 *[_cell(e, "step_vs_straightforward") for e in ops], _joined_cell(ops, "adapter_vs_straightforward"),
                 *[_bare_cell(by[m]) for m in ("lora", "share", "rotate")],
                 f"{max(e['ratios']['memory_vs_lora'] for e in ops):.2f}",
                 f"{max(e['ratios']['delta_weight_vs_straightforward'] for e in ops):.2f}",
                 f"{max(e['ratios']['delta_weight_vs_copy'] for e in ops):.2f}",
                 verdict_text(ops, bands)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def adapter_table(result: dict) -> str:
    settings, env, load, noise = result["settings"], result["environment"], result["load_average"], result["noise"]
    bands = noise_bands(result)
    band_text = f"noise band ±{bands['step_vs_straightforward']:.3f}"
    if noise.get("adapter_max_abs_deviation") is not None:
        band_text = (f"noise bands: step ±{bands['step_vs_straightforward']:.3f} (A/A "
                     f"{noise['max_abs_deviation']:.3f}), adapter alone ±{bands['adapter_vs_straightforward']:.3f}"
                     " (A/A "
                     f"{noise['adapter_max_abs_deviation']:.3f}, median of {settings['adapter_repeats']} rounds)")
    header = ["k→d", "T", "r (r̂)", "truncate ×sf", "share ×sf", "decouple ×sf", "rotate ×sf",
              "adapter alone ×sf (trunc. / share / dec. / rot.)", "LoRA ×bare (FLOP)", "share ×bare (FLOP)",
              "rotate ×bare (FLOP)", "mem ×LoRA (max)", "ΔW ×sf (max)", "ΔW / copy (max)", "verdict"]
    lines = [f"**{settings['dtype']}**, {settings['device']} ({env['device_name']}, {env['num_threads']} thread), "
             f"{result['clock']}, median of {settings['repeats']} interleaved rounds; {autograd_text(settings)}"
             f"{band_text}; "
             f"load average {load['before'][0]} → {load['after'][0]} on {env['cpu_count']} cores; "
             f"all targets met: **{overall_verdict(result)}**",
             "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *adapter_rows(result)]
    return "\n".join(lines)


def autograd_text(settings: dict) -> str:
    """On CUDA, how MoRA was differentiated (mora/operators.py, GPU_AUTOGRAD), where the run recorded it."""
    mode = settings.get("gpu_autograd")
    return f"MoRA's backward: `{mode}`; " if settings.get("device") == "cuda" and mode else ""


def model_table(result: dict) -> str:
    settings, env, load = result["settings"], result["environment"], result["load_average"]
    lines = [f"{settings['layers']}-layer LLaMA (hidden {settings['hidden']}, intermediate "
             f"{settings['intermediate']}), all 7 projections adapted, {settings['batch']}×{settings['seq_len']} "
             f"tokens, rank {settings['rank']}, {settings['dtype']}, {env['device_name']}, {result['clock']}, "
             f"{autograd_text(settings)}"
             f"median of {settings['repeats']} interleaved rounds, noise band "
             f"±{rounds_band([arm['step_s_all'] for arm in result['arms']]):.3f} (2 SE of a ratio of medians); "
             f"load average {load['before'][0]} → "
             f"{load['after'][0]} on {env['cpu_count']} cores",
             "", "| arm | step ms | ×bare | ×LoRA |", "|---|---|---|---|"]
    for arm in result["arms"]:
        lines.append(f"| {arm['name']} | {arm['step_s'] * 1e3:.0f} | {arm['vs_bare']:.3f} | {arm['vs_lora']:.3f} |")
    return "\n".join(lines)


def render(results: list[dict]) -> dict[str, str]:
    """{marker: markdown} for the README blocks the results fill."""
    blocks: dict[str, list[str]] = {}
    for result in results:
        kind = result.get("kind", "adapters")
        blocks.setdefault(kind, []).append(adapter_table(result) if kind == "adapters" else model_table(result))
    return {kind: "\n\n".join(parts) for kind, parts in blocks.items()}


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    for kind, body in blocks.items():
        pattern = re.compile(rf"(<!-- bench:{kind} -->\n)(?:.*?\n)?(<!-- /bench:{kind} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README has no <!-- bench:{kind} --> … <!-- /bench:{kind} --> block")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def _cells(result: dict) -> set[tuple]:
    """What a result measured: a layer benchmark's (device, dtype, k, d, tokens, rank) cells from its settings;
    a whole-model benchmark one cell (its kind)."""
    if result.get("kind", "adapters") != "adapters":
        return {(result["kind"],)}
    settings = result["settings"]
    return {(settings["device"], settings["dtype"], k, d, tokens, rank) for k, d in settings["shapes"]
            for tokens in settings["tokens"] for rank in settings["ranks"]}


def overlaps(old: dict, new: dict) -> bool:
    """Whether the result ``new`` measured a cell that ``old`` measured too (it then replaces ``old``)."""
    return old.get("kind", "adapters") == new.get("kind", "adapters") and bool(_cells(old) & _cells(new))


def measured_results(folder: Path = MEASURED) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="*", type=Path, help="JSON files to snapshot (none: re-render)")
    parser.add_argument("--snapshot", type=Path, default=MEASURED)
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args(argv)
    args.snapshot.mkdir(parents=True, exist_ok=True)
    new_results = [json.loads(path.read_text()) for path in args.results]
    for old in args.snapshot.glob("*.json"):  # a new run replaces the old ones it overlaps (no stale cell is kept)
        if any(overlaps(json.loads(old.read_text()), new) for new in new_results):
            old.unlink()
    for path in args.results:
        shutil.copyfile(path, args.snapshot / path.name)
    blocks = render(measured_results(args.snapshot))
    args.readme.write_text(replace_blocks(args.readme.read_text(), blocks))
    print(f"{args.readme}: rewrote {', '.join(blocks)} from {args.snapshot}")


if __name__ == "__main__":
    main()
