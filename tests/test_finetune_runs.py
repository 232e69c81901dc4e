"""The fine-tuning tasks end to end on stories260K (CPU, offline): a 3-step run of each method
through ``experiments.run.execute`` with the ``finetune_r8`` / ``finetune_r256`` presets at mini
scale, the in-loop held-out metric logged, lm-eval run on the trained model, and its scores in
``eval_results.json`` and the summary; an FFT run (lm_head tied to the embedding) resumes from
its checkpoint to the same scores.

Every method runs on tulu (Alpaca, the cheapest task); metamath (7,473 GSM8K problems to encode)
and biomed (800 abstracts mined by AdaptLLM) run FFT and MoRA, one per rank preset: the adapters
do not depend on the task, and the whole matrix takes about twice as long (~70 s on one thread).
"""

from __future__ import annotations

import math

import pytest
import torch

from experiments.evaluation.harness import read_eval_results
from experiments.loop.records import find_runs
from experiments.run import execute
from experiments.loop.checkpoint import CHECKPOINT
from tests.test_configs import compose

METHODS = ("fft", "lora", "loraplus", "asylora", "relora", "dora", "mora")
# GSM8K prompts alone take 138+ stories260K tokens: 256 keeps 69% of the problems, 128 none
TINY = ["train.max_steps=3", "train.warmup_steps=1", "train.batch_size=2", "task.n_eval=4", "task.max_len=256", "task.lm_eval_limit=2",
        "task.lm_eval_max_gen_toks=8", "train.eval_steps=[3]", "train.log_every=1", "train.ckpt_every=3", "device=cpu"]
# the in-loop held-out metrics (experiments/tasks/finetune.py) and lm-eval's of each task's benchmarks
IN_LOOP = {"tulu": ("eval/response_nll",), "metamath": ("eval/response_nll",),
           "biomed": ("eval/perplexity", "eval/choice_accuracy")}
LM_EVAL = {"tulu": ("alpaca_local_nll/nll_per_token",),
           "metamath": ("gsm8k_local_answer_nll/nll_per_token", "gsm8k_local_metamath/exact_match"),
           "biomed": ("pubmedqa_local/acc", "pubmed_abstracts_ppl/bits_per_byte")}
RUNS = ([("tulu", method, "finetune_r8") for method in METHODS]
        + [(task, "fft", "finetune_r8") for task in ("metamath", "biomed")]
        + [(task, "mora", "finetune_r256") for task in ("metamath", "biomed")])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def overrides(task: str, method: str, experiment: str, out_root) -> list[str]:
    restart = ["method.merge_every=2"] if method == "relora" else []  # one merge-and-reinit within 3 steps
    return [f"experiment={experiment}", f"task={task}", f"method={method}", *restart, *TINY, f"out_root={out_root}"]


def check_run(tmp_path, task: str, summary: dict) -> dict:
    """The run folder of a completed 3-step fine-tuning run, checked; returns :func:`find_runs`'s."""
    assert summary["status"] == "completed", summary
    [run] = find_runs(tmp_path)
    assert run["dir"].parent == tmp_path / task / "mini"
    assert [m["step"] for m in run["metrics"]] == [1, 2, 3]
    assert all(math.isfinite(m["loss"]) for m in run["metrics"])
    final = run["summary"]["final"]
    for key in IN_LOOP[task]:
        assert math.isfinite(final[key]) and final[key] == run["metrics"][-1][key], key
    [evaluation] = read_eval_results(run["dir"])["evaluations"]
    assert evaluation["settings"]["limit"] == 2 and evaluation["settings"]["max_gen_toks"] == 8
    scores = evaluation["metrics"]
    for key in LM_EVAL[task]:
        assert math.isfinite(scores[key]), key
        assert scores[key.split("/")[0] + "/n_samples"] == 2
    # limit=2 scores a subset: the summary's keys say so ("lm_eval_first2/"), never plain "lm_eval/"
    assert not any(k.startswith("lm_eval/") for k in final)
    assert {k: v for k, v in final.items() if k.startswith("lm_eval_first2/")} == {
        f"lm_eval_first2/{k}": v for k, v in scores.items()}
    weights = torch.load(run["dir"] / CHECKPOINT, map_location="cpu", weights_only=False)["weights"]
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    return run


@pytest.mark.parametrize("task, method, experiment", RUNS, ids=["-".join(r) for r in RUNS])
def test_three_step_finetuning_run(task, method, experiment, tmp_path):
    run = check_run(tmp_path, task, execute(compose(*overrides(task, method, experiment, tmp_path))))
    assert run["config"]["method"]["name"] == method and run["config"]["task"]["name"] == task
    assert run["config"]["rank"] == int(experiment.removeprefix("finetune_r"))


def test_full_finetuning_run_resumes_from_its_checkpoint(tmp_path):
    """FFT checkpoints of stories260K (lm_head tied to the embedding) load on resume: the resumed
    run restores the trained weights, so lm-eval scores them exactly as the first run did."""
    args = overrides("tulu", "fft", "finetune_r8", tmp_path)
    first = execute(compose(*args))
    run = check_run(tmp_path, "tulu", first)
    assert "lm_head.weight" not in torch.load(run["dir"] / CHECKPOINT, map_location="cpu", weights_only=False)["weights"]
    again = execute(compose(*args, "resume=true", "skip_completed=false"))  # the preset would skip a finished run
    assert again["status"] == "completed" and again["final"] == first["final"]
    assert len(read_eval_results(run["dir"])["evaluations"]) == 2
