"""The C4 pretraining data (Section 5.3): spec checks, tokenizers, packing, batches, perplexity, streaming."""

from __future__ import annotations

import math
import shutil
from itertools import islice
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

import experiments.models.c4_tokenizers as c4_tokenizers
from experiments.data.c4 import json_stream_loader, local_splits, read_documents, stream_train_texts
from experiments.data.offline import DEFAULT_DATA_ROOT, OfflineDataError, verify_files
from experiments.models.c4_tokenizers import bpe_cache_key, load_t5_tokenizer, train_bpe_tokenizer
from experiments.tasks.base import batch_indices, evaluate_perplexity, pack_documents, stream_blocks
from experiments.tasks.base import tokenize as encode_documents
import experiments.tasks.c4 as c4_task
from experiments.tasks import task_spec
from experiments.tasks.c4 import C4Task, C4TaskSpec, build_tokenizer, first_blocks

ROOT = DEFAULT_DATA_ROOT
CONF = Path(__file__).resolve().parent.parent / "conf"
T5_MODEL = "tokenizers/t5_spiece.model"
SPEC = C4TaskSpec()  # the default train/validation files
MINI = dict(source="local", tokenizer="bpe", vocab_size=2048, seq_len=128, eval_batch_size=32)


def stream_of(id_lists, eos):
    """doc₀ EOS doc₁ EOS …, written out plainly as the oracle for packing."""
    return [t for ids in id_lists for t in [*ids, eos]]


@pytest.fixture(scope="module")
def splits():
    return local_splits(ROOT, SPEC.train_files, SPEC.validation_files)


@pytest.fixture(scope="module")
def train_texts(splits):
    return splits.train


@pytest.fixture(scope="module")
def val_texts(splits):
    return splits.validation


@pytest.fixture(scope="module")
def bpe(train_texts, tmp_path_factory):
    return train_bpe_tokenizer(train_texts, 2048, tmp_path_factory.mktemp("bpe-cache"))


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5-base")  # the README's offline stand-in for the hub's t5-base
    shutil.copyfile(ROOT / T5_MODEL, folder / "spiece.model")
    return folder


@pytest.fixture(scope="module")
def t5(t5_folder):
    return load_t5_tokenizer(t5_folder)


@pytest.fixture(scope="module")
def task(bpe):
    return C4Task(C4TaskSpec.from_dict(MINI), bpe, batch_size=16, seed=0, data_root=ROOT)


# --------------------------------------------------------------------------------------- spec

@pytest.mark.parametrize("override, field", [
    ({"source": "web"}, "task.source"),
    ({"tokenizer": "gpt2"}, "task.tokenizer"),
    ({"train_files": []}, "task.train_files"),
    ({"validation_files": "c4/c4-sample.01.json.gz"}, "task.validation_files"),
    ({"hub_dataset": ""}, "task.hub_dataset"),
    ({"seq_len": 1}, "task.seq_len"),
    ({"seq_len": "512"}, "task.seq_len"),
    ({"tokenizer": "bpe", "vocab_size": None}, "task.vocab_size"),
    ({"tokenizer": "bpe", "vocab_size": 200}, "task.vocab_size"),        # below the 256 bytes + specials
    ({"tokenizer": "t5", "vocab_size": 2048}, "task.vocab_size"),
    ({"eval_tokens": 0}, "task.eval_tokens"),
    ({"eval_tokens": True}, "task.eval_tokens"),
    ({"eval_batch_size": 0}, "task.eval_batch_size"),
    ({"shuffle_buffer": -1}, "task.shuffle_buffer"),
    ({"source": "hub", "eval_tokens": None}, "task.eval_tokens"),
    ({"source": "hub", "tokenizer": "bpe", "vocab_size": 2048, "eval_tokens": 10}, "task.tokenizer"),
])
def test_bad_spec_fields_are_named(override, field):
    with pytest.raises(ValueError, match=f"{field}="):
        C4TaskSpec.from_dict(override)


def test_an_unregistered_task_name_is_refused_by_the_registry():
    with pytest.raises(ValueError, match=r"task must be one of \(.*'c4'.*\), got task='c5'"):
        task_spec({"name": "c5"})
    assert isinstance(task_spec({"name": "c4", "seq_len": 64}), C4TaskSpec)


def test_spec_messages_list_allowed_values_and_unknown_fields():
    with pytest.raises(ValueError, match=r"\('local', 'hub'\)"):
        C4TaskSpec.from_dict({"source": "web"})
    with pytest.raises(ValueError, match=r"unknown fields \['seqlen'\].*seq_len"):
        C4TaskSpec.from_dict({"seqlen": 128})


