"""The GPU code path in one script (``make gpu-check``; minutes on one GPU, no downloads):

1. **Each task kind, both dtypes**: a few optimizer steps of UUID memorisation, supervised
   fine-tuning (Tülu's mini data, with its lm-eval NLL) and C4 pretraining (a LLaMA built from a
   config), each in float32 and in bfloat16, through ``experiments/run.py``'s ``execute``, on
   the small models and offline data the repository holds; each must complete with finite losses.
2. **The adapter benchmark** at LLaMA-2-7B shapes, through its own command line
   (``benchmarks/bench_adapters.py``, what ``make bench`` runs), in bfloat16.
3. **A whole-model training step, MoRA against LoRA**: a LLaMA-2-7B-shaped model (width 4096,
   MLP 11008, 32 heads, vocabulary 32000) with a few decoder layers and random weights, bfloat16,
   all 7 projections adapted. Step = forward, backward and AdamW step. Arms are interleaved: every
   round times each arm once, in a shuffled order, and the median over rounds is reported, so
   machine noise hits all arms alike. The paper's claims (Section 4, Limitations): at rank 8
   MoRA's rotation (Eq. 9) is "approximately 1.15 times slower than LoRA"; at large rank it uses
   "almost the same time and memory". Peak CUDA memory of one step is measured per arm, each arm
   alone on the device.
4. **Exactness on the device**: every operator with every layout it admits (Eq. 4, 6 with both group
   kinds of Appendix B, 8, 9; both paddings), on shapes divisible or not and one LLaMA-2-7B MLP
   shape: in float64 the device's forward, ΔW and gradient of M equal the CPU's, and after
   ``merge`` the layer gives what it gave unmerged (Eq. 3); in float32 (no TF32) the same identity
   to float32 precision.

Writes ``gpu_check.json`` (every measurement, settings, hardware) and ``gpu_check.md`` to
``--out``. Without a CUDA device it stops with one line and exit code 1; ``--device cpu --tiny``
runs every part at toy sizes on the CPU, so the code path is tested without a GPU
(tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

# `python experiments/<script>.py` from a checkout: the repository root on the path instead of this
# folder, whose package names (data, models, ...) must not shadow installed libraries. The project's
# modules (transformers, Hydra) are imported where used, so a machine without a GPU is told at once.
REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)

# 3 optimizer steps of each task kind on the repository's small models and offline data; the values
# that shrink a preset are those of the tests' tiny runs (tests/test_run_smoke.py, test_finetune_runs.py)
STEPS = ["train.max_steps=3", "train.warmup_steps=1", "train.eval_steps=[3]", "train.log_every=1",
         "train.ckpt_every=3", "skip_completed=false"]
TASK_RUNS = {
    "uuid": ["experiment=uuid_memory", "model=stories260k", "method=mora", "rank=8", "train.batch_size=4",
             "task.n_pairs=8", "task.eval_pairs=4"],
    "sft": ["experiment=finetune_r8", "task=tulu", "method=mora", "train.batch_size=2", "task.n_eval=4",
            "task.max_len=256", "task.lm_eval_limit=2", "task.lm_eval_max_gen_toks=8"],
    "c4": ["experiment=pretrain_c4", "method=mora", "train.batch_size=4", "task.eval_tokens=4096"],
}
# --tiny: the C4 model and blocks of tests/test_run_smoke.py (the other two already run at toy size)
TINY_TASK_RUNS = {"c4": ["model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
                         "model.num_heads=2", "task.vocab_size=300", "task.seq_len=32", "task.eval_tokens=256",
                         "task.eval_batch_size=8"]}
DTYPES = ("float32", "bfloat16")

# LLaMA-2-7B's shape (its config.json), a few layers deep; --tiny: a toy of the same proportions
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_heads=32, vocab_size=32000)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=172, num_heads=4, vocab_size=512)
# ranks: 8 with rotation, the paper's setting for small ranks (conf/experiment/finetune_r8.yaml) and its
# "1.15x" claim; 256 with sharing (finetune_r256.yaml), "almost the same". --tiny: 2 and 16, which fit width 64
RANKS, TINY_RANKS = (8, 256), (2, 16)


def arms(tiny: bool) -> tuple:
    """(method, rank, operator) of each arm, and (MoRA arm, LoRA arm, the paper's bound or None) pairs."""
    small, large = TINY_RANKS if tiny else RANKS
    lora_small, mora_small = ("lora", small, None), ("mora", small, "rotate")
    lora_large, mora_large = ("lora", large, None), ("mora", large, "share")
    pairs = ((mora_small, lora_small, 1.15), (mora_large, lora_large, None))
    return (lora_small, mora_small, lora_large, mora_large), pairs


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="toy sizes everywhere: the dry run of the code path")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the LLaMA-2-7B-shaped model")
    parser.add_argument("--batch", type=int, default=4, help="sequences per whole-model step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each arm before timing")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (each arm once per round)")
    parser.add_argument("--skip", nargs="*", default=[], choices=("tasks", "bench", "whole_model", "exactness"))
    parser.add_argument("--out", type=Path, default=REPO / "results" / "gpu_check")
    from mora.operators import GPU_AUTOGRAD_CHOICES  # torch alone: light

    parser.add_argument("--gpu-autograd", choices=GPU_AUTOGRAD_CHOICES, default=None,
                        help="how MoRA is differentiated on CUDA (mora/operators.py, GPU_AUTOGRAD); default: its own")
    args = parser.parse_args(argv)
    if args.tiny:
        args.layers, args.batch, args.seq_len, args.warmup, args.rounds = 2, 2, 32, 1, 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no GPU (torch.cuda.is_available() is False); nothing was run. "
              "The dry run on the CPU: python experiments/gpu_check.py --device cpu --tiny", file=sys.stderr)
        return 1
    if args.gpu_autograd:
        from mora import operators
        operators.GPU_AUTOGRAD = args.gpu_autograd
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "hardware": hardware(args.device)}
    start = time.perf_counter()
    if "tasks" not in args.skip:
        report["tasks"] = [task_run(kind, dtype, args) for kind in TASK_RUNS for dtype in DTYPES]
    if "bench" not in args.skip:
        report["bench"] = adapter_benchmark(args)
    if "whole_model" not in args.skip:
        report["whole_model"] = whole_model_comparison(args)
    if "exactness" not in args.skip:
        report["exactness"] = exactness(args)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["passed"] = passed(report)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    print(f"gpu-check: {'passed' if report['passed'] else 'FAILED'} -> {args.out / 'gpu_check.md'}")
    return 0 if report["passed"] else 1


