"""Base models: llama2.c checkpoints from the offline data folder (checked against SHA256SUMS
first) and Hugging Face hub models for paper-scale runs."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from experiments.llama2c import load_llama2c
from experiments.offline_data import DEFAULT_DATA_ROOT, verify_files
from experiments.sp_tokenizer import load_sentencepiece_tokenizer

STORIES260K = ("models/stories260K/stories260K.bin", "models/stories260K/tok512.model")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_llama2c_with_tokenizer(data_root: str | Path, checkpoint: str, tokenizer: str):
    """A llama2.c model and its SentencePiece tokenizer, both verified against SHA256SUMS."""
    checkpoint_path, tokenizer_path = verify_files(data_root, (checkpoint, tokenizer))
    return load_llama2c(checkpoint_path), load_sentencepiece_tokenizer(tokenizer_path)


def load_stories260k(data_root: str | Path = DEFAULT_DATA_ROOT) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Karpathy's 260K-parameter TinyStories LLaMA (dim 64, 5 layers, vocab 512) and its tokenizer."""
    return load_llama2c_with_tokenizer(data_root, *STORIES260K)


def load_hub_model(hub_id: str, dtype: torch.dtype):
    """A causal LM and tokenizer from the Hugging Face hub (paper scale; needs network or a cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hub_id)
    if tokenizer.pad_token_id is None:  # LLaMA-2 has none; padded positions are masked anyway
        tokenizer.pad_token = tokenizer.unk_token
    return AutoModelForCausalLM.from_pretrained(hub_id, dtype=dtype), tokenizer


def load_model(spec, data_root: str | Path, dtype: str = "float32"):
    """(model, tokenizer) for a :class:`experiments.schema.ModelSpec`, by its ``source``."""
    if spec.source == "llama2c":
        model, tokenizer = load_llama2c_with_tokenizer(data_root, spec.path, spec.tokenizer)
        return model.to(DTYPES[dtype]), tokenizer
    if spec.source == "hub":
        return load_hub_model(spec.hub_id, DTYPES[dtype])
    raise ValueError(f"model.source={spec.source!r} cannot be loaded by load_model (allowed: llama2c, hub)")
