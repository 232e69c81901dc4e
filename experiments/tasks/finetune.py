"""Supervised fine-tuning and continual pretraining as the training loop sees them (Section 5.2).

:class:`SFTTask` trains on examples of :mod:`experiments.data.finetune` (Tülu v2, MetaMathQA,
GSM8K, Alpaca): a sequence is ``[BOS] prompt response [EOS]`` (several turns for a conversation)
and only the response tokens and their EOS carry labels. :class:`TextTask` continues pretraining
on domain text (PubMed abstracts, as AdaptLLM reading comprehension): ``[BOS] doc [EOS]`` packed
into blocks as in :mod:`experiments.tasks.c4`, labels everywhere.

Both give ``batch(step, process_index, num_processes)`` as a pure function of the step (epoch-wise
seeded permutations, :func:`experiments.tasks.uuid_memory.batch_indices`), so a resumed run sees the
batches an uninterrupted one would, and ``evaluate`` on held-out data that moves on a tiny model:
token-weighted response negative log-likelihood, or held-out perplexity and multiple-choice
accuracy. Generation-based scores (GSM8K, MMLU, PubMedQA in the paper's tables) run elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from experiments.data.adaptllm import AdaptLLMConfig, convert_corpus, domain_keywords, mix_with_instructions
from experiments.tasks.c4 import evaluate_perplexity, pack_documents
from experiments.data.finetune import (HELDOUT_EVERY, ChoiceExample, Example, as_example, gsm8k_pairs,
                                       load_alpaca, load_gsm8k, load_pubmedqa, pubmedqa_abstract, pubmedqa_choice,
                                       split_heldout, split_pubmedqa)
from experiments.data.offline import DEFAULT_DATA_ROOT
from experiments.tasks.uuid_memory import batch_indices

IGNORE_INDEX = -100
_ENCODE_CHUNK = 4096  # texts per tokenizer call: big enough for the Rust thread pool, small in memory


# ------------------------------------------------------------------------------------ encoding

def _tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    # verbose=False: long texts are expected (they are truncated or packed afterwards)
    return tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


class EncodedExamples:
    """Token ids of many examples in one flat tensor, with which tokens carry a label.

    Row i is ``tokens[offsets[i]:offsets[i+1]]``: flat int32 storage takes 4 bytes a token where
    Python lists of ints take about 36, which matters for Tülu v2's 326K conversations.
    ``full_lengths`` are the untruncated lengths of every input example, dropped ones included.
    """

    def __init__(self, tokens: torch.Tensor, trained: torch.Tensor, offsets: torch.Tensor,
                 full_lengths: torch.Tensor, n_dropped: int):
        self.tokens, self.trained, self.offsets = tokens, trained, offsets   # (N,), (N,), (n+1,)
        self.full_lengths, self.n_dropped = full_lengths, n_dropped

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def row(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.offsets[i].item(), self.offsets[i + 1].item()
        return self.tokens[start:end].long(), self.trained[start:end]


def encode_examples(examples: Sequence[Example | tuple[str, str]], tokenizer, max_len: int,
                    add_eos: bool = True) -> EncodedExamples:
    """``[BOS] segment₀ segment₁ …`` per example, EOS after each trainable segment (if ``add_eos``).

    Each segment is tokenised on its own, so a prompt/response boundary is a token boundary (one
    tokenisation of the joined text can merge across it, and masking by the prompt's token count
    would then be off by a token). Sequences
    longer than ``max_len`` keep their first ``max_len`` tokens: the prompt's start survives and a
    long response loses its end (and EOS). An example with no labelled token left is dropped and
    counted in ``n_dropped``.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (BOS and one trained token), got {max_len}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("the tokenizer has no EOS token; a response must end with one")
    rows, full_lengths, n_dropped = [], [], 0
    for start in range(0, len(examples), _ENCODE_CHUNK):
        chunk = [as_example(e) for e in examples[start:start + _ENCODE_CHUNK]]
        ids = iter(_tokenize(tokenizer, [segment.text for example in chunk for segment in example]))
        for example in chunk:
            row_ids, row_trained = ([bos], [False]) if bos is not None else ([], [])
            for segment, segment_ids in zip(example, ids):
                closing = [eos] if segment.trainable and add_eos else []
                row_ids += segment_ids + closing
                row_trained += [segment.trainable] * (len(segment_ids) + len(closing))
            full_lengths.append(len(row_ids))
            if not any(row_trained[1:max_len]):   # position 0 is never a target
                n_dropped += 1
                continue
            # numpy per row right away: Python ints for a whole corpus are what the flat storage avoids
            rows.append((np.asarray(row_ids[:max_len], dtype=np.int32),
                         np.asarray(row_trained[:max_len], dtype=bool)))
    if not rows:
        raise ValueError(f"no example keeps a trained token within max_len={max_len}")
    return _stack_rows(rows, full_lengths, n_dropped)


