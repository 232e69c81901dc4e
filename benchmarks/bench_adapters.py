"""Speed and memory of MoRA's operators against LoRA on LLaMA-2-7B linear-layer shapes.

The paper claims MoRA trains in "almost the same time and memory" as LoRA thanks to its
non-parameter operators, with rotation (Eq. 9) up to ~1.15× slower at rank 8 (Section 8,
"Limitation"; Section 4 puts decoupling at 1.03× sharing). This script checks that per layer.

What is measured, for each weight shape k→d and LoRA-equivalent rank r (Section 4 budget):

1. Step time: forward + backward of one frozen ``nn.Linear`` (the "bare" layer), of it plus
   peft's LoRA, and of it plus MoRA with each operator (truncate, share, decouple, rotate). The
   backward is driven by a fixed random output gradient (loss = <out, g>), so it fills x.grad
   and the adapter's gradients. Configurations are interleaved: after a warm-up, every round
   times each configuration once in a shuffled order, and the median over rounds is reported,
   so machine noise hits all configurations alike.
2. Memory: on CPU (no allocator statistics) ``saved_activation_bytes``, a proxy: the unique
   storages saved for backward (views of x count once; parameters and buffers are excluded as
   they live anyway) plus the output and gradient bytes. On CUDA also the real peak of one step.
3. ΔW build time: ``MoRAAdapter.delta_weight()`` and peft's ``get_delta_weight`` against a plain
   copy of W (``W.clone()``), the floor for any merge. On CPU both include the page faults of a
   fresh d×k allocation, whose cost depends on the allocator's state (a 64 MB clone took 4 ms in
   one run and 21 ms in another), so compare this ratio within one run; absolute medians are in
   the JSON.

It prints a table of ratios (MoRA/LoRA, MoRA/bare, LoRA/bare, memory, ΔW build/copy) beside
the targets (sharing ≤ 1.02× LoRA step time, rotation ≤ 1.08×, ΔW build ≤ 5× copy, MoRA memory
≤ LoRA + 5%; reported, not asserted) and writes raw medians, ratios, settings and hardware to JSON.

Run:  ``python benchmarks/bench_adapters.py`` (what ``make bench`` calls; minutes on CPU),
      ``python benchmarks/bench_adapters.py --quick`` for a seconds-long smoke test.
"""

from __future__ import annotations

import argparse
import json
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

from mora.layer import MoRAAdapter, MoRALinear
from mora.operators import OPERATORS

