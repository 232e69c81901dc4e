"""The UUID memorisation task (Section 3): pairs, encoding, loss masking, batch order, accuracy."""

from __future__ import annotations

import re

import pytest
import torch

from experiments.models.loading import STORIES260K
from experiments.data.offline import DEFAULT_DATA_ROOT
from experiments.models.sp_tokenizer import load_sentencepiece_tokenizer
from experiments.tasks.base import IGNORE_INDEX, batch_indices
from experiments.tasks.uuid_memory import (UUIDTask, UUIDTaskSpec, character_accuracy, encode_pairs,
                                   make_uuid_pairs, training_batch)

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


@pytest.fixture(scope="module")
def tokenizer():
    return load_sentencepiece_tokenizer(DEFAULT_DATA_ROOT / STORIES260K[1])


def test_pairs_are_deterministic_distinct_uuid4():
    pairs = make_uuid_pairs(50, seed=1234)
    assert pairs == make_uuid_pairs(50, seed=1234)
    assert pairs != make_uuid_pairs(50, seed=1235)
    assert make_uuid_pairs(10, seed=1234) == pairs[:10]  # more pairs extend, never reshuffle
    strings = [s for pair in pairs for s in pair]
    assert len(strings) == 100 and len(set(strings)) == 100
    assert all(UUID4.match(s) for s in strings), [s for s in strings if not UUID4.match(s)]


def test_encoding_has_fixed_lengths_and_decodes_back(tokenizer):
    pairs = make_uuid_pairs(20, seed=0)
    data = encode_pairs(pairs, tokenizer, separator=":")
    # prompt: BOS, sentencepiece's dummy-prefix ▁, 36 key characters, ":"; target: 36 characters, EOS
    assert data.prompts.shape == (20, 1 + 1 + 36 + 1) and data.targets.shape == (20, 36 + 1)
    assert (data.prompts[:, 0] == tokenizer.bos_token_id).all()
    assert (data.targets[:, -1] == tokenizer.eos_token_id).all()
    assert data.values == [v for _, v in pairs]
    for (key, value), prompt, target in zip(pairs, data.prompts, data.targets):
        assert tokenizer.decode(prompt, skip_special_tokens=True) == key + ":"
        assert tokenizer.decode(target, skip_special_tokens=True) == value
        assert tokenizer.decode(torch.cat([prompt, target]), skip_special_tokens=True) == f"{key}:{value}"


def test_training_batch_masks_the_prompt(tokenizer):
    data = encode_pairs(make_uuid_pairs(6, seed=0), tokenizer, separator=":")
    indices = torch.tensor([4, 1, 3])
    batch = training_batch(data, indices)
    prompt_len = data.prompts.shape[1]
    assert batch["input_ids"].shape == batch["labels"].shape == (3, prompt_len + data.targets.shape[1])
    assert torch.equal(batch["input_ids"], torch.cat([data.prompts[indices], data.targets[indices]], dim=1))
    assert (batch["labels"][:, :prompt_len] == IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][:, prompt_len:], data.targets[indices])  # value and EOS


def test_batch_indices_cover_each_pair_once_per_epoch():
    n, b = 12, 4  # 3 steps per epoch
    for epoch in range(3):
        seen = torch.cat([batch_indices(n, b, step, seed=7) for step in range(3 * epoch, 3 * epoch + 3)])
        assert sorted(seen.tolist()) == list(range(n)), epoch
    first, second = (torch.cat([batch_indices(n, b, s, seed=7) for s in range(e * 3, e * 3 + 3)]) for e in (0, 1))
    assert not torch.equal(first, second)  # reshuffled every epoch


def test_batch_indices_drop_the_last_partial_batch():
    n, b = 10, 4  # 2 full batches per epoch; 2 pairs sit out each epoch
    for epoch in range(3):
        seen = torch.cat([batch_indices(n, b, step, seed=0) for step in (2 * epoch, 2 * epoch + 1)]).tolist()
        assert len(seen) == 8 and len(set(seen)) == 8


def test_batch_indices_are_a_pure_function_of_step_and_seed():
    expected = [batch_indices(12, 4, step, seed=3) for step in range(9)]
    torch.manual_seed(123)  # the global RNG and the order of calls must not matter
    torch.rand(5)
    for step in reversed(range(9)):
        assert torch.equal(batch_indices(12, 4, step, seed=3), expected[step])
    assert any(not torch.equal(batch_indices(12, 4, step, seed=4), expected[step]) for step in range(9))


def test_task_batch_splits_the_global_batch_across_processes(tokenizer):
    spec = UUIDTaskSpec(name="uuid", n_pairs=8, pair_seed=1, separator=":", eval_pairs=None, eval_batch_size=8)
    task = UUIDTask(spec, tokenizer, batch_size=4, seed=0)
    whole = task.batch(5)
    parts = [task.batch(5, process_index=i, num_processes=2) for i in range(2)]
    assert sorted(map(tuple, whole["input_ids"].tolist())) == sorted(
        tuple(row) for p in parts for row in p["input_ids"].tolist())
    with pytest.raises(ValueError, match="batch_size"):
        UUIDTask(spec, tokenizer, batch_size=9, seed=0)


@pytest.mark.parametrize("predicted, expected, accuracy", [
    ("abcd", "abcd", 1.0),
    ("abxd", "abcd", 0.75),
    ("xxxx", "abcd", 0.0),
    ("ab", "abcd", 0.5),          # a short answer scores its missing characters as wrong
    ("abcdef", "abcd", 1.0),      # extra characters are ignored
    ("bcd", "abcd", 0.0),         # position by position: a shifted answer scores nothing
    ("", "abcd", 0.0),
])
def test_character_accuracy(predicted, expected, accuracy):
    assert character_accuracy(predicted, expected) == accuracy
