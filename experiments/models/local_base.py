"""Bases the repository pretrains itself (``model.source: local_base``), once, from the offline text.

stories260K (width 64) is the only pretrained LLaMA available offline, and at width 64 the paper's rank
regimes do not survive the shrink (docs/calibration.md, Amendment 2). A wider base is built here: a LLaMA
of the shape the model config names, trained from a seeded initialisation on the offline corpora with
stories260K's tokenizer, deterministically (fixed seed, data order and thread count), and cached under
``bases/<name>/`` (``MORA_BASE_ROOT`` moves the cache). ``make base`` builds it; a run that needs it
builds it on first use, under a file lock so parallel runs build it once.

The folder holds the Hugging Face files (``config.json``, ``model.safetensors``) and ``manifest.json``:
the recipe and shape it was built from, the corpus files with their SHA-256, token counts, validation
loss before and after, and the weights' SHA-256. Loading checks all of these against the config, so a
base built from another recipe or an altered file is refused, not silently used.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from experiments.data.c4 import read_documents
from experiments.data.offline import sha256_file, verify_files
from experiments.models.sp_tokenizer import load_sentencepiece_tokenizer
from experiments.paths import REPO_ROOT
from experiments.tasks.base import batch_indices, evaluate_perplexity, pack_documents, tokenize
from mora.validation import check_float, check_int, check_known_fields

DEFAULT_BASE_ROOT = REPO_ROOT / "bases"
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
JSON_SUFFIXES = (".json", ".jsonl", ".gz")   # JSON lines with a "text" field (C4); anything else is plain text


def base_root() -> Path:
    """Where built bases are cached: ``$MORA_BASE_ROOT`` or ``<repo>/bases``."""
    return Path(os.environ.get("MORA_BASE_ROOT") or DEFAULT_BASE_ROOT)


@dataclass(frozen=True)
class BaseRecipe:
    """How a base is pretrained (``model.pretrain`` in its config): data, length, optimiser, seed."""

    corpus: tuple[str, ...]          # files under data_root (checked against SHA256SUMS)
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    seed: int
    validation_blocks: int = 64      # held out (a seeded choice of blocks) for the before/after loss
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1        # cosine to min_lr_ratio · lr
    grad_clip: float = 1.0
    threads: int = 2                 # fixed, so the float sums (and the weights) repeat exactly

    @classmethod
    def from_dict(cls, raw: dict) -> "BaseRecipe":
        check_known_fields("model.pretrain", raw, cls.__dataclass_fields__)
        for key in ("corpus", "steps", "batch_size", "seq_len", "lr", "warmup_steps", "seed"):
            if raw.get(key) is None:
                raise ValueError(f"model.pretrain.{key} is required for model.source='local_base'")
        if isinstance(raw["corpus"], str) or not raw["corpus"]:
            raise ValueError(f"model.pretrain.corpus must be a non-empty list of files under data_root, got {raw['corpus']!r}")
        recipe = cls(**{**raw, "corpus": tuple(str(p) for p in raw["corpus"])})
        for key in ("steps", "batch_size", "seq_len", "validation_blocks", "threads"):
            check_int(f"model.pretrain.{key}", getattr(recipe, key))
        check_int("model.pretrain.warmup_steps", recipe.warmup_steps, minimum=0)
        check_int("model.pretrain.seed", recipe.seed, minimum=0)
        check_float("model.pretrain.lr", recipe.lr, low=0.0, low_open=True)
        check_float("model.pretrain.weight_decay", recipe.weight_decay, low=0.0)
        check_float("model.pretrain.grad_clip", recipe.grad_clip, low=0.0, low_open=True)
        check_float("model.pretrain.min_lr_ratio", recipe.min_lr_ratio, low=0.0, high=1.0)
        if recipe.warmup_steps >= recipe.steps:
            raise ValueError(f"model.pretrain.warmup_steps={recipe.warmup_steps} must be below "
                             f"model.pretrain.steps={recipe.steps}")
        return recipe


@dataclass(frozen=True)
class BaseShape:
    """The LLaMA a base is built as (the model config's shape fields)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    vocab_size: int = field(default=0)   # from the tokenizer

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, rms_norm_eps=1e-5, rope_theta=10000.0)


def recipe_of(spec) -> BaseRecipe:
    """The spec's recipe, validated (a config gives a dict, a validated ModelSpec a BaseRecipe)."""
    return spec.pretrain if isinstance(spec.pretrain, BaseRecipe) else BaseRecipe.from_dict(spec.pretrain)


def shape_of(spec, vocab_size: int) -> BaseShape:
    return BaseShape(spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.num_heads,
                     spec.num_kv_heads or spec.num_heads, spec.max_position_embeddings or 2048,
                     bool(spec.tie_word_embeddings), vocab_size)


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_corpus(data_root: Path, files: tuple[str, ...]) -> list[str]:
    """Documents of each file: JSON lines' ``text`` (C4), or a plain text cut at blank lines."""
    documents: list[str] = []
    for rel, path in zip(files, verify_files(data_root, files)):
        if path.name.endswith(JSON_SUFFIXES):
            documents.extend(read_documents(data_root, [rel]))
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            documents.extend(p.strip() for p in text.split("\n\n") if p.strip())
    return documents


