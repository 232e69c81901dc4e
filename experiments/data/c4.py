"""C4 documents (Section 5.3): the offline sample (1,000 real C4-en documents, checked against
SHA256SUMS) or ``allenai/c4`` streamed from the hub, and the same streaming path run on local files."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path

from experiments.data.columns import require_columns
from experiments.data.offline import verify_files


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


def local_splits(data_root: str | Path, train_files: Sequence[str], validation_files: Sequence[str]) -> LocalSplits:
    """Training and validation documents, with every validation document held out of training.

    The offline validation files are not disjoint from the training file (c4-sample.0{1,2,3} are
    its first 30 documents), so exact copies are removed from the training side here; without
    this, validation perplexity would be measured on training data.
    """
    validation = read_documents(data_root, validation_files)
    held_out = set(validation)
    train = read_documents(data_root, train_files)
    kept = [text for text in train if text not in held_out]
    return LocalSplits(kept, validation, len(train) - len(kept))


def hub_stream_loader(dataset: str, config: str) -> Callable[[str], Iterable[dict]]:
    """``split -> streamed rows`` of a hub dataset (contacts the hub when called)."""
    def load(split: str):
        from datasets import load_dataset  # imported here: only the hub path needs datasets
        return require_columns(load_dataset(dataset, config, split=split, streaming=True), ("text",),
                               f"{dataset} config {config}", split)
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
