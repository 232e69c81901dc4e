"""Every config composes and validates; bad input fails fast, naming the field; the rank mapping.

No model is loaded here: composing and validating is milliseconds, so every method and scale is
checked. Paper-scale validation is told a GPU exists (``cuda_available=True``) and must then
describe the paper's Section 3 run; without one it must refuse.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException

from experiments.schema import RESTART_FIELDS, build_run_config

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
    assert run.model.name == "stories_w128" and run.device == "cpu"   # the UUID preset's calibrated base
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
    assert run.scale == "mini" and run.model.name in ("stories260k", "stories_w128", "llama_w64", "llama_mini")
    assert not run.model.requires_gpu and run.device == "cpu"


# pretrain_c4_first_mini records the first C4 miniature (its model and vocabulary) for its diagnosis: mini only
@pytest.mark.parametrize("experiment", [e for e in EXPERIMENTS if not e.endswith("_first_mini")])
def test_experiment_composes_and_validates_at_paper_scale(experiment):
    run = validate(f"experiment={experiment}", "scale=paper", cuda_available=True)
    assert run.scale == "paper" and run.model.requires_gpu and run.device == "cuda"


# ------------------------------------------------------------------ C4 pretraining (Section 5.3)

PRETRAIN_METHODS = ["fft", "lora", "mora", "relora", "remora"]


@pytest.mark.parametrize("method", PRETRAIN_METHODS)
def test_pretraining_paper_preset_is_section_5_3(method):
    run = validate("experiment=pretrain_c4", f"method={method}", "scale=paper", cuda_available=True)
    assert (run.task.name, run.task.source, run.task.tokenizer, run.task.seq_len) == ("c4", "hub", "t5", 512)
    assert (run.model.name, run.model.hidden_size, run.model.intermediate_size, run.model.num_layers,
            run.model.num_heads) == ("llama_250m", 768, 2560, 24, 16)
    assert run.train.batch_size * run.train.grad_accum == 1024 and run.train.max_steps == 10_000
    assert run.rank.rank == 128 and run.adapter.rank == 128
    assert run.singular_values
    if method != "fft":  # embeddings, norms and lm_head train in every arm (ReLoRA's setting)
        assert set(run.adapter.trainable_modules) == {"embed_tokens", "norm", "lm_head"}
    if method in ("relora", "remora"):  # merge every 2K steps, 50-step restart warm-up, jagged schedule
        assert (run.restarts.merge_every, run.restarts.restart_warmup_steps, run.train.scheduler) == (
            2000, 50, "jagged_cosine")
        assert run.train.min_lr_ratio == 0.1
    else:
        assert run.restarts.merge_every is None and run.train.scheduler == "cosine"
    assert run.restarts.group_switch == ("pair" if method == "remora" else "none")
    if method == "mora":
        assert run.adapter.operator == "share"  # Eq. 6


def test_pretraining_1b_model_is_one_override_away():
    run = validate("experiment=pretrain_c4", "model=llama_1b", "scale=paper", cuda_available=True)
    assert (run.model.hidden_size, run.model.intermediate_size, run.model.num_layers, run.model.num_heads) == (
        2048, 5461, 24, 32)


@pytest.mark.parametrize("method", PRETRAIN_METHODS)
def test_pretraining_mini_preset_keeps_the_paper_ratios(method):
    run = validate("experiment=pretrain_c4", f"method={method}")
    assert (run.task.name, run.task.source, run.model.name) == ("c4", "local", "llama_w64")
    assert run.rank.paper_rank == 128 and run.rank.reference_width == 768 and run.rank.representable
    assert abs(run.rank.rank / run.model.hidden_size - 128 / 768) < 0.01
    if method in ("relora", "remora"):
        assert run.train.max_steps // run.restarts.merge_every == 5  # 10K steps / 2K as in the paper
        assert run.train.scheduler == "jagged_cosine"


@pytest.mark.parametrize("override, field", [
    ("method.merge_every=7", "method.merge_every"),  # does not divide max_steps under the jagged schedule
    ("restart.every=7", "method.merge_every"),       # the preset's restart block, read by relora and remora
    ("method.group_switch=triple", "method.group_switch"),
    ("train.min_lr_ratio=1.5", "train.min_lr_ratio"),
    ("method.restart_warmup_steps=-1", "method.restart_warmup_steps"),
    ("train.warmup_steps=400", "train.warmup_steps"),  # the first restart would come before it ends
])
def test_bad_restart_settings_name_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        validate("experiment=pretrain_c4", "method=remora", override)


@pytest.mark.parametrize("overrides", [("method=relora", "method.group_switch=pair"),
                                       ("method=remora", "method.operator=rotate")])
def test_group_switch_needs_mora_sharing(overrides):
    with pytest.raises(ValueError, match="group_switch"):
        validate("experiment=pretrain_c4", *overrides)


def test_jagged_restart_needs_a_warm_up():
    with pytest.raises(ValueError, match="method.restart_warmup_steps"):
        validate("experiment=pretrain_c4", "method=relora", "method.restart_warmup_steps=0")


PRESETS = sorted(p.stem for p in (CONF / "preset").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_relora_and_remora_restart_on_the_same_schedule(preset):
    """Under every preset ReLoRA and ReMoRA read the preset's one restart schedule."""
    task, scale = preset.rsplit("_", 1)
    relora, remora = (compose(f"task={task}", f"scale={scale}", f"method={m}").method for m in ("relora", "remora"))
    schedule = ("merge_every", "restart_warmup_steps", "jagged_schedule")
    assert {k: relora[k] for k in schedule} == {k: remora[k] for k in schedule} and relora.merge_every > 0
    assert (relora.group_switch, remora.group_switch) == ("none", "pair")


