"""Every bad input a user can type is refused before any model is loaded, in one line that names the
field, and leaves no run folder behind; the command line prints that line, not a traceback.

Each row goes through the real entry point (``experiments.run.execute``) with the model loaders
replaced by a function that fails the test, as on a machine without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import experiments.run as run_module
from experiments.run import INPUT_ERRORS, execute
from tests.test_configs import REPO, compose

C4 = "experiment=pretrain_c4"

# (overrides, what the error must name); "{tmp}" is the test's folder
BAD_INPUTS = [
    # booleans are true or false only: bool("no") is True
    (["resume=no"], "resume"),
    (["resume=abc"], "resume"),
    (["skip_completed=maybe"], "skip_completed"),
    (["singular_values=abc"], "singular_values"),
    # numbers out of range
    (["lr=inf"], "lr"),
    (["lr=abc"], "lr"),
    (["lr=-1"], "lr"),
    (["lr=0"], "lr"),
    (["train.grad_clip=-1"], "train.grad_clip"),  # a negative max-norm flips the gradients
    (["train.weight_decay=-5"], "train.weight_decay"),
    (["method=lora", "method.alpha=-1"], "method.alpha"),
    (["task.eval_pairs=100000"], "task.eval_pairs"),  # more than task.n_pairs
    (["train.warmup_steps=100000"], "train.warmup_steps"),  # beyond train.max_steps
    # where the run goes and what watches it
    (["out_root="], "out_root"),
    (["out_root={tmp}/a_file"], "out_root"),  # a file, not a folder (made by the test)
    (["out_dir={tmp}/taken"], "out_dir"),  # already holds a run (made by the test)
    (["out_dir={tmp}/a_file"], "out_dir"),
    (["out_root=/proc/mora-runs"], "out_root"),  # no folder can be made there, not even by root
    (["logger=wandb", "logger.mode=sometimes"], "logger.mode"),
    (["logger=wandb", "+logger.mdoe=online"], "mdoe"),
    # module names, checked on the model's weightless skeleton
    (["method.target_modules=[q_proj,qproj]"], "method.target_modules ['qproj']"),  # a base the repository pretrains
    (["model=stories260k", "method.target_modules=[wq]"], "method.target_modules"),  # a llama2.c checkpoint
    ([C4, "method=lora", "method.target_modules=[wq]"], "method.target_modules"),  # a LLaMA built from a config
    ([C4, "method.trainable_modules=[embed_tokens,nrom]"], "method.trainable_modules"),
    (["method.target_modules=q_proj"], "method.target_modules"),  # a name, not a list
    (["method.target_modules=[q_proj,1]"], "method.target_modules"),
    (["method.target_modules=[]"], "target_modules"),
    # how many CPU threads: auto or a positive integer (experiments/threads.py)
    (["threads=0"], "threads"),
    (["threads=-2"], "threads"),
    (["threads=2.5"], "threads"),
    (["threads=true"], "threads"),
    (["threads=null"], "threads"),
    (["threads=half"], "threads"),
    # already refused by experiments/schema.py and the specs it builds
    (["device=tpu"], "device"),
    (["device=cuda"], "device=cuda"),
    (["scale=paper"], "requires_gpu"),
    (["logger.kind=tensorboard"], "logger"),
    (["seed=-1"], "seed"),
    (["model.source=s3"], "model.source"),
    (["model.hidden_size=0"], "model.hidden_size"),
    (["+model.flavour=x"], "flavour"),
    ([C4, "model.num_heads=3"], "model.num_heads"),
    (["rank=0"], "rank"),
    (["method.operator=spin"], "operator"),
    (["method.compress_groups=diagonal"], "compress_groups"),
    (["method.padding=mirror"], "padding"),
    (["method.rounding=up"], "rounding"),
    (["method.dropout=1.5"], "dropout"),
    (["method=loraplus", "method.loraplus_ratio=0.5"], "loraplus_ratio"),
    (["+method.flavour=x"], "flavour"),
    (["method=lora", "+method.merge_every=5"], "method.merge_every"),
    ([C4, "method=remora", "method.merge_every=7"], "method.merge_every"),
    ([C4, "method=remora", "method.group_switch=triple"], "method.group_switch"),
    ([C4, "method=relora", "method.restart_warmup_steps=0"], "method.restart_warmup_steps"),
    (["train.max_steps=null"], "train.max_steps"),
    (["train.max_steps=0"], "train.max_steps"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.batch_size=100000"], "train.batch_size"),  # more than task.n_pairs
    (["train.grad_accum=0"], "train.grad_accum"),
    (["train.log_every=0"], "train.log_every"),
    (["train.ckpt_every=0"], "train.ckpt_every"),
    (["train.warmup_steps=-1"], "train.warmup_steps"),
    (["train.scheduler=cosine_foo"], "train.scheduler"),
    (["train.dtype=float16"], "train.dtype"),
    ([C4, "train.min_lr_ratio=1.5"], "train.min_lr_ratio"),
    (["train.eval_steps=[5000]"], "train.eval_steps"),
    (["task.n_pairs=0"], "task.n_pairs"),
    (["task.eval_batch_size=0"], "task.eval_batch_size"),
    (["+task.flavour=x"], "flavour"),
]


def refuse_to_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the inputs were checked")


@pytest.fixture
def nothing_loads(monkeypatch, tmp_path):
    """No GPU, no model: any load fails the test. Makes the files some rows refer to."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for loader in ("load_model", "build_llama_from_config"):
        monkeypatch.setattr(run_module, loader, refuse_to_load)
    (tmp_path / "a_file").write_text("")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.yaml").write_text("rank: 8\n")


