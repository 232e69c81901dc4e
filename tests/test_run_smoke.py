"""The entry point end to end on stories260K (CPU, offline): a 3-step run of every method and MoRA
operator, a run killed by SIGKILL (after a checkpoint, or before the first) and resumed that
matches an uninterrupted one bit for bit, a NaN that stops the run with the last good checkpoint
kept, resumes that must be refused or must leave a finished run as it was, and make's
``skip_completed=true`` continuing an interrupted run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import experiments.run as run_module
from experiments.loop.records import find_runs, read_run
from experiments.run import execute
from experiments.evaluation.spectra import load_spectra
from experiments.loop.checkpoint import CHECKPOINT
from experiments.tasks import build_task
from mora.adapters import adapter_parameters
from tests.test_configs import EXPERIMENTS, METHODS, REPO, compose

# code-path runs use the real stories260K (loaded in a second); the UUID preset's own base (stories_w128) is
# pretrained by `make base`, which tests/test_local_base.py covers on a tiny recipe
TINY = ["model=stories260k", "train.max_steps=3", "train.warmup_steps=1", "train.batch_size=4", "task.n_pairs=8", "task.eval_pairs=4",
        "train.eval_steps=[3]", "train.log_every=1", "train.ckpt_every=3", "device=cpu"]
MORA_OPERATORS = ("truncate", "share", "decouple", "rotate")
RUNS = [[f"method={m}"] + (["method.merge_every=2"] if m in ("relora", "remora") else [])
        for m in METHODS if m != "mora"] + [["method=mora", f"method.operator={op}"] for op in MORA_OPERATORS]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def base_weights_modified(weights: dict) -> bool:
    """Whether the layers' flags in a checkpoint say a restart wrote updates into base weights."""
    flags = [t.item() for k, t in weights.items() if k.endswith(".base_weight_modified")]
    assert flags  # every adapter layer saves its flag
    return all(flags)


def mora_groups(weights: dict) -> list[list[int]]:
    """The sharing groups MoRA layers saved in a checkpoint (indices into GROUP_KINDS)."""
    return [t.tolist() for k, t in weights.items() if k.endswith(".mora.groups")]


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock ``time`` field."""
    return [{k: v for k, v in row.items() if k != "time"} for row in read_run(run_dir)["metrics"]]


def three_step_run(tmp_path: Path, *overrides: str) -> dict:
    """Run TINY with ``overrides`` into ``tmp_path``; check the run folder; return :func:`read_run`'s."""
    summary = execute(compose(*overrides, *TINY, f"out_root={tmp_path}"))
    assert summary["status"] == "completed", summary
    [run] = find_runs(tmp_path)
    assert run["dir"].parent == tmp_path / "uuid" / "mini"
    assert [m["step"] for m in run["metrics"]] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in run["metrics"])
    assert run["summary"]["final"]["eval/char_accuracy"] == run["metrics"][-1]["eval/char_accuracy"]
    assert 0 <= run["summary"]["final"]["eval/char_accuracy"] <= 100
    assert run["environment"]["versions"]["torch"] == torch.__version__
    assert (run["dir"] / "config.yaml").is_file() and (run["dir"] / "environment.json").is_file()
    ckpt = torch.load(run["dir"] / CHECKPOINT, map_location="cpu", weights_only=False)
    assert ckpt["loop"]["step"] == 3 and ckpt["weights"]
    assert all(torch.isfinite(t).all() for t in ckpt["weights"].values())
    return run


@pytest.mark.parametrize("overrides", RUNS, ids=[" ".join(o) for o in RUNS])
def test_three_step_run(overrides, tmp_path):
    run = three_step_run(tmp_path, *overrides)
    asked = dict(o.split("=") for o in overrides)
    assert run["config"]["method"]["name"] == asked["method"]
    assert run["config"]["method"].get("operator") == asked.get("method.operator", run["config"]["method"].get("operator"))
    ckpt = torch.load(run["dir"] / CHECKPOINT, map_location="cpu", weights_only=False)
    if "method.merge_every" in asked:  # the restart at step 2 merged ΔW into W (and ReMoRA switched groups)
        assert base_weights_modified(ckpt["weights"])
        assert all(groups == [1, 1] for groups in mora_groups(ckpt["weights"]))  # block/block


