"""Load a llama2.c checkpoint (Karpathy's format) as a Hugging Face ``LlamaForCausalLM``.

Format (llama2.c's version-0 export): seven int32 (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, max_seq_len; vocab_size < 0 means an unshared classifier), then float32
tensors in PyTorch ``(out, in)`` layout: token embedding, attention RMSNorms, wq, wk, wv, wo, FFN
RMSNorms, w1, w2, w3, final RMSNorm, two legacy RoPE tables, and the classifier if unshared.
llama2.c rotates interleaved pairs (2i, 2i+1) while HF LLaMA rotates halves (i, i + d/2), so wq
and wk are permuted per head, the same permutation HF's own LLaMA converter applies.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

_HEADER = struct.Struct("<7i")  # llama2.c writes little-endian int32 and float32


def read_llama2c(path: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """(HF config, HF state dict) of a llama2.c ``.bin`` checkpoint."""
    raw = Path(path).read_bytes()
    header = _HEADER.unpack_from(raw)
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    shared = vocab > 0
    vocab = abs(vocab)
    head = dim // n_heads
    kv_dim = n_kv_heads * head
    data = torch.from_numpy(np.frombuffer(raw, dtype="<f4", offset=_HEADER.size).copy())
    shapes = [("embed", (vocab, dim)), ("att_norm", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
              ("wk", (n_layers, kv_dim, dim)), ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
              ("ffn_norm", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
              ("w3", (n_layers, hidden, dim)), ("norm", (dim,)), ("rope_cos", (seq_len, head // 2)),
              ("rope_sin", (seq_len, head // 2))] + ([] if shared else [("cls", (vocab, dim))])
    tensors, offset = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        if offset + size > data.numel():
            raise ValueError(f"{path}: ends inside tensor {name!r}; truncated or not a llama2.c v0 checkpoint")
        tensors[name] = data[offset:offset + size].view(shape)
        offset += size
    if offset != data.numel():
        raise ValueError(f"{path}: {data.numel() - offset} trailing floats; not a llama2.c v0 checkpoint")
    return _hf_config(header), _to_hf_state_dict(tensors, n_layers, n_heads, n_kv_heads, shared)


def read_llama2c_config(path: str | Path) -> LlamaConfig:
    """The HF config of a llama2.c checkpoint, from its header alone."""
    with open(path, "rb") as f:
        return _hf_config(_HEADER.unpack(f.read(_HEADER.size)))


def _hf_config(header: tuple[int, ...]) -> LlamaConfig:
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    return LlamaConfig(vocab_size=abs(vocab), hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
                       num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=seq_len,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=vocab > 0,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _interleaved_to_half_rotation(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from pairs (2i, 2i+1) to halves (i, i + head/2)."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _to_hf_state_dict(t: dict, n_layers: int, n_heads: int, n_kv_heads: int, shared: bool) -> dict:
    state = {"model.embed_tokens.weight": t["embed"], "model.norm.weight": t["norm"],
             "lm_head.weight": t["embed"] if shared else t["cls"]}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state |= {
            p + "input_layernorm.weight": t["att_norm"][i],
            p + "post_attention_layernorm.weight": t["ffn_norm"][i],
            p + "self_attn.q_proj.weight": _interleaved_to_half_rotation(t["wq"][i], n_heads),
            p + "self_attn.k_proj.weight": _interleaved_to_half_rotation(t["wk"][i], n_kv_heads),
            p + "self_attn.v_proj.weight": t["wv"][i],
            p + "self_attn.o_proj.weight": t["wo"][i],
            p + "mlp.gate_proj.weight": t["w1"][i],
            p + "mlp.down_proj.weight": t["w2"][i],
            p + "mlp.up_proj.weight": t["w3"][i],
        }
    return {k: v.clone() for k, v in state.items()}


def load_llama2c(path: str | Path) -> LlamaForCausalLM:
    """The checkpoint as an HF model (float32, eval mode)."""
    config, state = read_llama2c(path)
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)  # RoPE's inv_freq is a non-persistent buffer
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
