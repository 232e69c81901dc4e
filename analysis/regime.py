"""Is each `mini` experiment in the paper's regime? One table per experiment, every value computed.

A miniature can only test a claim if it keeps the quantities that drive the paper's result: how
many trainable parameters each memorised bit gets, r/d, epochs, tokens per parameter, the share of
the trainable parameters in the embeddings. For each such axis the tables give the paper's value,
the `mini` value and whether they match. Nothing is typed in: values come from the composed `paper`
and `mini` presets (:func:`analysis.paper_settings.compose`, validated by
:func:`experiments.schema.build_run_config`), from the models those presets build (counted on the
meta device; adapters injected with :func:`mora.adapters.inject_adapters`), from the data the
tasks build, and from the measured run folders (:func:`experiments.loop.records.find_runs`). Facts
of the paper that no config holds (LLaMA-2 7B's shape, the UUID format, Table 2) are named constants
with their source.

    python -m analysis regime --runs tests/fixtures/measured --out reports/regime   # reports/regime/regime.md
    python -m analysis.regime --readme README.md --write docs/regime.md            # refresh the generated copies
    python -m analysis.regime --check                                              # non-zero when they are stale
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from analysis.methods import method_style
from analysis.paper_settings import T5_VOCAB, TABLE_5_ROWS, compose, fmt, read
from analysis.paper_settings import readme_block as marked_block
from analysis.pretrain_figures import PAPER_TABLE3
from analysis.runs import Run, best_groups, check_unique, run_from_record
from analysis.uuid_figures import PAPER_TABLE2, PAPER_TABLE2_STEPS
from experiments.loop.records import find_runs, flatten
from experiments.models.loading import build_llama_from_config, load_model
from experiments.data.offline import verify_files
from experiments.models.local_base import shape_of
from experiments.models.sp_tokenizer import load_sentencepiece_tokenizer
from experiments.schema import RunConfig, build_run_config
from experiments.tasks import build_task
from experiments.tasks.finetune import SFTTask, TextTask
from mora.adapters import AdapterConfig, find_target_linears, inject_adapters, trainable_parameter_count
from mora.layer import MoRAAdapter

REPO = Path(__file__).resolve().parents[1]
MEASURED = REPO / "tests" / "fixtures" / "measured"     # the run folders behind the README's numbers
DOC = REPO / "docs" / "regime.md"
README = REPO / "README.md"
BEGIN, END = "<!-- regime:begin -->", "<!-- regime:end -->"
README_HEADING = "## Is each miniature in the paper's regime?"
CLAIMS_HEADING = "## The paper's claims and what we measured"   # the README section ours follows

# A `mini` value is in the paper's regime when it is within ×1.25 of the paper's, either way: tight
# enough that a ratio a preset claims to keep (r/d, merge cycles) must really be kept, loose enough
# for the rounding a small width forces (paper rank 128 on width 768 is rank 21.3 on width 128).
TOLERANCE = 1.25

# ------------------------------------------------------------------ facts of the paper no config holds

# LLaMA-2 7B (Touvron et al. 2023), the base of Sections 3 and 5.1-5.2. A hub model: its config
# holds only the hidden size, so the rest of the shape is stated here to build it on the meta device.
HUB_SHAPES = {"meta-llama/Llama-2-7b-hf": dict(vocab_size=32_000, hidden_size=4096, intermediate_size=11_008,
                                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)}

# Section 3: a UUID value is 32 hex digits, 128 bits; a version-4 UUID fixes 4 of them (the version)
# and 2 more (the RFC 4122 variant), as experiments/tasks/uuid_memory.py draws them. What a pair asks
# the model to store is the value its key maps to: 122 random bits.
UUID_BITS = 32 * 4 - 4 - 2
FULL_ACCURACY = 100.0          # Table 2: "memorize all UUID pairs" = 100% character accuracy

# Table 2's arms. The regime is judged on the baselines alone (FFT, LoRA); MoRA's outcome is the
# claim under test, so it never decides whether a miniature is in regime (issue 12's rule).
UUID_ARMS = tuple(PAPER_TABLE2)
UUID_BASELINES = tuple(arm for arm in UUID_ARMS if arm[0] in ("fft", "lora"))
UUID_LR_METHODS = tuple(dict.fromkeys(method for method, _ in UUID_ARMS))
C4_ARMS = (*PAPER_TABLE3, "fft")                 # Table 3's rows and this repo's full-rank reference
FINETUNE_RANKS = (8, 256)                        # Section 5.2: the two rank regimes
# Table 1's columns that have a mini scale; finance (Table 7) has no offline text (make table7)
FINETUNE_TASKS = ("tulu", "metamath", "biomed")

# The config keys that make a run folder a run of the current `mini` preset: the measured rows read
# only those, so a run of an older preset is never counted as this one's.
UUID_PRESET_KEYS = ("model.name", "task.n_pairs", "task.pair_seed", "train.max_steps", "train.batch_size",
                    "train.grad_accum")
C4_PRESET_KEYS = ("model.name", "task.seq_len", "task.tokenizer", "task.vocab_size", "train.max_steps",
                  "train.batch_size", "train.grad_accum")
FINETUNE_PRESET_KEYS = ("model.name", "task.dataset", "task.max_len", "task.n_train", "train.max_steps",
                        "train.batch_size", "train.grad_accum")

# ------------------------------------------------------------------ rows and verdicts

IN, OUT, UNJUDGED = "in", "out", "unjudged"
MARKS = {IN: "✓", OUT: "✗", UNJUDGED: "—"}


@dataclass(frozen=True)
class Verdict:
    status: str       # IN | OUT | UNJUDGED
    text: str

    def __str__(self) -> str:
        return f"{MARKS[self.status]} {self.text}".rstrip()


@dataclass(frozen=True)
class Row:
    axis: str
    paper: str
    mini: str
    verdict: Verdict


@dataclass(frozen=True)
class Table:
    title: str
    context: str          # one paragraph of computed setting, above the rows
    rows: tuple[Row, ...]


def within(paper: float, mini: float, tolerance: float = TOLERANCE, sides: tuple[str, str] = ("smaller", "larger")
           ) -> Verdict:
    """✓ when mini/paper lies in [1/tolerance, tolerance], else how far out and on which side."""
    factor = mini / paper
    off = max(factor, 1 / factor)
    if off <= tolerance:
        return Verdict(IN, f"×{factor:.3g} (within ×{tolerance:g})")
    return Verdict(OUT, f"out by ×{times(off)} (mini {sides[factor > 1]})")


def unjudged(why: str) -> Verdict:
    return Verdict(UNJUDGED, why)


def ratio_row(axis: str, paper: float, mini: float, show: Callable[[float], str] | None = None) -> Row:
    show = show or sig3
    return Row(axis, show(paper), show(mini), within(paper, mini))


def times(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def sig3(x: float) -> str:
    """Three significant digits, thousands with separators: 5,523 · 16.4 · 0.0625."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def count(n: int) -> str:
    """A parameter or token count as 6.74B, 1.43M, 260K."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def fraction(numerator: int, denominator: int) -> str:
    return f"{numerator}/{denominator} = {sig3(numerator / denominator)}"


def fraction_row(axis: str, paper: tuple[int, int], mini: tuple[int, int]) -> Row:
    """A ratio shown with its parts (r/d, merge_every/max_steps), judged on its value."""
    return Row(axis, fraction(*paper), fraction(*mini), within(paper[0] / paper[1], mini[0] / mini[1]))


# ------------------------------------------------------------------ configs and models

@lru_cache(maxsize=None)
def run_config(*overrides: str) -> RunConfig:
    """What ``experiments/run.py <overrides>`` would run, validated. ``cuda_available=True`` because
    only shapes and sizes are read here: nothing runs, so a paper preset's GPU is not needed."""
    return build_run_config(compose(*overrides), cuda_available=True)


