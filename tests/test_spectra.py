"""experiments/evaluation/spectra.py: effective weights of every method, rank of ΔW, counts per module type, I/O."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from experiments.evaluation.spectra import (FIG5_MODULE_TYPES, SPECTRA_FILE, count_above, delta_spectra,
                                 effective_linear_weights, load_spectra, normalise_name, save_spectra)
from mora.adapters import LLAMA_TARGETS, AdapterConfig, adapter_layers, inject_adapters, merge_adapters
from mora.restarts import merge_and_reinit

METHODS = ("fft", "lora", "relora", "mora", "remora", "dora", "asylora")
RANK = 2


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=64)
    return LlamaForCausalLM(config).eval()


def adapted(method, seed=0):
    return inject_adapters(tiny_llama(seed), AdapterConfig(method=method, rank=RANK))


@torch.no_grad()
def perturb(model, seed=1, scale=0.1):
    """Non-zero values in every trained tensor (FFT: the weights themselves), as training would leave."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad and (".mora." in name or ".lora_" in name or "_proj" in name):
            p.add_(scale * torch.randn(p.shape, generator=g))


def assert_reproduces_layers(model):
    """layer(x) == x @ W_eff.T (+ bias) for every targeted linear."""
    weights = effective_linear_weights(model)
    assert len(weights) == 2 * len(LLAMA_TARGETS)
    x = torch.randn(3, 64)
    with torch.no_grad():
        for name, weight in weights.items():
            layer = model.get_submodule(name)
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else getattr(layer, "base_layer", layer)
            inputs = x[:, :weight.shape[1]]  # (3, k)
            expected = inputs @ weight.T + (0 if base.bias is None else base.bias)
            torch.testing.assert_close(layer(inputs), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- effective weights


@pytest.mark.parametrize("method", METHODS)
def test_effective_weight_reproduces_the_layer(method):
    model = adapted(method)
    perturb(model)
    assert_reproduces_layers(model)


@pytest.mark.parametrize("method", ["relora", "remora"])
def test_effective_weight_after_merge_and_reinit_and_when_merged(method):
    model = adapted(method)
    perturb(model)
    merge_and_reinit(model, ("block", "block") if method == "remora" else None)
    perturb(model, seed=2)  # W0 now holds the first cycle's update, the adapter the second's
    assert_reproduces_layers(model)
    before = effective_linear_weights(model)
    merge_adapters(model)
    after = effective_linear_weights(model)
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_keys_are_the_same_before_and_after_injection(method):
    plain = effective_linear_weights(tiny_llama())
    assert list(effective_linear_weights(adapted(method))) == list(plain)
    assert all(".base_layer" not in k and k.split(".")[-1] in LLAMA_TARGETS for k in plain)
    assert "model.layers.1.mlp.down_proj" in plain
    with pytest.raises(ValueError, match="no linear layer matches"):
        effective_linear_weights(tiny_llama(), target_modules=())  # FFT's adapter config targets nothing


def test_normalise_name():
    assert normalise_name("model.layers.0.self_attn.q_proj.base_layer") == "model.layers.0.self_attn.q_proj"
    assert normalise_name("a.base_layer.b") == "a.b" and normalise_name("a.q_proj") == "a.q_proj"


def test_effective_weights_are_copies():
    model = tiny_llama()
    weights = effective_linear_weights(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(1.0)  # FFT trains the weight in place
    assert not torch.equal(weights["model.layers.0.self_attn.q_proj"], model.model.layers[0].self_attn.q_proj.weight)


# ---------------------------------------------------------------- rank of ΔW


def numerical_rank(values, rel=1e-5):
    return int((values > rel * values[0]).sum())


def spectra_after_training(method):
    model = adapted(method)
    initial = effective_linear_weights(model)
    perturb(model)
    return model, delta_spectra(initial, effective_linear_weights(model))


def test_lora_update_has_rank_r():
    _, spectra = spectra_after_training("lora")
    assert all(numerical_rank(s) == RANK for s in spectra.values())


def test_mora_share_update_has_rank_at_most_r_hat_and_above_lora():
    model, spectra = spectra_after_training("mora")
    layers = adapter_layers(model)
    for name, values in spectra.items():
        assert RANK < numerical_rank(values) <= layers[name].mora.r_hat


def test_fft_random_update_is_full_rank():
    _, spectra = spectra_after_training("fft")
    shapes = {n: min(w.shape) for n, w in effective_linear_weights(tiny_llama()).items()}
    assert all(len(s) == shapes[n] and numerical_rank(s) == shapes[n] for n, s in spectra.items())


def test_delta_spectra_are_float32_descending_singular_values():
    g = torch.Generator().manual_seed(0)
    initial = {"a.q_proj": torch.randn(6, 4, generator=g, dtype=torch.float64)}
    final = {"a.q_proj": initial["a.q_proj"] + torch.randn(6, 4, generator=g, dtype=torch.float64)}
    (values,) = delta_spectra(initial, final).values()
    assert values.dtype == torch.float32 and values.shape == (4,) and torch.all(values[:-1] >= values[1:])
    expected = torch.linalg.svdvals(final["a.q_proj"] - initial["a.q_proj"]).float()
    torch.testing.assert_close(values, expected)
    with pytest.raises(KeyError):
        delta_spectra(initial, {"b.q_proj": final["a.q_proj"]})
    with pytest.raises(ValueError, match="shape"):
        delta_spectra(initial, {"a.q_proj": torch.zeros(4, 6)})


# ---------------------------------------------------------------- counts and files


def test_count_above_averages_layers_per_type_in_the_papers_order():
    spectra = {"model.layers.0.mlp.gate_proj": torch.tensor([0.3, 0.2]),
               "model.layers.0.self_attn.q_proj": torch.tensor([1.0, 0.5, 0.1, 0.05]),  # 2 (> is strict)
               "model.layers.1.self_attn.q_proj": torch.tensor([0.2, 0.01, 0.0, 0.0]),  # 1
               "model.layers.1.mlp.up_proj": torch.tensor([0.09])}
    counts = count_above(spectra)
    assert counts == {"q_proj": 1.5, "up_proj": 0.0, "gate_proj": 2.0}
    assert list(counts) == [t for t in FIG5_MODULE_TYPES if t in counts]
    assert count_above(spectra, threshold=0.0)["q_proj"] == 3.0


def test_save_load_round_trip(tmp_path):
    _, spectra = spectra_after_training("mora")
    path = save_spectra(tmp_path, spectra)  # a run folder: the file goes inside
    assert path == tmp_path / SPECTRA_FILE
    for loaded in (load_spectra(tmp_path), load_spectra(path)):
        assert set(loaded) == set(spectra)
        for name, values in spectra.items():
            assert loaded[name].dtype == torch.float32
            torch.testing.assert_close(loaded[name], values, rtol=0, atol=0)
    assert count_above(load_spectra(tmp_path)) == count_above(spectra)
