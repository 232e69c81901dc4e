"""Speed and memory of MoRA's operators against the straightforward implementation, LoRA and the bare layer.

The paper claims MoRA trains in "almost the same time and memory" as LoRA thanks to its
non-parameter operators, with rotation (Eq. 9) up to ~1.15× slower at rank 8 (Section 8). peft's
LoRA is a weak yardstick on a CPU (its overhead is memory traffic, not arithmetic), so every MoRA
operator is also timed against the straightforward implementation of the same operator
(benchmarks/straightforward.py: pad-and-view-sum compression, concatenate-and-tile decompression,
one rotation per input block; same M, same x, the same output to float precision).

What is measured, for each weight shape k→d, number of tokens T and LoRA-equivalent rank r:

1. Step time: forward + backward of one frozen ``nn.Linear`` (the "bare" layer), of it plus
   peft's LoRA, of it plus MoRA under each operator, and of it plus the straightforward MoRA. The
   backward is driven by a fixed random output gradient, so it fills x.grad and the adapter's
   gradients. Configurations are interleaved: after a warm-up, every round times each
   configuration once in a shuffled order, and the median over rounds is reported. On the CPU the
   clock is the thread's CPU time (one thread, ``time.thread_time``): on a shared machine it does not
   count the time the process waits for a core, which wall-clock time does; on CUDA, wall-clock
   time after a synchronize. The bare layer is timed twice as two configurations ("bare" and
   "bare-again"): their ratio is an A/A comparison, one draw of the run's noise. The spread of every
   configuration's times over its rounds gives a second estimate, two standard errors of a ratio of
   medians (benchmarks/report.py, ``rounds_band``); the verdicts use the wider of the two.
2. Memory: on CPU ``saved_activation_bytes``, a proxy: the unique storages saved for backward
   (views of x count once; parameters and buffers are excluded as they live anyway) plus the output
   and gradient bytes. On CUDA also the real peak of one step.
3. ΔW build time: ``MoRAAdapter.delta_weight()``, the straightforward build, peft's
   ``get_delta_weight`` and a plain copy of W (``W.clone()``, the floor for any merge).
4. Adapter time: forward + backward of each MoRA adapter alone, ours and the straightforward one,
   the frozen layer's output replaced by zeros (:class:`AdapterAlone`). The frozen GEMMs are the
   same calls in both implementations, and where they dominate a step (bfloat16 on a CPU without
   bfloat16 units: ~30 s of a 31-s step) their own variation hides the adapters' difference; this
   timing holds only what differs. Its noise band is an A/A comparison too: the sharing adapter
   timed twice ("share" and its "again" copy), per rank.

Each MoRA row gets a verdict against the targets of issue 15: step ≤ 1.00× straightforward,
adapter alone ≤ 1.00× straightforward, ΔW build ≤ 1.00× straightforward and ≤ 2× copy, memory
≤ LoRA + 5%. Beside ×bare it prints the
FLOP bound of the configuration (see :func:`flop_bound`). Raw times, ratios, verdicts, settings,
load and hardware go to JSON; ``benchmarks/report.py`` renders the README table from it.

Run:  ``python benchmarks/bench_adapters.py`` (what ``make bench`` calls; see the Makefile),
      ``python benchmarks/bench_adapters.py --quick`` for a seconds-long smoke test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for benchmarks/ (not installed)
from benchmarks.straightforward import StraightforwardMoRA  # noqa: E402
from benchmarks.report import (configuration_rounds, noise_bands, overall_verdict, rounds_band,  # noqa: E402
                               verdict_text)
from mora.layer import MoRAAdapter, MoRALinear  # noqa: E402
from mora import operators  # noqa: E402
from mora.operators import OPERATORS  # noqa: E402

LLAMA2_7B_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (k, d): q/k/v/o, up/gate, down
QUICK_SHAPES = ((256, 256), (256, 688), (688, 256))
STRAIGHTFORWARD = {op: f"{op}-sf" for op in OPERATORS}  # method name of each operator's baseline
METHODS = ("bare", "bare-again", "lora") + OPERATORS + tuple(STRAIGHTFORWARD.values())
TARGETS = dict(step_vs_straightforward=1.0, adapter_vs_straightforward=1.0, delta_weight_vs_straightforward=1.0,
               delta_weight_vs_copy=2.0, memory_vs_lora=1.05)
ADAPTER_AA = ("share", "share-again")  # the adapter timed twice per rank: the A/A comparison of adapter times
INIT_STD = 0.01  # non-zero LoRA B and MoRA M, so no zero-weight path is special-cased


@dataclass
class Config:
    """One timed configuration: a module, its input and output gradient, and how to reset it."""

    name: tuple  # (rank, method); rank is None for the rank-independent bare layer
    module: nn.Module
    x: torch.Tensor
    grad_out: torch.Tensor

    def reset(self) -> None:
        """Drop last step's gradients outside the timed region, so freeing them is not timed."""
        self.x.grad = None
        for p in self.module.parameters():
            p.grad = None

    def step(self) -> None:
        self.module(self.x).backward(self.grad_out)


