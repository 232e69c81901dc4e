"""Every config composes and validates; bad input fails fast, naming the field; the rank mapping.

No model is loaded here: composing and validating is milliseconds, so every method and scale is
checked. Paper-scale validation is told a GPU exists (``cuda_available=True``) and must then
describe the paper's Section 3 run; without one it must refuse.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException

from experiments.schema import build_run_config

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose(*overrides: str):
    """The config ``python experiments/run.py <overrides>`` would get."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def validate(*overrides: str, cuda_available: bool = False):
    return build_run_config(compose(*overrides), cuda_available=cuda_available)


def test_every_method_is_found():
    assert set(METHODS) >= {"fft", "lora", "loraplus", "asylora", "dora", "relora", "mora", "remora"}


@pytest.mark.parametrize("method", METHODS)
def test_method_composes_and_validates_at_mini_scale(method):
    run = validate(f"method={method}", "scale=mini")
    assert run.adapter.method == method
    assert run.model.name == "stories260k" and run.device == "cpu"
    assert run.lr > 0 and run.train.max_steps > 0
    assert all(0 < s <= run.train.max_steps for s in run.train.eval_steps)


@pytest.mark.parametrize("method", METHODS)
def test_method_composes_and_validates_at_paper_scale(method):
    run = validate(f"method={method}", "scale=paper", cuda_available=True)
    assert run.adapter.method == method and run.device == "cuda"
    assert run.model.name == "llama2_7b" and run.model.requires_gpu
    assert run.task.n_pairs == 10_000
    assert run.train.batch_size == 1000 and run.train.max_steps == 1000
    assert run.train.eval_steps == (300, 500, 700, 900)


@pytest.mark.parametrize("method", METHODS)
def test_paper_scale_refuses_a_cpu_machine(method):
    with pytest.raises(ValueError, match="requires_gpu.*GPU|GPU.*requires_gpu"):
        validate(f"method={method}", "scale=paper", cuda_available=False)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates_at_mini_scale(experiment):
    run = validate(f"experiment={experiment}", "scale=mini")
    assert run.scale == "mini" and run.model.name == "stories260k"


def test_defaults_are_the_documented_command():
    run = validate()  # python experiments/run.py  ==  method=mora task=uuid scale=mini rank=8
    assert (run.adapter.method, run.adapter.operator, run.scale, run.task.name) == ("mora", "share", "mini", "uuid")
    assert run.out_dir == Path(f"results/runs/uuid/mini/mora-share-r8-lr{run.lr:g}-s0")


@pytest.mark.parametrize("group, value", [("method", "qlora"), ("logger", "tensorboard"), ("scale", "huge")])
def test_unknown_group_choice_names_the_group(group, value):
    with pytest.raises(HydraException, match=f"{group}/{value}"):
        compose(f"{group}={value}")


@pytest.mark.parametrize("override, field", [
    ("rank=0", "rank"),
    ("rank=-3", "rank"),
    ("train.scheduler=cosine_foo", "train.scheduler"),
    ("train.eval_steps=[5000]", "train.eval_steps"),
    ("train.batch_size=0", "train.batch_size"),
    ("device=tpu", "device"),
    ("method.operator=spin", "operator"),
    ("method.compress_groups=diagonal", "compress_groups"),
    ("+method.flavour=x", "flavour"),  # a typo that Hydra lets through with +
    ("logger.kind=tensorboard", "logger"),
    ("lr=-1", "lr"),
    ("lr=0", "lr"),
    ("task.n_pairs=0", "task.n_pairs"),
    ("task.eval_batch_size=0", "task.eval_batch_size"),
])
def test_bad_value_names_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        validate(override)


def test_cuda_requested_without_a_gpu():
    with pytest.raises(ValueError, match="device=cuda"):
        validate("device=cuda", cuda_available=False)


# ------------------------------------------------------------------ rank mapping (r/d kept)


def test_rank_256_maps_to_4_on_width_64():
    run = validate("rank=256", "scale=mini")
    assert (run.rank.paper_rank, run.rank.rank, run.rank.width, run.rank.reference_width) == (256, 4, 64, 4096)
    assert run.rank.representable and run.adapter.rank == 4
    assert "NOT REPRESENTABLE" not in run.rank.describe()
    assert "1/16" in run.rank.describe()  # 256/4096 == 4/64


def test_rank_8_is_not_representable_on_width_64():
    run = validate("rank=8", "scale=mini")
    assert (run.rank.rank, run.rank.representable, run.adapter.rank) == (1, False, 1)
    text = run.rank.describe()
    assert "NOT REPRESENTABLE" in text and "8x larger r/d" in text  # 1/64 vs the paper's 1/512


@pytest.mark.parametrize("rank", [8, 256])
def test_paper_scale_uses_the_rank_as_given(rank):
    run = validate(f"rank={rank}", "scale=paper", cuda_available=True)
    assert (run.rank.rank, run.rank.representable, run.adapter.rank) == (rank, True, rank)
    assert "used as is" in run.rank.describe()