LLAMA2_7B_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))  # (k, d): q/k/v/o, up/gate, down
QUICK_SHAPES = ((256, 256), (256, 688), (688, 256))
METHODS = ("bare", "lora") + OPERATORS
STEP_TARGETS_VS_LORA = {"share": 1.02, "rotate": 1.08}
DELTA_TARGET_VS_COPY = 5.0
MEMORY_TARGET_VS_LORA = 1.05
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per step (rows of x)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed rounds (median is reported); 3 keeps the CPU run under ~8 min")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument("--delta-repeats", type=int, default=7, help="timed rounds of ΔW builds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="comma-separated INxOUT (k→d); default: LLaMA-2-7B shapes")
    parser.add_argument("--ranks", type=lambda s: [int(r) for r in s.split(",")], default=None,
                        help="comma-separated LoRA-equivalent ranks; default: 8,256")
    parser.add_argument("--out", type=Path, default=Path("results/bench/adapters.json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, ranks 8,32, 256 tokens, 3 repeats: a smoke test")
    return parser


def resolve_settings(args: argparse.Namespace) -> dict:
    """Fill defaults; --quick overrides sizes but keeps explicit --out/--device/--dtype."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = dict(tokens=args.tokens, repeats=args.repeats, warmup=args.warmup,
                    delta_repeats=args.delta_repeats, device=device, dtype=args.dtype,
                    shapes=args.shapes or list(LLAMA2_7B_SHAPES), ranks=args.ranks or [8, 256],
                    seed=args.seed, quick=args.quick, out=str(args.out))
    if args.quick:
        settings.update(tokens=256, repeats=3, delta_repeats=3, shapes=list(QUICK_SHAPES),
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
    """{(None, 'bare'): base, (r, 'lora'): …, (r, operator): …} sharing the one frozen base."""
    modules: dict[tuple, nn.Module] = {(None, "bare"): base}
    for rank in ranks:
        modules[(rank, "lora")] = build_lora(base, rank)
        for operator in OPERATORS:
            modules[(rank, operator)] = build_mora(base, rank, operator)
    return modules


# ----------------------------------------------------------------------------- timing

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn: Callable[[], object], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


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
    count once; parameters and buffers are left out because they are resident regardless.
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
    out.backward(config.grad_out)
    grads = [config.x.grad] + [p.grad for p in module.parameters() if p.grad is not None]
    parts = dict(saved_for_backward_bytes=sum(saved.values()),
                 output_bytes=out.untyped_storage().nbytes(),
                 grad_bytes=sum(g.untyped_storage().nbytes() for g in grads))
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
    return fns


# ----------------------------------------------------------------------------- one shape

def make_configs(modules: dict, settings: dict, k: int, d: int) -> dict[tuple, Config]:
    device, dtype = settings["device"], getattr(torch, settings["dtype"])
    x = torch.randn(settings["tokens"], k, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(settings["tokens"], d, device=device, dtype=dtype)
    return {name: Config(name, module, x, grad_out) for name, module in modules.items()}


def bench_shape(k: int, d: int, settings: dict, rng: random.Random, progress: tqdm) -> dict:
    """Raw per-round timings for one k→d shape: step times, memory and ΔW builds per config."""
    device, dtype = settings["device"], getattr(torch, settings["dtype"])
    base = nn.Linear(k, d, bias=False, device=device, dtype=dtype).requires_grad_(False)
    modules = build_modules(base, settings["ranks"])
    configs = make_configs(modules, settings, k, d)
    progress.set_description(f"{k}->{d}")
    step_times = interleaved_times({n: c.step for n, c in configs.items()},
                                   {n: c.reset for n, c in configs.items()},
                                   settings["repeats"], settings["warmup"], device, rng, progress)
    memory = {name: measure_memory(config, device) for name, config in configs.items()}
    with torch.no_grad():
        builders = delta_weight_fns(modules)
        delta_times = interleaved_times(builders, {n: (lambda: None) for n in builders},
                                        settings["delta_repeats"], settings["warmup"], device,
                                        rng, progress)
    return dict(modules=modules, step_times=step_times, memory=memory, delta_times=delta_times)


def shape_entries(k: int, d: int, raw: dict, settings: dict) -> list[dict]:
    """One JSON entry per (rank, method); the rank-independent bare/copy timings are repeated."""
    entries = []
    for rank in settings["ranks"]:
        for method in METHODS:
            key = (None, "bare") if method == "bare" else (rank, method)
            module = raw["modules"][key]
            steps = raw["step_times"][key]
            trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
            entry = dict(shape=f"{k}->{d}", in_features=k, out_features=d, rank=rank,
                         method=method, step_s=statistics.median(steps), step_s_all=steps,
                         trainable_params=trainable, memory=raw["memory"][key],
                         copy_s=statistics.median(raw["delta_times"][(None, "copy")]))
            if method in OPERATORS:
                entry["r_hat"] = module.mora.r_hat
            if method != "bare":
                entry["delta_weight_s"] = statistics.median(raw["delta_times"][key])
            entries.append(entry)
    return entries


# ----------------------------------------------------------------------------- ratios

def memory_metric(device: str) -> str:
    return "peak_step_bytes" if device == "cuda" else "saved_activation_bytes"


def add_ratios(entries: list[dict], device: str) -> None:
    """Attach ratios to LoRA and the bare layer (same shape and rank) and target verdicts."""
    metric = memory_metric(device)
    by_key = {(e["shape"], e["rank"], e["method"]): e for e in entries}
    for entry in entries:
        lora = by_key[(entry["shape"], entry["rank"], "lora")]
        bare = by_key[(entry["shape"], entry["rank"], "bare")]
        ratios = dict(step_vs_lora=entry["step_s"] / lora["step_s"],
                      step_vs_bare=entry["step_s"] / bare["step_s"],
                      memory_vs_lora=entry["memory"][metric] / lora["memory"][metric],
                      memory_vs_bare=entry["memory"][metric] / bare["memory"][metric])
        if "delta_weight_s" in entry:
            ratios["delta_weight_vs_copy"] = entry["delta_weight_s"] / entry["copy_s"]
        entry["ratios"] = ratios
        entry["targets"] = targets_for(entry)


def targets_for(entry: dict) -> dict[str, dict]:
    """{ratio name: {'max': target, 'met': bool}} for the targets that apply to this method."""
    method, ratios = entry["method"], entry["ratios"]
    limits = {}
    if method in STEP_TARGETS_VS_LORA:
        limits["step_vs_lora"] = STEP_TARGETS_VS_LORA[method]
    if method in OPERATORS:
        limits["memory_vs_lora"] = MEMORY_TARGET_VS_LORA
        limits["delta_weight_vs_copy"] = DELTA_TARGET_VS_COPY
    return {name: dict(max=limit, met=ratios[name] <= limit) for name, limit in limits.items()}


# ----------------------------------------------------------------------------- report

TABLE_COLUMNS = (("shape", 12), ("rank", 5), ("method", 9), ("r_hat", 5), ("step ms", 9),
                 ("×LoRA", 6), ("target", 11), ("×bare", 6), ("mem×LoRA", 8), ("target", 11),
                 ("mem×bare", 8), ("ΔW/copy", 8), ("target", 11))


def target_cell(entry: dict, ratio: str) -> str:
    target = entry["targets"].get(ratio)
    if target is None:
        return ""
    return f"≤{target['max']:g} {'ok' if target['met'] else 'MISS'}"


def table_row(entry: dict) -> list[str]:
    r = entry["ratios"]
    delta = r.get("delta_weight_vs_copy")
    return [entry["shape"], str(entry["rank"]), entry["method"], str(entry.get("r_hat", "")),
            f"{entry['step_s'] * 1e3:.1f}", f"{r['step_vs_lora']:.3f}", target_cell(entry, "step_vs_lora"),
            f"{r['step_vs_bare']:.3f}", f"{r['memory_vs_lora']:.3f}", target_cell(entry, "memory_vs_lora"),
            f"{r['memory_vs_bare']:.3f}", "" if delta is None else f"{delta:.2f}",
            target_cell(entry, "delta_weight_vs_copy")]


def format_table(entries: list[dict], device: str) -> str:
    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, (_, width) in zip(cells, TABLE_COLUMNS)).rstrip()

    header = line([name for name, _ in TABLE_COLUMNS])
    rows = [line(table_row(e)) for e in entries]
    note = (f"memory = {memory_metric(device)}"
            + (" (CPU proxy: saved-for-backward storages + output + grads)" if device == "cpu" else ""))
    return "\n".join([header, "-" * len(header), *rows, note])


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo where present (no hostname), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    return dict(torch_version=torch.__version__, python_version=platform.python_version(),
                platform=platform.platform(), processor=platform.processor(), cpu_model=cpu_model(),
                device=device, num_threads=torch.get_num_threads(),
                device_name=torch.cuda.get_device_name() if device == "cuda" else cpu_model())


# ----------------------------------------------------------------------------- driver

def progress_total(settings: dict) -> int:
    n_steps = 1 + len(settings["ranks"]) * (1 + len(OPERATORS))  # bare + (LoRA + MoRA) per rank
    per_shape = (settings["warmup"] + settings["repeats"]) * n_steps
    per_shape += (settings["warmup"] + settings["delta_repeats"]) * n_steps  # copy replaces bare
    return per_shape * len(settings["shapes"])


def run(settings: dict) -> dict:
    """Benchmark every shape; returns the JSON-ready result (entries carry ratios and targets)."""
    torch.manual_seed(settings["seed"])
    rng = random.Random(settings["seed"])
    start = time.perf_counter()
    entries = []
    with tqdm(total=progress_total(settings), unit="step", file=sys.stderr) as progress:
        for k, d in settings["shapes"]:
            raw = bench_shape(k, d, settings, rng, progress)
            entries.extend(shape_entries(k, d, raw, settings))
    add_ratios(entries, settings["device"])
    return dict(settings={**settings, "shapes": [list(s) for s in settings["shapes"]]},
                environment=environment(settings["device"]), memory_metric=memory_metric(settings["device"]),
                targets=dict(step_vs_lora=STEP_TARGETS_VS_LORA, delta_weight_vs_copy=DELTA_TARGET_VS_COPY,
                             memory_vs_lora=MEMORY_TARGET_VS_LORA),
                entries=entries, wall_time_s=time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    settings = resolve_settings(build_parser().parse_args(argv))
    result = run(settings)
    print(format_table(result["entries"], settings["device"]))
    env = result["environment"]
    print(f"device={env['device_name']} threads={env['num_threads']} torch={env['torch_version']} "
          f"dtype={settings['dtype']} tokens={settings['tokens']} repeats={settings['repeats']} "
          f"wall={result['wall_time_s']:.1f}s")
    out = Path(settings["out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=True))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
