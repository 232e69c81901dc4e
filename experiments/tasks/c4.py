"""Language modelling on C4 from scratch (Section 5.3, Fig. 4, Table 3, Fig. 5).

The paper trains LLaMA-style models on C4 and "follow[s] Lialin et al." (ReLoRA, 2023) for the
rest, so the data pipeline is ReLoRA's: documents tokenised with the t5-base tokenizer (32,100
tokens), each followed by EOS, concatenated and cut into 512-token blocks (no padding, blocks
cross document boundaries, labels = inputs); validation perplexity = exp(mean token
cross-entropy) over a fixed number of validation tokens (ReLoRA scores the first 10M). Two
deliberate differences from ReLoRA's code: the mean is token-weighted (sums over tokens, not a
mean of batch means), and the validation tokens are stated as a number of packed blocks.

Two sources share that pipeline:

- ``local`` (mini scale): JSON-lines files under the offline data root (1,000 real C4-en
  documents, 30 of which are the validation files and are held out of training), checked against
  SHA256SUMS. A vocabulary of 32K would dominate a CPU-sized model, so a small byte-level BPE can
  be trained on the training split (:mod:`experiments.models.c4_tokenizers`).
- ``hub`` (paper scale): ``allenai/c4`` (config ``en``) streamed, shuffled with a buffer, tokenised
  and packed on the fly; a cursor makes ``batch(step)`` repeatable after a restart by replaying
  the stream up to the requested step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from experiments.data.c4 import hub_stream_loader, local_splits, stream_train_texts
from experiments.data.offline import verify_files
from experiments.models.c4_tokenizers import (BPE_SPECIAL_TOKENS, BYTE_ALPHABET, DEFAULT_TOKENIZER_CACHE,
                                              load_t5_tokenizer, train_bpe_tokenizer)
from experiments.tasks.base import (TaskSpec, TokenizerVocabulary, batch_indices, check_batch_fits, check_spec_ints,
                                    evaluate_perplexity, pack_documents, stream_blocks, take_blocks, tokenize)
from mora.validation import check_choice, check_int

SOURCES = ("local", "hub")
TOKENIZERS = ("bpe", "t5")


@dataclass(frozen=True)
class C4TaskSpec(TaskSpec):
    """The task's config (conf/task/c4.yaml), validated on construction."""

    name: str = "c4"
    source: str = "local"
    train_files: tuple[str, ...] = ("c4/c4-sample.00000-of-00001.json.gz",)
    validation_files: tuple[str, ...] = ("c4/c4-sample.01.json.gz", "c4/c4-sample.02.json.gz",
                                         "c4/c4-sample.03.json.gz")
    hub_dataset: str = "allenai/c4"
    hub_config: str = "en"
    seq_len: int = 512
    tokenizer: str = "t5"
    vocab_size: int | None = None      # bpe only: size including the special tokens
    t5_tokenizer: str = "t5-base"      # hub id, a folder holding spiece.model, or a .model under data_root
    eval_tokens: int | None = None     # validation tokens scored (rounded up to whole blocks); None: all (local)
    eval_batch_size: int = 32
    shuffle_buffer: int = 10_000       # hub streaming; 0 keeps the stream's order

    def __post_init__(self) -> None:
        check_choice("task.source", self.source, SOURCES)
        check_choice("task.tokenizer", self.tokenizer, TOKENIZERS)
        for field in ("train_files", "validation_files"):
            files = getattr(self, field)
            if not isinstance(files, tuple) or not files or not all(isinstance(f, str) and f for f in files):
                _fail(field, "a non-empty list of paths relative to data_root", files)
        for field in ("hub_dataset", "hub_config", "t5_tokenizer"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                _fail(field, "a non-empty string", getattr(self, field))
        # a block must predict at least one token
        check_spec_ints(self, {"seq_len": 2, "eval_tokens": 1, "eval_batch_size": 1, "shuffle_buffer": 0},
                        optional=("eval_tokens",))
        self._validate_combinations()

    def _validate_combinations(self) -> None:
        if self.tokenizer == "bpe":
            check_int("task.vocab_size", self.vocab_size, BYTE_ALPHABET + len(BPE_SPECIAL_TOKENS))
        elif self.vocab_size is not None:
            _fail("vocab_size", f"null with task.tokenizer={self.tokenizer!r} (its vocabulary is fixed; "
                  "vocab_size applies to task.tokenizer='bpe')", self.vocab_size)
        if self.source == "hub" and self.tokenizer != "t5":
            _fail("tokenizer", "'t5' with task.source='hub' (a BPE is trained on a local training split)",
                  self.tokenizer)
        if self.source == "hub" and self.eval_tokens is None:
            _fail("eval_tokens", "a positive integer with task.source='hub' (the validation split is "
                  "streamed, so the number of tokens scored must be fixed)", self.eval_tokens)


def _fail(field: str, expected: str, value) -> None:
    raise ValueError(f"task.{field} must be {expected}, got task.{field}={value!r}")


def build_tokenizer(spec: C4TaskSpec, data_root: str | Path,
                    cache_dir: str | Path = DEFAULT_TOKENIZER_CACHE) -> PreTrainedTokenizerFast:
    """The spec's tokenizer: a BPE trained on the training split only, or t5-base."""
    if spec.tokenizer == "bpe":
        train = local_splits(data_root, spec.train_files, spec.validation_files).train
        return train_bpe_tokenizer(train, spec.vocab_size, cache_dir)
    name = spec.t5_tokenizer
    if name.endswith(".model"):  # a SentencePiece file in the offline data: checked like every data file
        name = verify_files(data_root, [name])[0]
    return load_t5_tokenizer(name)


def first_blocks(blocks: torch.Tensor, eval_tokens: int | None, seq_len: int) -> torch.Tensor:
    """The first ⌈eval_tokens / seq_len⌉ blocks (all for None); raises if there are fewer."""
    if eval_tokens is None:
        return blocks
    n = math.ceil(eval_tokens / seq_len)
    if n > len(blocks):
        raise ValueError(f"task.eval_tokens={eval_tokens} needs {n} validation blocks of {seq_len} tokens, "
                         f"but the validation files give {len(blocks)} ({len(blocks) * seq_len} tokens); "
                         "lower it or set task.eval_tokens=null (all)")
    return blocks[:n]


class StreamedBatches:
    """Global batches of a block stream, addressed by step: replayed forward, never backwards."""

    def __init__(self, blocks: Iterator[torch.Tensor], batch_size: int):
        self.blocks, self.batch_size = blocks, batch_size
        self.next_step = 0
        self._last: torch.Tensor | None = None

    def __call__(self, step: int) -> torch.Tensor:
        if step == self.next_step - 1 and self._last is not None:  # asked again (e.g. by another caller)
            return self._last
        if step < self.next_step:
            raise ValueError(f"step {step} was already streamed (the cursor is at step {self.next_step}); "
                             "a streamed dataset is only read forward: build a new task to go back")
        while self.next_step < step:  # a resumed run: consume and discard the steps it already trained on
            self._advance()
        return self._advance()

    def _advance(self) -> torch.Tensor:
        self._last = take_blocks(self.blocks, self.batch_size, f"train step {self.next_step}")
        self.next_step += 1
        return self._last


class C4Task(TokenizerVocabulary):
    """C4 as the training loop sees it: ``batch(step)`` (a pure function of the step) and ``evaluate``.

    ``batch_size`` is the global number of blocks per step; process ``i`` of ``n`` gets rows i::n.
    ``load_stream`` (source=hub) maps a split name to its streamed rows; the default streams
    ``spec.hub_dataset``; :func:`json_stream_loader` runs the same path on local files.
    """

    lm_eval = None  # validation perplexity is scored in the loop (Table 3)

    def __init__(self, spec: C4TaskSpec, tokenizer, batch_size: int, seed: int, data_root: str | Path,
                 load_stream: Callable[[str], Iterable[dict]] | None = None):
        self.spec, self.tokenizer, self.batch_size, self.seed = spec, tokenizer, batch_size, seed
        if tokenizer.eos_token_id is None:
            raise ValueError("the C4 tokenizer has no EOS token; packing needs one between documents")
        if spec.source == "local":
            self._init_local(data_root)
        else:
            self._init_streamed(load_stream or hub_stream_loader(spec.hub_dataset, spec.hub_config))

    def _init_local(self, data_root) -> None:
        spec, eos = self.spec, self.eos_token_id
        splits = local_splits(data_root, spec.train_files, spec.validation_files)
        self.train_blocks = pack_documents(tokenize(self.tokenizer, splits.train, "tokenizing C4 train"),
                                           spec.seq_len, eos)                            # (N, T)
        self.validation_blocks = first_blocks(pack_documents(tokenize(self.tokenizer, splits.validation),
                                                             spec.seq_len, eos), spec.eval_tokens, spec.seq_len)
        check_batch_fits(self.batch_size, len(self.train_blocks), f"training blocks of task.seq_len={spec.seq_len}")
        self._global_batch = self._permuted_batch
        self._origin = (f"train {len(splits.train):,} docs ({splits.removed_from_train} validation docs held out) "
                        f"-> {len(self.train_blocks):,} blocks ({self.train_blocks.numel():,} tokens); "
                        f"validation {len(splits.validation):,} docs")

    def _init_streamed(self, load_stream) -> None:
        spec, eos = self.spec, self.eos_token_id
        val_texts = (row["text"] for row in load_stream("validation"))  # unshuffled: a fixed, stated prefix
        n_val = math.ceil(spec.eval_tokens / spec.seq_len)
        self.validation_blocks = take_blocks(stream_blocks(val_texts, self.tokenizer, spec.seq_len, eos),
                                              n_val, "validation")
        train = stream_blocks(stream_train_texts(load_stream, self.seed, spec.shuffle_buffer), self.tokenizer,
                              spec.seq_len, eos)
        self._global_batch = StreamedBatches(train, self.batch_size)
        self._origin = (f"train streamed from {spec.hub_dataset}/{spec.hub_config} (shuffle buffer "
                        f"{spec.shuffle_buffer}, seed {self.seed}); validation: first blocks of its stream")

    def _permuted_batch(self, step: int) -> torch.Tensor:
        return self.train_blocks[batch_indices(len(self.train_blocks), self.batch_size, step, self.seed)]

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    def batch(self, step: int, process_index: int = 0, num_processes: int = 1) -> dict[str, torch.Tensor]:
        """This process's rows of the global batch of ``step``; labels = inputs (the model shifts them)."""
        input_ids = self._global_batch(step)[process_index::num_processes]   # (B / num_processes, T)
        return {"input_ids": input_ids, "labels": input_ids}

    def evaluate(self, model, device: torch.device) -> dict[str, float]:
        return evaluate_perplexity(model, self.validation_blocks, self.spec.eval_batch_size, device)

    def describe(self) -> str:
        val = self.validation_blocks
        return (f"C4 ({self.spec.source}, seq_len {self.spec.seq_len}, vocab {self.vocab_size:,} "
                f"{self.spec.tokenizer}): {self._origin} -> {len(val):,} blocks ({val.numel():,} tokens, "
                f"{len(val) * (val.shape[1] - 1):,} predicted tokens scored)")


def build_c4_task(spec: C4TaskSpec, tokenizer, *, batch_size: int, seed: int, data_root) -> C4Task:
    """The registry's builder: pretraining from scratch brings no tokenizer, so the task makes its own."""
    if tokenizer is None:
        tokenizer = build_tokenizer(spec, data_root)
    return C4Task(spec, tokenizer, batch_size, seed, data_root)
