"""Examples as tensors, and their held-out scores: what the fine-tuning tasks train and evaluate on.

An example (:mod:`experiments.data.finetune`) becomes ``[BOS] prompt response [EOS]`` (several
turns for a conversation) with only the response tokens and their EOS labelled; many examples are
stored flat (:class:`EncodedExamples`) and collated right-padded. Held-out scores are those that
move on a tiny model: token-weighted response negative log-likelihood, and multiple-choice
accuracy by the lowest mean option NLL (AdaptLLM's scorer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from experiments.data.finetune import ChoiceExample, Example, as_example
from experiments.tasks.base import IGNORE_INDEX, eval_mode, tokenize

_EXAMPLES_PER_CHUNK = 4096  # examples encoded together: bounds the Python lists alive at once


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
                    add_eos: bool = True, limit: int | None = None) -> EncodedExamples:
    """``[BOS] segment₀ segment₁ …`` per example, EOS after each trainable segment (if ``add_eos``).

    Each segment is tokenised on its own, so a prompt/response boundary is a token boundary (one
    tokenisation of the joined text can merge across it, and masking by the prompt's token count
    would then be off by a token). Sequences
    longer than ``max_len`` keep their first ``max_len`` tokens: the prompt's start survives and a
    long response loses its end (and EOS). An example with no labelled token left is dropped and
    counted in ``n_dropped``. ``limit``: stop after that many kept examples (the rest is not read).
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (BOS and one trained token), got {max_len}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("the tokenizer has no EOS token; a response must end with one")
    rows, full_lengths, n_dropped = [], [], 0
    for start in range(0, len(examples), _EXAMPLES_PER_CHUNK):
        if limit is not None and len(rows) >= limit:
            break
        chunk = [as_example(e) for e in examples[start:start + _EXAMPLES_PER_CHUNK]]
        ids = iter(tokenize(tokenizer, [segment.text for example in chunk for segment in example]))
        for example in chunk:
            if limit is not None and len(rows) >= limit:
                break
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
    return stack_rows(rows, full_lengths, n_dropped)


def stack_rows(rows: Sequence[tuple[Sequence[int], Sequence[bool]]], full_lengths: Sequence[int],
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


def padding_token_id(tokenizer) -> int:
    # LLaMA-2 and stories260K have no pad piece; padded positions are masked, so any id works
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def sequence_nll(model, batch: dict[str, torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed next-token negative log-likelihood over labelled tokens, and their count."""
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]  # (B, T-1, V)
    targets = batch["labels"][:, 1:]                                                                      # (B, T-1)
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return nll.sum(dim=1).cpu(), (targets != IGNORE_INDEX).sum(dim=1).cpu()


def response_nll(model, data: EncodedExamples, batch_size: int, pad_id: int, device) -> dict[str, float]:
    """Token-weighted mean NLL of the labelled (response + EOS) tokens of ``data``, and its exp.

    Rows are batched shortest first (less padding; the sums do not depend on the order).
    """
    order = torch.argsort(data.lengths, stable=True).tolist()
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            sums, counts = sequence_nll(model, collate(data, order[start:start + batch_size], pad_id), device)
            total, count = total + sums.sum().item(), count + counts.sum().item()
    return {"response_nll": total / count, "response_perplexity": math.exp(total / count),
            "response_tokens": count}


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
    return stack_rows(rows, data.full_lengths.tolist(), 0)


def choice_accuracy(model, data: EncodedExamples, choices: Sequence[ChoiceExample], batch_size: int, pad_id: int,
                    device) -> dict[str, float]:
    """Accuracy (%) of picking, per question, the option with the lowest mean per-token NLL after
    the prompt (``data`` from :func:`encode_choices`): the scorer of AdaptLLM's evaluation sets."""
    means = []
    with eval_mode(model):
        for start in range(0, len(data), batch_size):
            rows = range(start, min(start + batch_size, len(data)))
            sums, counts = sequence_nll(model, collate(data, rows, pad_id), device)
            means += (sums / counts).tolist()
    hits, k = 0, 0
    for c in choices:
        scores = means[k:k + len(c.options)]
        hits += int(min(range(len(scores)), key=scores.__getitem__) == c.answer_index)
        k += len(c.options)
    return {"choice_accuracy": 100.0 * hits / len(choices)}


def encode_texts(texts: Sequence[str], tokenizer) -> list[list[int]]:
    """``[BOS] text`` token ids per document (EOS is added by packing): how LLaMA sees a document."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in tokenize(tokenizer, texts)]