def hardware(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                 "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    return info


# ----------------------------------------------------------------------------- 1. task runs

def task_run(kind: str, dtype: str, args: argparse.Namespace) -> dict:
    """One short run of ``kind`` in ``dtype`` through the entry point; never raises."""
    from hydra import compose, initialize_config_dir

    from experiments.loop.records import find_runs
    from experiments.run import execute

    out_root = args.out / "runs" / f"{kind}-{dtype}"
    overrides = [*TASK_RUNS[kind], *STEPS, *(TINY_TASK_RUNS.get(kind, []) if args.tiny else []),
                 f"device={args.device}", f"train.dtype={dtype}", f"out_root={out_root}"]
    row = {"kind": kind, "dtype": dtype, "overrides": overrides}
    reset_peak(args.device)
    start = time.perf_counter()
    try:
        with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
            summary = execute(compose("config", overrides=overrides))
        [run] = find_runs(out_root)
        losses = [m["loss"] for m in run["metrics"] if "loss" in m]
        row |= {"status": summary["status"], "losses": losses, "final": summary["final"],
                "ok": summary["status"] == "completed" and len(losses) == 3 and all(map(math.isfinite, losses))}
    except Exception as err:  # a failure is a finding of the check: record it, run the other parts
        row |= {"status": "error", "error": f"{type(err).__name__}: {err}", "ok": False}
    return row | {"seconds": round(time.perf_counter() - start, 2), "peak_memory_gb": peak_gb(args.device)}


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None


# ----------------------------------------------------------------------------- 2. adapter benchmark

def adapter_benchmark(args: argparse.Namespace) -> dict:
    """benchmarks/bench_adapters.py through its command line (LLaMA-2-7B shapes; --tiny: its --quick)."""
    out = args.out / "bench_adapters.json"
    command = [sys.executable, str(REPO / "benchmarks" / "bench_adapters.py"), "--device", args.device,
               "--dtype", "bfloat16", "--out", str(out), *(["--quick"] if args.tiny else [])]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    row = {"command": " ".join(command[1:]), "returncode": done.returncode,
           "seconds": round(time.perf_counter() - start, 1), "ok": done.returncode == 0 and out.exists()}
    if row["ok"]:
        row["result_file"] = str(out)
    else:
        row["error"] = (done.stdout + done.stderr)[-2000:]
    return row


# ----------------------------------------------------------------------------- 3. whole model

def arm_name(arm) -> str:
    method, rank, operator = arm
    return f"{method} r={rank}" + (f" {operator}" if operator else "")


def build_arm(arm, args: argparse.Namespace):
    """(model with ``arm``'s adapters on all 7 projections, its optimizer), bfloat16, on the device."""
    from experiments.models.loading import build_llama_from_config
    from experiments.schema import ModelSpec
    from mora.adapters import AdapterConfig, build_optimizer, inject_adapters

    shape = TINY_LLAMA if args.tiny else LLAMA2_7B
    spec = ModelSpec(name="llama2_7b_shape", source="config", hidden_size=shape["hidden_size"],
                     intermediate_size=shape["intermediate_size"], num_layers=args.layers,
                     num_heads=shape["num_heads"], max_position_embeddings=max(args.seq_len, 4096))
    model = build_llama_from_config(spec, shape["vocab_size"], seed=0, dtype="bfloat16")
    method, rank, operator = arm
    config = AdapterConfig(method=method, rank=rank, **({"operator": operator} if operator else {}))
    inject_adapters(model, config)
    model = model.to(args.device).train()
    return model, build_optimizer(model, config, lr=1e-4)


def train_step(model, optimizer, batch: torch.Tensor) -> float:
    loss = model(input_ids=batch, labels=batch).loss  # (B, T) -> scalar
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # .item() waits for the device: the step is over when the timer stops


def whole_model_comparison(args: argparse.Namespace) -> dict:
    """Peak memory of each arm alone, then step times of all arms interleaved (medians)."""
    vocab = (TINY_LLAMA if args.tiny else LLAMA2_7B)["vocab_size"]
    batch = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    batch = batch.to(args.device)  # (B, T)
    all_arms, pairs = arms(args.tiny)
    measured = {}
    for arm in all_arms:  # memory: one arm on the device at a time
        model, optimizer = build_arm(arm, args)
        train_step(model, optimizer, batch)  # the optimizer's state exists from here on
        reset_peak(args.device)
        train_step(model, optimizer, batch)
        measured[arm] = {"peak_memory_gb": peak_gb(args.device), "trainable": sum(
            p.numel() for p in model.parameters() if p.requires_grad), "seconds": []}
        del model, optimizer
        if args.device == "cuda":
            torch.cuda.empty_cache()
    built = {arm: build_arm(arm, args) for arm in all_arms}
    for _ in range(args.warmup):
        for arm, (model, optimizer) in built.items():
            train_step(model, optimizer, batch)
    order = list(all_arms)
    rng = random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)
        for arm in order:
            start = time.perf_counter()
            train_step(*built[arm], batch)
            measured[arm]["seconds"].append(time.perf_counter() - start)
    median = {arm: statistics.median(m["seconds"]) for arm, m in measured.items()}
    rows = [{"arm": arm_name(arm), "median_ms": round(1000 * median[arm], 3), "peak_memory_gb": m["peak_memory_gb"],
             "trainable_parameters": m["trainable"]} for arm, m in measured.items()]
    ratios = [{"mora": arm_name(mora), "lora": arm_name(lora), "paper_at_most": claim,
               "step_time_ratio": round(median[mora] / median[lora], 3),
               "memory_ratio": (round(measured[mora]["peak_memory_gb"] / measured[lora]["peak_memory_gb"], 3)
                                if args.device == "cuda" else None)} for mora, lora, claim in pairs]
    return {"model": {**(TINY_LLAMA if args.tiny else LLAMA2_7B), "layers": args.layers, "dtype": "bfloat16",
                      "batch": args.batch, "seq_len": args.seq_len},
            "rounds": args.rounds, "arms": rows, "ratios": ratios, "ok": True}


