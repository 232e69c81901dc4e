"""What loads where (issue 13, probe 7): ``save_pretrained`` on an adapted model, ``save_adapter``
with nothing to save, and which folders peft's ``PeftModel.from_pretrained`` and our
``load_adapter`` read. Tiny random LLaMA models as in tests/test_adapters.py."""

import json
from dataclasses import asdict

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from mora.adapters import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT, FORMAT_VERSION, MORA_CONFIG, AdapterConfig, adapter_layers,
    adapter_state_dict, build_optimizer, inject_adapters, load_adapter, merge_and_unload, save_adapter,
)
from mora.methods import METHODS
from mora.restarts import merge_and_reinit
from tests.test_adapters import make, tiny_llama, tokens

PEFT_BACKED = [m for m, method in METHODS.items() if method.layer_kind == "lora"]
OURS = [m for m, method in METHODS.items() if method.layer_kind != "lora"]  # fft, mora, remora
ADAPTED = [m for m in METHODS if METHODS[m].layer_kind is not None]


def trained(method, steps=3, seed=0, **overrides):
    """A tiny LLaMA with ``method`` injected (rank 2, the norms trainable) after a few AdamW steps,
    so that every trained tensor (A, B, DoRA's magnitude, M, the norms) has moved."""
    model, config = make(dict(method=method), seed=seed, **{"trainable_modules": ("norm",), **overrides})
    train(model, config, steps)
    return model, config


def train(model, config, steps):
    optimizer = build_optimizer(model, config, lr=2e-2)
    ids = tokens(3)
    for _ in range(steps):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()


def logits(model):
    with torch.no_grad():
        return model(tokens()).logits


# ------------------------------------------------------------------ save_pretrained


@pytest.mark.parametrize("method", ADAPTED)
def test_save_pretrained_refuses_an_adapted_model_and_names_what_to_call(method, tmp_path):
    """Before the fix it wrote ``*.base_layer.weight`` / ``*.mora.M`` and from_pretrained gave random
    projections; now it refuses before writing anything."""
    model, _ = trained(method, steps=1)
    with pytest.raises(RuntimeError, match=r"save_adapter\(model, directory, config\).*merge_and_unload\(model\)"
                                           r"\.save_pretrained\(directory\)"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("method", ["lora", "dora", "relora", "mora", "remora"])
def test_merge_and_unload_then_save_pretrained_is_the_trained_model(method, tmp_path):
    model, config = trained(method)
    if METHODS[method].restarts:  # W0 holds a merged update, the adapters a later one
        merge_and_reinit(model)
        train(model, config, steps=2)
    expected = logits(model)
    merged = merge_and_unload(model)
    merged.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert saved.keys() <= merged.state_dict().keys()
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor, merged.state_dict()[key], rtol=0, atol=0)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)


def test_fft_saves_with_save_pretrained(tmp_path):
    model, _ = trained("fft", steps=1)
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(logits(LlamaForCausalLM.from_pretrained(tmp_path).eval()), logits(model))


# ------------------------------------------------------------------ save_adapter with nothing to save


@pytest.mark.parametrize("method", ["lora", "mora"])
def test_save_adapter_refuses_a_model_whose_adapters_were_unloaded(method, tmp_path):
    """Before the fix it silently wrote an adapter with no tensors."""
    model, config = trained(method, steps=1)
    merge_and_unload(model)
    with pytest.raises(ValueError, match=r"no adapter layers.*merge_and_unload.*save_pretrained"):
        save_adapter(model, tmp_path / "adapter", config)
    with pytest.raises(ValueError, match="no adapter layers"):
        adapter_state_dict(model, config)  # the checkpoint path refuses too
    assert not (tmp_path / "adapter").exists()


def test_save_adapter_refuses_layers_of_another_method(tmp_path):
    model, _ = trained("lora", steps=1)
    with pytest.raises(ValueError, match=r"method='mora' injects mora layers, the model holds lora layers"):
        save_adapter(model, tmp_path, make(dict(method="mora"))[1])


# ------------------------------------------------------------------ peft-backed methods: peft's format


@pytest.mark.parametrize("method", PEFT_BACKED)
def test_peft_backed_adapters_load_with_peft_and_with_load_adapter(method, tmp_path):
    """Before the fix PeftModel.from_pretrained raised KeyError 'peft_type'."""
    model, config = trained(method)
    expected = logits(model)
    save_adapter(model, tmp_path, config)

    saved = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert saved["peft_type"] == "LORA" and saved["use_dora"] == (method == "dora")
    assert saved["modules_to_save"] == ["norm"] and saved["r"] == config.rank
    assert all(k.startswith("base_model.model.") for k in load_file(str(tmp_path / ADAPTER_WEIGHTS)))

    peft_model = PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model), expected, rtol=0, atol=1e-6)

    fresh = tiny_llama(seed=0)
    assert load_adapter(fresh, tmp_path).method == method
    torch.testing.assert_close(logits(fresh.eval()), expected, rtol=0, atol=0)
    assert all(p.requires_grad == q.requires_grad for p, q in zip(fresh.parameters(), model.parameters()))


