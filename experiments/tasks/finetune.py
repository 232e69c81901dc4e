"""Fine-tuning (Section 5.2; Table 1, Table 4, Tables 6-7): supervised fine-tuning and continual pretraining.

A task is supervised fine-tuning on (prompt, response) examples (``kind: sft``: Tülu v2 →
MMLU, MetaMathQA → GSM8K/MATH; :class:`SFTTask`, loss on the responses only) or continual
pretraining on domain text (``kind: text``: PubMed abstracts, financial news, turned into reading
comprehension with AdaptLLM, Cheng et al. 2023; :class:`TextTask`, ``[BOS] doc [EOS]`` packed into
blocks as in C4, labels everywhere). ``source: local`` reads the offline files (mini scale: GSM8K,
Alpaca, PubMedQA-L abstracts); ``source: hub`` loads the paper's data with
``datasets.load_dataset`` (paper scale).

Both tasks give ``batch(step, ...)`` as a pure function of the step and ``evaluate`` on held-out
data that moves on a tiny model (:mod:`experiments.tasks.examples`); the paper's benchmarks run
after training with lm-eval on the tasks the spec names (:attr:`FinetuneTaskSpec.lm_eval`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.data import finetune as data
from experiments.data.adaptllm import AdaptLLMConfig, convert_corpus
from experiments.data.columns import require_columns
from experiments.data.finetune import ChoiceExample, Example
from experiments.tasks.base import (LmEvalSettings, TaskSpec, TokenizerVocabulary, batch_indices, check_batch_fits,
                                    check_spec_ints, evaluate_perplexity, pack_documents)
from experiments.tasks.examples import (choice_accuracy, collate, encode_choices, encode_examples, encode_texts,
                                        padding_token_id, response_nll)
from mora.validation import check_choice, check_float

KINDS = ("sft", "text")
SOURCES = ("local", "hub")
# what each (source, kind) can read; the hub text corpora are any dataset with a text column
DATASETS = {("local", "sft"): ("gsm8k", "alpaca"), ("local", "text"): ("pubmedqa",),
            ("hub", "sft"): ("metamathqa", "tulu_v2"), ("hub", "text"): ("text",)}


@dataclass(frozen=True)
class FinetuneTaskSpec(TaskSpec):
    """One fine-tuning task; every field validated on construction, errors name ``task.<field>``."""

    name: str
    kind: str = "sft"
    source: str = "local"
    dataset: str = "gsm8k"
    hub_id: str | None = None          # hub: the dataset id (MetaMathQA, Tülu v2, a PubMed/finance corpus)
    hub_split: str = "train"
    text_field: str = "text"           # hub text corpora: the column holding a document
    max_len: int = 512                 # sft: tokens per example (longer ones are cut); text: block length
    n_eval: int = 100                  # held-out examples scored in the loop (response NLL / perplexity)
    # the training set's first n_train items (sft: examples with something to learn within max_len; text:
    # packed blocks), None = all. Sets epochs = steps x batch / n_train (docs/calibration.md, Amendment 6)
    n_train: int | None = None
    eval_batch_size: int = 8
    adaptllm: bool = True              # text: AdaptLLM reading comprehension (Cheng et al. 2023) or raw text
    instruction_ratio: float = 0.0     # text: general instructions mixed in (AdaptLLM), 0 = none
    lm_eval_tasks: tuple[str, ...] = ()  # benchmarks scored after training (lm_eval_tasks/README.md)
    lm_eval_limit: int | None = None   # first N documents of each benchmark (None: all)
    lm_eval_fewshot: int | None = None  # None: each task's own
    lm_eval_batch_size: int = 8
    lm_eval_max_gen_toks: int | None = None

    def __post_init__(self) -> None:
        check_choice("task.kind", self.kind, KINDS)
        check_choice("task.source", self.source, SOURCES)
        check_choice("task.dataset", self.dataset, DATASETS[(self.source, self.kind)])
        if self.source == "hub" and not self.hub_id:
            raise ValueError(f"task.hub_id is required for task.source=hub (task={self.name}); the paper's "
                             "financial-news corpus, for one, is not on the hub: point it at your copy")
        check_spec_ints(self, {"max_len": 1, "n_eval": 1, "eval_batch_size": 1, "lm_eval_batch_size": 1,
                               "lm_eval_limit": 1, "lm_eval_max_gen_toks": 1, "lm_eval_fewshot": 0, "n_train": 1},
                        optional=("lm_eval_limit", "lm_eval_max_gen_toks", "lm_eval_fewshot", "n_train"))
        check_float("task.instruction_ratio", self.instruction_ratio, 0.0, 1.0, high_open=True)

    @property
    def lm_eval(self) -> LmEvalSettings | None:
        if not self.lm_eval_tasks:
            return None
        return LmEvalSettings(self.lm_eval_tasks, self.lm_eval_limit, self.lm_eval_fewshot, self.lm_eval_batch_size,
                              self.lm_eval_max_gen_toks)


class SFTTask(TokenizerVocabulary):
    """Supervised fine-tuning: ``batch`` gives right-padded examples, loss on responses only.

    ``batch_size`` is the global number of examples per step; process i of n gets rows i::n,
    padded to its own longest row. ``evaluate`` scores ``eval_examples`` (none: returns {}).
    """

    def __init__(self, examples: Sequence[Example | tuple[str, str]], tokenizer, batch_size: int, seed: int,
                 max_len: int, eval_examples: Sequence[Example | tuple[str, str]] = (), eval_batch_size: int = 8,
                 lm_eval: LmEvalSettings | None = None, n_examples: int | None = None):
        self.lm_eval = lm_eval
        self.tokenizer, self.batch_size, self.seed, self.max_len = tokenizer, batch_size, seed, max_len
        self.eval_batch_size, self.pad_id = eval_batch_size, padding_token_id(tokenizer)
        self.data = encode_examples(examples, tokenizer, max_len, limit=n_examples)
        if n_examples is not None and len(self.data) < n_examples:
            raise ValueError(f"task.n_train={n_examples} asks for more training examples than the training set has "
                             f"with something to learn within max_len={max_len} ({len(self.data):,})")
        self.eval_data = encode_examples(eval_examples, tokenizer, max_len) if len(eval_examples) else None
        check_batch_fits(batch_size, len(self.data), "training examples")

    def batch(self, step: int, process_index: int = 0, num_processes: int = 1) -> dict[str, torch.Tensor]:
        rows = batch_indices(len(self.data), self.batch_size, step, self.seed)
        return collate(self.data, rows[process_index::num_processes].tolist(), self.pad_id)

    def evaluate(self, model, device) -> dict[str, float]:
        if self.eval_data is None:
            return {}
        return response_nll(model, self.eval_data, self.eval_batch_size, self.pad_id, device)

    def describe(self) -> str:
        lengths = self.data.full_lengths.float()
        held = f", {len(self.eval_data)} held out" if self.eval_data is not None else ""
        return (f"SFT: {len(self.data):,} examples{held} ({self.data.n_dropped} dropped: nothing to learn within "
                f"max_len={self.max_len}); tokens per example median {lengths.median().item():.0f}, "
                f"95th percentile {lengths.quantile(0.95).item():.0f}, "
                f"{(lengths > self.max_len).float().mean().item():.1%} truncated")


class TextTask(TokenizerVocabulary):
    """Continual pretraining: ``[BOS] doc [EOS]`` packed into ``seq_len`` blocks, labels = inputs.

    ``evaluate``: perplexity on ``eval_texts`` packed the same way (the first ``eval_blocks``
    blocks, or all) and, given ``eval_choices``, multiple-choice accuracy with each question cut
    to ``seq_len`` tokens (:func:`encode_choices`).
    """

    def __init__(self, texts: Sequence[str], tokenizer, batch_size: int, seed: int, seq_len: int,
                 eval_texts: Sequence[str] = (), eval_choices: Sequence[ChoiceExample] = (),
                 eval_batch_size: int = 8, eval_blocks: int | None = None, lm_eval: LmEvalSettings | None = None,
                 n_blocks: int | None = None):
        self.lm_eval = lm_eval
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; packing needs one between documents")
        self.tokenizer, self.batch_size, self.seed, self.seq_len = tokenizer, batch_size, seed, seq_len
        self.eval_choices, self.eval_batch_size = list(eval_choices), eval_batch_size
        # scored within seq_len, the context the model is trained on
        self.choice_data = encode_choices(self.eval_choices, tokenizer, seq_len) if self.eval_choices else None
        self.blocks = pack_documents(encode_texts(texts, tokenizer), seq_len, tokenizer.eos_token_id)  # (N, T)
        if n_blocks is not None:
            self.blocks = _first(self.blocks, n_blocks, f"training blocks of seq_len={seq_len}")
        self.eval_blocks = None
        if len(eval_texts):
            blocks = pack_documents(encode_texts(eval_texts, tokenizer), seq_len, tokenizer.eos_token_id)
            self.eval_blocks = blocks if eval_blocks is None else blocks[:eval_blocks]
        check_batch_fits(batch_size, len(self.blocks), f"training blocks of seq_len={seq_len}")

    def batch(self, step: int, process_index: int = 0, num_processes: int = 1) -> dict[str, torch.Tensor]:
        rows = batch_indices(len(self.blocks), self.batch_size, step, self.seed)
        input_ids = self.blocks[rows[process_index::num_processes]]     # (B / num_processes, T)
        return {"input_ids": input_ids, "labels": input_ids}

    def evaluate(self, model, device) -> dict[str, float]:
        metrics = {}
        if self.eval_blocks is not None:
            metrics |= evaluate_perplexity(model, self.eval_blocks, self.eval_batch_size, device)
        if self.eval_choices:
            metrics |= choice_accuracy(model, self.choice_data, self.eval_choices, self.eval_batch_size,
                                       padding_token_id(self.tokenizer), device)
        return metrics

    def describe(self) -> str:
        val = "none" if self.eval_blocks is None else f"{len(self.eval_blocks):,} blocks"
        return (f"text: {len(self.blocks):,} blocks of {self.seq_len} ({self.blocks.numel():,} tokens); "
                f"held-out text {val}; {len(self.eval_choices)} held-out questions")


def build_finetune_task(spec: FinetuneTaskSpec, tokenizer, *, batch_size: int, seed: int, data_root: str | Path,
                        load_dataset: Callable | None = None) -> SFTTask | TextTask:
    """The registry's builder: the SFTTask / TextTask of ``spec``, on the base model's tokenizer.

    ``source: local`` reads the offline mini data; ``source: hub`` calls ``load_dataset`` (default:
    ``datasets.load_dataset``; tests pass a stand-in) with the paper's data set.
    """
    if tokenizer is None:
        raise ValueError(f"task={spec.name} fine-tunes a pretrained model and uses its tokenizer; "
                         "model.source=config (a model built from scratch) has none")
    common = {"eval_batch_size": spec.eval_batch_size, "lm_eval": spec.lm_eval}
    if spec.source == "local":
        if spec.kind == "sft":
            mini_data = {"gsm8k": data.gsm8k_mini, "alpaca": data.alpaca_mini}[spec.dataset]
            train, heldout = mini_data(data_root, spec.n_eval)
            return SFTTask(train, tokenizer, batch_size, seed, spec.max_len, eval_examples=heldout,
                           n_examples=spec.n_train, **common)
        train, heldout, questions = data.pubmed_texts(data_root, adaptllm=AdaptLLMConfig() if spec.adaptllm else None,
                                                      instruction_ratio=spec.instruction_ratio, seed=seed)
        return TextTask(train, tokenizer, batch_size, seed, spec.max_len, eval_texts=heldout[:spec.n_eval],
                        eval_choices=questions[:spec.n_eval], n_blocks=spec.n_train, **common)
    if load_dataset is None:
        from datasets import load_dataset
    if spec.kind == "sft":
        hub_data = {"metamathqa": data.load_metamathqa, "tulu_v2": data.load_tulu_v2}[spec.dataset]
        return SFTTask(hub_data(load_dataset, spec.hub_id, spec.hub_split), tokenizer, batch_size, seed,
                       spec.max_len, lm_eval=spec.lm_eval, n_examples=spec.n_train)
    rows = require_columns(load_dataset(spec.hub_id, split=spec.hub_split), (spec.text_field,), spec.hub_id,
                           spec.hub_split, hint="task.text_field names the text column")
    texts = [row[spec.text_field] for row in rows]
    if spec.adaptllm:
        texts = convert_corpus(texts, AdaptLLMConfig(), seed)
    return TextTask(texts, tokenizer, batch_size, seed, spec.max_len, lm_eval=spec.lm_eval, n_blocks=spec.n_train)


def _first(items, n: int | None, what: str):
    """The first ``n`` of ``items`` (all when ``n`` is None); fewer than ``n`` is an error naming task.n_train."""
    if n is None:
        return items
    if n > len(items):
        raise ValueError(f"task.n_train={n} asks for more {what} than the training set has ({len(items):,})")
    return items[:n]
