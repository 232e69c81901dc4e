"""What every task shares: the :class:`Task` interface the loop sees, the spec base class, and the
pieces more than one task uses (batch order, tokenising, packing, perplexity, eval mode).

A task is built from its validated spec (a frozen dataclass of ``task.*`` config fields) by the
family's builder in the registry (:mod:`experiments.tasks`). The loop then needs only
``batch(step, process_index, num_processes)`` — a pure function of the step, so a resumed run sees
exactly the batches an uninterrupted one would — and ``evaluate(model, device)``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from itertools import islice
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mora.validation import check_int, check_known_fields

IGNORE_INDEX = -100          # labels the loss skips (prompts, padding): transformers' convention
_ENCODE_CHUNK_DOCS = 1024    # texts per tokenizer call: large enough for the Rust thread pool
_STREAM_CHUNK_DOCS = 64      # smaller when streaming, so the first batch does not wait on many documents
_FLUSH_TOKENS = 1 << 16      # tokens buffered before cutting blocks (one tensor per flush, not per doc)


@dataclass(frozen=True)
class LmEvalSettings:
    """The lm-eval benchmarks a task is scored on after training (Section 5.2; lm_eval_tasks/)."""

    tasks: tuple[str, ...]
    limit: int | None = None         # first N documents of each benchmark (None: all)
    fewshot: int | None = None       # None: each benchmark's own
    batch_size: int = 8
    max_gen_toks: int | None = None


class Task(Protocol):
    """The training loop's view of a task."""

    tokenizer: Any
    lm_eval: LmEvalSettings | None   # benchmarks after training, or None

    @property
    def vocab_size(self) -> int:
        """Vocabulary a model built from a config needs (pretraining from scratch)."""

    def batch(self, step: int, process_index: int = 0, num_processes: int = 1) -> dict[str, torch.Tensor]:
        """This process's rows of the global batch of ``step`` (0-based)."""

    def evaluate(self, model, device) -> dict[str, float]:
        """In-loop held-out metrics (without the ``eval/`` prefix the loop adds)."""

    def describe(self) -> str:
        """One paragraph on the data as built: sizes, truncation, what evaluation scores."""


@dataclass(frozen=True)
class TaskSpec:
    """Base of every task's spec: validated on construction (errors name ``task.<field>``).

    Subclasses are frozen dataclasses with a ``name`` field and check their values in
    ``__post_init__``; list values of the config become tuples.
    """

    @classmethod
    def from_dict(cls, values: dict) -> "TaskSpec":
        allowed = {f.name for f in fields(cls)}
        check_known_fields("task", values, allowed)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def check_train(self, batch_size: int) -> None:
        """Refuse a training batch the task cannot fill, before any model is loaded (default: no check)."""

    @property
    def lm_eval(self) -> LmEvalSettings | None:
        return None


class TokenizerVocabulary:
    """Mixin: the task's vocabulary is its tokenizer's."""

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def check_spec_ints(spec, minimums: dict[str, int], optional: Iterable[str] = ()) -> None:
    """``task.<field>`` must be an integer ≥ its minimum (``optional`` ones may be None)."""
    optional = set(optional)
    for name, minimum in minimums.items():
        check_int(f"task.{name}", getattr(spec, name), minimum, allow_none=name in optional)


# ------------------------------------------------------------------------------------ batches