@lru_cache(maxsize=None)
def _llama2c(model, data_root: Path):
    return load_model(model, data_root)                      # (model, tokenizer); small, real weights


@lru_cache(maxsize=None)
def _from_config(model, task, data_root: Path) -> nn.Module:
    """A LLaMA built from conf/model/*.yaml, on the meta device: shapes without memory."""
    with torch.device("meta"):
        return build_llama_from_config(model, vocab_size(task), seed=0)


@lru_cache(maxsize=None)
def _hub(model, task, data_root: Path) -> nn.Module:
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**HUB_SHAPES[model.hub_id]))


@lru_cache(maxsize=None)
def _local_base(model, task, data_root: Path) -> nn.Module:
    """A base the repository pretrains (experiments/models/local_base.py), on the meta device: its
    shape is the config's and its vocabulary its tokenizer's, so no base has to be built to count."""
    (tokenizer_path,) = verify_files(data_root, [model.tokenizer])
    with torch.device("meta"):
        return LlamaForCausalLM(shape_of(model, len(load_sentencepiece_tokenizer(tokenizer_path))).llama_config())


MODEL_BUILDERS = {"llama2c": lambda model, task, root: _llama2c(model, root)[0], "config": _from_config,
                  "hub": _hub, "local_base": _local_base}
TOKENIZER_VOCAB = {"t5": T5_VOCAB}   # fixed vocabularies; a trained BPE has task.vocab_size tokens


def vocab_size(task) -> int:
    """The vocabulary a model built from a config gets from its task's tokenizer (Section 5.3)."""
    return TOKENIZER_VOCAB.get(task.tokenizer, task.vocab_size)


def base_model(run: RunConfig) -> nn.Module:
    """The run's base model: real for llama2.c checkpoints, on the meta device for the large ones."""
    return MODEL_BUILDERS[run.model.source](run.model, run.task, run.data_root)


# ------------------------------------------------------------------ parameter counts

@dataclass(frozen=True)
class Trainable:
    """The parameters one arm trains, by kind."""

    adapters: int
    embeddings: int     # input embeddings and lm_head (one matrix when tied)
    rest: int           # every other base parameter that trains (norms; all linear layers for FFT)

    @property
    def total(self) -> int:
        return self.adapters + self.embeddings + self.rest

    @property
    def embedding_share(self) -> float:
        return self.embeddings / self.total