def _stack_rows(rows: Sequence[tuple[Sequence[int], Sequence[bool]]], full_lengths: Sequence[int],
                n_dropped: int) -> EncodedExamples:
    """:class:`EncodedExamples` of (token ids, trained flags) rows."""
    offsets = np.cumsum([0] + [len(ids) for ids, _ in rows], dtype=np.int64)
    tokens = np.concatenate([np.asarray(ids, dtype=np.int32) for ids, _ in rows])
    trained = np.concatenate([np.asarray(flags, dtype=bool) for _, flags in rows])
    return EncodedExamples(torch.from_numpy(tokens), torch.from_numpy(trained), torch.from_numpy(offsets),
                           torch.tensor(full_lengths), n_dropped)


def collate(data: EncodedExamples, rows: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (B, T), T = the longest of ``rows``.

    Labels are the input ids where a token is trained and IGNORE_INDEX elsewhere (prompt, BOS,
    padding); the model shifts them, so a response token is predicted from the token before it.
    """
    pairs = [data.row(int(i)) for i in rows]
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)      # (B, T)
    labels = torch.full_like(input_ids, IGNORE_INDEX)                          # (B, T)
    attention_mask = torch.zeros_like(input_ids)                               # (B, T)
    for r, (ids, trained) in enumerate(pairs):
        input_ids[r, :len(ids)] = ids
        attention_mask[r, :len(ids)] = 1
        labels[r, :len(ids)] = torch.where(trained, ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pad_id(tokenizer) -> int:
    # LLaMA-2 and stories260K have no pad piece; padded positions are masked, so any id works
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ---------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def sequence_nll(model, batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed next-token negative log-likelihood over labelled tokens, and their count."""
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]  # (B, T-1, V)
    targets = batch["labels"][:, 1:]                                                                      # (B, T-1)
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return nll.sum(dim=1).cpu(), (targets != IGNORE_INDEX).sum(dim=1).cpu()


def _in_eval_mode(model, fn):
    was_training = model.training
    model.eval()
    try:
        return fn()
    finally:
        model.train(was_training)


def response_nll(model, data: EncodedExamples, batch_size: int, pad_id: int, device) -> dict[str, float]:
    """Token-weighted mean NLL of the labelled (response + EOS) tokens of ``data``, and its exp.

    Rows are batched shortest first (less padding; the sums do not depend on the order).
    """
    order = torch.argsort(data.lengths, stable=True).tolist()

    def run():
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            sums, counts = sequence_nll(model, collate(data, order[start:start + batch_size], pad_id), device)
            total, count = total + sums.sum().item(), count + counts.sum().item()
        return {"response_nll": total / count, "response_perplexity": math.exp(total / count),
                "response_tokens": count}
    return _in_eval_mode(model, run)


def encode_choices(choices: Sequence[ChoiceExample], tokenizer, max_len: int | None = None) -> EncodedExamples:
    """One row per (question, option): ``[BOS] prompt option``, the option's tokens labelled, no EOS.

    A row longer than ``max_len`` loses the start of its prompt (BOS stays): the question and the
    answer cue sit at the prompt's end, so a short-context model (stories260K: 512) keeps them.
    """
    pairs = [(c.prompt, option) for c in choices for option in c.options]
    data = encode_examples(pairs, tokenizer, max_len=2**31 - 1, add_eos=False)
    if len(data) != len(pairs):
        raise ValueError("an answer option encodes to no tokens")
    rows = []
    for i in range(len(data)):
        ids, trained = (t.tolist() for t in data.row(i))
        if max_len is not None and len(ids) > max_len:
            if sum(trained) > max_len - 2:
                raise ValueError(f"an answer option is longer than max_len={max_len} allows")
            keep = max_len - 1
            ids, trained = ids[:1] + ids[-keep:], trained[:1] + trained[-keep:]
        rows.append((ids, trained))
    return _stack_rows(rows, data.full_lengths.tolist(), 0)