@pytest.mark.parametrize("overrides, field", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_fails_fast_in_one_line_naming_the_field(overrides, field, tmp_path, nothing_loads):
    runs = tmp_path / "runs"
    cfg = compose(f"out_root={runs}", *(o.format(tmp=tmp_path) for o in overrides))
    start = time.perf_counter()
    with pytest.raises(INPUT_ERRORS) as caught:
        execute(cfg)
    assert time.perf_counter() - start < 1.0  # validation only: no model, no data, no folder
    message = str(caught.value)
    assert field in message and "\n" not in message, message
    assert not runs.exists()  # no half-made run folder


@pytest.mark.usefixtures("one_thread")  # execute sets torch's threads: restored after this module
def test_module_names_are_checked_again_on_the_loaded_model_before_any_folder(tmp_path, monkeypatch):
    """Names are checked on the model's skeleton before loading; should the loaded model differ (the
    skeleton here claims a Linear ``qproj`` that stories260K lacks), the same one-line error comes
    after loading, before training or the run folder."""
    skeleton = torch.nn.ModuleDict({"q_proj": torch.nn.Linear(2, 2), "qproj": torch.nn.Linear(2, 2)})
    monkeypatch.setattr(run_module, "model_skeleton", lambda *args: skeleton)
    monkeypatch.setattr(run_module, "train", refuse_to_load)
    runs = tmp_path / "runs"
    with pytest.raises(ValueError) as caught:
        execute(compose("model=stories260k", "method.target_modules=[q_proj,qproj]", "device=cpu", f"out_root={runs}"))
    message = str(caught.value)
    assert message.startswith("method.target_modules ['qproj'] match no nn.Linear"), message
    assert "'v_proj'" in message and "\n" not in message  # the Linear names the model has
    assert not runs.exists()


def run_cli(*overrides: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env))


def test_the_command_line_prints_one_line_and_the_traceback_only_when_asked(tmp_path):
    done = run_cli("resume=no", f"out_root={tmp_path}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: resume must be true or false, got resume='no' (MORA_DEBUG=1 shows the traceback)"]
    debug = run_cli("resume=no", f"out_root={tmp_path}", MORA_DEBUG="1")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "resume must be true or false" in debug.stderr
    assert not any(tmp_path.iterdir())
