"""The composed Hydra config, turned into typed, validated objects before any work starts.

Hydra stops here: everything downstream receives these dataclasses. Each check names the field
and the allowed values, so a typo fails in milliseconds instead of after a model download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.loop.trackers import WANDB_MODES
from experiments.models.local_base import BaseRecipe
from experiments.paths import DEFAULT_DATA_ROOT
from experiments.tasks import TaskSpec, task_spec
from experiments.threads import check_threads
from mora.adapters import AdapterConfig
from mora.restarts import RestartConfig, check_restarts
from mora.validation import check_bool, check_choice, check_float, check_int, check_known_fields

SCALES = ("mini", "paper")
MODEL_SOURCES = ("llama2c", "hub", "config", "local_base")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULERS = ("linear", "cosine", "constant")  # jagged_cosine is derived from the method (ReLoRA/ReMoRA)
DTYPES = ("float32", "bfloat16")
LOGGERS = ("none", "wandb")
LOGGER_FIELDS = ("kind", "project", "mode", "group")  # what experiments/run.py hands to the tracker



@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    hidden_size: int
    requires_gpu: bool = False
    path: str | None = None          # llama2c: checkpoint, relative to data_root
    tokenizer: str | None = None     # llama2c: SentencePiece model, relative to data_root
    hub_id: str | None = None        # hub: Hugging Face id
    # source=config: a LLaMA (RMSNorm, SwiGLU, RoPE) built from these fields, randomly initialised
    # from the run seed (Section 5.3 pretrains from scratch); the vocabulary comes from the task
    intermediate_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    # source=local_base: the shape fields above plus this recipe (experiments/models/local_base.py):
    # a base the repository pretrains once from the offline text, with ``tokenizer``'s vocabulary
    pretrain: BaseRecipe | dict | None = None


@dataclass(frozen=True)
class TrainSpec:
    max_steps: int
    batch_size: int
    grad_accum: int
    warmup_steps: int
    scheduler: str
    weight_decay: float
    grad_clip: float | None
    log_every: int
    ckpt_every: int
    eval_steps: tuple[int, ...]
    dtype: str
    min_lr_ratio: float = 0.0          # cosine envelopes end at min_lr_ratio · lr (ReLoRA: 0.1)



@dataclass(frozen=True)
class RankMapping:
    """The paper's rank and what it becomes on this model's width (ratio r/d kept)."""

    paper_rank: int
    rank: int
    width: int
    reference_width: int | None
    representable: bool

    def describe(self) -> str:
        if self.reference_width is None or self.reference_width == self.width:
            return f"rank {self.paper_rank} used as is (width {self.width})"
        paper_ratio = self.paper_rank / self.reference_width
        text = (f"paper rank {self.paper_rank} on width {self.reference_width} (r/d = 1/{1 / paper_ratio:g}) "
                f"-> rank {self.rank} on width {self.width} (r/d = 1/{self.width / self.rank:g})")
        if not self.representable:
            text += ("; NOT REPRESENTABLE at this width: rank 1 is the smallest, so this run has a "
                     f"{paper_ratio ** -1 * self.rank / self.width:g}x larger r/d than the paper")
        return text


def map_rank(paper_rank: int, width: int, reference_width: int | None) -> RankMapping:
    """Scale ``paper_rank`` by width / reference_width so that r/d (hence MoRA's r̂/d = √(2r/d)) stays."""
    check_int("rank", paper_rank)
    if reference_width is None:
        return RankMapping(paper_rank, paper_rank, width, None, True)
    exact = paper_rank * width / reference_width
    rank = max(1, round(exact))
    return RankMapping(paper_rank, rank, width, reference_width, representable=exact >= 0.5)


@dataclass(frozen=True)
class RunConfig:
    seed: int
    scale: str
    rank: RankMapping
    lr: float
    resume: bool
    device: str
    out_dir: Path
    data_root: Path
    model: ModelSpec
    adapter: AdapterConfig
    restarts: RestartConfig            # ReLoRA/ReMoRA merges (never, for the other methods)
    task: TaskSpec                     # the task family's spec (experiments.tasks registry)
    train: TrainSpec
    logger: dict
    singular_values: bool = False      # save the spectra of ΔW = W_final - W_init (Fig. 5)
    skip_completed: bool = False       # make targets: skip a completed run, resume an interrupted one
    threads: int | str = "auto"        # CPU threads: a number, or auto (experiments/threads.py)


def _model_spec(cfg: DictConfig) -> ModelSpec:
    m = OmegaConf.to_container(cfg.model, resolve=True)
    check_choice("model.source", m.get("source"), MODEL_SOURCES)
    needed = {"llama2c": ("path", "tokenizer"), "hub": ("hub_id",),
              "config": ("intermediate_size", "num_layers", "num_heads"),
              "local_base": ("tokenizer", "intermediate_size", "num_layers", "num_heads", "pretrain")}[m["source"]]
    for key in needed:
        if not m.get(key):
            raise ValueError(f"model.{key} is required for model.source={m['source']!r} (model={m.get('name')})")
    check_int("model.hidden_size", m.get("hidden_size"))
    check_known_fields("model", m, ModelSpec.__dataclass_fields__)
    if m["source"] in ("config", "local_base"):
        for key in ("intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_position_embeddings"):
            if m.get(key) is not None:
                check_int(f"model.{key}", m[key])
        if m["hidden_size"] % m["num_heads"]:
            raise ValueError(f"model.hidden_size={m['hidden_size']} must be divisible by model.num_heads={m['num_heads']}")
    if m["source"] == "local_base":
        m["pretrain"] = BaseRecipe.from_dict(m["pretrain"])   # a bad recipe fails here, not after the corpus is read
    return ModelSpec(**m)


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``python experiments/run.py <overrides>`` gets (same conf dir and version_base)."""
    from hydra import compose, initialize_config_dir

    from experiments.paths import REPO_ROOT

    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def model_spec(model_name: str) -> ModelSpec:
    """The validated base model ``conf/model/<model_name>.yaml`` (its Hydra defaults list composed)."""
    return _model_spec(compose_config([f"model={model_name}"]))


# method fields that configure the training loop's restarts rather than the adapter layers
RESTART_FIELDS = tuple(RestartConfig.__dataclass_fields__)


def _restart_config(cfg: DictConfig) -> RestartConfig:
    """The method's restart settings (conf/method/relora.yaml, remora.yaml); other methods have none."""
    m = OmegaConf.to_container(cfg.method, resolve=True)
    return RestartConfig(**{k: m[k] for k in RESTART_FIELDS if k in m})


def _train_spec(cfg: DictConfig, restarts: RestartConfig) -> TrainSpec:
    """The training settings; a merging method with ``jagged_schedule`` turns the schedule into
    ReLoRA's jagged cosine (Section 5.3): LR zero at each merge, ``restart_warmup_steps`` back up."""
    if cfg.train.max_steps is None:
        raise ValueError(f"train.max_steps has no value for task={cfg.task.name} at scale={cfg.scale.name}: the preset "
                         "leaves it to you (one epoch of your corpus, whose size the paper does not state); "
                         "pass train.max_steps=N")
    t = OmegaConf.to_container(cfg.train, resolve=True)
    for key in ("max_steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
        check_int(f"train.{key}", t[key])
    check_int("train.warmup_steps", t["warmup_steps"], minimum=0)
    if t["warmup_steps"] > t["max_steps"]:
        raise ValueError(f"train.warmup_steps must be at most train.max_steps={t['max_steps']}, "
                         f"got train.warmup_steps={t['warmup_steps']}")
    # a negative max-norm would flip the gradients; null turns clipping off
    check_float("train.grad_clip", t["grad_clip"], 0.0, low_open=True, allow_none=True)
    weight_decay = check_float("train.weight_decay", t["weight_decay"], 0.0)
    check_choice("train.scheduler", t["scheduler"], SCHEDULERS)
    check_choice("train.dtype", t["dtype"], DTYPES)
    min_ratio = check_float("train.min_lr_ratio", t.get("min_lr_ratio", 0.0), 0.0, 1.0)
    steps = tuple(int(s) for s in t["eval_steps"])
    # step 0 evaluates the model before its first update (the base's own score, a regime axis)
    if any(s < 0 or s > t["max_steps"] for s in steps):
        raise ValueError(f"train.eval_steps must lie in [0, train.max_steps={t['max_steps']}] (0: before training), "
                         f"got {list(steps)}")
    scheduler = t["scheduler"]
    if restarts.jagged_schedule:
        merge_every = restarts.merge_every
        if t["scheduler"] != "cosine":
            raise ValueError("method.jagged_schedule=true needs train.scheduler=cosine (the jagged schedule is "
                             f"a cosine envelope with restarts), got train.scheduler={t['scheduler']!r}")
        if t["max_steps"] % merge_every:
            raise ValueError(f"method.merge_every={merge_every} must divide train.max_steps={t['max_steps']} "
                             "(the jagged schedule's cycles must tile the run)")
        if not t["warmup_steps"] < merge_every:
            raise ValueError(f"train.warmup_steps={t['warmup_steps']} must be shorter than method.merge_every="
                             f"{merge_every}: the first restart would come before the warm-up ends")
        scheduler = "jagged_cosine"
    return TrainSpec(**{**t, "eval_steps": steps, "weight_decay": weight_decay, "scheduler": scheduler,
                        "min_lr_ratio": min_ratio})


def _task_spec(cfg: DictConfig) -> TaskSpec:
    return task_spec(OmegaConf.to_container(cfg.task, resolve=True))


def _adapter_config(cfg: DictConfig, rank: RankMapping) -> AdapterConfig:
    m = OmegaConf.to_container(cfg.method, resolve=True)
    fields = set(AdapterConfig.__dataclass_fields__) - {"method", "rank", "extra"}
    check_known_fields("method", m, fields | {"name", *RESTART_FIELDS})
    values = {k: v for k, v in m.items() if k in fields}
    for key in ("target_modules", "trainable_modules"):
        names = values.get(key, ())
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"method.{key} must be a list of module names, e.g. [q_proj, v_proj], "
                             f"got method.{key}={names!r}")
    check_float("method.alpha", values.get("alpha"), 0.0, low_open=True, allow_none=True)
    if values.get("alpha") is not None and rank.rank != rank.paper_rank:
        # α/r is LoRA's effective step size: keep the paper's ratio when the rank is mapped
        values["alpha"] = float(values["alpha"]) * rank.rank / rank.paper_rank
    return AdapterConfig(method=m["name"], rank=rank.rank, **values)


def _learning_rate(cfg: DictConfig, method: str) -> float:
    """``lr`` as given, else the preset's ``lr_by_method`` entry for the method."""
    if cfg.lr is not None:
        return check_float("lr", cfg.lr, 0.0, low_open=True)
    table = cfg.get("lr_by_method") or {}
    if method not in table:
        raise ValueError(f"lr is null and the preset has no lr_by_method entry for method={method!r}; "
                         f"set lr=<value> (entries: {sorted(table)})")
    return check_float(f"lr_by_method.{method}", table[method], 0.0, low_open=True)


def default_run_name(cfg: DictConfig, adapter: AdapterConfig, lr: float) -> str:
    """<task>/<scale>/<method>[-<operator>]-r<paper rank>-lr<lr>-s<seed>: one folder per run."""
    method = adapter.method + (f"-{adapter.operator}" if adapter.layer_kind == "mora" else "")
    rank = "" if adapter.layer_kind is None else f"-r{cfg.rank}"
    return f"{cfg.task.name}/{cfg.scale.name}/{method}{rank}-lr{lr:g}-s{cfg.seed}"


def _logger(cfg: DictConfig) -> dict:
    """The tracker settings, checked here: a bad ``logger.mode`` found after the model loaded would
    leave a half-made run folder."""
    logger = OmegaConf.to_container(cfg.logger, resolve=True)
    check_choice("logger", logger.get("kind"), LOGGERS)
    check_known_fields("logger", logger, LOGGER_FIELDS)
    if logger["kind"] == "wandb":
        check_choice("logger.mode", logger.get("mode", "offline"), WANDB_MODES)
    return logger


def _out_dir(cfg: DictConfig, adapter: AdapterConfig, lr: float) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir)
    if not isinstance(cfg.out_root, str) or not cfg.out_root.strip():
        # Path("") is the working directory: runs would land in ./<task>/... unnoticed
        raise ValueError(f"out_root must be a folder path (or set out_dir), got out_root={cfg.out_root!r}")
    return Path(cfg.out_root) / default_run_name(cfg, adapter, lr)