# ----------------------------------------------------------------------------- settings

def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x4096,4096x11008' -> [(4096, 4096), (4096, 11008)], each IN x OUT (k→d)."""
    shapes = []
    for item in text.split(","):
        k, d = item.lower().split("x")
        shapes.append((int(k), int(d)))
    return shapes


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int_list, default=[256, 2048],
                        help="comma-separated tokens per step (rows of x), each timed separately")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument("--delta-repeats", type=int, default=5, help="timed rounds of ΔW builds")
    parser.add_argument("--adapter-repeats", type=int, default=7,
                        help="timed rounds of the adapters alone (cheap beside the steps, so more of them)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (timing assumes 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="comma-separated INxOUT (k→d); default: LLaMA-2-7B shapes")
    parser.add_argument("--ranks", type=int_list, default=None,
                        help="comma-separated LoRA-equivalent ranks; default: 8,256")
    parser.add_argument("--out", type=Path, default=Path("results/bench/adapters.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-autograd", choices=operators.GPU_AUTOGRAD_CHOICES, default=operators.GPU_AUTOGRAD,
                        help="how MoRA is differentiated on CUDA (mora/operators.py, GPU_AUTOGRAD); no effect on a CPU")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, ranks 8,32, 64 and 256 tokens, one round: a smoke test")
    return parser


def resolve_settings(args: argparse.Namespace) -> dict:
    """Fill defaults; --quick overrides sizes but keeps explicit --out/--device/--dtype."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = dict(tokens=args.tokens, repeats=args.repeats, warmup=args.warmup,
                    delta_repeats=args.delta_repeats, adapter_repeats=args.adapter_repeats, threads=args.threads,
                    device=device, dtype=args.dtype,
                    shapes=args.shapes or list(LLAMA2_7B_SHAPES), ranks=args.ranks or [8, 256],
                    seed=args.seed, quick=args.quick, out=str(args.out), gpu_autograd=args.gpu_autograd)
    if args.quick:
        settings.update(tokens=[64, 256], repeats=1, delta_repeats=1, adapter_repeats=1, shapes=list(QUICK_SHAPES),
                        ranks=[8, 32])
    return settings


# ----------------------------------------------------------------------------- modules

def build_lora(base: nn.Linear, rank: int) -> nn.Module:
    """peft's LoRA Linear around ``base`` (alpha = 2r as in the paper's setup), B non-zero."""
    from peft import LoraConfig, inject_adapter_in_model  # slow import: only when benchmarking

    net = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["0"]),
                                  nn.Sequential(base))
    lora = net[0]
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_(0.0, INIT_STD)
    return lora.to(device=base.weight.device, dtype=base.weight.dtype)


def build_mora(base: nn.Linear, rank: int, operator: str) -> MoRALinear:
    adapter = MoRAAdapter.from_rank(base.in_features, base.out_features, rank, operator)
    with torch.no_grad():
        adapter.M.normal_(0.0, INIT_STD)
    adapter.to(device=base.weight.device, dtype=base.weight.dtype)
    return MoRALinear(base, adapter)


def build_modules(base: nn.Linear, ranks: list[int]) -> dict[tuple, nn.Module]:
    """{(None, 'bare'): base, (r, 'lora'): …, (r, op): …, (r, 'op-sf'): …} sharing the one frozen base."""
    modules: dict[tuple, nn.Module] = {(None, "bare"): base, (None, "bare-again"): base}
    for rank in ranks:
        modules[(rank, "lora")] = build_lora(base, rank)
        for operator in OPERATORS:
            mora = modules[(rank, operator)] = build_mora(base, rank, operator)
            modules[(rank, STRAIGHTFORWARD[operator])] = StraightforwardMoRA(mora)
    return modules


class AdapterAlone(nn.Module):
    """A MoRA layer's step without its frozen GEMM: zeros stand in for W0 x, then the adapter adds Δx.

    Ours adds Δx into the zeros in place (``MoRAAdapter.forward``), the straightforward one adds its Δx
    out of place, exactly as their layers add Δx to W0 x; the zeros cost the same in both.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layer, MoRALinear):
            return self.layer.mora(x)
        return x.new_zeros(*x.shape[:-1], self.layer.base_layer.out_features) + self.layer.delta(x)


