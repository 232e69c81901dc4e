"""The real training loop under two processes on CPU (gloo), launched as on GPUs:
``accelerate launch --config_file launch/multi_gpu.yaml`` with two processes and no mixed precision.

Checked: the run completes; one run folder with one metrics line per step and one summary (rank 0
writes, rank 1 does not); both ranks end with bit-identical parameters (their gradients were
all-reduced); and the run equals a single-process run of the same global batch, losses and adapter
weights, which it can only do if each rank trained on its half of the batch and the halves were
averaged. No launcher, no skip: a missing accelerate or a hang (timeout) fails the test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from experiments.loop.records import RunRecord, find_runs, read_run
from experiments.run import execute
from experiments.loop.trackers import NullTracker, make_tracker
from experiments.loop.checkpoint import CHECKPOINT
from experiments.loop.training import _check_sharding
from tests.test_configs import REPO, compose

# 4 optimizer steps on 8 UUID pairs, global batch 4 (2 per rank), evaluated at the end
TINY = ["task=uuid", "model=stories260k", "method=mora", "rank=8", "train.max_steps=4", "train.warmup_steps=1", "train.batch_size=4",
        "task.n_pairs=8", "task.eval_pairs=4", "train.eval_steps=[4]", "train.log_every=1", "train.ckpt_every=4",
        "device=cpu"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "multi_gpu.yaml"),
          "--num_processes", "2", "--mixed_precision", "no"]  # the GPU recipe, at 2 processes and fp32

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """(run folder as read_run gives it, {rank: trainable parameters at the end}, launcher output)."""
    root = tmp_path_factory.mktemp("distributed")
    out, dumps = root / "runs", root / "dumps"
    dumps.mkdir()
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([*LAUNCH, str(REPO / "tests" / "distributed_entry.py"), str(dumps), *TINY,
                           f"out_root={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    runs = find_runs(out)
    assert len(runs) == 1, (runs, log[-2000:])
    params = {int(p.stem.removeprefix("rank")): torch.load(p) for p in sorted(dumps.glob("rank*.pt"))}
    return runs[0], params, log


def test_two_processes_ran_and_rank_0_alone_wrote_the_run(two_process_run):
    run, params, log = two_process_run
    assert sorted(params) == [0, 1]  # both ranks trained to the end
    assert run["environment"]["hardware"]["world_size"] == 2
    assert run["summary"]["status"] == "completed"
    assert [m["step"] for m in run["metrics"]] == [1, 2, 3, 4]  # once each: rank 1 logged nothing
    assert all(math.isfinite(m["loss"]) for m in run["metrics"])
    names = sorted(p.name for p in run["dir"].iterdir())
    assert names == sorted([".writer.lock", "config.yaml", "environment.json", "metrics.jsonl", "summary.json", CHECKPOINT])


def test_both_ranks_end_with_identical_parameters(two_process_run):
    _, params, _ = two_process_run
    assert params[0].keys() == params[1].keys() and params[0]
    assert all(torch.equal(params[0][n], params[1][n]) for n in params[0])


def test_two_processes_equal_one_process_on_the_same_global_batch(two_process_run, tmp_path):
    """Each rank sees half of every batch (tasks shard by process index); the all-reduced mean of
    the halves' gradients is the whole batch's, so the runs agree up to float summation order."""
    run, _, _ = two_process_run
    summary = execute(compose(*TINY, f"out_root={tmp_path}"))
    assert summary["status"] == "completed", summary
    [single] = find_runs(tmp_path)
    for two, one in zip(run["metrics"], single["metrics"], strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)  # the global batch's loss, not rank 0's half
    weights = [torch.load(r["dir"] / CHECKPOINT, weights_only=False)["weights"] for r in (run, single)]
    assert weights[0].keys() == weights[1].keys()
    for name, trained in weights[1].items():
        if not trained.is_floating_point():  # the layers' own state: MoRA's groups, the base-weight flag
            assert torch.equal(weights[0][name], trained), name
            continue
        assert trained.abs().max() > 1e-4, name  # M started at zero and moved
        torch.testing.assert_close(weights[0][name], trained, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ the pieces, without a launcher

def test_only_rank_0_writes_a_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    record = RunRecord.create(tmp_path / "run", {"seed": 0}, resume=False)
    record.log(1, loss=1.0)
    record.truncate_after(0)
    assert record.write_summary({"status": "completed"})["status"] == "completed"
    assert not (tmp_path / "run").exists()
    assert isinstance(make_tracker("wandb", project="p", run_name="r", config={}), NullTracker)
    monkeypatch.setenv("RANK", "0")
    RunRecord.create(tmp_path / "run", {"seed": 0}, resume=False).log(1, loss=1.0)
    assert [m["step"] for m in read_run(tmp_path / "run")["metrics"]] == [1]


class _Stub:
    """What _check_sharding reads of an Accelerator: the process count and DeepSpeed's config."""

    def __init__(self, num_processes, deepspeed_config=None):
        self.num_processes = num_processes
        plugin = None if deepspeed_config is None else type("Plugin", (), {"deepspeed_config": deepspeed_config})()
        self.state = type("State", (), {"deepspeed_plugin": plugin})()


def test_a_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match="train.batch_size=6 must be divisible.*4"):
        _check_sharding(_Stub(4), 6)


def test_deepspeed_is_told_the_per_process_batch():
    config = {"train_micro_batch_size_per_gpu": "auto"}
    _check_sharding(_Stub(8, config), 1000)
    assert config["train_micro_batch_size_per_gpu"] == 125
