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
  be trained on the training split.
- ``hub`` (paper scale): ``allenai/c4`` (config ``en``) streamed, shuffled with a buffer, tokenised
  and packed on the fly; a cursor makes ``batch(step)`` repeatable after a restart by replaying
  the stream up to the requested step.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from itertools import count, islice
from pathlib import Path

import numpy as np
import tokenizers
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, T5TokenizerFast

from experiments.data.offline import verify_files
from experiments.tasks.uuid_memory import batch_indices

SOURCES = ("local", "hub")
TOKENIZERS = ("bpe", "t5")
# T5's layout: pad 0, EOS 1, unk 2. A byte-level BPE never needs <unk>; it is there so every
# tokenizer of this task has the same three special tokens at the same ids.
BPE_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
BYTE_ALPHABET = 256
DEFAULT_TOKENIZER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mora-repro" / "tokenizers"
_ENCODE_CHUNK_DOCS = 1024   # documents per batch-encode call: large enough for the Rust thread pool
_STREAM_CHUNK_DOCS = 64     # smaller when streaming, so the first batch does not wait on many documents
_FLUSH_TOKENS = 1 << 16     # tokens buffered before cutting blocks (one tensor per flush, not per doc)


# ----------------------------------------------------------------------------------------- spec

def _fail(field: str, expected: str, value) -> None:
    raise ValueError(f"task.{field} must be {expected}, got task.{field}={value!r}")


def _check_int(field: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        _fail(field, f"an integer >= {minimum}" + (" or null" if allow_none else ""), value)


@dataclass(frozen=True)
class C4TaskSpec:
    """The task's config (conf/task/c4.yaml), validated on construction; :meth:`from_dict` takes lists too."""

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

    @classmethod
    def from_dict(cls, d: dict) -> C4TaskSpec:
        """Validate ``d`` (e.g. the composed ``task`` config); raises ValueError naming ``task.<field>``."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"task has unknown fields {unknown}; allowed: {allowed}")
        values = {k: tuple(v) if k.endswith("_files") and isinstance(v, (list, tuple)) else v for k, v in d.items()}
        return cls(**values)

    def __post_init__(self) -> None:
        choices = {"name": ("c4",), "source": SOURCES, "tokenizer": TOKENIZERS}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                _fail(field, f"one of {allowed}", getattr(self, field))
        for field in ("train_files", "validation_files"):
            files = getattr(self, field)
            if not isinstance(files, tuple) or not files or not all(isinstance(f, str) and f for f in files):
                _fail(field, "a non-empty list of paths relative to data_root", files)
        for field in ("hub_dataset", "hub_config", "t5_tokenizer"):
            if not isinstance(getattr(self, field), str) or not getattr(self, field):
                _fail(field, "a non-empty string", getattr(self, field))
        _check_int("seq_len", self.seq_len, 2)  # a block must predict at least one token
        _check_int("eval_tokens", self.eval_tokens, 1, allow_none=True)
        _check_int("eval_batch_size", self.eval_batch_size, 1)
        _check_int("shuffle_buffer", self.shuffle_buffer, 0)
        self._validate_combinations()

    def _validate_combinations(self) -> None:
        if self.tokenizer == "bpe":
            _check_int("vocab_size", self.vocab_size, BYTE_ALPHABET + len(BPE_SPECIAL_TOKENS))
        elif self.vocab_size is not None:
            _fail("vocab_size", f"null with task.tokenizer={self.tokenizer!r} (its vocabulary is fixed; "
                  "vocab_size applies to task.tokenizer='bpe')", self.vocab_size)
        if self.source == "hub" and self.tokenizer != "t5":
            _fail("tokenizer", "'t5' with task.source='hub' (a BPE is trained on a local training split)",
                  self.tokenizer)
        if self.source == "hub" and self.eval_tokens is None:
            _fail("eval_tokens", "a positive integer with task.source='hub' (the validation split is "
                  "streamed, so the number of tokens scored must be fixed)", self.eval_tokens)


# ----------------------------------------------------------------------------------- tokenizers

def _wrap_bpe(backend: Tokenizer) -> PreTrainedTokenizerFast:
    # split_special_tokens: a document containing the text "</s>" gets its characters, not EOS.
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", split_special_tokens=True,
                                   clean_up_tokenization_spaces=False)


def bpe_cache_key(texts: Sequence[str], vocab_size: int) -> str:
    """Hash of the training texts, vocabulary size and trainer version: equal keys, equal tokenizers."""
    digest = hashlib.sha256(f"bpe-v1|{tokenizers.__version__}|{vocab_size}|{BPE_SPECIAL_TOKENS}".encode())
    for text in texts:
        data = text.encode()
        digest.update(len(data).to_bytes(8, "little"))  # length prefix: ["ab", "c"] != ["a", "bc"]
        digest.update(data)
    return digest.hexdigest()[:24]


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int,
                        cache_dir: str | Path = DEFAULT_TOKENIZER_CACHE) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` tokens (special tokens included) trained on ``texts``.

    Training is deterministic; the result is cached as ``cache_dir/bpe-<key>.json`` (see
    :func:`bpe_cache_key`) so repeated runs and every process of one run share one vocabulary.
    """
    path = Path(cache_dir) / f"bpe-{bpe_cache_key(texts, vocab_size)}.json"
    if path.is_file():
        return _wrap_bpe(Tokenizer.from_file(str(path)))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer)
    _atomic_write_text(path, backend.to_str())
    return _wrap_bpe(backend)


