"""Checkpoints, resume and ΔW spectra under sharded launches (launch/README.md).

FSDP2 (``launch/fsdp.yaml``): the real training loop under ``accelerate launch --config_file
launch/fsdp.yaml`` with two CPU processes (gloo; tests/fsdp_cpu_entry.py puts accelerate on its
FSDP route on the CPU). Each method's run is interrupted after its checkpoint of step 2 and resumed
to step 4 under FSDP, then compared with one uninterrupted process on the same global batch:
losses, the final checkpoint (weights and Adam's moments, whole, not a shard) and the ΔW spectra
(computed from that checkpoint). A shard saved as if whole, or moments not restored at the resume,
would make them differ.

DeepSpeed, FSDP1, and FSDP with ReLoRA/ReMoRA restarts or lm-eval tasks are refused before any
model loads, with the environment each launch config makes accelerate export.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

import experiments.run as run_module
from experiments.evaluation.spectra import load_spectra
from experiments.loop.checkpoint import CHECKPOINT
from experiments.loop.records import find_runs
from experiments.run import execute
from tests.test_configs import REPO, compose
from tests.test_launch_configs import LAUNCH, validated

# 4 optimizer steps on 8 UUID pairs, global batch 4 (2 per rank), a checkpoint every 2 steps
TINY = ["task=uuid", "model=stories260k", "rank=8", "train.max_steps=4", "train.warmup_steps=1", "train.batch_size=4",
        "task.n_pairs=8", "task.eval_pairs=2", "train.eval_steps=[4]", "train.log_every=1", "train.ckpt_every=2",
        "device=cpu", "singular_values=true"]
# MoRA's layer and FFT (every weight trained and sharded) in every suite run; peft's layer family, whose
# LoRA+ optimizer has two param groups, in a second launch marked slow (a launch is most of a minute here)
METHODS = ("mora", "fft")
PEFT_METHODS = ("lora", "loraplus", "asylora", "dora")
ALL_METHODS = [*METHODS, *(pytest.param(m, marks=pytest.mark.slow) for m in PEFT_METHODS)]
STOP = 2  # the step after whose checkpoint the run is interrupted

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def launch_fsdp(methods, root) -> dict:
    """{method: (run folder as read_run gives it, [rank 0's dump, rank 1's dump])}, one launch."""
    out, dumps = root / "runs", root / "dumps"
    dumps.mkdir()
    runs = [" ".join([*TINY, f"method={m}", f"out_root={out / m}"]) for m in methods]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH / "fsdp.yaml"),
              "--num_processes", "2", "--mixed_precision", "no"]  # the GPU recipe, at 2 processes and fp32
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([*launch, str(REPO / "tests" / "fsdp_cpu_entry.py"), str(dumps), str(STOP), *runs],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    found = {}
    for i, method in enumerate(methods):
        [run] = find_runs(out / method)
        found[method] = run, [json.loads((dumps / f"rank{r}-run{i}.json").read_text()) for r in (0, 1)]
    return found


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    return launch_fsdp(METHODS, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def fsdp_peft_runs(tmp_path_factory):
    return launch_fsdp(PEFT_METHODS, tmp_path_factory.mktemp("fsdp_peft"))


@pytest.fixture
def fsdp_run(method, request):
    """(run folder, dumps) of ``method``'s FSDP run, from the launch that holds it."""
    return request.getfixturevalue("fsdp_peft_runs" if method in PEFT_METHODS else "fsdp_runs")[method]