@pytest.mark.parametrize("preset", ["c4_mini", "c4_paper"])
def test_the_configs_give_valid_specs(preset):
    task_cfg = OmegaConf.merge(OmegaConf.load(CONF / "task" / "c4.yaml"),
                               OmegaConf.load(CONF / "preset" / f"{preset}.yaml")["task"])
    spec = C4TaskSpec.from_dict(OmegaConf.to_container(task_cfg, resolve=True))
    assert isinstance(spec.train_files, tuple) and spec.validation_files == SPEC.validation_files


# ---------------------------------------------------------------------------------- tokenizers

def test_bpe_round_trips_real_c4_text(bpe, train_texts, val_texts):
    assert len(bpe) == 2048 and (bpe.pad_token_id, bpe.eos_token_id) == (0, 1)
    sample = train_texts[:20] + val_texts  # byte-level: exact, unseen documents included
    ids = encode_documents(bpe, sample)
    assert [bpe.decode(doc) for doc in ids] == sample
    assert sum(map(len, ids)) < sum(map(len, sample)) / 2.5  # merges were learned (~3 characters per token)
    assert bpe.eos_token_id not in bpe("a </s> b", add_special_tokens=False)["input_ids"]  # text is text


def test_bpe_is_trained_on_the_train_split_only_and_cached(train_texts, val_texts, tmp_path, monkeypatch):
    spec = C4TaskSpec.from_dict(MINI)
    first = build_tokenizer(spec, ROOT, tmp_path)
    # one cache file, keyed by the training documents alone (adding validation text changes the key)
    assert [p.name for p in tmp_path.iterdir()] == [f"bpe-{bpe_cache_key(train_texts, 2048)}.json"]
    assert bpe_cache_key(train_texts + val_texts, 2048) != bpe_cache_key(train_texts, 2048)
    assert bpe_cache_key(train_texts, 4096) != bpe_cache_key(train_texts, 2048)

    def no_training(*args, **kwargs):
        raise AssertionError("the second call retrained instead of reading the cache")
    monkeypatch.setattr(c4_tokenizers.trainers, "BpeTrainer", no_training)
    second = build_tokenizer(spec, ROOT, tmp_path)
    assert second.get_vocab() == first.get_vocab()
    assert second(val_texts[0])["input_ids"] == first(val_texts[0])["input_ids"]


def test_bpe_cache_folder_is_created_on_a_fresh_machine(train_texts, tmp_path):
    # a new machine has no ~/.cache/mora-repro/tokenizers yet; the first C4 run must create it
    cache = tmp_path / "not" / "yet" / "made"
    tokenizer = train_bpe_tokenizer(train_texts[:20], 300, cache)
    assert len(tokenizer) == 300
    assert [p.name for p in cache.iterdir()] == [f"bpe-{bpe_cache_key(train_texts[:20], 300)}.json"]


def test_t5_stand_in_is_the_t5_base_vocabulary(t5, t5_folder, val_texts):
    assert len(t5) == 32_100 and (t5.pad_token_id, t5.eos_token_id) == (0, 1)
    from_file = build_tokenizer(C4TaskSpec(tokenizer="t5", t5_tokenizer=T5_MODEL), ROOT)  # checked .model
    ids = t5(val_texts[0], add_special_tokens=False)["input_ids"]
    assert from_file(val_texts[0], add_special_tokens=False)["input_ids"] == ids
    assert t5.decode(ids).split() == val_texts[0].split()  # sentencepiece normalises whitespace only


def test_validation_documents_are_held_out_of_training(splits):
    raw_train = read_documents(ROOT, SPEC.train_files)
    # the offline validation files repeat the training file's first 30 documents
    assert len(raw_train) == 1000 and splits.validation == raw_train[:30]
    assert splits.removed_from_train == 30 and splits.train == raw_train[30:]
    assert not set(splits.train) & set(splits.validation)


def test_unlisted_data_files_are_refused():
    with pytest.raises(OfflineDataError, match="not listed"):
        read_documents(ROOT, ["c4/not-there.json.gz"])


# ------------------------------------------------------------------------------------- packing