# ----------------------------------------------------------------------------- 4. exactness on the device

# (k, d, r̂): not divisible either way, divisible, one block (k ≤ r̂), each with every layout; and LLaMA-2-7B's
# up_proj at r = 8's r̂ with each operator in the official code's layout (its float64 copies are 360 MB each)
EXACT_SHAPES = [(37, 53, 8), (53, 37, 6), (64, 24, 8), (3, 40, 8)]
LARGE_EXACT_SHAPE, LARGE_EXACT_LAYOUT = (4096, 11008, 348), ("cyclic", "cyclic", "wrap")
# largest |a - b| / largest |b| allowed: float64 leaves only summation order; float32 (TF32 off) ~1e-6
EXACT_TOLERANCE = {"float64": 1e-10, "float32": 1e-4}


def layouts() -> list[tuple[str, str, str, str]]:
    """(operator, compress groups, decompress groups, padding): every layout each operator admits."""
    from mora.operators import GROUP_KINDS, OPERATORS, PADDINGS

    groups = [(c, d) for c in GROUP_KINDS for d in GROUP_KINDS]
    return [(op, c, d, pad) for op in OPERATORS for (c, d) in (groups if op == "share" else groups[:1])
            for pad in PADDINGS]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def exactness_case(k: int, d: int, r_hat: int, layout: tuple, device: str) -> dict:
    """One shape and layout: the device against the CPU (float64) and merged against unmerged (float64, float32)."""
    from mora.layer import MoRAAdapter, MoRALinear

    generator = torch.Generator().manual_seed(k * 100003 + d * 101 + r_hat)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r̂ > min(d, k) warns on purpose for the one-block shape
        cpu = MoRAAdapter(k, d, r_hat, *layout).double()
    with torch.no_grad():
        cpu.M.copy_(torch.randn(r_hat, r_hat, generator=generator, dtype=torch.float64))
    x = torch.randn(2, 3, k, generator=generator, dtype=torch.float64)       # (B, T, k)
    grad_out = torch.randn(2, 3, d, generator=generator, dtype=torch.float64)
    base = torch.nn.Linear(k, d, dtype=torch.float64)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d, k, generator=generator, dtype=torch.float64) / k ** 0.5)
        base.bias.copy_(torch.randn(d, generator=generator, dtype=torch.float64))

    def forward_and_grad(adapter, inputs):
        adapter.zero_grad(set_to_none=True)
        out = adapter(inputs)
        (out * grad_out.to(out)).sum().backward()
        return out.detach(), adapter.M.grad.detach()

    errors = {}
    cpu_out, cpu_grad = forward_and_grad(cpu, x)
    cpu_delta = cpu.delta_weight().detach()
    adapter = copy.deepcopy(cpu).to(device)
    dev_out, dev_grad = forward_and_grad(adapter, x.to(device))
    errors["forward_vs_cpu"] = relative_error(dev_out, cpu_out)
    errors["delta_weight_vs_cpu"] = relative_error(adapter.delta_weight(), cpu_delta)
    errors["grad_M_vs_cpu"] = relative_error(dev_grad, cpu_grad)
    for dtype in ("float64", "float32"):
        layer = MoRALinear(copy.deepcopy(base), copy.deepcopy(cpu)).to(device=device, dtype=getattr(torch, dtype))
        inputs = x.to(device=device, dtype=getattr(torch, dtype))
        weight = layer.base_layer.weight.detach().clone()
        with torch.no_grad():
            unmerged = layer(inputs)
            layer.merge()
            merged = layer(inputs)
            layer.unmerge()
        errors[f"merged_vs_unmerged_{dtype}"] = relative_error(merged, unmerged)
        errors[f"unmerge_restores_W0_{dtype}"] = relative_error(layer.base_layer.weight, weight)
    ok = all(error <= EXACT_TOLERANCE["float32" if name.endswith("float32") else "float64"]
             for name, error in errors.items())
    return {"shape": [k, d, r_hat], "layout": "-".join(layout), "errors": errors, "ok": ok}