def choice_accuracy(model, data: EncodedExamples, choices: Sequence[ChoiceExample], batch_size: int, pad_id: int,
                    device) -> dict[str, float]:
    """Accuracy (%) of picking, per question, the option with the lowest mean per-token NLL after
    the prompt (``data`` from :func:`encode_choices`): the scorer of AdaptLLM's evaluation sets."""
    def run():
        means = []
        for start in range(0, len(data), batch_size):
            sums, counts = sequence_nll(model, collate(data, range(start, min(start + batch_size, len(data))), pad_id),
                                        device)
            means += (sums / counts).tolist()
        return means
    means, hits, k = _in_eval_mode(model, run), 0, 0
    for c in choices:
        scores = means[k:k + len(c.options)]
        hits += int(min(range(len(scores)), key=scores.__getitem__) == c.answer_index)
        k += len(c.options)
    return {"choice_accuracy": 100.0 * hits / len(choices)}


# -------------------------------------------------------------------------------------- tasks

class SFTTask:
    """Supervised fine-tuning: ``batch`` gives right-padded examples, loss on responses only.

    ``batch_size`` is the global number of examples per step; process i of n gets rows i::n,
    padded to its own longest row. ``evaluate`` scores ``eval_examples`` (none: returns {}).
    """

    def __init__(self, examples: Sequence[Example | tuple[str, str]], tokenizer, batch_size: int, seed: int,
                 max_len: int, eval_examples: Sequence[Example | tuple[str, str]] = (), eval_batch_size: int = 8):
        self.tokenizer, self.batch_size, self.seed, self.max_len = tokenizer, batch_size, seed, max_len
        self.eval_batch_size, self.pad_id = eval_batch_size, _pad_id(tokenizer)
        self.data = encode_examples(examples, tokenizer, max_len)
        self.eval_data = encode_examples(eval_examples, tokenizer, max_len) if len(eval_examples) else None
        if batch_size > len(self.data):
            raise ValueError(f"train.batch_size={batch_size} exceeds the {len(self.data)} training examples")

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


