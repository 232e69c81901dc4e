"""One training step of a small LLaMA, all 7 projections adapted: bare, LoRA, MoRA-share, MoRA-rotate.

The layer benchmark (bench_adapters.py) times one projection; this times what a user pays per
step: forward, loss, backward and the optimizer step of a whole (small) LLaMA whose q/k/v/o/
gate/up/down projections carry the adapter, side by side in one process. "bare" is the frozen
model with a backward to its input embeddings (every arm computes that too), so ×bare is the
adapters' share of a step. The paper claims rotation costs ≤ 1.15× LoRA's time (Section 8).

Arms are interleaved (one step each per round, shuffled), the median over rounds is reported; on
the CPU the clock is the thread's CPU time with one thread. Writes JSON that benchmarks/report.py
renders into the README.

Run:  ``python benchmarks/bench_model.py`` (what ``make bench-model`` calls), ``--quick`` for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for benchmarks/ (not installed)
from benchmarks.bench_adapters import environment, load_average  # noqa: E402
from benchmarks.report import rounds_band  # noqa: E402
from mora import operators  # noqa: E402
from mora.adapters import AdapterConfig, build_optimizer, inject_adapters  # noqa: E402

ARMS = (("bare", None, None), ("LoRA", "lora", None), ("MoRA share", "mora", "share"),
        ("MoRA rotate", "mora", "rotate"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2752)  # LLaMA-2's 11008/4096 ratio
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("results/bench/model.json"))
    parser.add_argument("--gpu-autograd", choices=operators.GPU_AUTOGRAD_CHOICES, default=operators.GPU_AUTOGRAD,
                        help="how MoRA is differentiated on CUDA (mora/operators.py, GPU_AUTOGRAD); no effect on a CPU")
    parser.add_argument("--quick", action="store_true", help="2 tiny layers, 2 rounds: a smoke test")
    return parser


def build_arm(method: str | None, operator: str | None, settings: dict):
    """(model, optimizer or None) of one arm, the same frozen weights for every arm (one seed)."""
    torch.manual_seed(settings["seed"])
    config = LlamaConfig(vocab_size=settings["vocab"], hidden_size=settings["hidden"],
                         intermediate_size=settings["intermediate"], num_hidden_layers=settings["layers"],
                         num_attention_heads=settings["heads"], max_position_embeddings=settings["seq_len"])
    model = LlamaForCausalLM(config).to(device=settings["device"], dtype=getattr(torch, settings["dtype"]))
    if method is None:
        return model.requires_grad_(False), None
    adapters = AdapterConfig(method=method, rank=settings["rank"], **({"operator": operator} if operator else {}))
    inject_adapters(model, adapters)
    return model, build_optimizer(model, adapters, lr=1e-4)


def train_step(model, optimizer, batch: dict) -> None:
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    model(inputs_embeds=embeds, labels=batch["input_ids"]).loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run(settings: dict) -> dict:
    if settings["device"] == "cpu":
        torch.set_num_threads(settings["threads"])
    clock = time.thread_time if settings["device"] == "cpu" else time.perf_counter
    arms = {name: build_arm(method, operator, settings) for name, method, operator in ARMS}
    generator = torch.Generator().manual_seed(settings["seed"])
    batch = {"input_ids": torch.randint(settings["vocab"], (settings["batch"], settings["seq_len"]),
                                        generator=generator).to(settings["device"])}
    rng, times = random.Random(settings["seed"]), {name: [] for name in arms}
    start, load_before = time.perf_counter(), load_average()
    for round_index in range(settings["warmup"] + settings["repeats"]):
        order = list(arms)
        rng.shuffle(order)
        for name in order:
            if settings["device"] == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            train_step(*arms[name], batch)
            if settings["device"] == "cuda":
                torch.cuda.synchronize()
            if round_index >= settings["warmup"]:
                times[name].append(clock() - t0)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    rows = [dict(name=name, step_s=medians[name], step_s_all=times[name], vs_bare=medians[name] / medians["bare"],
                 vs_lora=medians[name] / medians["LoRA"],
                 trainable_params=sum(p.numel() for p in arms[name][0].parameters() if p.requires_grad))
            for name in arms]
    return dict(kind="model", settings=settings, environment=environment(settings["device"]),
                clock="thread CPU time" if settings["device"] == "cpu" else "wall time (synchronized)",
                load_average=dict(before=load_before, after=load_average()), arms=rows,
                wall_time_s=time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["device"] = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    operators.GPU_AUTOGRAD = settings["gpu_autograd"]
    if args.quick:
        settings.update(layers=2, hidden=64, intermediate=172, heads=4, vocab=128, batch=2, seq_len=16,
                        repeats=2, warmup=1)
    result = run(settings)
    for arm in result["arms"]:
        print(f"{arm['name']:<12} {arm['step_s'] * 1e3:9.1f} ms  ×bare {arm['vs_bare']:.3f}  "
              f"×LoRA {arm['vs_lora']:.3f}")
    print(f"noise band ±{rounds_band([arm['step_s_all'] for arm in result['arms']]):.3f} (2 SE of a ratio of "
          f"medians, from the rounds' spread) load={result['load_average']['before']}→"
          f"{result['load_average']['after']} wall={result['wall_time_s']:.1f}s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**result, "settings": {**settings, "out": str(args.out)}}, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