def _lr_at(step: int, recipe: BaseRecipe) -> float:
    """Linear warm-up, then cosine from lr to min_lr_ratio · lr (the usual LLaMA pretraining shape)."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    floor = recipe.min_lr_ratio
    return recipe.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain_base(shape: BaseShape, recipe: BaseRecipe, tokenizer, data_root: Path,
                  progress: bool = True) -> tuple[LlamaForCausalLM, dict]:
    """Train a LLaMA of ``shape`` on the recipe's corpus; (model, facts for the manifest)."""
    started = time.time()
    documents = read_corpus(data_root, recipe.corpus)
    blocks = pack_documents(tokenize(tokenizer, documents, desc="tokenizing the base corpus"),
                            recipe.seq_len, tokenizer.eos_token_id)
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(recipe.seed))
    if len(blocks) <= recipe.validation_blocks + recipe.batch_size:
        raise ValueError(f"the corpus gives {len(blocks)} blocks of {recipe.seq_len} tokens: too few for "
                         f"model.pretrain.validation_blocks={recipe.validation_blocks} and a batch of "
                         f"{recipe.batch_size}")
    validation, train = blocks[order[:recipe.validation_blocks]], blocks[order[recipe.validation_blocks:]]
    with _threads(recipe.threads):
        torch.manual_seed(recipe.seed)
        model = LlamaForCausalLM(shape.llama_config())
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
        before = evaluate_perplexity(model, validation, 32, "cpu")["loss"]
        losses = []
        bar = tqdm(range(recipe.steps), desc="pretraining the base", disable=not progress)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, recipe)
            ids = train[batch_indices(len(train), recipe.batch_size, step, recipe.seed)]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"base pretraining diverged at step {step} (loss {losses[-1]}); "
                                         "lower model.pretrain.lr")
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        after = evaluate_perplexity(model, validation, 32, "cpu")["loss"]
    tail = losses[-min(50, len(losses)):]
    facts = {"train_blocks": len(train), "validation_blocks": len(validation),
             "train_tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
             "corpus_tokens": int(blocks.numel()), "documents": len(documents),
             "parameters": sum(p.numel() for p in model.parameters()),
             "validation_loss_before": before, "validation_loss_after": after,
             "train_loss_last50": sum(tail) / len(tail), "seconds": round(time.time() - started, 1),
             "torch": torch.__version__}
    return model, facts


def _expected(spec, vocab_size: int) -> dict:
    return {"shape": asdict(shape_of(spec, vocab_size)), "recipe": asdict(recipe_of(spec)),
            "tokenizer": spec.tokenizer}


def _json_roundtrip(value: dict) -> dict:
    return json.loads(json.dumps(value))   # tuples become lists, as in the manifest


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_base(spec, data_root: str | Path, root: Path | None = None, progress: bool = True) -> Path:
    """Pretrain the base ``spec`` names (unless a matching one is cached) and return its folder."""
    data_root, root = Path(data_root), (root or base_root())
    folder = root / spec.name
    with _lock(root / f".{spec.name}.lock"):
        if (folder / MANIFEST).is_file():
            return _checked(spec, data_root, folder)
        (tokenizer_path,) = verify_files(data_root, [spec.tokenizer])
        tokenizer = load_sentencepiece_tokenizer(tokenizer_path)
        expected = _expected(spec, len(tokenizer))
        print(f"building base {spec.name!r} into {folder} (once; offline; "
              f"{expected['recipe']['steps']} steps on {expected['recipe']['threads']} threads)")
        model, facts = pretrain_base(shape_of(spec, len(tokenizer)), recipe_of(spec),
                                     tokenizer, data_root, progress)
        staging = root / f".{spec.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, safe_serialization=True)
        corpus = dict(zip(expected["recipe"]["corpus"],
                          (sha256_file(p) for p in verify_files(data_root, expected["recipe"]["corpus"]))))
        manifest = {**_json_roundtrip(expected), "corpus_sha256": corpus, **facts,
                    "weights_sha256": sha256_file(staging / WEIGHTS)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)   # the folder appears whole or not at all
        print(f"base {spec.name!r}: validation loss {facts['validation_loss_before']:.3f} -> "
              f"{facts['validation_loss_after']:.3f} in {facts['seconds']:.0f} s")
        return folder


def _checked(spec, data_root: Path, folder: Path) -> Path:
    """``folder`` if its manifest matches ``spec`` and its weights their recorded SHA-256."""
    manifest = json.loads((folder / MANIFEST).read_text())
    (tokenizer_path,) = verify_files(data_root, [spec.tokenizer])
    expected = _json_roundtrip(_expected(spec, len(load_sentencepiece_tokenizer(tokenizer_path))))
    for key, value in expected.items():
        if manifest.get(key) != value:
            raise ValueError(f"the cached base {folder} was built with a different {key} than model={spec.name} "
                             f"now names ({manifest.get(key)} vs {value}); delete the folder to rebuild it")
    if sha256_file(folder / WEIGHTS) != manifest["weights_sha256"]:
        raise ValueError(f"{folder / WEIGHTS} differs from the SHA-256 in its manifest; delete {folder} to rebuild")
    return folder


def load_local_base(spec, data_root: str | Path, dtype: torch.dtype):
    """(model, tokenizer) of a base the repository pretrains (built on first use)."""
    folder = build_base(spec, data_root)
    (tokenizer_path,) = verify_files(data_root, [spec.tokenizer])
    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    return model, load_sentencepiece_tokenizer(tokenizer_path)
