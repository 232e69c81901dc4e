"""Evaluate a trained run (or a saved adapter) with lm-eval:

    python experiments/eval.py --run results/runs/<task>/<scale>/<name> --tasks gsm8k_local_metamath,pubmedqa_local
    python experiments/eval.py --adapter <dir from mora.adapters.save_adapter> --model stories260k --tasks ...

The base model is rebuilt from the run's saved ``config.yaml`` (validated as at training time),
the adapters are injected and the run's ``checkpoint.pt`` loaded into them (with the switched
sharing groups and merged base weights of ReLoRA/ReMoRA restarts); ``--merge`` folds them into
the base weights first, which must not change any score. Results go to ``eval_results.json``
in the run (or adapter) folder; see experiments/evaluation/harness.py and lm_eval_tasks/README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

# `python experiments/<script>.py` from a checkout: the repository root on the path instead of this
# folder, whose package names (data, models, ...) must not shadow installed libraries
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from experiments.evaluation.harness import evaluate_with_lm_eval, save_eval_results  # noqa: E402
from experiments.models.loading import load_model  # noqa: E402
from experiments.data.offline import DEFAULT_DATA_ROOT  # noqa: E402
from experiments.loop.records import CONFIG  # noqa: E402
from experiments.paths import REPO_ROOT  # noqa: E402
from experiments.schema import build_run_config, model_spec  # noqa: E402
from experiments.loop.checkpoint import CHECKPOINT, load_checkpoint  # noqa: E402
from mora.adapters import inject_adapters, load_adapter, merge_and_unload  # noqa: E402


def load_run(run_dir: str | Path, device: str = "auto"):
    """(model with the run's trained weights, tokenizer, RunConfig, checkpoint step) of a run folder."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    saved = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8"))
    saved.pop("resolved", None)  # what execute() derived and recorded; build_run_config derives it again
    run = build_run_config(OmegaConf.create(saved | {"device": device}), torch.cuda.is_available())
    if run.model.source == "config":
        raise ValueError(f"{run_dir} pretrains a model from scratch (model.source=config); its C4 perplexity is "
                         "logged during training, lm-eval benchmarks need a pretrained base model")
    model, tokenizer = load_model(run.model, run.data_root, run.train.dtype)
    inject_adapters(model, run.adapter)
    loop = load_checkpoint(run_dir / CHECKPOINT, model)  # FFT: every weight; adapters: theirs and the trained ones
    return model.to(run.device).eval(), tokenizer, run, loop["step"]


def load_saved_adapter(adapter_dir: str | Path, model_name: str, data_root: str | Path | None,
                       dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) of the base ``conf/model/<model_name>.yaml`` with a saved adapter loaded."""
    model, tokenizer = load_model(model_spec(model_name), data_root or DEFAULT_DATA_ROOT, dtype)
    load_adapter(model, adapter_dir)
    return model.to(device).eval(), tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="run folder written by experiments/run.py")
    source.add_argument("--adapter", help="folder written by mora.adapters.save_adapter")
    parser.add_argument("--model", default="stories260k",
                        help="with --adapter: the base model (conf/model/<name>.yaml)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None, help="first N documents per task (a fraction if < 1)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-gen-toks", type=int, default=None, help="override every generative task's length")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="with --adapter: the base model's dtype (a run uses its train.dtype)")
    parser.add_argument("--data-root", default=None, help="offline data folder (default: the run's data_root)")
    parser.add_argument("--adaptllm-root", default=None, help="local copies of AdaptLLM's test sets (<subset>.jsonl)")
    parser.add_argument("--merge", action="store_true", help="merge the adapters into the base weights first")
    parser.add_argument("--log-samples", action="store_true", help="keep every prompt and response in the results")
    parser.add_argument("--out", default=None, help="folder for eval_results.json (default: the run or adapter folder)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    if args.run:
        model, tokenizer, run, step = load_run(args.run, args.device)
        data_root, extra = args.data_root or run.data_root, {"run": str(args.run), "checkpoint_step": step}
    else:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        model, tokenizer = load_saved_adapter(args.adapter, args.model, args.data_root, args.dtype, device)
        data_root, extra = args.data_root or DEFAULT_DATA_ROOT, {"adapter": str(args.adapter), "base_model": args.model}
    if args.merge:
        merge_and_unload(model)
    results = evaluate_with_lm_eval(model, tokenizer, args.tasks.split(","), data_root=data_root,
                                    num_fewshot=args.num_fewshot, limit=limit, batch_size=args.batch_size,
                                    max_gen_toks=args.max_gen_toks, adaptllm_root=args.adaptllm_root,
                                    log_samples=args.log_samples)
    path = save_eval_results(args.out or args.run or args.adapter, results, merged=args.merge, **extra)
    for key, value in sorted(results["metrics"].items()):
        print(f"{key:>50}  {value:.6g}")
    print(f"-> {path}")
    return results


if __name__ == "__main__":
    main()
