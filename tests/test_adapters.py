"""Every method through the same injection path on a tiny random LlamaForCausalLM."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mora.adapters import (
    METHOD_LAYERS, AdapterConfig, adapter_layers, adapter_state_dict, adapter_summary, build_optimizer,
    inject_adapters, load_adapter, load_adapter_state_dict, lora_layers, merge_adapters, merge_and_reinit,
    merge_and_unload, mora_layers, save_adapter, trainable_parameter_count, unmerge_adapters,
)
from mora.convert import convert_official_state_dict, load_official_adapter

# each method once, MoRA with each operator (the paper uses rotate at r=8, share at r=256)
CASES = [dict(method=m) for m in METHOD_LAYERS if m != "mora"] + [
    dict(method="mora", operator=op) for op in ("truncate", "share", "decouple", "rotate")]
IDS = [c["method"] + ("-" + c["operator"] if "operator" in c else "") for c in CASES]


def tiny_llama(seed=0, **config):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, **config)
    return LlamaForCausalLM(config).eval()


def make(case, seed=0, **overrides):
    model = tiny_llama(seed)
    config = AdapterConfig(**{"rank": 2, **case, **overrides})
    return inject_adapters(model, config), config


def perturb_adapters(model, seed=1):
    """Give every trainable adapter tensor non-zero values so merges have something to merge."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and (".mora." in name or ".lora_B." in name):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def tokens(seed=0):
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_zero_init_equals_base(case):
    ids = tokens()
    base_logits = tiny_llama()(ids).logits
    model, _ = make(case)
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [c for c in CASES if c["method"] != "fft"], ids=IDS[1:])
def test_merged_equals_unmerged_equals_unloaded(case):
    model, _ = make(case)
    model.double()
    perturb_adapters(model)
    ids = tokens()
    unmerged = model(ids).logits
    weights = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    merge_adapters(model)
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-9, atol=1e-9)
    unmerge_adapters(model)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-9, atol=1e-9)
    plain = merge_and_unload(model)
    assert not adapter_layers(plain)
    assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(plain(ids).logits, unmerged, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_only_where_they_should_be(case):
    model, config = make(case, trainable_modules=("embed_tokens", "norm", "lm_head"))
    perturb_adapters(model)
    model(tokens(), labels=tokens()).loss.backward()
    for name, p in model.named_parameters():
        expected = (config.method == "fft" or ".mora." in name or "lora_B" in name
                    or "lora_magnitude" in name or ("lora_A" in name and config.method != "asylora")
                    or name.split(".")[-2].endswith(("embed_tokens", "norm", "lm_head")))
        assert p.requires_grad == expected, name
        assert (p.grad is not None) == expected, name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_few_steps_reduce_the_loss(case):
    model, config = make(case)
    model.train()
    optimizer = build_optimizer(model, config, lr=1e-2)
    ids = tokens(3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("case", [c for c in CASES if c["method"] != "fft"], ids=IDS[1:])
def test_save_and_load_round_trip(case, tmp_path):
    model, config = make(case, trainable_modules=("norm",))
    perturb_adapters(model)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)  # a trained non-adapter parameter must be saved too
    save_adapter(model, tmp_path, config)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    ids = tokens()
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not any(".base_layer." in k for k in saved)  # only adapters and trained modules
    # "norm" names every RMSNorm: 2 per decoder layer and the final one
    assert len({k for k in saved if "norm" in k}) == 2 * 2 + 1


def test_fft_of_a_tied_model_saves_and_loads(tmp_path):
    """FFT saves every weight once: lm_head tied to the embedding (stories260K) is not saved twice,
    which safetensors would refuse, and checkpoints that hold the alias still load."""
    config = AdapterConfig(method="fft")
    model = inject_adapters(tiny_llama(tie_word_embeddings=True), config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # full fine-tuning moved every weight, the tied one too
    state = adapter_state_dict(model, config)
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    assert state.keys() == dict(model.named_parameters()).keys()
    save_adapter(model, tmp_path, config)
    ids = tokens()
    for load in (lambda fresh: load_adapter(fresh, tmp_path),
                 lambda fresh: load_adapter_state_dict(fresh, model.state_dict())):  # alias included
        fresh = tiny_llama(seed=1, tie_word_embeddings=True)
        load(fresh)
        assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_unloaded_model_saves_with_save_pretrained(tmp_path):
    model, _ = make(dict(method="mora", operator="rotate"))
    perturb_adapters(model)
    ids = tokens()
    expected = model(ids).logits
    merge_and_unload(model).save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_mora_matches_lora_budget_and_summary():
    model, config = make(dict(method="mora", operator="share"), rank=4)
    rows = adapter_summary(model)
    assert len(rows) == 2 * 7
    for row in rows:
        lora = (row["in_features"] + row["out_features"]) * 4
        assert abs(row["params"] - lora) <= 2 * row["r_hat"] + 1  # nearest rounding of √
    assert trainable_parameter_count(model) == sum(r["params"] for r in rows)


def test_relora_merge_and_reinit_keeps_function_and_resets_factors():
    model, _ = make(dict(method="relora"))
    perturb_adapters(model)
    ids = tokens()
    before = model(ids).logits
    merge_and_reinit(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
    for layer in lora_layers(model).values():
        assert layer.lora_B["default"].weight.abs().sum() == 0
        assert layer.lora_A["default"].weight.abs().sum() > 0  # Kaiming, not zero (ReLoRA issue #18)


def test_relora_saves_merged_base_weights(tmp_path):
    model, config = make(dict(method="remora", operator="share"))
    perturb_adapters(model)
    merge_and_reinit(model, groups=("block", "block"))
    perturb_adapters(model, seed=2)
    save_adapter(model, tmp_path, config)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    assert all(l.mora.layout.compress_groups == "block" for l in mora_layers(fresh).values())
    torch.testing.assert_close(fresh(tokens()).logits, model(tokens()).logits)


def test_asylora_a_is_orthonormal_and_frozen():
    model, config = make(dict(method="asylora"))
    for layer in lora_layers(model).values():
        A = layer.lora_A["default"].weight
        torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0]), rtol=1e-5, atol=1e-5)
        assert not A.requires_grad
        assert layer.scaling["default"] == config.lora_alpha / config.rank