def adapter_modules(modules: dict[tuple, nn.Module]) -> dict[tuple, nn.Module]:
    """{(r, op): AdapterAlone, (r, 'op-sf'): AdapterAlone, (r, 'share-again'): the share one again}."""
    alone = {key: AdapterAlone(module) for key, module in modules.items()
             if key[1] in OPERATORS or key[1] in STRAIGHTFORWARD.values()}
    for rank in {rank for rank, _ in alone}:
        alone[(rank, ADAPTER_AA[1])] = alone[(rank, ADAPTER_AA[0])]
    return alone


# ----------------------------------------------------------------------------- timing

def clock(device: str) -> Callable[[], float]:
    """The thread's CPU time on the CPU (immune to waiting for a shared core), else wall time."""
    return time.thread_time if device == "cpu" else time.perf_counter


def time_once(fn: Callable[[], object], device: str) -> float:
    now = clock(device)
    if device == "cuda":
        torch.cuda.synchronize()
    start = now()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return now() - start


def interleaved_times(fns: dict, resets: dict, repeats: int, warmup: int, device: str,
                      rng: random.Random, progress: tqdm) -> dict[tuple, list[float]]:
    """Seconds per call of each fn over ``repeats`` rounds, each round in a fresh random order.

    Shuffling keeps any slow drift (thermal, other processes) from favouring one configuration.
    """
    times: dict[tuple, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + repeats):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            resets[name]()
            elapsed = time_once(fns[name], device)
            if round_index >= warmup:
                times[name].append(elapsed)
            progress.update(1)
    return times


# ----------------------------------------------------------------------------- memory

def saved_activation_bytes(config: Config) -> dict[str, int]:
    """CPU memory proxy of one step: unique saved storages + output + gradients, in bytes.

    Storages are keyed by data_ptr so views of x (saved by both LoRA's A and MoRA's blocks, say)
    count once; parameters and buffers are left out because they are resident regardless. The
    gradients are x's and the trainable parameters' sizes: the forward alone holds everything
    counted, so no backward is run (in bfloat16 on a CPU it is ~30 s of a 31-s step).
    """
    module = config.module
    resident = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in resident:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    config.reset()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = config.module(config.x)
    needs_grad = [config.x] + [p for p in module.parameters() if p.requires_grad]
    parts = dict(saved_for_backward_bytes=sum(saved.values()),
                 output_bytes=out.untyped_storage().nbytes(),
                 grad_bytes=sum(t.numel() * t.element_size() for t in needs_grad))
    return dict(parts, saved_activation_bytes=sum(parts.values()))