def lone_adapter_parameters(in_features: int, out_features: int, adapter: AdapterConfig) -> int:
    """The adapter's trainable parameters on one k→d Linear, injected alone. A large model is
    counted shape by shape because MoRA's rotation tables cannot be built on the meta device."""
    holder = nn.Module()
    holder.linear = nn.Linear(in_features, out_features, bias=False, device="meta")
    inject_adapters(holder, replace(adapter, target_modules=("linear",), trainable_modules=()))
    return trainable_parameter_count(holder)


def adapter_parameters(model: nn.Module, adapter: AdapterConfig) -> int:
    if adapter.layer_kind is None:
        return 0
    linears = (model.get_submodule(name) for name in find_target_linears(model, adapter.target_modules))
    shapes = Counter((linear.in_features, linear.out_features) for linear in linears)
    return sum(n * lone_adapter_parameters(k, d, adapter) for (k, d), n in shapes.items())


def unfrozen_parameters(model: nn.Module, adapter: AdapterConfig) -> list[nn.Parameter]:
    """The base parameters that train: all of them without adapters (FFT), else those of the modules
    ``trainable_modules`` names, by mora.adapters' rule (a module whose own name ends with a pattern)."""
    if adapter.layer_kind is None:
        return list(model.parameters())
    chosen = [module for name, module in model.named_modules()
              if name and any(name.rsplit(".", 1)[-1].endswith(p) for p in adapter.trainable_modules)]
    return list({id(p): p for module in chosen for p in module.parameters()}.values())


def embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = (model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    return list({id(p): p for p in params}.values())


def trainable(model: nn.Module, adapter: AdapterConfig) -> Trainable:
    """What ``adapter`` trains in ``model``, without touching ``model`` (a meta-device model will do)."""
    unfrozen = unfrozen_parameters(model, adapter)
    embedding_ids = {id(p) for p in embedding_parameters(model)}
    embeddings = sum(p.numel() for p in unfrozen if id(p) in embedding_ids)
    return Trainable(adapter_parameters(model, adapter), embeddings, sum(p.numel() for p in unfrozen) - embeddings)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def r_over_d(run: RunConfig) -> tuple[int, int]:
    """(r, d): the rank the run trains and the model's hidden size."""
    return run.adapter.rank, run.model.hidden_size


def r_hat_over_d(run: RunConfig) -> tuple[int, int]:
    """(r̂, d) of MoRA on a d×d module (q_proj): r̂/d = √(2r/d) up to rounding (Section 4)."""
    d, a = run.model.hidden_size, run.adapter
    return MoRAAdapter.from_rank(d, d, a.rank, a.operator, a.rounding).r_hat, d


# ------------------------------------------------------------------ measured runs

ABSENT = object()


@lru_cache(maxsize=None)
def mini_records(root: Path) -> tuple[dict, ...]:
    """Every `mini` run folder under ``root``, read once: find_runs parses YAML, the slow part."""
    return tuple(find_runs(root, **{"scale.name": "mini"}))


def preset_records(root: Path, task: str, cfg, keys: Iterable[str]) -> list[dict]:
    """The measured runs of the preset ``cfg`` was composed from: its task, and its values at ``keys``."""
    wanted = {"task.name": task, **{key: read(cfg, key) for key in keys}}
    return [record for record in mini_records(root)
            if all(flatten(record["config"]).get(key, ABSENT) == value for key, value in wanted.items())]


def preset_runs(root: Path, task: str, cfg, keys: Iterable[str]) -> list[Run]:
    runs = [run_from_record(record) for record in preset_records(root, task, cfg, keys)]
    check_unique(runs)
    return runs


def first_full_step(curve: dict[int, float]) -> int | None:
    """The first evaluated step at 100% character accuracy (None: never within the curve)."""
    return next((step for step in sorted(curve) if curve[step] >= FULL_ACCURACY), None)


def measured_curves(runs: list[Run]) -> dict[tuple[str, int | None], dict[int, float]]:
    """(method, paper rank) → step → mean character accuracy of the chosen learning rate's seeds."""
    return {(key.method, key.rank): {step: stat.mean for step, stat in group.char_accuracy.items()}
            for key, group in best_groups(runs).items() if group.char_accuracy}


def learning_rates(runs: Iterable[Run], method: str) -> frozenset[float]:
    return frozenset(run.lr for run in runs if run.method == method)


def stated_grid(cfg, method: str, grid_key: str) -> frozenset[float] | None:
    """The preset's learning-rate grid for ``method`` (at ``grid_key``); None when it holds none. A
    paper preset holds a grid exactly where the paper states one (docs/paper_settings.md)."""
    grid = read(cfg, f"{grid_key}.{method}")
    return frozenset(grid) if isinstance(grid, list) else None


def preset_learning_rates(cfg, method: str, grid_key: str) -> frozenset[float]:
    """The preset's grid for ``method`` when it holds one, else its one learning rate."""
    return stated_grid(cfg, method, grid_key) or frozenset({read(cfg, f"lr_by_method.{method}")})


def step_zero_scores(root: Path, task: str, cfg) -> dict[str, float]:
    """Mean over runs of every ``eval/*`` metric logged at step 0, i.e. the base before training."""
    records = preset_records(root, task, cfg, FINETUNE_PRESET_KEYS)
    at_zero = [m for r in records for m in r["metrics"] if m["step"] == 0]
    names = sorted({k for m in at_zero for k in m if k.startswith("eval/")})
    return {n: sum(m[n] for m in at_zero if n in m) / sum(n in m for m in at_zero) for n in names}


# ------------------------------------------------------------------ UUID memorisation (Section 3, 5.1)

def uuid_run(scale: str, method: str, rank: int | None) -> RunConfig:
    return run_config("task=uuid", f"scale={scale}", f"method={method}", f"rank={rank or 8}")


def memorised_bits(run: RunConfig) -> int:
    return run.task.n_pairs * UUID_BITS


def arm_label(method: str, rank: int | None) -> str:
    return method_style(method).label + (f" r = {rank}" if rank is not None else "")


def params_per_bit(scale: str, method: str, rank: int | None) -> float:
    run = uuid_run(scale, method, rank)
    return trainable(base_model(run), run.adapter).total / memorised_bits(run)


def uuid_capacity_rows() -> list[Row]:
    rows = []
    for method, rank in UUID_ARMS:
        mini_rank = "" if rank is None else f" (mini r = {uuid_run('mini', method, rank).adapter.rank})"
        rows.append(ratio_row(f"trainable parameters per memorised bit, {arm_label(method, rank)}{mini_rank}",
                              params_per_bit("paper", method, rank), params_per_bit("mini", method, rank)))
    return rows


def rank_rows(runs_at: Callable[[str, int], RunConfig], ranks: Iterable[int]) -> list[Row]:
    """r/d (d: hidden size) and MoRA's r̂/d on a d×d module, paper against mini, at each paper rank."""
    rows = []
    for rank in ranks:
        paper, mini = runs_at("paper", rank), runs_at("mini", rank)
        rows.append(fraction_row(f"r/d at paper r = {rank}", r_over_d(paper), r_over_d(mini)))
        rows.append(fraction_row(f"MoRA r̂/d at paper r = {rank} ({paper.adapter.operator}, d×d module)",
                                 r_hat_over_d(paper), r_hat_over_d(mini)))
    return rows


def epochs_at(run: RunConfig, step: int) -> float:
    """Passes over the pairs after ``step`` optimizer steps."""
    return step * run.train.batch_size * run.train.grad_accum / run.task.n_pairs


def uuid_epoch_rows() -> list[Row]:
    """Epochs at each Table 2 evaluation, paired by position (the mini preset's i-th for the paper's i-th)."""
    paper, mini = uuid_run("paper", "fft", None), uuid_run("mini", "fft", None)
    rows = []
    for i, paper_step in enumerate(paper.train.eval_steps):
        axis = f"epochs over the pairs at evaluation {i + 1} (paper step {paper_step}"
        if i >= len(mini.train.eval_steps):
            rows.append(Row(axis + ")", sig3(epochs_at(paper, paper_step)), "no evaluation", unjudged("")))
            continue
        mini_step = mini.train.eval_steps[i]
        rows.append(ratio_row(f"{axis}, mini step {mini_step})", epochs_at(paper, paper_step),
                              epochs_at(mini, mini_step)))
    return rows


def reach_text(curve: dict[int, float] | None) -> str:
    if curve is None:
        return "not measured"
    budget, step = max(curve), first_full_step(curve)
    if step is None:
        last = curve[budget]
        # a mean a hair under 100 would print as "100.0": give it the digits that show it is not
        return f"not reached: {last:.{2 if last >= 99.95 else 1}f}% at step {budget}"
    return f"step {step} of {budget} ({step / budget:.2f} of the budget)"


def reach_verdict(paper: dict[int, float], mini: dict[int, float] | None) -> Verdict:
    """Both reach 100%: compare the fractions of the budget; otherwise whether the outcome is the same."""
    if mini is None:
        return unjudged("no measured run of this preset")
    paper_step, mini_step = first_full_step(paper), first_full_step(mini)
    if paper_step is not None and mini_step is not None:
        return within(paper_step / max(paper), mini_step / max(mini), sides=("earlier", "later"))
    if paper_step is None and mini_step is None:
        return Verdict(IN, "neither reaches 100%")
    return Verdict(OUT, "the paper's reaches 100%, the mini one does not" if paper_step is not None
                   else "the mini one reaches 100%, the paper's does not")


def uuid_reach_rows(runs: list[Run]) -> list[Row]:
    """Table 2's shape: when (as a fraction of the evaluated budget) each baseline memorises every pair."""
    measured = measured_curves(runs)
    rows = []
    for arm in UUID_BASELINES:
        paper = dict(zip(PAPER_TABLE2_STEPS, PAPER_TABLE2[arm]))
        rows.append(Row(f"{arm_label(*arm)}: first evaluation at 100% character accuracy (Table 2)",
                        reach_text(paper), reach_text(measured.get(arm)), reach_verdict(paper, measured.get(arm))))
    return rows


def grid_verdict(paper: frozenset[float] | None, tried: frozenset[float]) -> Verdict:
    """In regime when mini tried at least as many learning rates as the paper searched."""
    if paper is None:
        return unjudged("the paper states no grid")
    if len(tried) >= len(paper):
        return Verdict(IN, f"{points(len(tried))}, the paper {len(paper)}")
    return Verdict(OUT, f"{points(len(tried))} against the paper's {len(paper)}")


def lr_row(axis: str, paper_cfg, mini_cfg, method: str, grid_key: str, runs: list[Run]) -> Row:
    """Learning rates tried for one arm: the mini grid is the preset's together with the measured runs'."""
    paper = stated_grid(paper_cfg, method, grid_key)
    preset, measured = preset_learning_rates(mini_cfg, method, grid_key), learning_rates(runs, method)
    paper_rates = fmt(preset_learning_rates(paper_cfg, method, grid_key))
    paper_text = fmt(paper) if paper else f"no grid stated (preset {paper_rates})"
    mini_text = f"preset {fmt(preset)}; runs {fmt(measured) if measured else 'none'}"
    return Row(axis, paper_text, mini_text, grid_verdict(paper, preset | measured))


def points(n: int) -> str:
    return f"{n} point{'s' * (n != 1)}"


def uuid_lr_rows(runs: list[Run]) -> list[Row]:
    paper, mini = compose("task=uuid", "scale=paper"), compose("task=uuid", "scale=mini")
    return [lr_row(f"learning rates tried, {method_style(m).label} (Sections 3, 5.1)", paper, mini, m,
                   "lr_grid_by_method", runs) for m in UUID_LR_METHODS]


def uuid_context(runs: list[Run], root: Path) -> str:
    def setting(run: RunConfig) -> str:
        return (f"{run.model.name} ({count(parameter_count(base_model(run)))} parameters), {run.task.n_pairs:,} "
                f"pairs = {memorised_bits(run):,} bits, {run.train.batch_size * run.train.grad_accum:,} pairs per "
                f"step, {run.train.max_steps:,} steps")
    paper, mini = uuid_run("paper", "fft", None), uuid_run("mini", "fft", None)
    return (f"Paper: {setting(paper)}. Mini: {setting(mini)}. A memorised bit is one of the {UUID_BITS} random "
            f"bits of a pair's value (128 bits less the 6 a version-4 UUID fixes). Measured rows: {len(runs)} "
            f"runs of the current mini preset under `{shown(root)}`, best learning rate per arm, mean over seeds.")


def uuid_table(root: Path) -> Table:
    mini_cfg = compose("task=uuid", "scale=mini")
    runs = preset_runs(root, "uuid", mini_cfg, UUID_PRESET_KEYS)
    ranks = tuple(dict.fromkeys(rank for _, rank in UUID_ARMS if rank is not None))
    rows = (*uuid_capacity_rows(), *rank_rows(lambda scale, r: uuid_run(scale, "mora", r), ranks),
            *uuid_epoch_rows(), *uuid_reach_rows(runs), *uuid_lr_rows(runs))
    return Table("UUID memorisation: Table 2, Fig. 2, Fig. 3 (Sections 3, 5.1)", uuid_context(runs, root), rows)


# ------------------------------------------------------------------ C4 pretraining (Section 5.3)

def c4_run(scale: str, method: str) -> RunConfig:
    return run_config("experiment=pretrain_c4", f"scale={scale}", f"method={method}")


def tokens(run: RunConfig) -> int:
    """Tokens trained on: steps × sequences per step × sequence length (packed blocks, no padding)."""
    return run.train.max_steps * run.train.batch_size * run.train.grad_accum * run.task.seq_len


def non_embedding_parameters(model: nn.Module) -> int:
    return parameter_count(model) - sum(p.numel() for p in embedding_parameters(model))


def c4_token_rows() -> list[Row]:
    paper, mini = c4_run("paper", "fft"), c4_run("mini", "fft")
    per_param = [tokens(run) / parameter_count(base_model(run)) for run in (paper, mini)]
    per_non_embedding = [tokens(run) / non_embedding_parameters(base_model(run)) for run in (paper, mini)]
    return [ratio_row("tokens per parameter (all parameters)", *per_param),
            ratio_row("tokens per non-embedding parameter", *per_non_embedding)]


@lru_cache(maxsize=None)
def c4_train_tokens(experiment: str = "experiment=pretrain_c4") -> int:
    """Tokens in an experiment's `mini` packed training split (what one epoch is), counted by building its task."""
    run = run_config(experiment, "scale=mini", "method=fft")
    task = build_task(run.task, None, batch_size=run.train.batch_size, seed=0, data_root=run.data_root)
    return int(task.train_blocks.numel())


def c4_epoch_row() -> Row:
    """Passes over the training text: the paper streams C4 once (5.24B tokens of a far larger split); the mini
    corpus is 970 documents, so more tokens per parameter there means repeating them (Amendment 5)."""
    epochs = tokens(c4_run("mini", "fft")) / c4_train_tokens()
    verdict = (Verdict(IN, "one pass or less, as the paper") if epochs <= 1
               else Verdict(OUT, f"mini repeats its corpus ×{epochs:.2g} (the paper never repeats a token)"))
    return Row("epochs over the training text", "< 1 (one pass of the streamed C4 train split)", f"{epochs:.3g}",
               verdict)


def c4_embedding_rows() -> list[Row]:
    rows = []
    for method in C4_ARMS:
        paper, mini = c4_run("paper", method), c4_run("mini", method)
        share = [trainable(base_model(run), run.adapter).embedding_share for run in (paper, mini)]
        rows.append(ratio_row(f"share of the trainable parameters in embeddings + lm_head, "
                              f"{method_style(method).label}", *share))
    return rows


def c4_schedule_rows() -> list[Row]:
    """Warm-up and merge cycles as fractions of training: what a shorter run must keep (Section 5.3)."""
    def warmup(run: RunConfig) -> tuple[int, int]:
        return run.train.warmup_steps, run.train.max_steps

    def cycle(run: RunConfig) -> tuple[int, int]:
        return run.restarts.merge_every, run.train.max_steps

    rows = [fraction_row("warm-up steps / training steps", *(warmup(c4_run(s, "fft")) for s in ("paper", "mini")))]
    for method in C4_ARMS:
        paper, mini = c4_run("paper", method), c4_run("mini", method)
        if paper.restarts.merge_every:
            rows.append(fraction_row(f"{method_style(method).label}: merge_every / max_steps (a merge cycle as a "
                                     "fraction of training)", cycle(paper), cycle(mini)))
    return rows


def c4_lr_rows(runs: list[Run]) -> list[Row]:
    paper, mini = compose("experiment=pretrain_c4", "scale=paper"), compose("experiment=pretrain_c4", "scale=mini")
    return [lr_row(f"learning rates tried, {method_style(m).label}", paper, mini, m, "lr_grid_by_method", runs)
            for m in C4_ARMS]


def c4_context(runs: list[Run], root: Path) -> str:
    def setting(run: RunConfig) -> str:
        model = base_model(run)
        return (f"{run.model.name} ({count(parameter_count(model))} parameters, vocabulary {vocab_size(run.task):,}), "
                f"{count(tokens(run))} tokens ({run.train.max_steps:,} steps × "
                f"{run.train.batch_size * run.train.grad_accum:,} × {run.task.seq_len})")
    return (f"Paper: {setting(c4_run('paper', 'fft'))}. Mini: {setting(c4_run('mini', 'fft'))}. Adapters at paper "
            f"r = {c4_run('paper', 'lora').rank.paper_rank}, embeddings, norms and lm_head trainable in every arm. "
            f"Measured rows: {len(runs)} runs of the current mini preset under `{shown(root)}`.")


def c4_table(root: Path) -> Table:
    mini_cfg = compose("experiment=pretrain_c4", "scale=mini")
    runs = preset_runs(root, "c4", mini_cfg, C4_PRESET_KEYS)
    rank = c4_run("paper", "lora").rank.paper_rank
    rows = (*c4_token_rows(), c4_epoch_row(), *c4_embedding_rows(),
            *rank_rows(lambda scale, r: c4_run(scale, "mora"), (rank,)), *c4_schedule_rows(), *c4_lr_rows(runs))
    return Table("C4 pretraining from scratch: Fig. 4, Table 3, Fig. 5 (Section 5.3)", c4_context(runs, root), rows)


# ------------------------------------------------------------------ fine-tuning (Section 5.2, Table 5)

def finetune_cfg(task: str, scale: str):
    """Steps, batch and data do not depend on the rank regime or the method: r = 8 and LoRA stand for all."""
    return compose("experiment=finetune_r8", f"task={task}", f"scale={scale}", "method=lora")


# the rows batch() draws from: SFTTask's encoded examples, TextTask's packed blocks
TRAINING_ROWS: dict[type, tuple[str, Callable[[Any], int]]] = {
    SFTTask: ("examples", lambda task: len(task.data)),
    TextTask: ("packed blocks", lambda task: len(task.blocks)),
}


@lru_cache(maxsize=None)
def mini_training_rows(task: str) -> tuple[int, str]:
    """(rows, what a row is) of the task the mini preset builds from the offline data, on the base's tokenizer."""
    run = run_config("experiment=finetune_r8", f"task={task}", "scale=mini", "method=lora")
    tokenizer = _llama2c(run.model, run.data_root)[1]
    built = build_task(run.task, tokenizer, batch_size=run.train.batch_size, seed=run.seed, data_root=run.data_root)
    unit, rows = TRAINING_ROWS[type(built)]
    return rows(built), unit


def examples_per_step(cfg) -> int:
    return read(cfg, "train.batch_size") * read(cfg, "train.grad_accum")


def paper_epochs(task: str) -> tuple[float, str]:
    """Epochs of the paper preset over Section 5.2.1's data set size, or Table 5's stated count when
    the preset cannot say (a corpus of unstated size leaves train.max_steps null)."""
    row = next(r for r in TABLE_5_ROWS if r.task == task)
    steps = read(finetune_cfg(task, "paper"), "train.max_steps")
    if steps is None or row.n_examples is None:
        return float(row.epochs), "Table 5; the corpus size is not stated"
    return steps * examples_per_step(finetune_cfg(task, "paper")) / row.n_examples, f"of {row.n_examples:,} examples"


def finetune_task_rows(task: str, root: Path) -> list[Row]:
    paper, mini = finetune_cfg(task, "paper"), finetune_cfg(task, "mini")
    paper_steps, mini_steps = read(paper, "train.max_steps"), read(mini, "train.max_steps")
    steps_row = (ratio_row(f"{task}: optimizer steps", paper_steps, mini_steps, lambda x: f"{x:,}")
                 if paper_steps is not None else
                 Row(f"{task}: optimizer steps", "one epoch of the corpus", f"{mini_steps:,}",
                     unjudged("the paper states no corpus size")))
    epochs, source = paper_epochs(task)
    rows, unit = mini_training_rows(task)
    mini_epochs = mini_steps * examples_per_step(mini) / rows
    epochs_row = Row(f"{task}: epochs over the training set", f"{sig3(epochs)} ({source})",
                     f"{sig3(mini_epochs)} (of {rows:,} {unit})", within(epochs, mini_epochs))
    return [steps_row, epochs_row, *finetune_schedule_rows(task), base_row(task, mini, root)]


def finetune_schedule_rows(task: str) -> list[Row]:
    """Table 5's schedule as fractions of training (warm-up; ReLoRA's merge cycle, searched over {1k, 2k} in
    Section 5.2) and its kind."""
    def relora(scale: str):
        return compose("experiment=finetune_r8", f"task={task}", f"scale={scale}", "method=relora")

    paper, mini = relora("paper"), relora("mini")
    steps, mini_steps = read(paper, "train.max_steps"), read(mini, "train.max_steps")
    p_sched, m_sched = read(paper, "train.scheduler"), read(mini, "train.scheduler")
    p_warm, m_warm = read(paper, "train.warmup_steps"), read(mini, "train.warmup_steps")
    p_merge, m_merge = read(paper, "method.merge_every"), read(mini, "method.merge_every")
    searched = (p_merge, 2 * p_merge)   # Section 5.2: merge steps searched from {1k, 2k}
    rows = [Row(f"{task}: learning-rate schedule (Table 5)", p_sched, m_sched,
                Verdict(IN, "same") if p_sched == m_sched else Verdict(OUT, "differs"))]
    merge_axis = f"{task}: ReLoRA merge_every / max_steps (the paper searched {searched[0]:,} and {searched[1]:,})"
    if steps is None:
        why = unjudged("the paper states no corpus size, so no step count")
        return rows + [Row(f"{task}: warm-up steps / training steps", f"{p_warm} of an unstated number",
                           fraction(m_warm, mini_steps), why),
                       Row(merge_axis, f"{searched[0]:,} or {searched[1]:,} of an unstated number",
                           fraction(m_merge, mini_steps), why)]
    verdicts = [within(n / steps, m_merge / mini_steps) for n in searched]
    merge_verdict = next((v for v in verdicts if v.status == IN), verdicts[0])
    return rows + [fraction_row(f"{task}: warm-up steps / training steps", (p_warm, steps), (m_warm, mini_steps)),
                   Row(merge_axis, f"{fraction(searched[0], steps)} or {sig3(searched[1] / steps)}",
                       fraction(m_merge, mini_steps), merge_verdict)]


def base_row(task: str, mini_cfg, root: Path) -> Row:
    scores = step_zero_scores(root, task, mini_cfg)
    mini = ("; ".join(f"{name} {value:.3g}" for name, value in scores.items())
            or "not measured (no run evaluates at step 0)")
    return Row(f"{task}: what the base scores before training", "not stated (Table 1 has no base row)", mini,
               unjudged("nothing to compare"))


def merged(rows_by_task: dict[str, list[Row]]) -> list[Row]:
    """One row per axis when every task gives the same values, else one per task."""
    out = []
    for position in range(len(next(iter(rows_by_task.values())))):
        rows = {task: rows[position] for task, rows in rows_by_task.items()}
        values = {(r.paper, r.mini, str(r.verdict)) for r in rows.values()}
        if len(values) == 1:
            first = next(iter(rows.values()))
            out.append(replace(first, axis=f"{first.axis} ({', '.join(rows)})"))
        else:
            out += [replace(row, axis=f"{task}: {row.axis}") for task, row in rows.items()]
    return out


def finetune_rank_rows() -> list[Row]:
    # only shapes are read, and biomed's paper preset leaves train.max_steps to the user: give it one
    def runs_at(task: str) -> Callable[[str, int], RunConfig]:
        return lambda scale, rank: run_config(f"experiment=finetune_r{rank}", f"task={task}", f"scale={scale}",
                                              "method=mora", "train.max_steps=1", "train.warmup_steps=0",
                                              "train.eval_steps=[]")
    return merged({task: rank_rows(runs_at(task), FINETUNE_RANKS) for task in FINETUNE_TASKS})


def finetune_context(root: Path) -> str:
    def setting(scale: str) -> str:
        cfgs = [finetune_cfg(task, scale) for task in FINETUNE_TASKS]
        return (f"{' / '.join(sorted({read(c, 'model.name') for c in cfgs}))}, "
                f"{' / '.join(str(n) for n in sorted({examples_per_step(c) for c in cfgs}))} examples per step, "
                f"at most {' / '.join(str(n) for n in sorted({read(c, 'task.max_len') for c in cfgs}))} tokens each")
    return (f"Paper: {setting('paper')}. Mini: {setting('mini')}; mini training sets as the tasks build them from "
            f"the offline data (an example with nothing to learn within its first max_len tokens is dropped). "
            f"Measured rows read `{shown(root)}`.")


def finetune_table(root: Path) -> Table:
    rows = [row for task in FINETUNE_TASKS for row in finetune_task_rows(task, root)]
    return Table("Fine-tuning: Tables 1, 4, 6 (Section 5.2, Table 5)", finetune_context(root),
                 (*rows, *finetune_rank_rows()))


# ------------------------------------------------------------------ rendering and the generated copies

EXPERIMENTS = (uuid_table, c4_table, finetune_table)


def tables(root: Path = MEASURED) -> list[Table]:
    return [build(Path(root)) for build in EXPERIMENTS]


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (stable text for the README)."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def rule() -> str:
    return (f"A `mini` value is in the paper's regime (✓) when it lies within ×{TOLERANCE:g} of the paper's, either "
            f"way; otherwise (✗) the table says how far out and on which side; — marks what cannot be judged. "
            f"Paper values come from the `scale=paper` presets (checked against the paper in "
            f"`docs/paper_settings.md`) and the paper's published tables; mini values "
            f"from the `scale=mini` presets, the models and data they build, and the measured run folders.")


def table_markdown(table: Table, heading: str) -> str:
    lines = [f"{heading} {table.title}", "", table.context, "",
             "| axis | paper | mini | in the paper's regime? |", "|---|---|---|---|"]
    lines += [f"| {r.axis} | {r.paper} | {r.mini} | {r.verdict} |" for r in table.rows]
    out = sum(r.verdict.status == OUT for r in table.rows)
    judged = sum(r.verdict.status != UNJUDGED for r in table.rows)
    return "\n".join(lines + ["", f"{out} of {judged} judged axes out of the paper's regime."])


def markdown(found: list[Table], heading: str = "##") -> str:
    return "\n\n".join([rule(), *(table_markdown(t, heading) for t in found)])


def report(found: list[Table]) -> str:
    """``regime.md`` as ``python -m analysis regime`` and docs/regime.md hold it."""
    return (f"# Is each miniature in the paper's regime?\n\nGenerated by `python -m analysis regime` (docs/regime.md: "
            f"`python -m analysis.regime --write docs/regime.md`); do not edit.\n\n{markdown(found)}\n")


def block(found: list[Table]) -> str:
    """What README.md holds between the markers."""
    return (f"{BEGIN}\nGenerated by `python -m analysis.regime --readme README.md` from the presets and "
            f"`tests/fixtures/measured/`; `tests/test_regime.py` fails when this block is stale.\n\n"
            f"{markdown(found, '###')}\n{END}")


def readme_block(text: str) -> str | None:
    return marked_block(text, BEGIN, END)


def with_block(text: str, new_block: str) -> str:
    """README text with the block replaced, or its section inserted after the claims section."""
    old = readme_block(text)
    if old is not None:
        return text.replace(old, new_block)
    start = text.index(CLAIMS_HEADING) + len(CLAIMS_HEADING)
    after = text.find("\n## ", start)
    after = len(text) if after < 0 else after + 1
    return f"{text[:after].rstrip()}\n\n{README_HEADING}\n\n{new_block}\n\n{text[after:]}"


def problems(found: list[Table], readme: Path | None = README, doc: Path | None = DOC) -> list[str]:
    """A README block or doc that is not the freshly generated one."""
    stale = []
    if readme is not None and readme_block(readme.read_text()) != block(found):
        stale.append(f"stale: the block between the markers in {readme}; "
                     f"run python -m analysis.regime --readme {readme}")
    if doc is not None and (not doc.exists() or doc.read_text() != report(found)):
        stale.append(f"stale: {doc}; run python -m analysis.regime --write {doc}")
    return stale


def write_report(root: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "regime.md"
    path.write_text(report(tables(root)))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=Path, default=MEASURED, help="measured runs (default: %(default)s)")
    parser.add_argument("--write", type=Path, help="write the Markdown document here")
    parser.add_argument("--readme", type=Path, help="rewrite the regime block of this README")
    parser.add_argument("--check", action="store_true", help="exit 1 when the README block or the doc is stale")
    args = parser.parse_args(argv)
    found = tables(args.runs)
    if args.check:
        stale = problems(found, readme=args.readme or README, doc=args.write or DOC)
        print("\n".join(stale) or "the README block and the doc are current")
        return 1 if stale else 0
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(report(found))
    if args.readme:
        args.readme.write_text(with_block(args.readme.read_text(), block(found)))
    if not (args.write or args.readme):
        print(markdown(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
