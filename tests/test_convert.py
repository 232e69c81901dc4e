"""Checkpoints in the format the official code writes (kongds/MoRA: its peft 0.9 fork and train.py)
load with the trained model's logits: pretraining with embeddings, head and norms saved, regex
targets, partial files, ReMoRA runs. The suite writes those files itself, key names and config
fields as the fork writes them; the oracle is our own model in the state the file describes.
"""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from mora.adapters import AdapterConfig, inject_adapters, mora_layers, save_adapter
from mora.convert import (
    OfficialCheckpointWarning, convert_official_state_dict, load_official_adapter, load_official_merged_base,
    remora_mora_type,
)
from tests.test_adapters import tiny_llama, tokens

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
# train.py --train_embhead: peft 0.9 wraps every module whose name ends with one of these
EMBHEAD = ["embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm"]
GROUPS = {1: ("cyclic", "cyclic"), 2: ("block", "block"), 3: ("block", "cyclic"), 4: ("cyclic", "block")}


def official_config(**fields) -> dict:
    """adapter_config.json as the fork's LoraConfig writes it (sorted keys; inference_mode true on save)."""
    config = dict(alpha_pattern={}, auto_mapping=None, base_model_name_or_path=None, bias="none",
                  fan_in_fan_out=False, inference_mode=True, init_lora_weights=True, layers_pattern=None,
                  layers_to_transform=None, loftq_config={}, lora_alpha=16, lora_dropout=0.05,
                  megatron_config=None, megatron_core="megatron.core", modules_to_save=None, mora_type=1,
                  peft_type="LORA", r=2, rank_pattern={}, revision=None, target_modules=ALL_TARGETS,
                  task_type="CAUSAL_LM", use_dora=False, use_mora=True, use_rslora=False)
    return dict(sorted({**config, **fields}.items()))


def trained(mora_type=1, targets=ALL_TARGETS, embhead=False, seed=1):
    """Our model as the original's would be after training: M ≠ 0 (and embeddings, head, norms)."""
    operator = "rotate" if mora_type == 6 else "share"
    groups = GROUPS.get(mora_type, ("cyclic", "cyclic"))
    model = inject_adapters(tiny_llama(), AdapterConfig(
        method="mora", rank=2, target_modules=tuple(targets), operator=operator,
        compress_groups=groups[0], decompress_groups=groups[1],
        trainable_modules=("embed_tokens", "lm_head", "norm") if embhead else ()))
    perturb(model, seed)
    return model


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def saved_modules(model, entries):
    """peft 0.9's modules to save: every module whose name ends (plain str.endswith) with an entry."""
    return [n for n, _ in model.named_modules() if n and any(n.endswith(e) for e in entries)]


def official_state(model, embhead=False, layers=None) -> dict:
    """The adapter state dict the fork saves: M under lora_A and lora_B (cloned apart by
    safetensors), a module to save under its plain name (modules_to_save.default. dropped)."""
    state = {}
    for name, layer in mora_layers(model).items():
        if layers is None or any(f"layers.{i}." in name for i in layers):
            state[f"base_model.model.{name}.lora_A.weight"] = layer.mora.M.detach().clone()
            state[f"base_model.model.{name}.lora_B.weight"] = layer.mora.M.detach().clone()
    for name in saved_modules(model, EMBHEAD) if embhead else ():
        state[f"base_model.model.{name}.weight"] = model.get_submodule(name).weight.detach().clone()
    return state