def cuda_peak_bytes(config: Config) -> dict[str, int]:
    """Real allocator peak of one step: absolute, and above the pre-step allocation."""
    config.reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    config.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return dict(peak_allocated_bytes=peak, peak_step_bytes=peak - before)


def measure_memory(config: Config, device: str) -> dict[str, int]:
    memory = saved_activation_bytes(config)
    if device == "cuda":
        memory.update(cuda_peak_bytes(config))
    return memory


def memory_metric(device: str) -> str:
    return "peak_step_bytes" if device == "cuda" else "saved_activation_bytes"


# ----------------------------------------------------------------------------- ΔW build

def delta_weight_fns(modules: dict[tuple, nn.Module]) -> dict[tuple, Callable[[], torch.Tensor]]:
    """The ΔW builders, plus (None, 'copy'): cloning W, the floor for any merge."""
    weight = modules[(None, "bare")].weight
    fns = {(None, "copy"): weight.clone}
    for (rank, method), module in modules.items():
        if method == "lora":
            fns[(rank, method)] = lambda m=module: m.get_delta_weight("default")
        elif method in OPERATORS:
            fns[(rank, method)] = module.mora.delta_weight
        elif rank is not None:  # a straightforward baseline
            fns[(rank, method)] = module.delta_weight
    return fns


# ----------------------------------------------------------------------------- FLOP bound

def adapter_macs(method: str, k: int, d: int, rank: int, r_hat: int | None) -> tuple[int, int]:
    """(GEMM MACs, elementwise ops) one token adds to the frozen layer in one direction.

    LoRA: (k + d)·r GEMM, d adds. truncate: r̂². share: r̂² GEMM, k compression adds and d
    decompression adds. decouple: n·r̂² over the n used blocks, n·r̂ + d adds. rotate: decouple's,
    plus 3 ops per used input column (two products and a sum of the 2×2 rotation).
    """
    if method == "lora":
        return (k + d) * rank, d
    n = min(math.ceil(k / r_hat), math.ceil(d / r_hat))
    return {"truncate": (r_hat ** 2, d), "share": (r_hat ** 2, k + d),
            "decouple": (n * r_hat ** 2, n * r_hat + d),
            "rotate": (n * r_hat ** 2, 4 * n * r_hat + d)}[method]


def flop_bound(method: str, k: int, d: int, rank: int, r_hat: int | None) -> float:
    """Lower bound of step ×bare if time were arithmetic: (2dk + 3·GEMM + 2·elementwise) / 2dk.

    The bare step does d·k MACs forward and d·k backward (∂x only, W is frozen); an adapter's GEMMs
    run three times (forward, ∂x, ∂M) and its elementwise work twice.
    """
    if method.startswith("bare"):
        return 1.0
    gemm, elementwise = adapter_macs(method.removesuffix("-sf"), k, d, rank, r_hat)
    return (2 * d * k + 3 * gemm + 2 * elementwise) / (2 * d * k)


# ----------------------------------------------------------------------------- one shape

