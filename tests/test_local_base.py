"""Bases the repository pretrains itself (experiments/models/local_base.py): deterministic, learning,
cached with a manifest that is checked on load, and refused when the recipe or the weights changed."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.data.offline import DEFAULT_DATA_ROOT
from experiments.models.loading import load_model
from experiments.models.local_base import MANIFEST, WEIGHTS, BaseRecipe, build_base
from experiments.schema import ModelSpec, model_spec

RECIPE = {"corpus": ["text/botchan.txt"], "steps": 40, "batch_size": 4, "seq_len": 32, "lr": 1e-2,
          "warmup_steps": 4, "seed": 0, "validation_blocks": 8, "threads": 1}


def tiny_spec(**recipe) -> ModelSpec:
    return ModelSpec(name="tiny_base", source="local_base", hidden_size=16, tokenizer="models/stories260K/tok512.model",
                     intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1, max_position_embeddings=64,
                     tie_word_embeddings=True, pretrain={**RECIPE, **recipe})


@pytest.fixture(scope="module")
def data_root():
    return DEFAULT_DATA_ROOT


@pytest.fixture(scope="module")
def built(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("bases")
    return build_base(tiny_spec(), data_root, root, progress=False)


def test_pretraining_learns_and_records_its_facts(built):
    manifest = json.loads((built / MANIFEST).read_text())
    assert manifest["validation_loss_after"] < manifest["validation_loss_before"] - 1.0
    assert manifest["recipe"]["corpus"] == ["text/botchan.txt"] and manifest["shape"]["hidden_size"] == 16
    assert manifest["train_tokens_seen"] == 40 * 4 * 32
    assert set(manifest["corpus_sha256"]) == {"text/botchan.txt"}


def test_the_same_recipe_gives_the_same_weights(built, tmp_path, data_root):
    again = build_base(tiny_spec(), data_root, tmp_path, progress=False)
    first, second = (json.loads((f / MANIFEST).read_text())["weights_sha256"] for f in (built, again))
    assert first == second


def test_a_cached_base_is_reused_and_loads_with_its_tokenizer(built, data_root, monkeypatch):
    monkeypatch.setenv("MORA_BASE_ROOT", str(built.parent))
    stamp = (built / WEIGHTS).stat().st_mtime_ns
    model, tokenizer = load_model(tiny_spec(), data_root)
    assert (built / WEIGHTS).stat().st_mtime_ns == stamp                    # not rebuilt
    assert model.config.hidden_size == 16 and model.config.vocab_size == len(tokenizer) == 512
    ids = torch.tensor([tokenizer("Once upon a time").input_ids])
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_a_changed_recipe_or_altered_weights_are_refused(built, data_root, tmp_path):
    with pytest.raises(ValueError, match="different recipe"):
        build_base(tiny_spec(steps=41), data_root, built.parent, progress=False)
    copy = tmp_path / "tiny_base"
    copy.mkdir()
    for name in (MANIFEST, WEIGHTS, "config.json"):
        (copy / name).write_bytes((built / name).read_bytes())
    weights = bytearray((copy / WEIGHTS).read_bytes())
    weights[-1] ^= 1
    (copy / WEIGHTS).write_bytes(bytes(weights))
    with pytest.raises(ValueError, match="SHA-256"):
        build_base(tiny_spec(), data_root, tmp_path, progress=False)


@pytest.mark.parametrize("change, field", [({"steps": 0}, "model.pretrain.steps"), ({"lr": -1.0}, "model.pretrain.lr"),
                                           ({"corpus": "text/botchan.txt"}, "model.pretrain.corpus"),
                                           ({"warmup_steps": 40}, "model.pretrain.warmup_steps"),
                                           ({"epochs": 3}, "epochs")])
def test_bad_recipes_are_refused_naming_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        BaseRecipe.from_dict({**RECIPE, **change})


def test_the_shipped_wider_base_validates_and_maps_paper_rank_256_exactly():
    from experiments.schema import map_rank

    spec = model_spec("stories_w128")
    assert spec.source == "local_base" and spec.pretrain.threads == 2
    hash(spec)   # analysis caches by model spec
    assert map_rank(256, spec.hidden_size, 4096).rank == 8