def test_no_other_method_has_restart_settings():
    """Restart settings live in conf/method/{relora,remora}.yaml only, and no preset writes them into
    a method (a `_global_` preset that set method.merge_every would turn LoRA into ReLoRA)."""
    for method in METHODS:
        node = compose(f"method={method}").method
        assert method in ("relora", "remora") or not set(node) & set(RESTART_FIELDS), method
    for path in (CONF / "preset").glob("*.yaml"):
        method_section = OmegaConf.load(path).get("method") or {}
        assert not set(method_section) & set(RESTART_FIELDS), path.name


def test_only_a_restarting_method_takes_restart_settings():
    with pytest.raises(ValueError, match="method.merge_every=5: method='lora' does not merge"):
        validate("method=lora", "+method.merge_every=5")


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
    ("lr=abc", "lr=.abc."),                # not a number: the error still names lr
    ("lr=inf", "lr=inf"),
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


@pytest.mark.parametrize("model, width, rank", [("stories260k", 64, 4), ("stories_w128", 128, 8)])
def test_rank_256_keeps_r_over_d(model, width, rank):
    run = validate("rank=256", "scale=mini", f"model={model}")
    assert (run.rank.paper_rank, run.rank.rank, run.rank.width, run.rank.reference_width) == (256, rank, width, 4096)
    assert run.rank.representable and run.adapter.rank == rank
    assert "NOT REPRESENTABLE" not in run.rank.describe()
    assert "1/16" in run.rank.describe()  # 256/4096 == 4/64 == 8/128


@pytest.mark.parametrize("model, factor", [("stories260k", 8), ("stories_w128", 4)])
def test_rank_8_is_not_representable_on_a_mini_width(model, factor):
    run = validate("rank=8", "scale=mini", f"model={model}")
    assert (run.rank.rank, run.rank.representable, run.adapter.rank) == (1, False, 1)
    text = run.rank.describe()
    assert "NOT REPRESENTABLE" in text and f"{factor}x larger r/d" in text  # 1/64 or 1/128 vs the paper's 1/512


@pytest.mark.parametrize("rank", [8, 256])
def test_paper_scale_uses_the_rank_as_given(rank):
    run = validate(f"rank={rank}", "scale=paper", cuda_available=True)
    assert (run.rank.rank, run.rank.representable, run.adapter.rank) == (rank, True, rank)
    assert "used as is" in run.rank.describe()


# ------------------------------------------------------------------ fine-tuning (Section 5.2, Table 5)