def _atomic_write_text(path: Path, text: str) -> None:
    """Write then rename, so a concurrent reader (another rank) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def load_t5_tokenizer(name_or_path: str | Path) -> T5TokenizerFast:
    """The t5-base tokenizer (32,100 tokens: 32,000 pieces and 100 sentinels; pad 0, EOS 1).

    ``name_or_path``: a hub id, a folder holding ``spiece.model``, or a SentencePiece ``.model`` file
    (read through a temporary folder, since ``vocab_file=`` silently builds a broken tokenizer).
    """
    path = Path(name_or_path)
    if path.is_file():
        with tempfile.TemporaryDirectory() as folder:
            shutil.copyfile(path, Path(folder) / "spiece.model")
            return T5TokenizerFast.from_pretrained(folder)
    return T5TokenizerFast.from_pretrained(str(name_or_path))


def read_documents(data_root: str | Path, relative_paths: Iterable[str]) -> list[str]:
    """The ``text`` of every JSON line of the files (``.gz`` or plain), each checked against SHA256SUMS."""
    texts = []
    for path in verify_files(data_root, relative_paths):
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")) as f:
            texts.extend(json.loads(line)["text"] for line in f if line.strip())
    return texts


@dataclass(frozen=True)
class LocalSplits:
    train: list[str]
    validation: list[str]
    removed_from_train: int   # training documents dropped because they are validation documents


def local_splits(spec: C4TaskSpec, data_root: str | Path) -> LocalSplits:
    """Training and validation documents, with every validation document held out of training.

    The offline validation files are not disjoint from the training file (c4-sample.0{1,2,3} are
    its first 30 documents), so exact copies are removed from the training side here; without
    this, validation perplexity would be measured on training data.
    """
    validation = read_documents(data_root, spec.validation_files)
    held_out = set(validation)
    train = read_documents(data_root, spec.train_files)
    kept = [text for text in train if text not in held_out]
    return LocalSplits(kept, validation, len(train) - len(kept))


def build_tokenizer(spec: C4TaskSpec, data_root: str | Path,
                    cache_dir: str | Path = DEFAULT_TOKENIZER_CACHE) -> PreTrainedTokenizerFast:
    """The spec's tokenizer: a BPE trained on the training split only, or t5-base."""
    if spec.tokenizer == "bpe":
        return train_bpe_tokenizer(local_splits(spec, data_root).train, spec.vocab_size, cache_dir)
    name = spec.t5_tokenizer
    if name.endswith(".model"):  # a SentencePiece file in the offline data: checked like every data file
        name = verify_files(data_root, [name])[0]
    return load_t5_tokenizer(name)


def encode_documents(tokenizer, texts: Sequence[str], desc: str = "tokenizing") -> list[list[int]]:
    """Token ids of each text, no special tokens (EOS is added by packing); batch-encoded."""
    chunks = range(0, len(texts), _ENCODE_CHUNK_DOCS)
    ids: list[list[int]] = []
    for start in tqdm(chunks, desc=desc, disable=len(chunks) < 2):
        # verbose=False: documents longer than model_max_length are expected; they are packed, not fed whole
        ids.extend(tokenizer(list(texts[start:start + _ENCODE_CHUNK_DOCS]), add_special_tokens=False,
                             return_attention_mask=False, verbose=False)["input_ids"])
    return ids


# -------------------------------------------------------------------------------------- packing

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


def _take_blocks(blocks: Iterator[torch.Tensor], n: int, what: str) -> torch.Tensor:
    taken = list(islice(blocks, n))
    if len(taken) < n:
        raise ValueError(f"{what}: the stream ended after {len(taken)} of {n} blocks")
    return torch.stack(taken)


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


# ------------------------------------------------------------------------------------ streaming

