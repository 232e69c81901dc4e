"""UUID-pair memorisation (Section 3 and Section 5.1).

Random UUID pairs carry no knowledge a pretrained model could reuse, so everything the model
gets right after fine-tuning was memorised from the training pairs. A sequence is
``[BOS] key <separator> value [EOS]``; the loss covers the value and EOS only. Evaluation
generates greedily after ``key <separator>`` and scores character-level accuracy (Table 2):
the fraction of the 36 value characters that match position by position.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

import torch

from experiments.models.sp_tokenizer import encode_characters
from experiments.tasks.base import IGNORE_INDEX, TaskSpec, TokenizerVocabulary, batch_indices, check_spec_ints, eval_mode


@dataclass(frozen=True)
class UUIDTaskSpec(TaskSpec):
    """conf/task/uuid.yaml: how many pairs, from which seed, and how evaluation reads them."""

    name: str = "uuid"
    n_pairs: int = 10_000
    pair_seed: int = 1234
    separator: str = ":"
    eval_pairs: int | None = None      # score the first N pairs (None: all)
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        check_spec_ints(self, {"n_pairs": 1, "pair_seed": 0, "eval_pairs": 1, "eval_batch_size": 1},
                        optional=("eval_pairs",))
        if self.eval_pairs is not None and self.eval_pairs > self.n_pairs:
            raise ValueError(f"task.eval_pairs={self.eval_pairs} exceeds task.n_pairs={self.n_pairs}")

    def check_train(self, batch_size: int) -> None:
        if batch_size > self.n_pairs:
            raise ValueError(f"train.batch_size={batch_size} exceeds task.n_pairs={self.n_pairs}")


def make_uuid_pairs(n_pairs: int, seed: int) -> list[tuple[str, str]]:
    """``n_pairs`` (key, value) UUID4 strings, deterministic in ``seed``, all 2·n distinct."""
    rng = random.Random(seed)
    seen: set[str] = set()
    strings: list[str] = []
    while len(strings) < 2 * n_pairs:
        text = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        if text not in seen:  # a repeat is astronomically unlikely, but keys must be unique
            seen.add(text)
            strings.append(text)
    return list(zip(strings[0::2], strings[1::2]))


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids of every pair: prompts (BOS key sep) and targets (value EOS), equal lengths."""

    prompts: torch.Tensor   # (n, P)
    targets: torch.Tensor   # (n, V)
    values: list[str]


def encode_pairs(pairs: list[tuple[str, str]], tokenizer, separator: str) -> EncodedPairs:
    """One token per character (BPE would merge hex digits such as "ed" in half the UUIDs), so every
    prompt and target has the same length and accuracy is per character."""
    prompts = [[tokenizer.bos_token_id] + encode_characters(tokenizer, k + separator) for k, _ in pairs]
    targets = [encode_characters(tokenizer, v, add_prefix_space=False) + [tokenizer.eos_token_id] for _, v in pairs]
    return EncodedPairs(torch.tensor(prompts), torch.tensor(targets), [v for _, v in pairs])


def training_batch(data: EncodedPairs, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """input_ids (B, P+V) and labels with the prompt masked out (loss on value + EOS)."""
    prompts, targets = data.prompts[indices], data.targets[indices]
    input_ids = torch.cat([prompts, targets], dim=1)
    labels = torch.cat([torch.full_like(prompts, IGNORE_INDEX), targets], dim=1)
    return {"input_ids": input_ids, "labels": labels}


def character_accuracy(predicted: str, expected: str) -> float:
    """Fraction of ``expected``'s characters matched at the same position (Table 2's metric)."""
    hits = sum(p == e for p, e in zip(predicted, expected))
    return hits / len(expected)


@torch.no_grad()
def evaluate_uuid(model, tokenizer, data: EncodedPairs, batch_size: int, device: torch.device,
                  limit: int | None = None) -> dict[str, float]:
    """Greedy generation of every value; mean character accuracy and exact-match rate."""
    n = len(data.values) if limit is None else min(limit, len(data.values))
    new_tokens = data.targets.shape[1]
    scores, exact = [], 0
    with eval_mode(model):
        for start in range(0, n, batch_size):
            prompts = data.prompts[start:start + batch_size].to(device)
            out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                                 pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, prompts.shape[1]:], skip_special_tokens=True)
            for text, value in zip(texts, data.values[start:start + batch_size]):
                predicted = text.replace(" ", "")[:len(value)]
                scores.append(character_accuracy(predicted, value))
                exact += predicted == value
    return {"char_accuracy": 100.0 * sum(scores) / n, "exact_match": 100.0 * exact / n}


class UUIDTask(TokenizerVocabulary):
    """The UUID task as the training loop sees it: deterministic batches and an evaluation."""

    lm_eval = None  # scored in the loop only (Table 2's character accuracy)

    def __init__(self, spec: UUIDTaskSpec, tokenizer, batch_size: int, seed: int):
        spec.check_train(batch_size)
        self.spec, self.tokenizer, self.batch_size, self.seed = spec, tokenizer, batch_size, seed
        self.data = encode_pairs(make_uuid_pairs(spec.n_pairs, spec.pair_seed), tokenizer, spec.separator)

    def batch(self, step: int, process_index: int = 0, num_processes: int = 1) -> dict[str, torch.Tensor]:
        """This process's share of the global batch of ``step``."""
        indices = batch_indices(self.spec.n_pairs, self.batch_size, step, self.seed)
        return training_batch(self.data, indices[process_index::num_processes])

    def evaluate(self, model, device: torch.device) -> dict[str, float]:
        return evaluate_uuid(model, self.tokenizer, self.data, self.spec.eval_batch_size, device,
                             self.spec.eval_pairs)

    def describe(self) -> str:
        n_eval = self.spec.n_pairs if self.spec.eval_pairs is None else self.spec.eval_pairs
        return (f"UUID pairs: {self.spec.n_pairs:,} (pair seed {self.spec.pair_seed}), "
                f"{self.data.prompts.shape[1]} prompt + {self.data.targets.shape[1]} target tokens each, "
                f"{self.batch_size} per step; evaluation generates {n_eval:,} values")


def build_uuid_task(spec: UUIDTaskSpec, tokenizer, *, batch_size: int, seed: int, data_root) -> UUIDTask:
    """The registry's builder; ``data_root`` is unused (the pairs are generated)."""
    if tokenizer is None:
        raise ValueError("task=uuid fine-tunes a pretrained model and uses its tokenizer; "
                         "model.source=config (a model built from scratch) has none")
    return UUIDTask(spec, tokenizer, batch_size, seed)
