"""The fine-tuning tasks of Section 5.2 (Table 1, Table 4, Tables 6-7) as the runner sees them.

A task is supervised fine-tuning on (prompt, response) examples (``kind: sft``: Tülu v2 →
MMLU, MetaMathQA → GSM8K/MATH) or continual pretraining on domain text (``kind: text``: PubMed
abstracts, financial news, turned into reading comprehension with AdaptLLM, Cheng et al. 2023).
Training data and the in-loop held-out metrics come from :mod:`experiments.tasks.finetune`; the
paper's benchmarks run after training with lm-eval (:mod:`experiments.evaluation.harness`), on the
tasks the spec names.

``source: local`` reads the offline files (mini scale: GSM8K, Alpaca, PubMedQA-L abstracts);
``source: hub`` loads the paper's data with ``datasets.load_dataset`` (paper scale).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

from experiments.schema import check_choice, check_positive

KINDS = ("sft", "text")
SOURCES = ("local", "hub")
# what each (source, kind) can read; the hub text corpora are any dataset with a text column
DATASETS = {("local", "sft"): ("gsm8k", "alpaca"), ("local", "text"): ("pubmedqa",),
            ("hub", "sft"): ("metamathqa", "tulu_v2"), ("hub", "text"): ("text",)}


@dataclass(frozen=True)
class FinetuneTaskSpec:
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
        for name in ("max_len", "n_eval", "eval_batch_size", "lm_eval_batch_size"):
            check_positive(f"task.{name}", getattr(self, name))
        for name in ("lm_eval_limit", "lm_eval_max_gen_toks"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"task.{name} must be null or a positive integer, got {value!r}")
        if self.lm_eval_fewshot is not None and self.lm_eval_fewshot < 0:
            raise ValueError(f"task.lm_eval_fewshot must be null or ≥ 0, got {self.lm_eval_fewshot}")
        if not 0.0 <= self.instruction_ratio < 1.0:
            raise ValueError(f"task.instruction_ratio must lie in [0, 1), got {self.instruction_ratio}")

    @classmethod
    def from_dict(cls, values: dict) -> "FinetuneTaskSpec":
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - allowed)
        if unknown:
            raise ValueError(f"task has unknown fields {unknown}; allowed: {sorted(allowed)}")
        values = dict(values)
        values["lm_eval_tasks"] = tuple(values.get("lm_eval_tasks") or ())
        return cls(**values)


def build_finetune_task(spec: FinetuneTaskSpec, tokenizer, batch_size: int, seed: int, data_root: str | Path,
                        load_dataset: Callable | None = None):
    """The SFTTask / TextTask of ``spec``. ``load_dataset`` (default: ``datasets.load_dataset``) is
    only called for ``source: hub``; tests pass a stand-in."""
    from experiments.data import finetune as data
    from experiments.data.adaptllm import AdaptLLMConfig
    from experiments.tasks.finetune import SFTTask, TextTask, alpaca_task, gsm8k_task, pubmed_texts

    common = {"eval_batch_size": spec.eval_batch_size}
    if spec.source == "local":
        if spec.dataset == "gsm8k":
            return gsm8k_task(tokenizer, batch_size, seed, spec.max_len, spec.n_eval, data_root, **common)
        if spec.dataset == "alpaca":
            return alpaca_task(tokenizer, batch_size, seed, spec.max_len, spec.n_eval, data_root, **common)
        train, heldout, questions = pubmed_texts(data_root, adaptllm=AdaptLLMConfig() if spec.adaptllm else None,
                                                 instruction_ratio=spec.instruction_ratio, seed=seed)
        return TextTask(train, tokenizer, batch_size, seed, spec.max_len, eval_texts=heldout[:spec.n_eval],
                        eval_choices=questions[:spec.n_eval], **common)
    if load_dataset is None:
        from datasets import load_dataset
    if spec.dataset == "metamathqa":
        return SFTTask(data.load_metamathqa(load_dataset, spec.hub_id, spec.hub_split), tokenizer, batch_size,
                       seed, spec.max_len)
    if spec.dataset == "tulu_v2":
        return SFTTask(data.load_tulu_v2(load_dataset, spec.hub_id, spec.hub_split), tokenizer, batch_size,
                       seed, spec.max_len)
    texts = [row[spec.text_field] for row in load_dataset(spec.hub_id, split=spec.hub_split)]
    if spec.adaptllm:
        from experiments.data.adaptllm import convert_corpus

        texts = convert_corpus(texts, AdaptLLMConfig(), seed)
    return TextTask(texts, tokenizer, batch_size, seed, spec.max_len)