def bench_shape(k: int, d: int, settings: dict, rng: random.Random, progress: tqdm) -> list[dict]:
    """Entries of one k→d shape at every token count: step times, memory and ΔW builds."""
    device, dtype = settings["device"], getattr(torch, settings["dtype"])
    base = nn.Linear(k, d, bias=False, device=device, dtype=dtype).requires_grad_(False)
    modules = build_modules(base, settings["ranks"])
    progress.set_description(f"{k}->{d} ΔW")
    with torch.no_grad():
        builders = delta_weight_fns(modules)
        delta_times = interleaved_times(builders, {n: (lambda: None) for n in builders},
                                        settings["delta_repeats"], settings["warmup"], device, rng, progress)
    entries = []
    for tokens in settings["tokens"]:
        progress.set_description(f"{k}->{d} T={tokens}")
        x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
        grad_out = torch.randn(tokens, d, device=device, dtype=dtype)
        configs = {name: Config(name, module, x, grad_out) for name, module in modules.items()}
        step_times = interleaved_times({n: c.step for n, c in configs.items()},
                                       {n: c.reset for n, c in configs.items()},
                                       settings["repeats"], settings["warmup"], device, rng, progress)
        progress.set_description(f"{k}->{d} T={tokens} adapters")
        alone = {name: Config(name, module, x, grad_out) for name, module in adapter_modules(modules).items()}
        adapter_times = interleaved_times({n: c.step for n, c in alone.items()}, {n: c.reset for n, c in alone.items()},
                                          settings["adapter_repeats"], settings["warmup"], device, rng, progress)
        progress.set_description(f"{k}->{d} T={tokens} memory")
        memory = {}
        for name, config in configs.items():
            memory[name] = measure_memory(config, device)
            progress.update()
        entries += [entry(k, d, tokens, rank, method, modules, step_times, memory, delta_times, adapter_times,
                          settings)
                    for rank in settings["ranks"] for method in METHODS]
    return entries


def entry(k: int, d: int, tokens: int, rank: int, method: str, modules: dict, step_times: dict,
          memory: dict, delta_times: dict, adapter_times: dict, settings: dict) -> dict:
    """One JSON entry per (tokens, rank, method); the rank-independent bare timings are repeated."""
    key = (None, method) if method.startswith("bare") else (rank, method)
    module = modules[key]
    r_hat = getattr(getattr(module, "mora", None), "r_hat", None)
    if method.endswith("-sf"):
        r_hat = modules[(rank, method.removesuffix("-sf"))].mora.r_hat
    result = dict(shape=f"{k}->{d}", in_features=k, out_features=d, tokens=tokens, dtype=settings["dtype"],
                  rank=rank, method=method, r_hat=r_hat, step_s=statistics.median(step_times[key]),
                  step_s_all=step_times[key], memory=memory[key],
                  trainable_params=sum(p.numel() for p in module.parameters() if p.requires_grad),
                  copy_s=statistics.median(delta_times[(None, "copy")]),
                  flop_bound_vs_bare=flop_bound(method, k, d, rank, r_hat))
    if key in delta_times:
        result["delta_weight_s"] = statistics.median(delta_times[key])
    if key in adapter_times:
        result.update(adapter_s=statistics.median(adapter_times[key]), adapter_s_all=adapter_times[key])
    if method == ADAPTER_AA[0]:
        result["adapter_again_s"] = statistics.median(adapter_times[(rank, ADAPTER_AA[1])])
    return result


# ----------------------------------------------------------------------------- ratios and verdicts

def add_ratios(entries: list[dict], device: str) -> None:
    """Attach ratios to the bare layer, LoRA and the straightforward operator, and the verdicts."""
    metric = memory_metric(device)
    by_key = {(e["shape"], e["tokens"], e["rank"], e["method"]): e for e in entries}
    for e in entries:
        group = (e["shape"], e["tokens"], e["rank"])
        bare, lora = by_key[(*group, "bare")], by_key[(*group, "lora")]
        ratios = dict(step_vs_bare=e["step_s"] / bare["step_s"], step_vs_lora=e["step_s"] / lora["step_s"],
                      memory_vs_lora=e["memory"][metric] / lora["memory"][metric])
        if "delta_weight_s" in e:
            ratios["delta_weight_vs_copy"] = e["delta_weight_s"] / e["copy_s"]
        if e["method"] in OPERATORS:
            sf = by_key[(*group, STRAIGHTFORWARD[e["method"]])]
            ratios["step_vs_straightforward"] = e["step_s"] / sf["step_s"]
            ratios["adapter_vs_straightforward"] = e["adapter_s"] / sf["adapter_s"]
            ratios["delta_weight_vs_straightforward"] = e["delta_weight_s"] / sf["delta_weight_s"]
        e["ratios"] = ratios
        e["verdicts"] = verdicts(e)