def encode_texts(texts: Sequence[str], tokenizer) -> list[list[int]]:
    """``[BOS] text`` token ids per document (EOS is added by packing): how LLaMA sees a document."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for start in range(0, len(texts), _ENCODE_CHUNK)
            for ids in _tokenize(tokenizer, texts[start:start + _ENCODE_CHUNK])]


class TextTask:
    """Continual pretraining: ``[BOS] doc [EOS]`` packed into ``seq_len`` blocks, labels = inputs.

    ``evaluate``: perplexity on ``eval_texts`` packed the same way (the first ``eval_blocks``
    blocks, or all) and, given ``eval_choices``, multiple-choice accuracy with each question cut
    to ``seq_len`` tokens (:func:`encode_choices`).
    """

    def __init__(self, texts: Sequence[str], tokenizer, batch_size: int, seed: int, seq_len: int,
                 eval_texts: Sequence[str] = (), eval_choices: Sequence[ChoiceExample] = (),
                 eval_batch_size: int = 8, eval_blocks: int | None = None):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; packing needs one between documents")
        self.tokenizer, self.batch_size, self.seed, self.seq_len = tokenizer, batch_size, seed, seq_len
        self.eval_choices, self.eval_batch_size = list(eval_choices), eval_batch_size
        # scored within seq_len, the context the model is trained on
        self.choice_data = encode_choices(self.eval_choices, tokenizer, seq_len) if self.eval_choices else None
        self.blocks = pack_documents(encode_texts(texts, tokenizer), seq_len, tokenizer.eos_token_id)  # (N, T)
        self.eval_blocks = None
        if len(eval_texts):
            blocks = pack_documents(encode_texts(eval_texts, tokenizer), seq_len, tokenizer.eos_token_id)
            self.eval_blocks = blocks if eval_blocks is None else blocks[:eval_blocks]
        if batch_size > len(self.blocks):
            raise ValueError(f"train.batch_size={batch_size} exceeds the {len(self.blocks)} training blocks "
                             f"of seq_len={seq_len}")

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
                                       _pad_id(self.tokenizer), device)
        return metrics

    def describe(self) -> str:
        val = "none" if self.eval_blocks is None else f"{len(self.eval_blocks):,} blocks"
        return (f"text: {len(self.blocks):,} blocks of {self.seq_len} ({self.blocks.numel():,} tokens); "
                f"held-out text {val}; {len(self.eval_choices)} held-out questions")


# ------------------------------------------------------------------------ mini tasks (offline)

def _first(items: Sequence, n: int, what: str) -> list:
    """The first ``n`` of ``items`` (the in-loop evaluation subset); more than there are is an error."""
    if n > len(items):
        raise ValueError(f"task.n_eval={n} exceeds the {len(items)} {what}")
    return list(items[:n])


def gsm8k_task(tokenizer, batch_size: int, seed: int, max_len: int, n_eval: int = 200,
               data_root: str | Path = DEFAULT_DATA_ROOT, **kwargs) -> SFTTask:
    """The mini math task: GSM8K train in MetaMath's format; the first ``n_eval`` problems of the
    test file (which never overlaps the training file) scored in the loop."""
    heldout = _first(load_gsm8k("test", data_root), n_eval, "GSM8K test problems")
    return SFTTask(gsm8k_pairs(load_gsm8k("train", data_root)), tokenizer, batch_size, seed, max_len,
                   eval_examples=gsm8k_pairs(heldout), **kwargs)


def alpaca_task(tokenizer, batch_size: int, seed: int, max_len: int, n_eval: int = 10,
                data_root: str | Path = DEFAULT_DATA_ROOT, every: int = HELDOUT_EVERY, **kwargs) -> SFTTask:
    """The mini instruction task: the 100 Alpaca examples less every ``every``-th (the ones
    ``alpaca_local_nll`` scores: 20 of 100, :func:`~experiments.data.finetune.is_heldout`); the
    first ``n_eval`` of those held-out examples scored in the loop."""
    pairs = load_alpaca(data_root)
    train, heldout = split_heldout(len(pairs), every)
    return SFTTask([pairs[i] for i in train], tokenizer, batch_size, seed, max_len,
                   eval_examples=_first([pairs[i] for i in heldout], n_eval, "held-out Alpaca examples"), **kwargs)


def pubmed_texts(data_root: str | Path = DEFAULT_DATA_ROOT, every: int = HELDOUT_EVERY,
                 adaptllm: AdaptLLMConfig | None = AdaptLLMConfig(), general_texts: Sequence[str] = (),
                 instruction_ratio: float = 0.0, seed: int = 0):
    """(training texts, held-out abstracts, held-out questions) of the mini biomedicine task.

    Training texts are the abstracts of the training items (800 of PubMedQA-L's 1,000, the
    complement of what ``pubmedqa_local`` and ``pubmed_abstracts_ppl`` score), as AdaptLLM reading
    comprehension (titles = the items' questions, which PubMedQA takes from the article titles;
    keywords from ``general_texts``), mixed with the training Alpaca instructions at
    ``instruction_ratio``; ``adaptllm=None`` keeps the raw abstracts. Held-out items (every
    ``every``-th PMID in numeric order) give only evaluation data.
    """
    train, heldout = split_pubmedqa(load_pubmedqa(data_root), every)
    abstracts = [pubmedqa_abstract(item) for item in train]
    texts = abstracts
    if adaptllm is not None:
        keywords = domain_keywords(abstracts, general_texts) if general_texts else frozenset()
        texts = convert_corpus(abstracts, adaptllm, seed, [item.question for item in train], keywords)
    if instruction_ratio:
        alpaca = load_alpaca(data_root)
        instructions = [alpaca[i][0] + alpaca[i][1] for i in split_heldout(len(alpaca), every)[0]]
        texts = mix_with_instructions(texts, instructions, instruction_ratio, seed)
    return texts, [pubmedqa_abstract(item) for item in heldout], [pubmedqa_choice(item) for item in heldout]