def write(directory, state, config, fmt="safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file(state, str(directory / "adapter_model.safetensors"))
    else:
        torch.save(state, directory / "adapter_model.bin")
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def logits(model):
    return model.eval()(tokens()).logits


def load_quietly(model, directory, **kwargs):
    """Load, failing on any OfficialCheckpointWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", OfficialCheckpointWarning)
        return load_official_adapter(model, directory, **kwargs)


# ----------------------------------------------------------------------------- modules_to_save

@pytest.mark.parametrize("fmt,dtype", [("safetensors", torch.float32), ("bin", torch.float32),
                                       ("safetensors", torch.bfloat16)])
def test_pretraining_checkpoint_with_embeddings_head_and_norms_reproduces_logits(tmp_path, fmt, dtype):
    """train.py --pretrain --train_embhead --use_mora: the file holds M and every module to save."""
    ours = trained(embhead=True)
    with torch.no_grad():  # the trained values as the file can hold them (--use_bf16)
        for p in filter(lambda p: p.requires_grad, ours.parameters()):
            p.copy_(p.to(dtype))
    state = {k: v.to(dtype) for k, v in official_state(ours, embhead=True).items()}
    assert "base_model.model.lm_head.weight" in state and "base_model.model.model.embed_tokens.weight" in state
    write(tmp_path, state, official_config(modules_to_save=EMBHEAD), fmt)
    fresh = tiny_llama()
    config = load_quietly(fresh, tmp_path, mora_type=1)
    torch.testing.assert_close(logits(fresh), logits(ours), rtol=0, atol=0)
    assert set(config.trainable_modules) == set(EMBHEAD)
    assert fresh.lm_head.weight.requires_grad and fresh.model.layers[1].input_layernorm.weight.requires_grad
    assert not mora_layers(fresh).keys() & set(saved_modules(fresh, EMBHEAD))


def test_a_module_to_save_missing_from_the_file_is_an_error(tmp_path):
    ours = trained(embhead=True)
    state = official_state(ours, embhead=True)
    del state["base_model.model.lm_head.weight"]
    write(tmp_path, state, official_config(modules_to_save=EMBHEAD))
    with pytest.raises(ValueError, match=r"no tensor from the file.*lm_head\.weight"):
        load_official_adapter(tiny_llama(), tmp_path, mora_type=1)


def test_wrapped_embedding_keys_convert_and_their_copies_must_agree():
    """peft 0.9 with a resized vocabulary also saves the wrapper whole: ``modules_to_save.`` and an
    ``original_module`` (the untrained copy, dropped)."""
    w = torch.randn(4, 3)
    state = {"base_model.model.model.embed_tokens.weight": w,
             "base_model.model.model.embed_tokens.modules_to_save.weight": w.clone(),
             "base_model.model.model.embed_tokens.original_module.weight": torch.zeros(4, 3)}
    assert convert_official_state_dict(state).keys() == {"model.embed_tokens.weight"}
    state["base_model.model.model.embed_tokens.modules_to_save.weight"] += 1
    with pytest.raises(ValueError, match="differing copies"):
        convert_official_state_dict(state)
    with pytest.raises(KeyError, match="not an official MoRA adapter key"):
        convert_official_state_dict({"base_model.model.q_proj.lora_magnitude_vector.weight": w})


def test_a_tied_head_saved_as_two_differing_modules_is_an_error(tmp_path):
    ours = trained(embhead=True)
    state = official_state(ours, embhead=True)
    write(tmp_path, state, official_config(modules_to_save=EMBHEAD))
    with pytest.raises(ValueError, match="tied"):
        load_official_adapter(tiny_llama(tie_word_embeddings=True), tmp_path, mora_type=1)


# ----------------------------------------------------------------------------- target_modules

@pytest.mark.parametrize("targets,fields,expect", [
    (r".*\.(q_proj|v_proj)", {}, [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]),
    (r"model\.layers\.1\.mlp\..*_proj", {}, [f"model.layers.1.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]),
    (["q_proj", "model.layers.0.mlp.down_proj"], {}, ["model.layers.0.mlp.down_proj"]
     + [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]),
    (["q_proj", "v_proj"], {"layers_to_transform": [1]}, ["model.layers.1.self_attn.q_proj",
                                                          "model.layers.1.self_attn.v_proj"]),
], ids=["regex", "regex-one-layer", "list-name-and-suffix", "layers_to_transform"])
def test_target_modules_match_as_peft_matches_them(tmp_path, targets, fields, expect):
    """A str is a regex fullmatched against the whole module name (peft); a list matches a name
    exactly or as a ``.name`` suffix; layers_to_transform keeps those layers."""
    ours = trained(targets=expect)
    write(tmp_path, official_state(ours), official_config(target_modules=targets, **fields))
    fresh = tiny_llama()
    config = load_quietly(fresh, tmp_path, mora_type=1)
    assert sorted(mora_layers(fresh)) == sorted(expect) == sorted(config.target_modules)
    assert config.extra["official"]["target_modules"] == (targets if isinstance(targets, str) else sorted(targets))
    torch.testing.assert_close(logits(fresh), logits(ours), rtol=0, atol=0)


def test_a_regex_that_matches_nothing_or_a_non_linear_is_an_error(tmp_path):
    write(tmp_path, {}, official_config(target_modules=r"q_proj"))  # fullmatch: no module is named q_proj
    with pytest.raises(ValueError, match="matches no module"):
        load_official_adapter(tiny_llama(), tmp_path, mora_type=1)
    write(tmp_path, {}, official_config(target_modules=r".*\.mlp"))
    with pytest.raises(ValueError, match="LlamaMLP"):
        load_official_adapter(tiny_llama(), tmp_path, mora_type=1)


# ----------------------------------------------------------------------------- coverage

def test_a_targeted_module_without_M_is_an_error_or_with_strict_false_a_warning(tmp_path):
    ours = trained(targets=["q_proj", "v_proj"])
    write(tmp_path, official_state(ours, layers=[0]), official_config(target_modules=["q_proj", "v_proj"]))
    with pytest.raises(ValueError, match=r"2 module\(s\) the config targets .*layers\.1\.self_attn\.q_proj"):
        load_official_adapter(tiny_llama(), tmp_path, mora_type=1)
    fresh = tiny_llama()
    with pytest.warns(OfficialCheckpointWarning, match="no tensor from the file"):
        load_official_adapter(fresh, tmp_path, mora_type=1, strict=False)
    assert not mora_layers(fresh)["model.layers.1.self_attn.q_proj"].mora.M.any()
    assert mora_layers(fresh)["model.layers.0.self_attn.q_proj"].mora.M.any()


def test_tensors_nothing_takes_are_an_error_or_with_strict_false_skipped(tmp_path):
    ours = trained(targets=["q_proj", "v_proj"])
    write(tmp_path, official_state(ours), official_config(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"taken by nothing.*v_proj\.mora\.M"):
        load_official_adapter(tiny_llama(), tmp_path, mora_type=1)
    fresh = tiny_llama()
    with pytest.warns(OfficialCheckpointWarning, match="taken by nothing"):
        load_official_adapter(fresh, tmp_path, mora_type=1, strict=False)
    assert sorted(mora_layers(fresh)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


# ----------------------------------------------------------------------------- ReMoRA

def merged_base_state(model) -> dict:
    """What the fork's ReMoRA callback writes to base-model/ at a restart: the inner LlamaModel,
    still wrapped by peft (merged W as base_layer, M just zeroed under one name of the aliased
    lora_A/lora_B pair, which safetensors keeps once), modules to save as original_module and
    modules_to_save.default."""
    state, saved = {}, saved_modules(model.model, EMBHEAD)
    for name, tensor in model.model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if leaf in ("groups", "base_weight_modified"):
            continue
        if name.endswith(".mora.M"):
            state[name.replace(".mora.M", ".lora_A.default.weight")] = tensor.clone()
        elif module in saved:
            state[f"{module}.original_module.{leaf}"] = tiny_llama().model.get_submodule(module).weight.detach()
            state[f"{module}.modules_to_save.default.{leaf}"] = tensor.clone()
        else:
            state[name] = tensor.clone()
    return state


def remora_run(tmp_path, restarts=1, start=1):
    """A ReMoRA pretraining run as the official train.py writes it: after each restart (merge,
    zero M, next type) base-model/ is rewritten; the final adapter keeps the starting type."""
    ours = trained(mora_type=start, embhead=True)
    current = start
    for r in range(restarts):
        current = remora_mora_type(current, 1)
        for layer in mora_layers(ours).values():
            layer.merge_and_reinit(GROUPS[current])
        base = tmp_path / "base-model"
        base.mkdir(exist_ok=True)
        save_file(merged_base_state(ours), str(base / "model.safetensors"))
        perturb(ours, seed=10 + r)  # training goes on after the restart
    write(tmp_path, official_state(ours, embhead=True), official_config(modules_to_save=EMBHEAD, mora_type=start))
    return ours, current


def test_remora_checkpoint_loads_with_the_type_and_merged_base_given(tmp_path):
    ours, current = remora_run(tmp_path, restarts=2)
    assert current == remora_mora_type(1, 2) == 3
    fresh = tiny_llama()
    config = load_quietly(fresh, tmp_path, mora_type=current, merged_base=tmp_path / "base-model")
    assert (config.compress_groups, config.decompress_groups) == GROUPS[3]
    assert config.extra["official"]["saved_mora_type"] == 1
    torch.testing.assert_close(logits(fresh), logits(ours), rtol=0, atol=1e-5)


def test_remora_checkpoint_loaded_as_the_file_says_warns_and_is_wrong(tmp_path):
    """The file keeps type 1 and the original base: both are wrong after restarts, and the
    folder (base-model/ beside the adapter) says so."""
    ours, _ = remora_run(tmp_path, restarts=1)
    fresh = tiny_llama()
    with pytest.warns(OfficialCheckpointWarning, match=r"base-model.*merged_base=.*mora_type=1"):
        load_official_adapter(fresh, tmp_path)
    assert (logits(fresh) - logits(ours)).abs().max() > 0.1
    wrong_type = tiny_llama()  # the merged base alone is not enough: the groups matter too
    load_quietly(wrong_type, tmp_path, mora_type=1, merged_base=tmp_path / "base-model")
    assert (logits(wrong_type) - logits(ours)).abs().max() > 0.1


def test_a_trainer_checkpoint_of_a_remora_run_is_recognised(tmp_path):
    """HF Trainer saves checkpoint-N/ inside the run folder, beside base-model/."""
    remora_run(tmp_path)
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (checkpoint / name).write_bytes((tmp_path / name).read_bytes())
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    with pytest.warns(OfficialCheckpointWarning, match=r"base-model.*global_step=4"):
        load_official_adapter(tiny_llama(), checkpoint, mora_type=2)


def test_a_type_the_user_did_not_confirm_warns_unless_remora_cannot_apply(tmp_path):
    """Types 1–4 may have been switched by ReMoRA; type 6 never is (the original's maps have no 6)."""
    ours = trained(mora_type=1, targets=["q_proj"])
    write(tmp_path, official_state(ours), official_config(target_modules=["q_proj"]))
    with pytest.warns(OfficialCheckpointWarning, match=r"mora_type=1.*remora_mora_type"):
        load_official_adapter(tiny_llama(), tmp_path)
    load_quietly(tiny_llama(), tmp_path, mora_type=1)
    with pytest.raises(ValueError, match="never switched"):
        load_official_adapter(tiny_llama(), tmp_path, mora_type=6)
    rotated = trained(mora_type=6, targets=["q_proj"])
    write(tmp_path, official_state(rotated), official_config(target_modules=["q_proj"], mora_type=6))
    fresh = tiny_llama()
    load_quietly(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), logits(rotated), rtol=0, atol=0)


@pytest.mark.parametrize("start,restarts,remora_types,expect", [
    (1, 0, 4, 1), (1, 1, 4, 2), (1, 3, 4, 4), (1, 4, 4, 1), (3, 1, 4, 4), (4, 1, 4, 1), (1, 5, 4, 2),
    (1, 1, 2, 2), (2, 1, 2, 1), (1, 2, 2, 1),
])
def test_remora_type_follows_the_original_maps(start, restarts, remora_types, expect):
    """train.py: {1:2, 2:3, 3:4, 4:1} with --remora_types 4 (its default), {1:2, 2:1} otherwise."""
    assert remora_mora_type(start, restarts, remora_types) == expect


@pytest.mark.parametrize("start,remora_types", [(3, 2), (6, 4), (1, 3)])
def test_remora_type_refuses_what_the_original_cannot_run(start, remora_types):
    with pytest.raises(ValueError):
        remora_mora_type(start, 1, remora_types)


@pytest.mark.parametrize("fields,message", [
    ({"use_mora": False}, "plain LoRA"), ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"use_dora": True}, "use_dora"), ({"target_modules": "all-linear"}, "all-linear"),
    ({"target_modules": None}, "no target_modules"),
])
def test_what_the_converter_cannot_reproduce_is_refused(tmp_path, fields, message):
    write(tmp_path, {}, official_config(**fields))
    with pytest.raises(ValueError, match=message):
        load_official_adapter(tiny_llama(), tmp_path, mora_type=1)


def test_a_folder_of_this_library_is_pointed_to_load_adapter(tmp_path):
    config = AdapterConfig(method="mora", rank=2)
    model = inject_adapters(tiny_llama(), config)
    save_adapter(model, tmp_path, config)
    with pytest.raises(ValueError, match="mora.load_adapter"):
        load_official_adapter(tiny_llama(), tmp_path)


def test_a_merged_base_for_another_model_is_an_error(tmp_path):
    save_file({"layers.0.self_attn.q_proj.base_layer.weight": torch.zeros(32, 32),
               "layers.9.mlp.up_proj.base_layer.weight": torch.zeros(48, 32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 tensor\(s\) match no parameter.*layers\.9"):
        load_official_merged_base(tiny_llama(), tmp_path)