def verdicts(entry: dict) -> dict[str, dict]:
    """{ratio: {'max': target, 'met': bool}} for the issue-15 targets of a MoRA operator row."""
    if entry["method"] not in OPERATORS:
        return {}
    return {name: dict(max=limit, met=entry["ratios"][name] <= limit) for name, limit in TARGETS.items()}


def noise_band(entries: list[dict]) -> dict:
    """The A/A comparisons: step time of the bare layer against itself, per shape and token count, and
    the sharing adapter's time against itself, per shape, token count and rank; and the bands the rounds'
    spread gives (benchmarks/report.py, ``rounds_band``; the verdicts take the wider of the two)."""
    ratios = sorted({(e["shape"], e["tokens"]): e["ratios"]["step_vs_bare"]
                     for e in entries if e["method"] == "bare-again"}.items())
    adapter = sorted({(e["shape"], e["tokens"], e["rank"]): e["adapter_again_s"] / e["adapter_s"]
                      for e in entries if "adapter_again_s" in e}.items())

    def widest(pairs: list) -> float | None:
        return max(abs(r - 1.0) for _, r in pairs) if pairs else None

    return dict(aa_ratios={f"{shape} T={tokens}": r for (shape, tokens), r in ratios},
                max_abs_deviation=widest(ratios),
                adapter_aa_ratios={f"{shape} T={tokens} r={rank}": r for (shape, tokens, rank), r in adapter},
                adapter_max_abs_deviation=widest(adapter),
                step_rounds_band=rounds_band(configuration_rounds(entries, "step_s_all")),
                adapter_rounds_band=rounds_band(configuration_rounds(entries, "adapter_s_all")))


# ----------------------------------------------------------------------------- report

TABLE_COLUMNS = (("shape", 12), ("T", 5), ("rank", 4), ("method", 9), ("r_hat", 5), ("step ms", 9),
                 ("×sf", 6), ("adapt×sf", 8), ("×bare", 6), ("FLOP×bare", 9), ("×LoRA", 6), ("mem×LoRA", 8),
                 ("ΔW×sf", 6), ("ΔW/copy", 7), ("verdict", 16))


def verdict_cell(entry: dict, bands: dict[str, float]) -> str:
    """A MoRA row's verdict (benchmarks/report.py's rule: a timed ratio within its band of its target is a tie)."""
    return verdict_text([entry], bands) if entry["verdicts"] else ""


def table_row(entry: dict, bands: dict[str, float]) -> list[str]:
    r = entry["ratios"]

    def fmt(name: str, digits: int = 3) -> str:
        return "" if name not in r else f"{r[name]:.{digits}f}"

    return [entry["shape"], str(entry["tokens"]), str(entry["rank"]), entry["method"],
            str(entry["r_hat"] or ""), f"{entry['step_s'] * 1e3:.1f}", fmt("step_vs_straightforward"),
            fmt("adapter_vs_straightforward"), fmt("step_vs_bare"), f"{entry['flop_bound_vs_bare']:.3f}",
            fmt("step_vs_lora"), fmt("memory_vs_lora"), fmt("delta_weight_vs_straightforward", 2),
            fmt("delta_weight_vs_copy", 2), verdict_cell(entry, bands)]