UUID_EXPERIMENTS = [e for e in EXPERIMENTS if compose(f"experiment={e}").task.name == "uuid"]


@pytest.mark.parametrize("experiment", UUID_EXPERIMENTS)
def test_three_step_run_of_experiment(experiment, tmp_path):
    three_step_run(tmp_path, f"experiment={experiment}")


# ------------------------------------------------------------------ C4 pretraining arms (Section 5.3)

# A 2-layer width-32 LLaMA on 32-token blocks of the offline C4 sample with a 300-token BPE; 4 steps
# so that ReLoRA/ReMoRA merge once (after step 2, where the jagged schedule's LR is zero).
TINY_C4 = ["experiment=pretrain_c4", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
           "model.num_heads=2", "task.vocab_size=300", "task.seq_len=32", "task.eval_tokens=256",
           "task.eval_batch_size=8", "train.max_steps=4", "train.batch_size=4", "train.warmup_steps=1",
           "restart.every=2", "restart.warmup_steps=1", "train.eval_steps=[2,4]", "train.log_every=1",
           "train.ckpt_every=2", "device=cpu"]


@pytest.mark.parametrize("method", ["fft", "lora", "mora", "relora", "remora"])
def test_four_step_pretraining_run(method, tmp_path):
    summary = execute(compose(*TINY_C4, f"method={method}", f"out_root={tmp_path}"))
    assert summary["status"] == "completed", summary
    [run] = find_runs(tmp_path)
    assert run["dir"].parent == tmp_path / "c4" / "mini"
    assert [m["step"] for m in run["metrics"]] == [1, 2, 3, 4]
    final = run["summary"]["final"]
    assert math.isclose(final["eval/perplexity"], math.exp(final["eval/loss"]), rel_tol=1e-9)
    assert final["eval/tokens"] == 8 * 31  # 256 tokens in 8 blocks of 32, each predicting its last 31
    assert final["eval/perplexity"] < 300 * 2  # no worse than about uniform over the 300 tokens
    lrs = [m["lr"] for m in run["metrics"]]
    ckpt = torch.load(run["dir"] / CHECKPOINT, map_location="cpu", weights_only=False)
    if method in ("relora", "remora"):
        assert lrs[1] == 0.0  # logged after step 2: the rate of step 3, the jagged zero right after the merge
        assert base_weights_modified(ckpt["weights"])
    else:
        assert all(lr > 0 for lr in lrs)
        assert not any(t.item() for k, t in ckpt["weights"].items() if k.endswith(".base_weight_modified"))
    if method == "remora":
        assert all(groups == [1, 1] for groups in mora_groups(ckpt["weights"]))  # block/block
    spectra = load_spectra(run["dir"] / "spectra.safetensors")
    assert len(spectra) == 2 * 7  # q, k, v, o, gate, up, down of both layers
    assert all(torch.isfinite(s).all() and (s >= 0).all() for s in spectra.values())
    assert all(s.abs().sum() > 0 for s in spectra.values())  # every arm moved every adapted module


