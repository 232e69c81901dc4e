"""The paper's settings next to the config values that encode them, checked, as one Markdown table.

Each :class:`Setting` names where the paper states a value (Section 3, 5.1, 5.2, 5.3, Table 5,
Appendix B), the value as the paper writes it, the Hydra overrides that select the preset and the
dotted key(s) that hold it. :func:`check` composes each config exactly as ``experiments/run.py``
would, reads the keys and compares. Where the paper's value is not a single config value (epochs
of a dataset, a batch split into micro-steps, a model size) a small named function in the record
turns the config values into the paper's terms; nothing here branches on a setting's name.

    python -m analysis.paper_settings                      # print the table
    python -m analysis.paper_settings --write docs/paper_settings.md
    python -m analysis.paper_settings --readme README.md   # rewrite the block between the markers
    python -m analysis.paper_settings --check              # non-zero on a disagreement or a stale block
"""

from __future__ import annotations

import argparse
import math
import operator
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from experiments.schema import map_rank

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
DOC = REPO / "docs" / "paper_settings.md"
README = REPO / "README.md"
BEGIN, END = "<!-- paper-settings:begin -->", "<!-- paper-settings:end -->"
README_HEADING = "## Paper settings → config values"


@lru_cache(maxsize=None)
def compose(*overrides: str):
    """The config ``python experiments/run.py <overrides>`` would get (same conf dir and version_base)."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


# ------------------------------------------------------------------ config values -> paper's terms

def value(x):
    return x


def grid(values):
    """A learning-rate list as the set the paper writes ({1e-4, 2e-4})."""
    return frozenset(values)


def common_grid(*grids):
    """One set when every LoRA-like method has the same grid (Table 5's "LoRA-like" row), else each."""
    sets = tuple(frozenset(g) for g in grids)
    return sets[0] if len(set(sets)) == 1 else sets


def effective_batch(batch_size, grad_accum):
    """Examples per optimizer step (accelerate splits each micro-batch over the GPUs)."""
    return batch_size * grad_accum


def epochs(max_steps, batch_size, grad_accum, n_examples):
    """Passes over n_examples; a whole number when max_steps covers it to within one batch."""
    seen = max_steps * batch_size * grad_accum
    whole = round(seen / n_examples)
    return whole if abs(seen - whole * n_examples) < batch_size * grad_accum else seen / n_examples


def epochs_over(n_examples: int) -> Callable:
    """:func:`epochs` of a dataset whose size the paper states but no config holds (Section 5.2.1)."""
    def fn(max_steps, batch_size, grad_accum):
        return epochs(max_steps, batch_size, grad_accum, n_examples)
    fn.__name__ = f"epochs_over_{n_examples}"
    return fn


def trained_rank(rank, reference_width, hidden_size):
    """The rank the run builds: the paper's rank mapped to the model's width (paper scale: as is)."""
    return map_rank(rank, hidden_size, reference_width).rank


UUID_RANKS = (8, 16, 32, 64, 128, 256)  # Section 3's LoRA ranks


def uuid_ranks_as_is(reference_width, hidden_size):
    """Which of Section 3's ranks the UUID paper preset trains unchanged (none may be remapped)."""
    return tuple(r for r in UUID_RANKS if trained_rank(r, reference_width, hidden_size) == r)


OPERATOR_EQUATION = {"truncate": "Eq. 4", "share": "Eq. 6", "decouple": "Eq. 8", "rotate": "Eq. 9"}
OPERATOR_WORDS = {"truncate": "truncation", "share": "sharing rows and columns in M",
                  "decouple": "decoupling", "rotate": "rotation"}


def equation(op):
    return OPERATOR_EQUATION.get(op, op)


def mechanism(op):
    return OPERATOR_WORDS.get(op, op)


# Appendix B, Algorithms 1-2: type 0 = view(k/r̂, r̂).sum / repeat (this repo's "cyclic"),
# type 1 = view(r̂, k/r̂).sum / repeat_interleave ("block")
GROUP_TYPES = {("cyclic", "cyclic"): "type 0", ("block", "block"): "type 1"}
SWITCH_RULES = {"none": "no switch", "pair": "type 0 ↔ type 1", "cycle4": "official types 1→2→3→4→1"}


def group_type(compress_groups, decompress_groups):
    return GROUP_TYPES.get((compress_groups, decompress_groups), f"{compress_groups}/{decompress_groups}")


def switch_rule(group_switch):
    return SWITCH_RULES.get(group_switch, group_switch)


LLAMA_LINEARS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


def all_linear(target_modules):
    return "all linear layers" if frozenset(target_modules) == LLAMA_LINEARS else tuple(target_modules)


# the untied lm_head is the output embedding; "norm" matches every RMSNorm
UNFROZEN_KINDS = {"embed_tokens": "embeddings", "lm_head": "embeddings", "norm": "layernorm"}


def unfrozen(trainable_modules):
    return frozenset(UNFROZEN_KINDS.get(m, m) for m in trainable_modules)


def scheduler_kind(jagged_schedule):
    return "jagged" if jagged_schedule else "not jagged"


def optimizer_reset(merge_every):
    """experiments/loop/training.py resets the adapters' Adam state at every merge; no flag turns it off."""
    return "reset at each merge" if merge_every else "never reset"


HUB_MODELS = {"meta-llama/Llama-2-7b-hf": "LLaMA-2 7B"}


def model_name(hub_id):
    return HUB_MODELS.get(hub_id, hub_id)


T5_VOCAB = 32_100  # the t5-base tokenizer of task=c4 sizes the (untied) embeddings and lm_head


def llama_size(hidden_size, intermediate_size, num_layers):
    """Parameters of the from-scratch LLaMA (embeddings + lm_head included), 2 significant digits."""
    h, i, n = hidden_size, intermediate_size, num_layers
    params = 2 * T5_VOCAB * h + n * (4 * h * h + 3 * h * i + 2 * h) + h
    rounded = round(params, 1 - int(math.floor(math.log10(params))))
    return f"{rounded / 1e9:g}B" if rounded >= 1e9 else f"{rounded / 1e6:g}M"


def one_of(paper, derived) -> bool:
    """The paper searched a grid; the preset holds one point of it (the grid itself is not a config value)."""
    return derived in paper


# ------------------------------------------------------------------ the paper's settings

@dataclass(frozen=True)
class Setting:
    where: str                        # "Section 3", "Table 5", ...
    what: str
    paper: Any                        # as the paper writes it (sets for grids)
    overrides: tuple[str, ...]        # Hydra overrides selecting the preset
    keys: tuple[str, ...]             # dotted config keys, the arguments of `derive`
    derive: Callable = value          # config values -> the paper's terms
    compare: Callable[[Any, Any], bool] = operator.eq


UUID = ("task=uuid", "scale=paper")
C4 = ("experiment=pretrain_c4", "scale=paper")
R8, R256 = "experiment=finetune_r8", "experiment=finetune_r256"
EPOCH_KEYS = ("train.max_steps", "train.batch_size", "train.grad_accum")
BATCH_KEYS = ("train.batch_size", "train.grad_accum")
RANK_KEYS = ("rank", "rank_mapping.reference_width", "model.hidden_size")
LORA_LIKE = ("lora", "loraplus", "asylora", "dora", "relora")   # Table 5's "LoRA-like" rows

SECTION_3 = (
    Setting("Section 3", "UUID: base model", "LLaMA-2 7B", (*UUID, "method=lora"), ("model.hub_id",), model_name),
    Setting("Section 3", "UUID: random UUID pairs", 10_000, UUID, ("task.n_pairs",)),
    Setting("Section 3", "UUID: pairs per batch", 1_000, UUID, BATCH_KEYS, effective_batch),
    Setting("Section 3", "UUID: epochs", 100, UUID, (*EPOCH_KEYS, "task.n_pairs"), epochs),
    Setting("Section 3", "UUID: LoRA applied to", "all linear layers", (*UUID, "method=lora"),
            ("method.target_modules",), all_linear),
    Setting("Section 3", "UUID: LoRA learning-rate grid", grid([1e-4, 2e-4, 3e-4]), UUID,
            ("lr_grid_by_method.lora",), grid),
    Setting("Section 3", "UUID: LoRA ranks, each trained as is", UUID_RANKS, (*UUID, "method=lora"),
            ("rank_mapping.reference_width", "model.hidden_size"), uuid_ranks_as_is),
    Setting("Section 3", "UUID: FFT learning rate", 3e-5, (*UUID, "method=fft"), ("lr_by_method.fft",)),
)

SECTION_5_1 = (
    Setting("Section 5.1", "UUID: MoRA learning-rate grid", grid([5e-5, 1e-4, 2e-4]), UUID,
            ("lr_grid_by_method.mora",), grid),
    Setting("Section 5.1", "UUID: MoRA f_comp, f_decomp (the text cites Eq. 8, decoupling, but names sharing "
            "and groups g, g', which exist only in Eq. 6)", "sharing rows and columns in M",
            (*UUID, "method=mora"), ("method.operator",), mechanism),
    Setting("Section 5.1", "UUID: MoRA groups, \"every adjacent r̂ rows or columns\" (Appendix B's first kind)",
            "type 0", (*UUID, "method=mora"), ("method.compress_groups", "method.decompress_groups"), group_type),
    Setting("Table 2", "UUID: accuracy evaluated at steps", [300, 500, 700, 900], UUID, ("train.eval_steps",)),
)


def ft(task: str, *more: str) -> tuple[str, ...]:
    return (f"task={task}", "scale=paper", *more)


SECTION_5_2 = (
    Setting("Section 5.2", "r = 8 regime: rank trained", 8, (R8, "scale=paper", "method=lora"), RANK_KEYS,
            trained_rank),
    Setting("Section 5.2", "r = 256 regime: rank trained", 256, (R256, "scale=paper", "method=lora"), RANK_KEYS,
            trained_rank),
    Setting("Section 5.2", "LoRA+: λ (searched; the preset holds one point)", frozenset({2, 4}),
            ft("metamath", "method=loraplus"), ("method.loraplus_ratio",), compare=one_of),
    *(s for task in ("tulu", "metamath", "biomed", "finance") for s in (
        Setting("Section 5.2", f"{task}: base model", "LLaMA-2 7B", ft(task, "method=lora"), ("model.hub_id",),
                model_name),
        Setting("Section 5.2", f"{task}: ReLoRA merge steps (searched; the preset holds one point)",
                frozenset({1000, 2000}), ft(task, "method=relora"), ("method.merge_every",), compare=one_of),
        Setting("Section 5.2", f"{task}: ReLoRA restart warm-up steps", 50, ft(task, "method=relora"),
                ("method.restart_warmup_steps",)),
    )),
    Setting("Section 5.2", "MoRA groups at r = 256, \"every adjacent r̂ rows or columns\"", "type 0",
            (R256, "scale=paper", "method=mora"), ("method.compress_groups", "method.decompress_groups"),
            group_type),
)


@dataclass(frozen=True)
class Table5Row:
    """One dataset's block of Table 5 (Appendix A), transcribed. LoRA-like grids are the same at r = 8
    and r = 256 in every block; α is 16 at r = 8 and 128 at r = 256; f_comp is Eq. 9 at r = 8, Eq. 6 at 256."""

    task: str
    fft_lr: float
    lora_lrs: frozenset
    mora_r8_lrs: frozenset
    mora_r256_lrs: frozenset
    scheduler: str
    warmup: int
    epochs: int
    batch: int
    n_examples: int | None    # Section 5.2.1: Tülu v2 326k, MetaMath 395k; BioMed/finance corpora: not stated


TABLE_5_ROWS = (
    Table5Row("tulu", 2e-5, grid([1e-4, 2e-4]), grid([2e-4, 3e-4]), grid([3e-5, 5e-5]), "cosine", 500, 2, 128, 326_000),
    Table5Row("metamath", 2e-5, grid([1e-4, 2e-4]), grid([2e-4, 3e-4]), grid([3e-5, 5e-5]), "cosine", 300, 3, 128,
              395_000),
    Table5Row("biomed", 3e-5, grid([3e-4, 4e-4]), grid([4e-4, 5e-4]), grid([5e-5, 7e-5]), "linear", 150, 1, 128, None),
    Table5Row("finance", 3e-5, grid([3e-4, 4e-4]), grid([4e-4, 5e-4]), grid([5e-5, 7e-5]), "linear", 150, 1, 128, None),
)


def table5_settings(row: Table5Row) -> tuple[Setting, ...]:
    t, base = row.task, ft(row.task)
    lora_keys = {r: tuple(f"lr_grid.{r}.{m}" for m in LORA_LIKE) for r in ("r8", "r256")}
    epoch_rows = () if row.n_examples is None else (
        Setting("Table 5", f"{t}: epochs (of {row.n_examples:,} examples)", row.epochs, base, EPOCH_KEYS,
                epochs_over(row.n_examples)),)
    return (
        Setting("Table 5", f"{t}: LR scheduler", row.scheduler, base, ("train.scheduler",)),
        Setting("Table 5", f"{t}: warm-up steps", row.warmup, base, ("train.warmup_steps",)),
        Setting("Table 5", f"{t}: batch size", row.batch, base, BATCH_KEYS, effective_batch),
        *epoch_rows,
        Setting("Table 5", f"{t}: FFT learning rate", row.fft_lr, ft(t, "method=fft"), ("lr_by_method.fft",)),
        Setting("Table 5", f"{t}: LoRA-like LR grid, r = 8", row.lora_lrs, base, lora_keys["r8"], common_grid),
        Setting("Table 5", f"{t}: LoRA-like LR grid, r = 256", row.lora_lrs, base, lora_keys["r256"], common_grid),
        Setting("Table 5", f"{t}: MoRA LR grid, r = 8", row.mora_r8_lrs, base, ("lr_grid.r8.mora",), grid),
        Setting("Table 5", f"{t}: MoRA LR grid, r = 256", row.mora_r256_lrs, base, ("lr_grid.r256.mora",), grid),
        Setting("Table 5", f"{t}: LoRA-like α, r = 8", 16, ft(t, R8, "method=lora"), ("method.alpha",)),
        Setting("Table 5", f"{t}: LoRA-like α, r = 256", 128, ft(t, R256, "method=lora"), ("method.alpha",)),
        Setting("Table 5", f"{t}: MoRA f_comp, f_decomp, r = 8", "Eq. 9", ft(t, R8, "method=mora"),
                ("method.operator",), equation),
        Setting("Table 5", f"{t}: MoRA f_comp, f_decomp, r = 256", "Eq. 6", ft(t, R256, "method=mora"),
                ("method.operator",), equation),
    )


TABLE_5 = tuple(s for row in TABLE_5_ROWS for s in table5_settings(row))

SECTION_5_3 = (
    Setting("Section 5.3", "C4: model size (default model)", "250M", (*C4, "method=lora"),
            ("model.hidden_size", "model.intermediate_size", "model.num_layers"), llama_size),
    Setting("Section 5.3", "C4: model size (model=llama_1b)", "1.3B", (*C4, "method=lora", "model=llama_1b"),
            ("model.hidden_size", "model.intermediate_size", "model.num_layers"), llama_size),
    Setting("Section 5.3", "C4: training steps", 10_000, C4, ("train.max_steps",)),
    Setting("Section 5.3", "C4: batch size (sequences)", 1024, C4, BATCH_KEYS, effective_batch),
    Setting("Section 5.3", "C4: sequence length", 512, C4, ("task.seq_len",)),
    Setting("Section 5.3", "C4: rank trained, 250M", 128, (*C4, "method=lora"), RANK_KEYS, trained_rank),
    Setting("Section 5.3", "C4: rank trained, 1.3B", 128, (*C4, "method=mora", "model=llama_1b"), RANK_KEYS,
            trained_rank),
    Setting("Section 5.3", "C4: modules unfrozen besides the adapters", frozenset({"layernorm", "embeddings"}),
            (*C4, "method=lora"), ("method.trainable_modules",), unfrozen),
    Setting("Section 5.3", "C4: MoRA f_comp, f_decomp", "Eq. 6", (*C4, "method=mora"), ("method.operator",),
            equation),
    *(s for m in ("relora", "remora") for s in (
        Setting("Section 5.3", f"C4: {m} merge every (steps)", 2000, (*C4, f"method={m}"), ("method.merge_every",)),
        Setting("Section 5.3", f"C4: {m} restart warm-up steps", 50, (*C4, f"method={m}"),
                ("method.restart_warmup_steps",)),
        Setting("Section 5.3", f"C4: {m} scheduler", "jagged", (*C4, f"method={m}"), ("method.jagged_schedule",),
                scheduler_kind),
        Setting("Section 5.3", f"C4: {m} optimizer", "reset at each merge", (*C4, f"method={m}"),
                ("method.merge_every",), optimizer_reset),
    )),
)

APPENDIX_B = (
    Setting("Appendix B", "ReMoRA: shares rows and columns (groups only exist in Eq. 6)", "Eq. 6",
            (*C4, "method=remora"), ("method.operator",), equation),
    Setting("Appendix B", "ReMoRA: groups before the first merge", "type 0", (*C4, "method=remora"),
            ("method.compress_groups", "method.decompress_groups"), group_type),
    Setting("Appendix B", "ReMoRA: group type after each merge", "type 0 ↔ type 1", (*C4, "method=remora"),
            ("method.group_switch",), switch_rule),
)

SETTINGS = (*SECTION_3, *SECTION_5_1, *SECTION_5_2, *TABLE_5, *SECTION_5_3, *APPENDIX_B)

# Stated by the paper but not a config value; listed under the table so their absence is visible.
NOT_IN_CONFIG = (
    ("Table 5", "biomed/finance: 1 epoch", "the corpus size is not stated, so the presets give train.max_steps "
     "no value (null) and a run refuses to start until train.max_steps=N is passed"),
    ("Section 5.1", "M initialised to zeros", "code: mora/layer.py, always"),
    ("Section 5.2", "AsyLoRA's initialisation", "code: mora/adapters.py (A orthonormal and frozen, B zero)"),
    ("Section 5.3", "RMSNorm, SwiGLU, RoPE", "code: a transformers LlamaForCausalLM built from the model config"),
    ("Section 5.3", "no full-rank training warm-up", "nothing to set: the runner has no full-rank warm start"),
)


# ------------------------------------------------------------------ checking and rendering

@dataclass(frozen=True)
class Checked:
    setting: Setting
    values: tuple          # raw config values of setting.keys
    derived: Any           # setting.derive(*values); None when a key is absent
    agrees: bool

    def describe(self) -> str:
        s = self.setting
        return (f"{s.where}: {s.what}: paper {fmt(s.paper)} but config {self.config_text()} "
                f"({' '.join(s.overrides)}: {', '.join(s.keys)})")

    def config_text(self) -> str:
        """The raw values ("→ derived" when the record derives one); one value for n identical keys."""
        same = len(self.values) > 2 and all(v == self.values[0] for v in self.values)
        raw = f"{fmt(self.values[0])} (each)" if same else ", ".join(fmt(v) for v in self.values)
        return raw if self.setting.derive is value else f"{raw} → {fmt(self.derived)}"


ABSENT = object()


def read(cfg, key: str):
    found = OmegaConf.select(cfg, key, default=ABSENT)
    return OmegaConf.to_container(found, resolve=True) if OmegaConf.is_config(found) else found


def check_one(setting: Setting) -> Checked:
    cfg = compose(*setting.overrides)
    values = tuple(read(cfg, k) for k in setting.keys)
    if any(v is ABSENT for v in values):
        return Checked(setting, tuple("(absent)" if v is ABSENT else v for v in values), None, False)
    derived = setting.derive(*values)
    return Checked(setting, values, derived, bool(setting.compare(setting.paper, derived)))


def check(settings=SETTINGS) -> list[Checked]:
    return [check_one(s) for s in settings]


def fmt(x) -> str:
    """Values as the paper writes them: 1e-4, {1e-4, 2e-4}, 10,000."""
    if isinstance(x, bool) or x is None:
        return str(x).lower() if x is not None else "null"
    if isinstance(x, float) and x != 0 and abs(x) < 1e-2:
        mantissa, exp = f"{x:.4e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"
    if isinstance(x, float):
        return f"{x:g}"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, frozenset):
        return "{" + ", ".join(fmt(v) for v in sorted(x)) + "}"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in x) + "]"
    return str(x)


