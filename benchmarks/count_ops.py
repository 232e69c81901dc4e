"""How much work each adapter asks of the device per call, counted rather than timed (``make count-ops``).

On a GPU at LLaMA-2-7B shapes a bfloat16 step of one projection is about half a millisecond, most of it
the host launching kernels (an H200 multiplies 4096×4096 by 256 tokens in microseconds), so there a
step's time follows how many kernels it launches and whether it waits for the device, not its FLOPs.
This script counts, for the same modules ``make bench`` times (benchmarks/bench_adapters.py: ours,
the straightforward implementation, peft's LoRA, the bare layer):

* **ops**: the aten operators dispatched (``TorchDispatchMode``), views and other metadata-only
  operators left out: each one left is a kernel on a GPU (a few launch two), on any device, so the
  CPU counts are the GPU's;
* **host syncs**: operators that make the host wait for the device (``.item()``, ``nonzero``, a copy
  between the host and the device);
* on CUDA, also the kernels launched and the runtime's synchronisations, from ``torch.profiler``.

for one training step of the layer (forward + backward), the adapter alone (``AdapterAlone``) and one
ΔW build (merge). Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for benchmarks/ (not installed)
from benchmarks.bench_adapters import (LLAMA2_7B_SHAPES, STRAIGHTFORWARD, AdapterAlone,  # noqa: E402
                                       build_modules, delta_weight_fns, environment, int_list, parse_shapes)
from mora.operators import OPERATORS  # noqa: E402

# operators that make the host wait for the device's result
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "item", "unique", "_unique2"}

# operators that return a tensor but only re-describe memory (no kernel), beside those marked as views
METADATA_OPS = {"detach", "alias", "lift_fresh", "_unsafe_view", "_reshape_alias"}


class OpCounter(TorchDispatchMode):
    """Counts the aten operators that do work (not views), and those that wait for the device."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.syncs: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        launches = any(isinstance(t, torch.Tensor) for t in torch.utils._pytree.tree_leaves(out))  # not a dtype
        if launches and not func.is_view and name not in METADATA_OPS:
            self.ops[name] += 1
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        devices = {t.device.type for t in tensors}
        if name in SYNC_OPS or len(devices) > 1 or (name in ("_to_copy", "copy_") and cross_device(func, args, kwargs)):
            self.syncs[name] += 1
        return out


def cross_device(func, args, kwargs) -> bool:
    """A copy whose result lives on another device than its source: a host↔device transfer."""
    source = args[0] if func.overloadpacket.__name__ == "_to_copy" else args[1]
    target = kwargs.get("device") if func.overloadpacket.__name__ == "_to_copy" else args[0].device
    return isinstance(source, torch.Tensor) and target is not None and torch.device(target).type != source.device.type


def counted(fn, device: str) -> dict:
    fn()  # once untimed: lazy state (rotation tables, peft's caches) is built before counting
    counter = OpCounter()
    with counter:
        fn()
    result = {"ops": sum(counter.ops.values()), "host_syncs": sum(counter.syncs.values()),
              "by_op": dict(counter.ops.most_common()), "syncs_by_op": dict(counter.syncs)}
    if device == "cuda":
        try:
            result |= profiled(fn)
        except Exception as err:  # the op counts stand without the profiler's
            result["profiler_error"] = f"{type(err).__name__}: {err}"
    return result


def profiled(fn) -> dict:
    """CUDA kernels launched and runtime synchronisations of one call (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    runtime = {e.key: e.count for e in events if e.key.startswith(("cuda", "cu"))}
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    launches = sum(c for key, c in runtime.items() if "LaunchKernel" in key)
    syncs = sum(c for key, c in runtime.items() if "Synchronize" in key)  # the call's, and the one closing it
    memcpy = sum(c for key, c in runtime.items() if "Memcpy" in key)
    return {"cuda_kernels": kernels, "cuda_launches": launches, "cuda_synchronize": syncs, "cuda_memcpy": memcpy}


def count_shape(k: int, d: int, tokens: int, ranks: list[int], device: str, dtype: torch.dtype) -> list[dict]:
    base = nn.Linear(k, d, bias=False).to(device=device, dtype=dtype).requires_grad_(False)
    modules = build_modules(base, ranks)
    delta_fns = delta_weight_fns(modules)
    x = torch.randn(tokens, k, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(tokens, d, device=device, dtype=dtype)
    rows = []
    for (rank, method), module in modules.items():
        if method == "bare-again":
            continue

        def step(module=module):
            x.grad = None
            for p in module.parameters():
                p.grad = None
            module(x).backward(grad_out)

        row = {"shape": f"{k}->{d}", "tokens": tokens, "rank": rank, "method": method, "step": counted(step, device)}
        if method in OPERATORS or method in STRAIGHTFORWARD.values():
            alone = AdapterAlone(module)
            row["adapter"] = counted(lambda alone=alone: alone(x).backward(grad_out), device)
        if (rank, method) in delta_fns:
            row["delta_weight"] = counted(delta_fns[(rank, method)], device)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    cuda = any("cuda_kernels" in row["step"] for row in rows)
    head = ["k→d", "T", "r", "method", "step ops", "adapter ops", "ΔW ops", "host syncs (step/adapter/ΔW)"]
    head += ["step kernels", "ΔW kernels", "cuda syncs (step/ΔW)"] if cuda else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        parts = [row.get(part, {}) for part in ("step", "adapter", "delta_weight")]
        cells = [row["shape"], str(row["tokens"]), str(row["rank"] or "–"), row["method"],
                 *(str(p.get("ops", "–")) for p in parts), " / ".join(str(p.get("host_syncs", "–")) for p in parts)]
        if cuda:
            cells += [str(parts[0].get("cuda_kernels", "–")), str(parts[2].get("cuda_kernels", "–")),
                      f"{parts[0].get('cuda_synchronize', '–')} / {parts[2].get('cuda_synchronize', '–')}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--shapes", type=parse_shapes, default=None, help="KxD,KxD (default: LLaMA-2-7B's three)")
    parser.add_argument("--ranks", type=int_list, default=[8, 256])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("results/bench/count_ops.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here (torch.cuda.is_available() is False)")
    torch.manual_seed(0)
    rows = [row for k, d in (args.shapes or LLAMA2_7B_SHAPES)
            for row in count_shape(k, d, args.tokens, args.ranks, args.device, getattr(torch, args.dtype))]
    result = {"environment": environment(args.device), "settings": {**vars(args), "out": str(args.out)},
              "rows": rows}
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