def build_run_config(cfg: DictConfig, cuda_available: bool) -> RunConfig:
    """Validate the composed config; raises ValueError naming the offending field."""
    check_choice("scale", cfg.scale.name, SCALES)
    check_choice("device", cfg.device, DEVICES)
    logger = _logger(cfg)
    check_int("seed", cfg.seed, minimum=0)
    # booleans strictly: bool("no") is True
    resume = check_bool("resume", cfg.resume)
    skip_completed = check_bool("skip_completed", cfg.get("skip_completed", False))
    singular_values = check_bool("singular_values", cfg.get("singular_values", False))
    threads = check_threads(cfg.get("threads", "auto"))
    model = _model_spec(cfg)
    device = ("cuda" if cuda_available else "cpu") if cfg.device == "auto" else cfg.device
    if device == "cuda" and not cuda_available:
        raise ValueError("device=cuda but no CUDA device is visible; use device=cpu or auto")
    if model.requires_gpu and device != "cuda":
        raise ValueError(f"model={model.name} is a paper-scale model (model.requires_gpu=true) and needs a GPU; "
                         "use scale=mini on a CPU machine")
    rank = map_rank(cfg.rank, model.hidden_size, cfg.rank_mapping.reference_width)
    adapter = _adapter_config(cfg, rank)
    restarts = _restart_config(cfg)
    check_restarts(restarts, adapter)
    data_root = Path(cfg.data_root) if cfg.data_root else DEFAULT_DATA_ROOT
    lr = _learning_rate(cfg, adapter.method)
    out_dir = _out_dir(cfg, adapter, lr)
    train, task = _train_spec(cfg, restarts), _task_spec(cfg)
    task.check_train(train.batch_size)
    return RunConfig(seed=cfg.seed, scale=cfg.scale.name, rank=rank, lr=lr,
                     resume=resume, device=device, out_dir=out_dir, data_root=data_root,
                     model=model, adapter=adapter, restarts=restarts, task=task, train=train, logger=logger,
                     singular_values=singular_values, skip_completed=skip_completed, threads=threads)