def test_loraplus_gives_b_a_larger_learning_rate():
    model, config = make(dict(method="loraplus"), loraplus_ratio=4.0)
    optimizer = build_optimizer(model, config, lr=1e-3)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert lr_of[id(p)] == pytest.approx(4e-3)
        elif "lora_A" in name:
            assert lr_of[id(p)] == pytest.approx(1e-3)


def _train_single_linear(layer, target, steps=60):
    optimizer = torch.optim.Adam([layer.mora.M], lr=0.05)
    x = torch.randn(256, target.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = (layer(x) - x @ target.T).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("switch,expect_growth", [(True, True), (False, False)])
def test_remora_layout_switch_raises_rank_beyond_r_hat(switch, expect_growth):
    """Appendix B: merging with the same groups keeps rank(ΔW) ≤ r̂; switching them lets it grow."""
    from mora.layer import MoRAAdapter, MoRALinear

    torch.manual_seed(0)
    base = nn.Linear(64, 64, bias=False).double().requires_grad_(False)
    layer = MoRALinear(base, MoRAAdapter(64, 64, 8, "share").double())
    w0 = base.weight.clone()
    target = torch.randn(64, 64, dtype=torch.float64)
    _train_single_linear(layer, target)
    layer.merge_and_reinit(groups=("block", "block") if switch else None)
    _train_single_linear(layer, target)
    layer.merge()
    rank = torch.linalg.matrix_rank(base.weight - w0).item()
    assert (rank > 8) == expect_growth and rank <= 16


@pytest.mark.parametrize("kwargs,field", [
    (dict(method="qlora"), "method"), (dict(rank=0), "rank"), (dict(rank=2.5), "rank"),
    (dict(operator="rotation"), "operator"), (dict(padding="same"), "padding"),
    (dict(rounding="ceil"), "rounding"), (dict(loraplus_ratio=0.5), "loraplus_ratio"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdapterConfig(**kwargs)


def test_targets_that_match_nothing_are_an_error():
    with pytest.raises(ValueError, match="q_prj.*available"):
        inject_adapters(tiny_llama(), AdapterConfig(method="mora", rank=2, target_modules=("q_prj",)))
    with pytest.raises(ValueError, match="trainable_modules"):
        inject_adapters(tiny_llama(), AdapterConfig(method="lora", rank=2, trainable_modules=("embedding",)))


def test_official_checkpoint_converts(tmp_path):
    """A state dict in the official fork's layout (M under lora_A and lora_B) loads exactly."""
    ours, _ = make(dict(method="mora", operator="rotate"), target_modules=("q_proj", "down_proj"))
    perturb_adapters(ours)
    official = {}
    for name, layer in mora_layers(ours).items():
        M = layer.mora.M.detach().clone()
        official[f"base_model.model.{name}.lora_A.weight"] = M
        official[f"base_model.model.{name}.lora_B.weight"] = M.clone()
    save_file(official, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "use_mora": True, "mora_type": 6, "r": 2, "lora_alpha": 16,
         "lora_dropout": 0.0, "target_modules": ["q_proj", "down_proj"]}))
    fresh = tiny_llama()
    config = load_official_adapter(fresh, tmp_path)
    assert config.operator == "rotate"
    torch.testing.assert_close(fresh(tokens()).logits, ours(tokens()).logits)
    official["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] += 1
    with pytest.raises(ValueError, match="lora_B differs"):
        convert_official_state_dict(official)
