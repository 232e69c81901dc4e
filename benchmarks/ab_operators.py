"""A change to mora/operators.py against a git revision of it, side by side in one process (CPU or CUDA).

The revision's operators.py is loaded as a second module from ``git show REV:mora/operators.py``; both
run the same adapter (its M, layout and rotation tables) on the same x, as ``AdapterAlone`` does in
``make bench``: zeros stand in for the frozen layer's output and Δx is added into them, forward and backward.
Rounds are interleaved in a fresh random order; the report is the median time of the working tree's
operators over the revision's per configuration, on LLaMA-2-7B's three shapes at r = 8 and 256, every
operator, 256 and 2,048 tokens. On the CPU the clock is the thread's CPU time with one thread.

    python benchmarks/ab_operators.py --rev HEAD            # this checkout's changes against the last commit
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the checkout, for benchmarks/ (not installed)
from benchmarks.bench_adapters import LLAMA2_7B_SHAPES, int_list, parse_shapes  # noqa: E402
from mora import operators as working_tree  # noqa: E402
from mora.layer import MoRAAdapter  # noqa: E402


def operators_at(rev: str):
    """mora/operators.py as of ``rev``, imported as its own module (its relative imports made absolute)."""
    source = subprocess.run(["git", "show", f"{rev}:mora/operators.py"], cwd=REPO, check=True, capture_output=True,
                            text=True).stdout.replace("\nfrom .", "\nfrom mora.")
    path = Path(tempfile.mkdtemp()) / "operators_at_rev.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("operators_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def step_fn(module, adapter: MoRAAdapter, x: torch.Tensor, grad_out: torch.Tensor):
    def step():
        x.grad = adapter.M.grad = None
        out = torch.zeros_like(grad_out)
        module.add_mora_update(out, x, adapter.M, adapter.layout, adapter.cos, adapter.sin).backward(grad_out)
    return step


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    clock = time.thread_time if device == "cpu" else time.perf_counter
    start = clock()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return clock() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD", help="the git revision whose operators are the baseline")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--shapes", type=parse_shapes, default=None, help="KxD,KxD (default: LLaMA-2-7B's three)")
    parser.add_argument("--ranks", type=int_list, default=[8, 256])
    parser.add_argument("--tokens", type=int_list, default=[256, 2048])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("results/bench/ab_operators.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.device == "cpu":
        torch.set_num_threads(1)
    baseline, dtype, rng = operators_at(args.rev), getattr(torch, args.dtype), random.Random(0)
    rows = []
    for tokens in args.tokens:
        for k, d in args.shapes or LLAMA2_7B_SHAPES:
            for rank in args.ranks:
                for operator in working_tree.OPERATORS:
                    adapter = MoRAAdapter.from_rank(k, d, rank, operator).to(device=args.device, dtype=dtype)
                    with torch.no_grad():
                        adapter.M.normal_(0.0, 0.01)
                    x = torch.randn(tokens, k, device=args.device, dtype=dtype, requires_grad=True)
                    grad_out = torch.randn(tokens, d, device=args.device, dtype=dtype)
                    fns = {"rev": step_fn(baseline, adapter, x, grad_out),
                           "tree": step_fn(working_tree, adapter, x, grad_out)}
                    times = {name: [] for name in fns}
                    for round_index in range(args.rounds + 1):  # the first round warms up, untimed
                        for name in rng.sample(list(fns), len(fns)):
                            elapsed = timed(fns[name], args.device)
                            if round_index:
                                times[name].append(elapsed)
                    ratio = statistics.median(times["tree"]) / statistics.median(times["rev"])
                    rows.append(dict(shape=f"{k}->{d}", tokens=tokens, rank=rank, operator=operator, ratio=ratio,
                                     rev_s=statistics.median(times["rev"]), times=times))
                    print(f"T={tokens:<5} {k}->{d:<6} r={rank:<4} {operator:9} tree/{args.rev} {ratio:.3f} "
                          f"({rows[-1]['rev_s'] * 1e3:.1f} ms)", flush=True)
    ratios = [row["ratio"] for row in rows]
    summary = dict(median=statistics.median(ratios), min=min(ratios), max=max(ratios))
    print(f"tree/{args.rev}: median {summary['median']:.3f}, range {summary['min']:.3f}–{summary['max']:.3f} "
          f"over {len(rows)} configurations")
    result = dict(settings={**vars(args), "out": str(args.out), "shapes": args.shapes}, summary=summary, rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