@pytest.fixture
def one_process_run(method, tmp_path):
    """The same run, one process, never interrupted."""
    assert execute(compose(*TINY, f"method={method}", f"out_root={tmp_path}"))["status"] == "completed"
    return find_runs(tmp_path)[0]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_fsdp_sharded_every_weight_over_both_processes(method, fsdp_run):
    for dump in fsdp_run[1]:
        assert dump["distributed_type"] == "DistributedType.FSDP"
        for name, (whole, local) in dump["shapes"].items():
            assert local is not None, name  # a DTensor: FSDP2 owns it
            assert local[0] in (whole[0] // 2, (whole[0] + 1) // 2) and local[1:] == whole[1:], name


@pytest.mark.parametrize("method", ALL_METHODS)
def test_fsdp_run_resumed_from_its_checkpoint_equals_one_process(method, fsdp_run, one_process_run):
    """Losses, the final checkpoint (weights and Adam's moments, whole) and the ΔW spectra."""
    sharded, single = fsdp_run[0], one_process_run
    assert sharded["summary"]["status"] == "completed"
    assert [m["step"] for m in sharded["metrics"]] == [1, 2, 3, 4]  # steps 3-4 logged once, after the resume
    for two, one in zip(sharded["metrics"], single["metrics"], strict=True):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    saved, reference = (torch.load(r["dir"] / CHECKPOINT, map_location="cpu", weights_only=False)
                        for r in (sharded, single))
    assert saved["loop"]["step"] == 4
    assert saved["weights"].keys() == reference["weights"].keys()
    for name, tensor in reference["weights"].items():
        assert saved["weights"][name].shape == tensor.shape, name  # whole, not rank 0's shard
        torch.testing.assert_close(saved["weights"][name], tensor, rtol=1e-4, atol=1e-6)
    moments, expected = saved["optimizer"]["state"], reference["optimizer"]["state"]
    assert moments.keys() == expected.keys() and expected
    for index, state in expected.items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments[index][key], state[key], rtol=1e-3, atol=1e-7)
        assert moments[index]["step"] == state["step"] == 4  # restored at the resume, not restarted
    spectra, expected_spectra = load_spectra(sharded["dir"]), load_spectra(single["dir"])
    assert spectra.keys() == expected_spectra.keys() and len(spectra) == 35  # 5 layers x 7 projections
    for name, values in expected_spectra.items():
        torch.testing.assert_close(spectra[name], values, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ refused before any model loads

def launcher_env(config: str, *cli: str) -> dict[str, str]:
    """The variables ``accelerate launch --config_file launch/<config> *cli`` exports to each process."""
    args = validated(LAUNCH / config, *cli)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ""  # set by launch_command; it names no variable read here
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def refuse_to_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the launch was checked")


REFUSED = [
    ("deepspeed_zero2.yaml", [], "distributed_type DEEPSPEED (zero_stage 2, launch/deepspeed_zero2.yaml)"),
    ("deepspeed_zero3.yaml", [], "distributed_type DEEPSPEED (zero_stage 3, launch/deepspeed_zero3.yaml)"),
    ("fsdp.yaml", ["method=remora"], "method.merge_every=1000 (ReLoRA/ReMoRA restarts) under FSDP"),
    ("fsdp.yaml", ["method=relora"], "method.merge_every=1000 (ReLoRA/ReMoRA restarts) under FSDP"),
    ("fsdp.yaml", ["experiment=finetune_r8", "task=tulu"], "task.lm_eval_tasks=['alpaca_local_nll'] under FSDP"),
]


@pytest.mark.parametrize("config, overrides, message", REFUSED, ids=[f"{c} {' '.join(o)}" for c, o, _ in REFUSED])
def test_unsupported_sharded_launch_is_refused_before_loading(config, overrides, message, tmp_path, monkeypatch):
    for key, value in launcher_env(config).items():
        monkeypatch.setenv(key, value)
    for loader in ("load_model", "build_llama_from_config", "model_skeleton"):
        monkeypatch.setattr(run_module, loader, refuse_to_load)
    with pytest.raises(ValueError) as caught:
        execute(compose(*overrides, f"out_root={tmp_path / 'runs'}"))
    assert message in str(caught.value) and "\n" not in str(caught.value), caught.value
    assert not (tmp_path / "runs").exists()


def test_fsdp1_is_refused_and_fsdp2_without_restarts_or_lm_eval_is_not(monkeypatch):
    run = run_module.build_run_config(compose("method=mora"), cuda_available=False)
    env = launcher_env("fsdp.yaml")
    run_module.check_launch(run, env)  # launch/fsdp.yaml as it is
    with pytest.raises(ValueError, match="fsdp_version=1 is not supported: only FSDP2"):
        run_module.check_launch(run, env | {"FSDP_VERSION": "1"})
    run_module.check_launch(run, launcher_env("multi_gpu.yaml"))
    run_module.check_launch(run, {})  # one process


def test_the_command_line_refuses_deepspeed_in_one_line(tmp_path):
    env = os.environ | launcher_env("deepspeed_zero3.yaml") | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), f"out_root={tmp_path}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: the launch config's distributed_type DEEPSPEED (zero_stage 3")
    assert "launch/fsdp.yaml" in line
    assert not any(tmp_path.iterdir())
