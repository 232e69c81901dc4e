"""The paper's benchmarks (Table 1; Tables 4, 6, 7 of Section 5.2 and Appendix C) with lm-eval.

The model object is evaluated in process: adapted (MoRA/LoRA layers in place) or merged, it is
wrapped in lm-eval's ``HFLM`` as it is, so the score is that of the trained weights and nothing is
saved or reloaded on the way. Our task YAMLs live in ``lm_eval_tasks/`` (its README lists every
task with the table it stands for); built-in lm-eval tasks (``mmlu``, ``mmlu_anatomy``, ...) are
found as well. Local data reaches our tasks through the TaskManager's metadata (``data_root``,
checked against SHA256SUMS by every loader), so nothing depends on the working directory.

Results are files: :func:`save_eval_results` writes ``eval_results.json`` in the run folder,
beside ``metrics.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.paths import DEFAULT_DATA_ROOT, LM_EVAL_TASKS_DIR
from experiments.files import atomic_write_bytes

EVAL_RESULTS = "eval_results.json"
SEED = 1234  # python, numpy, torch and few-shot sampling seeds: the same call gives the same scores


def evaluate_with_lm_eval(model, tokenizer, tasks: Sequence[str], *, data_root: str | Path = DEFAULT_DATA_ROOT,
                          num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 16,
                          device: str | None = None, max_gen_toks: int | None = None,
                          max_length: int | None = None, adaptllm_root: str | Path | None = None,
                          log_samples: bool = False, bootstrap_iters: int = 100) -> dict:
    """Score ``model`` on lm-eval ``tasks``; returns ``{"metrics": {"<task>/<metric>": value},
    "lm_eval": <lm-eval's results, JSON-able>, "settings": {...}}``.

    ``num_fewshot`` overrides the tasks' own (ours and AdaptLLM's fix 0: their prompts are final);
    ``limit`` takes the first N (or a fraction) of each task's documents; ``max_gen_toks`` overrides
    the generation length of every generative task (None: each YAML's); ``max_length`` defaults to
    the model's position count (512 for stories260K) so lm-eval truncates contexts to what the
    model can attend to. ``adaptllm_root`` optionally holds local copies of AdaptLLM's test sets
    (``<subset>.jsonl``) for machines without the hub. The model's train/eval mode is restored.
    One process only (lm-eval does not shard a model object): under accelerate, call it on the
    main process with the unwrapped model.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    if device is not None:
        model.to(device)
    was_training = model.training
    with preserved_rng():  # lm-eval seeds the global generators; a training run must not notice
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                      max_length=max_length or context_length(model))
            # what our task loaders need (lm_eval_tasks/utils.py): where the offline data is, and
            # the tokenizer and window of the model for the per-token metrics
            metadata = {"data_root": str(Path(data_root).resolve()), "tokenizer": tokenizer,
                        "max_length": lm.max_length,
                        "adaptllm_root": None if adaptllm_root is None else str(Path(adaptllm_root).resolve())}
            raw = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                  task_manager=task_manager(tasks, metadata), log_samples=log_samples,
                                  gen_kwargs=None if max_gen_toks is None else {"max_gen_toks": max_gen_toks},
                                  bootstrap_iters=bootstrap_iters, random_seed=SEED, numpy_random_seed=SEED,
                                  torch_random_seed=SEED, fewshot_random_seed=SEED)
        finally:
            model.train(was_training)  # HFLM switched it to eval mode
    settings = {"tasks": tasks, "num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size,
                "max_gen_toks": max_gen_toks, "max_length": lm.max_length, "data_root": metadata["data_root"]}
    return {"metrics": flat_metrics(raw), "lm_eval": jsonable(raw), "settings": settings}