def batch_indices(n_items: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Items of training step ``step`` (0-based): epoch-wise shuffles, a pure function of step.

    Recomputing from (seed, epoch) instead of iterating a loader is what lets a resumed run see
    exactly the batches an uninterrupted one would.
    """
    per_epoch = max(1, n_items // batch_size)  # drop the last partial batch, as the paper's 10K/1K
    epoch, slot = divmod(step, per_epoch)
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[slot * batch_size:(slot + 1) * batch_size]


def check_batch_fits(batch_size: int, n_items: int, what: str) -> None:
    if batch_size > n_items:
        raise ValueError(f"train.batch_size={batch_size} exceeds the {n_items} {what}")


# ---------------------------------------------------------------------------------- tokenising

def tokenize(tokenizer, texts: Sequence[str], desc: str = "tokenizing") -> list[list[int]]:
    """Token ids of each text, no special tokens; batch-encoded, with a progress bar when long."""
    chunks = range(0, len(texts), _ENCODE_CHUNK_DOCS)
    ids: list[list[int]] = []
    for start in tqdm(chunks, desc=desc, disable=len(chunks) < 2):
        # verbose=False: long texts are expected (they are truncated or packed afterwards)
        ids.extend(tokenizer(list(texts[start:start + _ENCODE_CHUNK_DOCS]), add_special_tokens=False,
                             return_attention_mask=False, verbose=False)["input_ids"])
    return ids


# ------------------------------------------------------------------------------------- packing

def packed_chunks(token_id_lists: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> Iterator[torch.Tensor]:
    """Blocks (n, seq_len) of the stream ``doc₀ EOS doc₁ EOS …``, in order, yielded a few at a time.

    Only the final partial block of the whole stream is dropped; a document longer than
    ``seq_len`` spans several blocks, an empty one contributes its EOS.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    buffer: list[int] = []
    for ids in token_id_lists:
        buffer.extend(ids)
        buffer.append(eos_id)
        if len(buffer) >= max(seq_len, _FLUSH_TOKENS):
            yield _cut_blocks(buffer, seq_len)
    if len(buffer) >= seq_len:
        yield _cut_blocks(buffer, seq_len)


def _cut_blocks(buffer: list[int], seq_len: int) -> torch.Tensor:
    """Remove the whole blocks at the front of ``buffer`` (in place) and return them (n, seq_len)."""
    n = len(buffer) // seq_len
    # via numpy: several times faster than torch.tensor on a long list of Python ints
    blocks = torch.from_numpy(np.array(buffer[:n * seq_len], dtype=np.int64)).view(n, seq_len)
    del buffer[:n * seq_len]
    return blocks


def pack_documents(token_id_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> torch.Tensor:
    """(n_blocks, seq_len): every document followed by EOS, concatenated, cut into blocks."""
    chunks = list(packed_chunks(token_id_lists, seq_len, eos_id))
    if not chunks:
        total = sum(len(ids) + 1 for ids in token_id_lists)
        raise ValueError(f"{len(token_id_lists)} documents give {total} tokens with their EOS, fewer than "
                         f"seq_len={seq_len}: not one complete block")
    return torch.cat(chunks)


def stream_blocks(texts: Iterable[str], tokenizer, seq_len: int, eos_id: int) -> Iterator[torch.Tensor]:
    """Blocks (seq_len,) one at a time from a stream of texts: the rows :func:`pack_documents` gives."""
    text_iter = iter(texts)
    chunks_of_texts = iter(lambda: list(islice(text_iter, _STREAM_CHUNK_DOCS)), [])
    ids = (doc for chunk in chunks_of_texts
           for doc in tokenizer(chunk, add_special_tokens=False, return_attention_mask=False,
                                verbose=False)["input_ids"])
    for chunk in packed_chunks(ids, seq_len, eos_id):
        yield from chunk


def take_blocks(blocks: Iterator[torch.Tensor], n: int, what: str) -> torch.Tensor:
    """The next ``n`` blocks of a stream, stacked (n, T); raises if the stream ends first."""
    taken = list(islice(blocks, n))
    if len(taken) < n:
        raise ValueError(f"{what}: the stream ended after {len(taken)} of {n} blocks")
    return torch.stack(taken)


# ---------------------------------------------------------------------------------- evaluation

@contextlib.contextmanager
def eval_mode(model):
    """``model.eval()`` for the block, then the training mode it had (dropout back on)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_perplexity(model, blocks: torch.Tensor, batch_size: int, device) -> dict[str, float]:
    """Token-weighted mean next-token cross-entropy over ``blocks`` (n, T) and its exp.

    Each block predicts its tokens 1…T−1 from the ones before; summing losses and counting tokens
    (instead of averaging batch means) keeps the mean exact when the last batch is smaller.
    """
    total, scored = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(blocks), batch_size):
            ids = blocks[start:start + batch_size].to(device)              # (B, T)
            logits = model(input_ids=ids).logits[:, :-1].float()          # (B, T-1, V)
            targets = ids[:, 1:]                                           # (B, T-1)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     reduction="sum").item()
            scored += targets.numel()
    loss = total / scored
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": scored}
