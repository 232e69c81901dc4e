"""Base models: llama2.c checkpoints from the offline data folder (checked against SHA256SUMS
first), Hugging Face hub models for paper-scale runs, and LLaMA models built from a config and
randomly initialised for pretraining from scratch (Section 5.3)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from experiments.models.llama2c import load_llama2c, read_llama2c_config
from experiments.models.local_base import load_local_base
from experiments.data.offline import DEFAULT_DATA_ROOT, verify_files
from experiments.models.sp_tokenizer import load_sentencepiece_tokenizer

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


def build_llama_from_config(spec, vocab_size: int, seed: int, dtype: str = "float32") -> LlamaForCausalLM:
    """A randomly initialised LLaMA (RMSNorm, SwiGLU, RoPE) of ``spec``'s shape.

    The initialisation draws from its own generator seeded with ``seed`` alone, so every method of
    one seed starts from the identical W₀ (Section 5.3 compares adapters on the same frozen random
    weights), and the same call rebuilds W_init exactly for the ΔW spectra of Fig. 5.
    """
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_llama_config(spec, vocab_size))
    finally:
        torch.random.set_rng_state(state)  # the run's own RNG stream does not depend on the model size
    return model.to(DTYPES[dtype])


def _llama_config(spec, vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads or spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings or 2048,
        tie_word_embeddings=bool(spec.tie_word_embeddings), rms_norm_eps=1e-6, rope_theta=10000.0)


def model_skeleton(spec, data_root: str | Path):
    """``spec``'s model without weights (on the meta device, built in milliseconds): enough to check
    module names (``target_modules``) before the weights are read, downloaded or pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if spec.source == "llama2c":
        config = read_llama2c_config(verify_files(data_root, [spec.path])[0])
    elif spec.source == "hub":
        config = AutoConfig.from_pretrained(spec.hub_id)
    else:  # config, local_base: built from the spec's shape; the vocabulary does not change the names
        config = _llama_config(spec, vocab_size=1)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(spec, data_root: str | Path, dtype: str = "float32"):
    """(model, tokenizer) for a :class:`experiments.schema.ModelSpec`, by its ``source``."""
    if spec.source == "llama2c":
        model, tokenizer = load_llama2c_with_tokenizer(data_root, spec.path, spec.tokenizer)
        return model.to(DTYPES[dtype]), tokenizer
    if spec.source == "hub":
        return load_hub_model(spec.hub_id, DTYPES[dtype])
    if spec.source == "local_base":
        return load_local_base(spec, data_root, DTYPES[dtype])
    raise ValueError(f"model.source={spec.source!r} cannot be loaded by load_model (allowed: llama2c, hub, local_base); "
                     "source=config models are built by build_llama_from_config")