def test_packing_real_documents_keeps_the_stream_prefix(bpe, train_texts):
    ids = encode_documents(bpe, train_texts)
    stream = stream_of(ids, bpe.eos_token_id)
    for seq_len in (128, 333):  # 727K tokens: several internal flushes
        blocks = pack_documents(ids, seq_len, bpe.eos_token_id)
        assert blocks.dtype == torch.long and blocks.shape == (len(stream) // seq_len, seq_len)
        assert blocks.flatten().tolist() == stream[:blocks.numel()]  # nothing dropped or repeated
        assert len(stream) - blocks.numel() < seq_len                # only the partial tail is left out


def test_packing_edge_cases():
    docs = [[5, 6, 7], [], [8] * 10, []]  # empty documents still end with EOS; one longer than a block
    stream = stream_of(docs, 1)
    assert stream == [5, 6, 7, 1, 1] + [8] * 10 + [1, 1]
    assert torch.equal(pack_documents(docs, 4, eos_id=1), torch.tensor(stream[:16]).view(4, 4))
    assert torch.equal(pack_documents(docs, 5, eos_id=1), torch.tensor(stream[:15]).view(3, 5))
    assert torch.equal(pack_documents(docs, 17, eos_id=1), torch.tensor([stream]))  # exactly one block
    with pytest.raises(ValueError, match="17 tokens.*fewer than seq_len=18"):
        pack_documents(docs, 18, eos_id=1)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        pack_documents([], 4, eos_id=1)


def test_stream_blocks_are_the_packed_rows(t5, val_texts):
    packed = pack_documents(encode_documents(t5, val_texts), 64, t5.eos_token_id)
    streamed = torch.stack(list(stream_blocks(iter(val_texts), t5, 64, t5.eos_token_id)))
    assert torch.equal(streamed, packed)


# ------------------------------------------------------------------------------- local batches

def test_local_task_shapes_and_description(task):
    n_train, seq_len = task.train_blocks.shape
    assert seq_len == 128 and n_train > 5000 and len(task.validation_blocks) > 100
    assert task.vocab_size == 2048 and (task.pad_token_id, task.eos_token_id) == (0, 1)
    assert int(task.train_blocks.max()) < task.vocab_size
    text = task.describe()
    assert "\n" not in text and f"{n_train:,} blocks" in text and "vocab 2,048" in text
    assert "30 validation docs held out" in text


def test_batches_are_a_pure_function_of_the_step(task, bpe):
    later = task.batch(7)["input_ids"]
    for step in range(7):
        task.batch(step)
    assert torch.equal(task.batch(7)["input_ids"], later)       # any call order, e.g. after a resume
    batch = task.batch(3)
    assert batch["input_ids"].shape == (16, 128) and torch.equal(batch["labels"], batch["input_ids"])
    assert not torch.equal(task.batch(3)["input_ids"], task.batch(4)["input_ids"])
    other_seed = C4Task(task.spec, bpe, batch_size=16, seed=1, data_root=ROOT)
    assert torch.equal(other_seed.train_blocks, task.train_blocks)
    assert not torch.equal(other_seed.batch(7)["input_ids"], later)


def test_one_epoch_visits_each_block_once(task):
    index_of = {tuple(row.tolist()): i for i, row in enumerate(task.train_blocks)}
    n_blocks = len(task.train_blocks)
    assert len(index_of) == n_blocks  # blocks of real text are distinct, so rows identify blocks
    per_epoch = n_blocks // 16         # the last partial batch of each epoch is dropped
    seen = [index_of[tuple(row.tolist())] for step in range(per_epoch) for row in task.batch(step)["input_ids"]]
    assert len(seen) == len(set(seen)) == per_epoch * 16
    assert n_blocks - len(seen) < 16
    next_epoch = task.batch(per_epoch)["input_ids"]
    assert not torch.equal(next_epoch, task.batch(0)["input_ids"])  # reshuffled
    assert torch.equal(next_epoch, task.train_blocks[batch_indices(n_blocks, 16, per_epoch, 0)])


@pytest.mark.parametrize("num_processes", [2, 3, 16])
def test_process_slices_partition_the_global_batch(task, num_processes):
    whole = task.batch(11)["input_ids"]
    parts = [task.batch(11, p, num_processes)["input_ids"] for p in range(num_processes)]
    assert sum(len(p) for p in parts) == len(whole)
    for p, part in enumerate(parts):
        assert torch.equal(part, whole[p::num_processes])


def test_batch_larger_than_the_data_is_refused(bpe):
    spec = C4TaskSpec.from_dict({**MINI, "seq_len": 256})
    with pytest.raises(ValueError, match="train.batch_size=4000 exceeds"):
        C4Task(spec, bpe, batch_size=4000, seed=0, data_root=ROOT)


def test_eval_tokens_round_up_to_blocks_and_must_exist():
    blocks = torch.arange(40).view(10, 4)
    assert torch.equal(first_blocks(blocks, 9, 4), blocks[:3])
    assert torch.equal(first_blocks(blocks, None, 4), blocks)
    with pytest.raises(ValueError, match="task.eval_tokens=41"):
        first_blocks(blocks, 41, 4)


# ---------------------------------------------------------------------------------- evaluation

def manual_token_mean_ce(model, blocks):
    """Σ over every block and position of −log p(next token), divided by the count: plain loops."""
    total, n = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            log_probs = torch.log_softmax(model(input_ids=block[None]).logits[0].double(), dim=-1)
            for t in range(len(block) - 1):
                total -= log_probs[t, block[t + 1]].item()
                n += 1
    return total / n, n


def test_perplexity_is_exp_of_the_token_weighted_mean(task):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=task.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    blocks = task.validation_blocks[:37]
    model.eval()
    expected, n = manual_token_mean_ce(model, blocks)
    model.train()
    got = evaluate_perplexity(model, blocks, batch_size=8, device=torch.device("cpu"))  # last batch: 5
    assert model.training  # train mode restored
    assert got["tokens"] == n == 37 * 127
    assert got["loss"] == pytest.approx(expected, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
    model.eval()
    full = task.evaluate(model, torch.device("cpu"))
    assert not model.training  # the caller's mode is kept either way
    assert full["tokens"] == len(task.validation_blocks) * 127
    assert 6.0 < full["loss"] < 9.0  # about log(2048) = 7.6 for an untrained model


# ----------------------------------------------------------------------------------- streaming

@pytest.fixture(scope="module")
def local_stream():
    train = [str(p) for p in verify_files(ROOT, SPEC.train_files)]
    validation = [str(p) for p in verify_files(ROOT, SPEC.validation_files)]
    return json_stream_loader({"train": train, "validation": validation})


def streamed_task(t5, loader, monkeypatch, **override):
    def no_hub(*args, **kwargs):
        raise AssertionError("the test contacted the hub loader")
    monkeypatch.setattr(c4_task, "hub_stream_loader", no_hub)
    spec = C4TaskSpec.from_dict({"source": "hub", "tokenizer": "t5", "hub_dataset": "no-such/dataset",
                                 "seq_len": 64, "eval_tokens": 1000, "shuffle_buffer": 0, **override})
    return C4Task(spec, t5, batch_size=4, seed=0, data_root=ROOT, load_stream=loader)


def test_streaming_path_on_local_files_packs_like_the_local_path(t5, local_stream, val_texts, monkeypatch):
    train_texts = read_documents(ROOT, SPEC.train_files)  # the stream reads the file as it is
    task = streamed_task(t5, local_stream, monkeypatch)
    assert task.vocab_size == 32_100
    expected_val = pack_documents(encode_documents(t5, val_texts), 64, 1)[:math.ceil(1000 / 64)]
    assert torch.equal(task.validation_blocks, expected_val)
    expected_train = pack_documents(encode_documents(t5, train_texts[:40]), 64, 1)  # a prefix of the stream
    n_steps = len(expected_train) // 4
    streamed = torch.cat([task.batch(step)["input_ids"] for step in range(n_steps)])
    assert torch.equal(streamed, expected_train[:n_steps * 4])
    assert "no-such/dataset/en" in task.describe()


def test_streaming_fast_forwards_and_never_goes_back(t5, local_stream, monkeypatch):
    straight = streamed_task(t5, local_stream, monkeypatch)
    wanted = [straight.batch(step)["input_ids"] for step in range(6)]
    resumed = streamed_task(t5, local_stream, monkeypatch)
    assert torch.equal(resumed.batch(5)["input_ids"], wanted[5])   # steps 0-4 consumed and discarded
    halves = [resumed.batch(5, p, 2)["input_ids"] for p in range(2)]  # the same step again, per process
    assert torch.equal(torch.cat([halves[0], halves[1]]), wanted[5][[0, 2, 1, 3]])
    with pytest.raises(ValueError, match="step 3 was already streamed"):
        resumed.batch(3)


def test_streamed_training_texts_are_shuffled_by_seed_and_epoch(local_stream):
    train_texts = read_documents(ROOT, SPEC.train_files)
    def first(seed, n=1000 + 20):
        return list(islice(stream_train_texts(local_stream, seed, shuffle_buffer=100), n))
    a, b, c = first(0), first(0), first(1)
    assert a == b and a[:20] != c[:20]
    assert sorted(a[:1000]) == sorted(train_texts)        # an epoch is a permutation of the documents
    assert a[1000:] != a[:20]                              # the next epoch is reshuffled
    assert list(islice(stream_train_texts(local_stream, 0, 0), 1020)) == train_texts + train_texts[:20]