def markdown(rows: list[Checked]) -> str:
    lines = ["| paper | setting | paper value | config (overrides) | key | config value | agrees |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r.setting
        lines.append(f"| {s.where} | {s.what} | {fmt(s.paper)} | `{' '.join(s.overrides)}` | "
                     f"{', '.join(f'`{k}`' for k in s.keys)} | {r.config_text()} | {'✓' if r.agrees else '✗'} |")
    lines += ["", "Stated by the paper but not a config value:", ""]
    lines += [f"- {where}: {what}: {why}." for where, what, why in NOT_IN_CONFIG]
    return "\n".join(lines)


def block(rows: list[Checked]) -> str:
    """What README.md holds between the markers."""
    return (f"{BEGIN}\nGenerated by `python -m analysis.paper_settings --readme README.md` from the composed "
            f"configs; `make test` fails when a preset disagrees with the paper or this block is stale.\n\n"
            f"{markdown(rows)}\n{END}")


def document(rows: list[Checked]) -> str:
    return (f"# Paper settings → config values\n\nGenerated by `python -m analysis.paper_settings --write "
            f"docs/paper_settings.md`; do not edit. Each row composes the config with the overrides shown, "
            f"reads the key(s) and compares with the paper; \"→\" marks a value derived from the keys "
            f"(e.g. batch × accumulation).\n\n{markdown(rows)}\n")


def readme_block(text: str, begin: str = BEGIN, end: str = END) -> str | None:
    """The generated block of ``text`` between its markers (included), or None when it has none."""
    if begin not in text or end not in text:
        return None
    return text[text.index(begin):text.index(end) + len(end)]


def with_block(text: str, new_block: str) -> str:
    """README text with the block replaced, or the section appended when it has none yet."""
    old = readme_block(text)
    if old is None:
        return text.rstrip("\n") + f"\n\n{README_HEADING}\n\n{new_block}\n"
    return text.replace(old, new_block)


def problems(rows: list[Checked], readme: Path | None = README, doc: Path | None = DOC) -> list[str]:
    """Every disagreement, plus a README block or doc that is not the freshly generated one."""
    found = [f"disagrees: {r.describe()}" for r in rows if not r.agrees]
    if readme is not None and readme_block(readme.read_text()) != block(rows):
        found.append(f"stale: the block between the markers in {readme}; "
                     f"run python -m analysis.paper_settings --readme {readme}")
    if doc is not None and (not doc.exists() or doc.read_text() != document(rows)):
        found.append(f"stale: {doc}; run python -m analysis.paper_settings --write {doc}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path, help="write the Markdown document here")
    parser.add_argument("--readme", type=Path, help="rewrite the paper-settings block of this README")
    parser.add_argument("--check", action="store_true", help="exit 1 on a disagreement or a stale README/doc")
    args = parser.parse_args(argv)
    rows = check()
    if args.check:
        found = problems(rows, readme=args.readme or README, doc=args.write or DOC)
        print("\n".join(found) or f"{len(rows)} settings agree; README block and {args.write or DOC} are current")
        return 1 if found else 0
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(document(rows))
    if args.readme:
        args.readme.write_text(with_block(args.readme.read_text(), block(rows)))
    if not (args.write or args.readme):
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