TRANSFORMERS_DORA = pytest.mark.xfail(strict=True, reason=(
    "transformers 5.23's model.load_adapter leaves DoRA's magnitude vectors at their initial values, "
    "for folders peft itself writes too; strict, so that a fixed transformers makes the README's table fail"))


@pytest.mark.parametrize("method", [pytest.param(m, marks=TRANSFORMERS_DORA) if m == "dora" else m for m in PEFT_BACKED])
def test_transformers_load_adapter_reads_the_lora_family(method, tmp_path):
    """transformers' own peft integration (``model.load_adapter``) reads the same folder."""
    model, config = trained(method)
    save_adapter(model, tmp_path, config)
    base = tiny_llama()
    base.load_adapter(tmp_path)
    torch.testing.assert_close(logits(base.eval()), logits(model), rtol=0, atol=1e-6)


def test_relora_after_a_restart_loads_with_peft_and_restores_its_flags(tmp_path):
    """The merged W0 of a restarted layer goes into the file beside A and B; peft's loader loads every
    key its model has, so PeftModel gives the trained model's logits too."""
    model, config = trained("relora")
    merge_and_reinit(model)
    train(model, config, steps=2)
    expected = logits(model)
    save_adapter(model, tmp_path, config)
    saved = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert any(k.endswith(".base_layer.weight") for k in saved)
    assert not any("base_weight_modified" in k for k in saved)  # our flag; peft's layers have none

    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()), expected,
                               rtol=0, atol=1e-6)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    assert all(layer.base_weight_modified for layer in adapter_layers(fresh).values())
    torch.testing.assert_close(logits(fresh.eval()), expected, rtol=0, atol=0)


def test_a_tied_embedding_trained_through_peft_stays_tied(tmp_path):
    """stories260K ties lm_head to embed_tokens; training the embedding must change both after peft loads."""
    config = AdapterConfig(method="lora", rank=2, trainable_modules=("embed_tokens",))
    model = inject_adapters(tiny_llama(tie_word_embeddings=True), config)
    train(model, config, steps=2)
    expected = logits(model)
    save_adapter(model, tmp_path, config)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path)
                                      .eval()), expected, rtol=0, atol=1e-6)
    fresh = tiny_llama(tie_word_embeddings=True)
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh.eval()), expected, rtol=0, atol=0)


# ------------------------------------------------------------------ MoRA and FFT: this library's format


@pytest.mark.parametrize("method", OURS)
def test_our_folders_carry_the_format_marker_and_peft_names_the_right_reader(method, tmp_path):
    model, config = trained(method, steps=1)
    save_adapter(model, tmp_path, config)
    saved = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert (saved["format"], saved["format_version"]) == (FORMAT, FORMAT_VERSION)
    base = tiny_llama()
    with pytest.raises(KeyError, match=r"not a peft adapter.*mora\.load_adapter\(model, directory\)"):
        PeftModel.from_pretrained(base, tmp_path)
    with pytest.raises(KeyError, match=r"not a peft adapter.*mora\.load_adapter\(model, directory\)"):
        base.load_adapter(tmp_path)  # transformers' reader of peft folders asks peft the same way
    assert not adapter_layers(base)  # refused before anything was injected
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh.eval()), logits(model), rtol=0, atol=0)


def test_load_adapter_refuses_a_folder_peft_wrote(tmp_path):
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"peft adapter \(peft_type=LORA\).*PeftModel\.from_pretrained"):
        load_adapter(tiny_llama(), tmp_path)


def test_load_adapter_refuses_official_and_newer_folders(tmp_path):
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "use_mora": True, "r": 8}))
    with pytest.raises(ValueError, match=r"official MoRA code.*mora\.load_official_adapter"):
        load_adapter(tiny_llama(), tmp_path)
    _, config = make(dict(method="mora"))
    newer = {"format": FORMAT, "format_version": FORMAT_VERSION + 1, "config": asdict(config)}
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(newer))
    with pytest.raises(ValueError, match=f"format_version {FORMAT_VERSION + 1}"):
        load_adapter(tiny_llama(), tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / MORA_CONFIG).write_text(json.dumps({"config": asdict(config)}))  # our side file, but no marker
    with pytest.raises(ValueError, match=f"no 'format': '{FORMAT}' marker"):
        load_adapter(tiny_llama(), tmp_path)


@pytest.mark.parametrize("method", ["lora", "mora"])
def test_folders_written_before_the_marker_still_load(method, tmp_path):
    """Before this change save_adapter wrote ``{"config": ...}`` and our own tensor names for every method."""
    model, config = trained(method, steps=1)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"config": asdict(config)}))
    save_file(adapter_state_dict(model, config), str(tmp_path / ADAPTER_WEIGHTS))
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh.eval()), logits(model), rtol=0, atol=0)
