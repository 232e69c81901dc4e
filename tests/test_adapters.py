"""Every method through the same injection path on a tiny random LlamaForCausalLM; the method
registry (a toy method registered, injected, trained, saved and loaded); the state layers carry in
their state dict (MoRA's sharing groups, the base-weight-modified flag)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mora.adapters import (
    AdapterConfig, adapter_layers, adapter_state_dict, adapter_summary, build_optimizer, inject_adapters,
    load_adapter, load_adapter_state_dict, lora_layers, merge_adapters, merge_and_unload, mora_layers,
    save_adapter, trainable_parameter_count, unmerge_adapters,
)
from mora.convert import convert_official_state_dict, load_official_adapter
from mora.layer import MoRAAdapter, MoRALinear
from mora.methods import METHOD_LAYERS, METHODS, PEFT_ADAPTER, Method, get_method, register_method
from mora.restarts import merge_and_reinit

# each method once, MoRA with each operator (the paper uses rotate at r=8, share at r=256)
CASES = [dict(method=m) for m in METHODS if m != "mora"] + [
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


def test_remora_saves_merged_base_weights_and_switched_groups(tmp_path):
    model, config = make(dict(method="remora", operator="share"))
    perturb_adapters(model)
    merge_and_reinit(model, groups=("block", "block"))
    perturb_adapters(model, seed=2)
    save_adapter(model, tmp_path, config)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved.keys() == {"format", "format_version", "peft_type", "config"}  # the format marker, no side tables
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    assert all(l.mora.layout.compress_groups == "block" for l in mora_layers(fresh).values())
    torch.testing.assert_close(fresh(tokens()).logits, model(tokens()).logits)


# ------------------------------------------------------------------ state the layers carry


@pytest.mark.parametrize("method", ["relora", "remora"])
def test_restarted_layers_restore_from_their_state_dict(method):
    """After a restart (ReMoRA: with a switch of groups) the state dict alone restores the switched
    layout and the flag that the base weight holds merged updates: a fresh model loads it and gives
    identical outputs, and saves the merged base weights again."""
    case = dict(method=method, operator="share")
    model, config = make(case)
    perturb_adapters(model)
    merge_and_reinit(model, ("block", "block") if method == "remora" else None)
    perturb_adapters(model, seed=2)
    state = adapter_state_dict(model, config)
    assert all(state[f"{n}.base_weight_modified"] for n in adapter_layers(model))
    assert any(".base_layer.weight" in k for k in state)  # W0 holds trained updates now

    fresh, _ = make(case)  # cyclic groups, flags down, the untouched W0
    assert not any(layer.base_weight_modified for layer in adapter_layers(fresh).values())
    load_adapter_state_dict(fresh, state)

    assert all(layer.base_weight_modified for layer in adapter_layers(fresh).values())
    groups = {(l.mora.layout.compress_groups, l.mora.layout.decompress_groups) for l in mora_layers(fresh).values()}
    assert groups == ({("block", "block")} if method == "remora" else set())
    torch.testing.assert_close(fresh(tokens()).logits, model(tokens()).logits, rtol=0, atol=0)
    assert adapter_state_dict(fresh, config).keys() == state.keys()


def test_mora_adapter_keeps_its_groups_in_its_state_dict():
    adapter = MoRAAdapter(40, 24, 6, "share")
    with torch.no_grad():
        adapter.M.normal_()
    adapter.set_groups("block", "cyclic")
    state = adapter.state_dict()
    assert state["groups"].tolist() == [1, 0]  # indices into GROUP_KINDS = (cyclic, block)
    fresh = MoRAAdapter(40, 24, 6, "share")
    fresh.load_state_dict(state)
    assert (fresh.layout.compress_groups, fresh.layout.decompress_groups) == ("block", "cyclic")
    torch.testing.assert_close(fresh.delta_weight(), adapter.delta_weight(), rtol=0, atol=0)
    x = torch.randn(3, 40)
    torch.testing.assert_close(fresh(x), adapter(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="groups"):
        fresh.load_state_dict({**state, "groups": torch.tensor([0, 2])})


def test_base_weight_flag_is_layer_state():
    layer = MoRALinear(nn.Linear(16, 8, bias=False), MoRAAdapter(16, 8, 4, "share"))
    assert "base_weight_modified" in layer.state_dict() and not layer.base_weight_modified
    layer.merge()
    layer.unmerge()
    assert not layer.base_weight_modified  # an inference merge leaves W0 as it was
    layer.merge_and_reinit()
    assert layer.base_weight_modified
    fresh = MoRALinear(nn.Linear(16, 8, bias=False), MoRAAdapter(16, 8, 4, "share"))
    fresh.load_state_dict(layer.state_dict())
    assert fresh.base_weight_modified


# ------------------------------------------------------------------ the method registry


@torch.no_grad()
def _toy_init(layer):
    layer.lora_B[PEFT_ADAPTER].weight.fill_(0.01)


def _toy_optimizer(model, config, optimizer_cls, lr, weight_decay, **kwargs):
    """A at half B's rate: two parameter groups."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    a = [p for n, p in trainable if ".lora_A." in n]
    rest = [p for n, p in trainable if ".lora_A." not in n]
    return optimizer_cls([{"params": a, "lr": lr / 2}, {"params": rest}], lr=lr, weight_decay=weight_decay, **kwargs)


@pytest.fixture
def toy_method():
    """A LoRA-family method registered for one test: rsLoRA's α/√r scaling through peft's options,
    B started at 0.01 instead of zero, A trained at half B's learning rate."""
    method = register_method(Method("toy", layer_kind="lora", lora_options={"use_rslora": True},
                                    init_layer=_toy_init, build_optimizer=_toy_optimizer))
    yield method
    del METHODS["toy"]


def test_a_registered_method_injects_trains_saves_and_loads(toy_method, tmp_path):
    assert get_method("toy") is toy_method and METHOD_LAYERS["toy"] == "lora"
    model, config = make(dict(method="toy"), trainable_modules=("norm",))
    layers = lora_layers(model)
    assert len(layers) == 2 * 7
    for layer in layers.values():
        assert layer.scaling[PEFT_ADAPTER] == pytest.approx(config.lora_alpha / math.sqrt(config.rank))
        assert (layer.lora_B[PEFT_ADAPTER].weight == 0.01).all()
    optimizer = build_optimizer(model, config, lr=1e-2)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-3, 1e-2]

    ids = tokens(3)
    factors = {n: p.clone() for n, p in model.named_parameters() if ".lora_" in n}
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, factors[n]) for n, p in model.named_parameters() if n in factors)

    save_adapter(model, tmp_path, config)
    fresh = tiny_llama()
    assert load_adapter(fresh, tmp_path).method == "toy"
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_the_registry_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="already registered"):
        register_method(Method("lora", layer_kind="lora"))
    with pytest.raises(ValueError, match=r"method must be one of \(.*'remora'\), got method='qlora'"):
        get_method("qlora")
    with pytest.raises(ValueError, match="layer_kind"):
        Method("ia3", layer_kind="ia3")
    with pytest.raises(ValueError, match="lora_options"):
        Method("moradora", layer_kind="mora", lora_options={"use_dora": True})
    with pytest.raises(ValueError, match="no layer"):
        Method("refft", layer_kind=None, restarts=True)


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