def hub_stream_loader(dataset: str, config: str) -> Callable[[str], Iterable[dict]]:
    """``split -> streamed rows`` of a hub dataset (contacts the hub when called)."""
    def load(split: str):
        from datasets import load_dataset  # imported here: only the hub path needs datasets
        return load_dataset(dataset, config, split=split, streaming=True)
    return load


def json_stream_loader(files_by_split: dict[str, Sequence[str | Path]]) -> Callable[[str], Iterable[dict]]:
    """``split -> streamed rows`` of local JSON-lines files: the hub path, run offline."""
    def load(split: str):
        from datasets import load_dataset
        files = [str(p) for p in files_by_split[split]]
        return load_dataset("json", data_files={split: files}, split=split, streaming=True)
    return load


def stream_train_texts(load_stream: Callable[[str], Iterable[dict]], seed: int, shuffle_buffer: int) -> Iterator[str]:
    """Training texts, epoch after epoch, reshuffled per epoch (``set_epoch``) when a buffer is set."""
    stream = load_stream("train")
    if shuffle_buffer:
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
    for epoch in count():
        if hasattr(stream, "set_epoch"):
            stream.set_epoch(epoch)
        n_rows = 0
        for row in stream:
            n_rows += 1
            yield row["text"]
        if n_rows == 0:
            raise ValueError("the streamed train split is empty")


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
        self._last = _take_blocks(self.blocks, self.batch_size, f"train step {self.next_step}")
        self.next_step += 1
        return self._last


# ----------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate_perplexity(model, blocks: torch.Tensor, batch_size: int, device) -> dict[str, float]:
    """Token-weighted mean next-token cross-entropy over ``blocks`` (n, T) and its exp.

    Each block predicts its tokens 1…T−1 from the ones before; summing losses and counting tokens
    (instead of averaging batch means) keeps the mean exact when the last batch is smaller.
    """
    was_training = model.training
    model.eval()
    total, scored = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size].to(device)              # (B, T)
        logits = model(input_ids=ids).logits[:, :-1].float()          # (B, T-1, V)
        targets = ids[:, 1:]                                           # (B, T-1)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                 reduction="sum").item()
        scored += targets.numel()
    model.train(was_training)
    loss = total / scored
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": scored}


# ----------------------------------------------------------------------------------------- task

class C4Task:
    """C4 as the training loop sees it: ``batch(step)`` (a pure function of the step) and ``evaluate``.

    ``batch_size`` is the global number of blocks per step; process ``i`` of ``n`` gets rows i::n.
    ``load_stream`` (source=hub) maps a split name to its streamed rows; the default streams
    ``spec.hub_dataset``; :func:`json_stream_loader` runs the same path on local files.
    """

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
        splits = local_splits(spec, data_root)
        self.train_blocks = pack_documents(encode_documents(self.tokenizer, splits.train, "tokenizing C4 train"),
                                           spec.seq_len, eos)                            # (N, T)
        self.validation_blocks = first_blocks(pack_documents(encode_documents(self.tokenizer, splits.validation),
                                                             spec.seq_len, eos), spec.eval_tokens, spec.seq_len)
        if self.batch_size > len(self.train_blocks):
            raise ValueError(f"train.batch_size={self.batch_size} exceeds the {len(self.train_blocks)} training "
                             f"blocks of task.seq_len={spec.seq_len}")
        self._global_batch = self._permuted_batch
        self._origin = (f"train {len(splits.train):,} docs ({splits.removed_from_train} validation docs held out) "
                        f"-> {len(self.train_blocks):,} blocks ({self.train_blocks.numel():,} tokens); "
                        f"validation {len(splits.validation):,} docs")

    def _init_streamed(self, load_stream) -> None:
        spec, eos = self.spec, self.eos_token_id
        val_texts = (row["text"] for row in load_stream("validation"))  # unshuffled: a fixed, stated prefix
        n_val = math.ceil(spec.eval_tokens / spec.seq_len)
        self.validation_blocks = _take_blocks(stream_blocks(val_texts, self.tokenizer, spec.seq_len, eos),
                                              n_val, "validation")
        train = stream_blocks(stream_train_texts(load_stream, self.seed, spec.shuffle_buffer), self.tokenizer,
                              spec.seq_len, eos)
        self._global_batch = StreamedBatches(train, self.batch_size)
        self._origin = (f"train streamed from {spec.hub_dataset}/{spec.hub_config} (shuffle buffer "
                        f"{spec.shuffle_buffer}, seed {self.seed}); validation: first blocks of its stream")

    def _permuted_batch(self, step: int) -> torch.Tensor:
        return self.train_blocks[batch_indices(len(self.train_blocks), self.batch_size, step, self.seed)]

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

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