# Table 5: (scheduler, warm-up, FFT lr, LoRA-like lr grid r=8, MoRA r=8, LoRA-like r=256, MoRA r=256)
TABLE5 = {
    "tulu": ("cosine", 500, 2e-5, (1e-4, 2e-4), (2e-4, 3e-4), (1e-4, 2e-4), (3e-5, 5e-5)),
    "metamath": ("cosine", 300, 2e-5, (1e-4, 2e-4), (2e-4, 3e-4), (1e-4, 2e-4), (3e-5, 5e-5)),
    "biomed": ("linear", 150, 3e-5, (3e-4, 4e-4), (4e-4, 5e-4), (3e-4, 4e-4), (5e-5, 7e-5)),
    "finance": ("linear", 150, 3e-5, (3e-4, 4e-4), (4e-4, 5e-4), (3e-4, 4e-4), (5e-5, 7e-5)),
}
LORA_LIKE = ["lora", "loraplus", "asylora", "relora", "dora"]


@pytest.mark.parametrize("task", sorted(TABLE5))
@pytest.mark.parametrize("rank", [8, 256])
def test_finetune_paper_presets_are_table_5(task, rank):
    scheduler, warmup, fft_lr, lora8, mora8, lora256, mora256 = TABLE5[task]
    overrides = [f"experiment=finetune_r{rank}", f"task={task}", "scale=paper"]
    if task == "finance":  # the paper's finance corpus is not public: a user must name theirs
        overrides.append("task.hub_id=my/finance-news")
    if task in ("biomed", "finance"):  # one epoch of a corpus of unstated size: a user must give the steps
        overrides.append("train.max_steps=2000")
    cfg = compose(*overrides, "method=lora")
    grid = cfg.lr_grid[f"r{rank}"]
    assert tuple(grid.lora) == (lora8 if rank == 8 else lora256)
    assert tuple(grid.mora) == (mora8 if rank == 8 else mora256) and tuple(grid.fft) == (fft_lr,)
    for method in ["fft", "mora", *LORA_LIKE]:
        run = validate(*overrides, f"method={method}", cuda_available=True)
        assert (run.train.scheduler, run.train.warmup_steps) == (scheduler, warmup)
        assert run.train.batch_size * run.train.grad_accum == 128
        assert run.lr == grid[method][0]
        assert run.model.name == "llama2_7b" and run.adapter.rank == (rank if method != "fft" else run.adapter.rank)
        if method in LORA_LIKE:
            assert run.adapter.alpha == (16 if rank == 8 else 128)
        if method == "mora":  # Eq. 9 at r = 8, Eq. 6 at r = 256 (Section 5.2)
            assert run.adapter.operator == ("rotate" if rank == 8 else "share")


@pytest.mark.parametrize("task", ["metamath", "tulu", "biomed"])
def test_finetune_mini_presets_keep_alpha_over_r(task):
    run = validate("experiment=finetune_r256", f"task={task}", "method=lora")
    assert (run.rank.rank, run.adapter.alpha) == (4, 2.0)  # 128/256 = 0.5 = 2/4
    assert run.task.source == "local" and run.task.lm_eval_tasks


@pytest.mark.parametrize("experiment", [[], ["experiment=finetune_r8"], ["experiment=finetune_r256"]])
def test_finance_has_no_mini_scale_and_says_why(experiment):
    # `make table7` goes through the experiment presets: they must compose up to this message
    with pytest.raises(ValueError, match="task.hub_id"):
        validate(*experiment, "task=finance", "method=lora")


@pytest.mark.parametrize("task", ["biomed", "finance"])
def test_one_epoch_presets_refuse_to_run_without_a_step_count(task):
    # Table 5 trains one epoch of a corpus whose size the paper does not state: no made-up default
    corpus = ["task.hub_id=my/finance-news"] if task == "finance" else []  # not public: a user names theirs
    with pytest.raises(ValueError, match="train.max_steps has no value"):
        validate("scale=paper", f"task={task}", "method=lora", *corpus, cuda_available=True)
    run = validate("scale=paper", f"task={task}", "method=lora", *corpus, "train.max_steps=1234", cuda_available=True)
    assert run.train.max_steps == 1234