def test_pretraining_arms_start_from_the_same_random_weights(tmp_path):
    """Section 5.3 compares methods on one frozen W₀: the seed alone decides it."""
    from experiments.models.loading import build_llama_from_config
    from experiments.schema import build_run_config

    weights = []
    for method in ("lora", "mora"):
        run = build_run_config(compose(*TINY_C4, f"method={method}"), cuda_available=False)
        torch.manual_seed(123 if method == "lora" else 456)  # the global RNG must not matter
        weights.append(build_llama_from_config(run.model, 300, run.seed).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    other = build_llama_from_config(run.model, 300, seed=run.seed + 1).state_dict()
    assert not torch.equal(other["model.layers.0.self_attn.q_proj.weight"],
                           weights[0]["model.layers.0.self_attn.q_proj.weight"])


# ------------------------------------------------------------------ resume after SIGKILL

# ReMoRA with restarts at 6, 12, 18 and checkpoints at 8, 16, 20. The child is killed once line 9
# is logged, i.e. after the step-8 checkpoint (step 16's if the poll is slow): resuming must restore
# the switched sharing groups and merged base weights of the restart before it, and redo the steps
# logged past the checkpoint. 20 steps and an eval at 10 leave >1 s to kill it before it finishes.
RESUME_RUN = ["model=stories260k", "method=remora", "method.merge_every=6", "train.max_steps=20", "train.ckpt_every=8",
              "train.log_every=1", "task.n_pairs=16", "train.batch_size=4", "task.eval_pairs=4",
              "train.eval_steps=[10,20]", "device=cpu"]
KILL_AFTER_LINES = 9  # line 9 is written after the step-8 checkpoint


@pytest.fixture
def launch():
    """Start ``python experiments/run.py`` in a child (output to ``<out_dir>.log``); children still
    running when the test ends (a failure) are killed."""
    children = []

    def start(out_dir: Path, *extra: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        with open(f"{out_dir}.log", "a") as log:
            children.append(subprocess.Popen([sys.executable, str(REPO / "experiments" / "run.py"), *RESUME_RUN,
                                              f"out_dir={out_dir}", *extra], cwd=REPO, env=env, stdout=log, stderr=log))
        return children[-1]

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait()


def log_tail(out_dir: Path) -> str:
    return Path(f"{out_dir}.log").read_text()[-3000:]


def logged_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def finish(proc: subprocess.Popen, out_dir: Path) -> None:
    assert proc.wait(timeout=120) == 0, log_tail(out_dir)


# the second case checkpoints at the end only, so the kill comes before the first checkpoint: the
# resumed run must start clean instead of appending steps 1, 2, ... again after the logged ones
@pytest.mark.parametrize("extra", [[], ["train.ckpt_every=20"]], ids=["after-a-checkpoint", "before-any-checkpoint"])
def test_sigkilled_run_resumes_to_the_uninterrupted_result(extra, tmp_path, launch):
    killed, whole = tmp_path / "A", tmp_path / "B"
    uninterrupted = launch(whole, *extra)  # runs alongside the one we kill
    victim = launch(killed, *extra)
    deadline = time.monotonic() + 120
    while not ((killed / CHECKPOINT).exists() or extra) or logged_lines(killed) < KILL_AFTER_LINES:
        assert victim.poll() is None, f"it ended before it could be killed:\n{log_tail(killed)}"
        assert time.monotonic() < deadline, "the run never reached the step to kill it at"
        time.sleep(0.005)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (killed / "summary.json").exists()  # it died mid-way, not after finishing
    at_kill = [m["step"] for m in read_run(killed)["metrics"]]
    if extra:
        assert not (killed / CHECKPOINT).exists() and at_kill[-1] >= KILL_AFTER_LINES, at_kill
    else:
        ckpt_step = torch.load(killed / CHECKPOINT, map_location="cpu", weights_only=False)["loop"]["step"]
        assert ckpt_step in (8, 16) and at_kill[-1] > ckpt_step, at_kill  # logged steps past it get redone

    finish(launch(killed, *extra, "resume=true"), killed)
    finish(uninterrupted, whole)

    a, b = read_run(killed), read_run(whole)
    assert [m["step"] for m in a["metrics"]] == list(range(1, 21))
    assert metric_rows(killed) == metric_rows(whole)  # exact float equality: loss, lr, eval/*
    assert a["summary"]["status"] == b["summary"]["status"] == "completed"
    assert a["summary"]["final"] == b["summary"]["final"]
    assert len(a["environment"]["resumes"]) == 1 and "resumes" not in b["environment"]
    if extra:
        assert "starts clean from step 0" in Path(f"{killed}.log").read_text()  # progress bars may follow it
    weights_a, weights_b = (torch.load(d / CHECKPOINT, map_location="cpu", weights_only=False)["weights"]
                            for d in (killed, whole))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


# ------------------------------------------------------------------ divergence and bad resumes


class Killed(Exception):
    """Stands for a SIGKILL in-process: raised out of the loop, it leaves the run folder as a kill
    would (metrics and checkpoints so far, no summary)."""


def crash_at(step: int):
    """A task builder whose task raises Killed when asked for the batch of 0-based step ``step``."""

    def task(*args, **kwargs):
        built = build_task(*args, **kwargs)
        batch = built.batch

        def crashing(s, *rest):
            if s == step:
                raise Killed(f"killed before step {step + 1}")
            return batch(s, *rest)

        built.batch = crashing
        return built

    return task


def interrupted_run(monkeypatch, step: int, *overrides: str) -> None:
    """Run ``overrides`` until it is killed fetching the batch of 0-based step ``step``."""
    with monkeypatch.context() as patched:
        patched.setattr(run_module, "build_task", crash_at(step))
        with pytest.raises(Killed):
            execute(compose(*overrides))


def refuse_to_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the inputs were checked")


class PoisonAtStep:
    """Wraps the task builder: fetching the batch of 0-based step ``step`` first writes NaN into every
    adapter parameter (MoRA's M), as an exploding update would."""

    def __init__(self, step: int, model_box: list):
        self.step, self.model_box = step, model_box

    def task(self, *args, **kwargs):
        task = build_task(*args, **kwargs)
        batch = task.batch

        def poisoned(step, *rest):
            if step == self.step:
                with torch.no_grad():
                    for param in adapter_parameters(self.model_box[0]):
                        param.fill_(float("nan"))
            return batch(step, *rest)

        task.batch = poisoned
        return task


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model_box = []
    inject = run_module.inject_adapters
    monkeypatch.setattr(run_module, "inject_adapters", lambda model, cfg: (model_box.append(model), inject(model, cfg)))
    monkeypatch.setattr(run_module, "build_task", PoisonAtStep(1, model_box).task)  # the 2nd optimizer step
    out = tmp_path / "run"
    summary = execute(compose(*TINY, "train.ckpt_every=1", f"out_dir={out}"))

    assert summary["status"] == "diverged"
    assert "at step 2" in summary["final"]["error"] and "nan" in summary["final"]["error"]
    saved = read_run(out)
    assert saved["summary"]["status"] == "diverged" and saved["summary"]["final"] == summary["final"]
    assert "checkpoint.pt holds the last good state (step 1)" in summary["final"]["error"]
    assert [m["step"] for m in saved["metrics"]] == [1]
    ckpt = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=False)
    assert ckpt["loop"]["step"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["weights"].values())


def test_resume_with_a_changed_config_is_refused(tmp_path):
    out = tmp_path / "run"
    first = [*TINY, "train.max_steps=1", "train.eval_steps=[]", "train.ckpt_every=1", f"out_dir={out}"]
    done = execute(compose(*first))
    assert done["status"] == "completed"
    saved = (out / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"cannot resume .*lr: \S+ -> 0\.02"):
        execute(compose(*first, "resume=true", "lr=0.02"))
    assert (out / "config.yaml").read_text() == saved and (out / "summary.json").exists()
    with pytest.raises(FileExistsError, match="already holds a run"):
        execute(compose(*first))  # a fresh start never overwrites a run either
    again = execute(compose(*first, "resume=true"))  # resuming a finished run keeps its results
    assert again["status"] == "completed" and again["final"] == done["final"]
    assert read_run(out)["summary"]["final"]["eval/char_accuracy"] == done["final"]["eval/char_accuracy"]


def test_skip_completed_skips_the_same_run_and_refuses_another_config_under_the_same_name(tmp_path):
    args = ["method=lora", "rank=8", *TINY, f"out_root={tmp_path}", "skip_completed=true"]
    first = execute(compose(*args))
    again = execute(compose(*args))                            # the same config: skipped, the saved summary returned
    assert again["final"] == first["final"] and again["finished_at"] == read_run(next(tmp_path.rglob("summary.json")).parent)["summary"]["finished_at"]
    # the folder name (method, rank, lr, seed) is the same, the experiment is not: never count it as done
    with pytest.raises(ValueError, match=r"another config \(task.n_pairs: 8 -> 12"):
        execute(compose(*args, "task.n_pairs=12"))


def test_skip_completed_reuses_a_run_across_keys_that_do_not_change_it(tmp_path):
    args = ["method=lora", "rank=8", *TINY, f"out_root={tmp_path}", "skip_completed=true", "lr=0.01"]
    execute(compose(*args))
    (metrics,) = tmp_path.rglob("metrics.jsonl")
    written = metrics.stat().st_mtime_ns
    again = execute(compose(*args, "task.eval_batch_size=2", "lr_by_method.lora=0.5"))
    assert again["status"] == "completed" and metrics.stat().st_mtime_ns == written   # skipped, not rerun


def test_skip_completed_compares_the_rate_used_not_how_it_was_given(tmp_path):
    """make table3 gives each arm its rate through lr_by_method (lr null), make c4-lr-grid as lr=: a run one of
    them finished is the other's run when the resolved rate is the same (found by running the two in turn:
    "another config (lr: None -> 0.004)"), and another experiment when it is not."""
    args = ["method=lora", "rank=8", *TINY, f"out_root={tmp_path}", "skip_completed=true"]
    execute(compose(*args, "lr_by_method.lora=0.01"))
    (metrics,) = tmp_path.rglob("metrics.jsonl")
    written = metrics.stat().st_mtime_ns
    assert execute(compose(*args, "lr=0.01"))["status"] == "completed" and metrics.stat().st_mtime_ns == written
    with pytest.raises(ValueError, match=r"another config .*resolved.lr: 0.01 -> 0.02"):   # the same folder, another rate
        execute(compose(*args, "lr=0.02", f"out_dir={metrics.parent}"))
    execute(compose(*args, "lr=0.02"))                          # another rate: its own folder, a new run
    assert len(list(tmp_path.rglob("metrics.jsonl"))) == 2


def test_an_interrupted_run_resumes_when_only_how_its_rate_was_given_differs(tmp_path, monkeypatch):
    args = ["method=lora", "rank=8", *TINY, "train.ckpt_every=1", "skip_completed=true", f"out_root={tmp_path}"]
    interrupted_run(monkeypatch, 2, *args, "lr_by_method.lora=0.01")      # checkpoint at step 2, no summary
    [run] = find_runs(tmp_path)
    assert execute(compose(*args, "lr=0.01"))["status"] == "completed"
    [run] = find_runs(tmp_path)
    assert [m["step"] for m in run["metrics"]] == [1, 2, 3] and len(run["environment"]["resumes"]) == 1


def test_nan_before_any_checkpoint_says_there_is_none_and_prints_why(tmp_path, monkeypatch, capsys):
    model_box = []
    inject = run_module.inject_adapters
    monkeypatch.setattr(run_module, "inject_adapters", lambda model, cfg: (model_box.append(model), inject(model, cfg)))
    monkeypatch.setattr(run_module, "build_task", PoisonAtStep(1, model_box).task)
    out = tmp_path / "run"
    error = execute(compose(*TINY, f"out_dir={out}"))["final"]["error"]  # TINY checkpoints at step 3 only

    assert not (out / CHECKPOINT).exists()
    assert "last good state" not in error and "no checkpoint was written before it" in error
    assert f"[diverged] {out} :: loss is nan at step 2" in capsys.readouterr().out


# ------------------------------------------------------------------ interrupted runs (in process)


def test_resume_before_the_first_checkpoint_starts_clean(tmp_path, monkeypatch, capsys):
    killed, whole = tmp_path / "A", tmp_path / "B"
    interrupted_run(monkeypatch, 2, *TINY, f"out_dir={killed}")  # TINY checkpoints at step 3 only
    assert [m["step"] for m in read_run(killed)["metrics"]] == [1, 2] and not (killed / CHECKPOINT).exists()

    assert execute(compose(*TINY, f"out_dir={killed}", "resume=true"))["status"] == "completed"
    assert [m["step"] for m in read_run(killed)["metrics"]] == [1, 2, 3]  # not 1, 2, 1, 2, 3
    assert "starts clean from step 0" in capsys.readouterr().out
    execute(compose(*TINY, f"out_dir={whole}"))
    assert metric_rows(killed) == metric_rows(whole)


def test_resume_with_a_damaged_checkpoint_leaves_the_finished_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = [*TINY, f"out_dir={out}"]
    execute(compose(*args))
    kept = {name: (out / name).read_bytes() for name in ("summary.json", "metrics.jsonl")}
    ckpt = out / CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[:ckpt.stat().st_size // 2])  # a copy cut short

    with monkeypatch.context() as patched:  # refused before any model is loaded
        patched.setattr(run_module, "load_model", refuse_to_load)
        with pytest.raises(ValueError, match=r"checkpoint\.pt cannot be read .*left as they were"):
            execute(compose(*args, "resume=true"))
    assert all((out / name).read_bytes() == data for name, data in kept.items())
    # damage that gets past that cheap check fails as it loads, still before the summary is dropped
    monkeypatch.setattr(run_module, "check_checkpoint", lambda path: None)
    with pytest.raises(ValueError, match=r"checkpoint\.pt cannot be read"):
        execute(compose(*args, "resume=true"))
    assert all((out / name).read_bytes() == data for name, data in kept.items())


def test_skip_completed_resumes_an_interrupted_run_of_the_same_config(tmp_path, monkeypatch):
    args = ["method=lora", "rank=8", *TINY, "train.ckpt_every=1", "skip_completed=true"]
    interrupted_run(monkeypatch, 2, *args, f"out_root={tmp_path / 'A'}")  # checkpoint at step 2, no summary
    with pytest.raises(ValueError, match=r"an interrupted run of another config \(task.n_pairs: 8 -> 12"):
        execute(compose(*args, f"out_root={tmp_path / 'A'}", "task.n_pairs=12"))

    assert execute(compose(*args, f"out_root={tmp_path / 'A'}"))["status"] == "completed"  # was FileExistsError
    execute(compose(*args, f"out_root={tmp_path / 'B'}"))
    [a], [b] = find_runs(tmp_path / "A"), find_runs(tmp_path / "B")
    assert [m["step"] for m in a["metrics"]] == [1, 2, 3]
    assert metric_rows(a["dir"]) == metric_rows(b["dir"])
    assert len(a["environment"]["resumes"]) == 1


def test_train_seconds_count_every_session(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = [*TINY, "train.ckpt_every=1", f"out_dir={out}"]
    interrupted_run(monkeypatch, 2, *args)
    # as if the first session had run 1000 s longer: its clock is the metrics' time column
    metrics = out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    metrics.write_text("".join(json.dumps(row | {"time": row["time"] + 1000}) + "\n" for row in rows))

    summary = execute(compose(*args, "resume=true"))
    assert 1000 < summary["train_seconds"] <= read_run(out)["summary"]["wall_time_s"]