@contextlib.contextmanager
def preserved_rng():
    """Restore python's, numpy's and torch's (CUDA's too) global random states on exit."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def context_length(model) -> int:
    """The positions the model was trained on (LLaMA: ``max_position_embeddings``)."""
    return int(model.config.max_position_embeddings)


def task_manager(tasks: Sequence[str], metadata: dict):
    """A TaskManager over ``lm_eval_tasks/``, with lm-eval's built-in tasks only when ``tasks``
    need them: indexing the ~15K built-in YAMLs takes seconds, our folder milliseconds."""
    from lm_eval.tasks import TaskManager

    own = TaskManager(include_defaults=False, include_path=str(LM_EVAL_TASKS_DIR), metadata=metadata)
    if all(resolvable(name, own.task_index) for name in tasks):
        return own
    return TaskManager(include_path=str(LM_EVAL_TASKS_DIR), metadata=metadata)


def resolvable(name: str, index: dict) -> bool:
    """Whether ``name`` and, for a group, every member (recursively) is in the TaskManager's
    ``task_index``: lm-eval skips a YAML it cannot parse without a word, so a typo shows here."""
    entry = index.get(name)
    if entry is None:
        return False
    cfg = entry.cfg or {}
    if "group" not in cfg or not isinstance(cfg.get("task"), list):
        return True
    names = [m if isinstance(m, str) else m.get("task", m.get("group")) for m in cfg["task"]]
    return all(isinstance(n, str) and resolvable(n, index) for n in names)


# ----------------------------------------------------------------------------- results

def flat_metrics(raw: dict) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` over lm-eval's tasks and groups.

    lm-eval keys a metric ``"<metric>,<filter>"``; the filter is appended only when it is not
    ``none`` (``"<task>/<metric>/<filter>"``). A task run with k > 0 few-shot examples is named
    ``"<task>@<k>shot"`` so that MMLU 0-shot and 5-shot (Table 1) can live in one file; a group
    (``mmlu``) takes its members' k, which lm-eval's ``n-shot`` leaves out for the top group.
    """
    shots = group_shots(raw)

    def named(task: str) -> str:
        return f"{task}@{shots[task]}shot" if shots.get(task) else task

    flat = {}
    for task, values in raw.get("results", {}).items():
        for key, value in values.items():
            # not a metric: the "alias" entry, and stderrs lm-eval could not compute (it writes "N/A")
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filter_name = key.split(",", 1)
            flat[f"{named(task)}/{metric}" + ("" if filter_name == "none" else f"/{filter_name}")] = float(value)
    for task, counts in raw.get("n-samples", {}).items():
        flat[f"{named(task)}/n_samples"] = float(counts["effective"])
    return flat


def group_shots(raw: dict) -> dict[str, int]:
    """lm-eval's ``n-shot`` ({task: k}) with every group of ``group_subtasks`` given its members' k
    when they agree (lm-eval 0.4.13 lists the ``mmlu_stem``-level groups but not ``mmlu`` itself)."""
    shots = dict(raw.get("n-shot", {}))
    members = raw.get("group_subtasks", {})

    def of(name: str):
        if name not in shots and name in members:
            ks = {of(member) for member in members[name]}
            if len(ks) == 1 and None not in ks:
                shots[name] = ks.pop()
        return shots.get(name)

    for group in members:
        of(group)
    return shots


def jsonable(value: Any) -> Any:
    """``value`` with everything JSON cannot hold made printable: numpy values become numbers or
    lists, a tokenizer in the tasks' metadata becomes its class and name, NaN/inf stay floats."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "tolist"):  # numpy / torch scalars and arrays
        return jsonable(value.tolist())
    if hasattr(value, "name_or_path"):  # a tokenizer handed to the tasks through metadata
        return f"<{type(value).__name__} {value.name_or_path!r}>"
    return repr(value)


def save_eval_results(run_dir: str | Path, results: dict, **extra: Any) -> Path:
    """Add ``results`` (from :func:`evaluate_with_lm_eval`, plus ``extra`` fields such as
    ``merged`` or ``checkpoint_step``) to ``<run_dir>/eval_results.json``, atomically.

    The file keeps every evaluation under ``"evaluations"`` (appended, with its time) and the
    latest value of each metric of full evaluations under ``"metrics"``; a ``limit``-ed
    evaluation (a subset of the documents) is kept but never enters ``"metrics"``.
    """
    saved = read_eval_results(run_dir)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **jsonable(extra), **jsonable(results)}
    saved["evaluations"].append(entry)
    if results["settings"].get("limit") is None:
        saved["metrics"].update(results["metrics"])
    path = Path(run_dir) / EVAL_RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)  # eval.py --out may name a new folder
    atomic_write_bytes(path, (json.dumps(saved, indent=2) + "\n").encode("utf-8"))
    return path


def read_eval_results(run_dir: str | Path) -> dict:
    """The saved ``eval_results.json`` of a run (``{"metrics": {}, "evaluations": []}`` if none)."""
    path = Path(run_dir) / EVAL_RESULTS
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"metrics": {}, "evaluations": []}
