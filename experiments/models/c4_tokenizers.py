"""The tokenizers of C4 pretraining (Section 5.3): t5-base, as ReLoRA and the paper, or a small
byte-level BPE trained on the offline training split (a 32K vocabulary would dominate a CPU-sized
model: its embedding and head would hold most of the parameters)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, T5TokenizerFast

from experiments.files import atomic_write_text

# T5's layout: pad 0, EOS 1, unk 2. A byte-level BPE never needs <unk>; it is there so every
# tokenizer of the task has the same three special tokens at the same ids.
BPE_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
BYTE_ALPHABET = 256
DEFAULT_TOKENIZER_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mora-repro" / "tokenizers"


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
    path.parent.mkdir(parents=True, exist_ok=True)   # a fresh machine has no cache folder yet
    atomic_write_text(path, backend.to_str())
    return _wrap_bpe(backend)


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