def format_table(result: dict) -> str:
    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, (_, width) in zip(cells, TABLE_COLUMNS)).rstrip()

    header = line([name for name, _ in TABLE_COLUMNS])
    bands = noise_bands(result)
    rows = [line(table_row(e, bands)) for e in result["entries"] if not e["method"].endswith("-sf")]
    notes = [f"memory = {result['memory_metric']}"
             + (" (CPU proxy: saved-for-backward storages + output + grads)" if result["memory_metric"]
                == "saved_activation_bytes" else ""),
             f"clock = {result['clock']}; noise bands (the wider of the A/A ratio and 2 SE of a ratio of medians "
             f"over the rounds): step ±{bands['step_vs_straightforward']:.3f} (A/A: bare vs bare-again), adapter "
             f"alone ±{bands['adapter_vs_straightforward']:.3f} (A/A: share vs share-again)",
             f"targets: step ×sf ≤ {TARGETS['step_vs_straightforward']}, adapter alone ×sf ≤ "
             f"{TARGETS['adapter_vs_straightforward']}, ΔW ×sf ≤ "
             f"{TARGETS['delta_weight_vs_straightforward']}, ΔW/copy ≤ {TARGETS['delta_weight_vs_copy']}, "
             f"mem ×LoRA ≤ {TARGETS['memory_vs_lora']}",
             f"all MoRA rows meet every target: {overall_verdict(result)} (a timed ratio within the noise band "
             "of its target is a tie)"]
    return "\n".join([header, "-" * len(header), *rows, *notes])


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo where present (no hostname), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other processes' demand for the cores), where available."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device: str) -> dict:
    return dict(torch_version=torch.__version__, python_version=platform.python_version(),
                platform=platform.platform(), processor=platform.processor(), cpu_model=cpu_model(),
                cpu_count=os.cpu_count(), device=device, num_threads=torch.get_num_threads(),
                device_name=torch.cuda.get_device_name() if device == "cuda" else cpu_model())


# ----------------------------------------------------------------------------- driver

def progress_total(settings: dict) -> int:
    n_configs = 2 + len(settings["ranks"]) * (1 + 2 * len(OPERATORS))
    steps = (settings["warmup"] + settings["repeats"] + 1) * n_configs * len(settings["tokens"])  # + 1: memory
    builds = (settings["warmup"] + settings["delta_repeats"]) * (n_configs - 1)  # copy replaces the bares
    n_alone = len(settings["ranks"]) * (2 * len(OPERATORS) + 1)  # + 1: the A/A copy
    alone = (settings["warmup"] + settings["adapter_repeats"]) * n_alone * len(settings["tokens"])
    return (steps + builds + alone) * len(settings["shapes"])


def run(settings: dict) -> dict:
    """Benchmark every shape; returns the JSON-ready result (entries carry ratios and verdicts)."""
    torch.manual_seed(settings["seed"])
    operators.GPU_AUTOGRAD = settings.get("gpu_autograd", operators.GPU_AUTOGRAD)
    if settings["device"] == "cpu":
        torch.set_num_threads(settings["threads"])
    rng = random.Random(settings["seed"])
    start, load_before = time.perf_counter(), load_average()
    entries = []
    with tqdm(total=progress_total(settings), unit="call", file=sys.stderr) as progress:
        for k, d in settings["shapes"]:
            entries.extend(bench_shape(k, d, settings, rng, progress))
    add_ratios(entries, settings["device"])
    mora_rows = [e for e in entries if e["method"] in OPERATORS]
    return dict(settings={**settings, "shapes": [list(s) for s in settings["shapes"]]},
                environment=environment(settings["device"]), memory_metric=memory_metric(settings["device"]),
                clock="thread CPU time" if settings["device"] == "cpu" else "wall time (synchronized)",
                load_average=dict(before=load_before, after=load_average()), targets=TARGETS,
                noise=noise_band(entries), all_met=all(v["met"] for e in mora_rows for v in e["verdicts"].values()),
                entries=entries, wall_time_s=time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    settings = resolve_settings(build_parser().parse_args(argv))
    result = run(settings)
    print(format_table(result))
    env, load = result["environment"], result["load_average"]
    print(f"device={env['device_name']} threads={env['num_threads']} torch={env['torch_version']} "
          f"dtype={settings['dtype']} tokens={settings['tokens']} repeats={settings['repeats']} "
          f"gpu_autograd={settings['gpu_autograd']} "
          f"load={load['before']}→{load['after']} wall={result['wall_time_s']:.1f}s")
    out = Path(settings["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=True))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