def exactness(args: argparse.Namespace) -> dict:
    """Every layout on every shape; TF32 off, so float32 products are float32's (restored after)."""
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    start = time.perf_counter()
    try:
        plan = [(shape, layout) for shape in EXACT_SHAPES for layout in layouts()]
        if not args.tiny:
            plan += [(LARGE_EXACT_SHAPE, layout) for layout in layouts() if layout[1:] == LARGE_EXACT_LAYOUT]
        cases = [exactness_case(*shape, layout, args.device) for shape, layout in plan]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    worst = {name: max(case["errors"][name] for case in cases) for name in cases[0]["errors"]}
    return {"tolerance": EXACT_TOLERANCE, "cases": cases, "worst": worst,
            "seconds": round(time.perf_counter() - start, 1), "ok": all(case["ok"] for case in cases)}


# ----------------------------------------------------------------------------- report

def passed(report: dict) -> bool:
    """Every part ran: the task runs completed with finite losses and the benchmark exited 0. The
    step-time ratios are measurements, reported beside the paper's claim, not pass/fail."""
    return (all(row["ok"] for row in report.get("tasks", []))
            and all(report.get(part, {}).get("ok", True) for part in ("bench", "whole_model", "exactness")))


def markdown(report: dict) -> str:
    hw = report["hardware"]
    lines = [f"# GPU check ({hw.get('gpu', hw['device'])}, torch {hw['torch']})", "",
             f"Passed: {report['passed']}; {report['seconds']} s in all.", ""]
    if "tasks" in report:
        lines += ["## Task runs (3 optimizer steps each)", "", "| task | dtype | status | losses | s | peak GB |",
                  "|---|---|---|---|---|---|"]
        for row in report["tasks"]:
            losses = ", ".join(f"{x:.4f}" for x in row.get("losses", [])) or row.get("error", "")
            lines.append(f"| {row['kind']} | {row['dtype']} | {row['status']} | {losses} | {row['seconds']} | "
                         f"{row['peak_memory_gb']} |")
        lines.append("")
    if "bench" in report:
        bench = report["bench"]
        outcome = f"results in `{bench['result_file']}`." if bench["ok"] else "failed (see the JSON)."
        lines += ["## Adapter benchmark", "",
                  f"`{bench['command']}`: exit {bench['returncode']}, {bench['seconds']} s; {outcome}", ""]
    if "whole_model" in report:
        whole = report["whole_model"]
        m = whole["model"]
        lines += ["## Whole-model training step, MoRA vs LoRA", "",
                  f"LLaMA-2-7B shape (width {m['hidden_size']}, MLP {m['intermediate_size']}, vocabulary "
                  f"{m['vocab_size']}), {m['layers']} layers, {m['dtype']}, batch {m['batch']} x {m['seq_len']} "
                  f"tokens, medians of {whole['rounds']} interleaved rounds.", "",
                  "| arm | median step ms | peak GB | trainable |", "|---|---|---|---|"]
        lines += [f"| {r['arm']} | {r['median_ms']} | {r['peak_memory_gb']} | {r['trainable_parameters']:,} |"
                  for r in whole["arms"]]
        lines += ["", "| MoRA / LoRA | step time | memory | paper |", "|---|---|---|---|"]
        lines += [f"| {r['mora']} / {r['lora']} | {r['step_time_ratio']}x | {r['memory_ratio']} | "
                  f"{'<= %sx' % r['paper_at_most'] if r['paper_at_most'] else 'almost the same'} |"
                  for r in whole["ratios"]]
    if "exactness" in report:
        exact = report["exactness"]
        shapes = sorted({tuple(case["shape"]) for case in exact["cases"]})
        lines += ["", "## Exactness on the device (largest |a - b| / largest |b| over the shapes)", "",
                  f"Shapes (k, d, r̂): {', '.join(map(str, shapes))}; tolerance float64 "
                  f"{exact['tolerance']['float64']:g}, float32 {exact['tolerance']['float32']:g}; "
                  f"{exact['seconds']} s.", "",
                  "| layout | " + " | ".join(exact["worst"]) + " | ok |",
                  "|---|" + "---|" * (len(exact["worst"]) + 1)]
        for layout in dict.fromkeys(case["layout"] for case in exact["cases"]):
            mine = [case for case in exact["cases"] if case["layout"] == layout]
            lines.append(f"| {layout} | " + " | ".join(f"{max(c['errors'][name] for c in mine):.1e}"
                                                      for name in exact["worst"])
                         + f" | {all(c['ok'] for c in mine)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
