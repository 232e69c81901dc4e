"""ReLoRA/ReMoRA restarts on a tiny random LLaMA (Section 5.3, Appendix B; Lialin et al. 2023):
the optimizer reset touches the adapters' state alone, the re-init, the rank growth that the group
switch buys, the switching orders, the one validation of restart settings, merges where the jagged
schedule is at 0, and a run resumed from a checkpoint between two merges that matches the
uninterrupted one exactly."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import experiments.loop.training as training
from experiments.loop.records import RunRecord, read_run
from experiments.schema import TrainSpec
from experiments.loop.trackers import NullTracker
from experiments.loop.checkpoint import CHECKPOINT
from experiments.loop.training import train
from mora.adapters import AdapterConfig, build_optimizer, inject_adapters, lora_layers, mora_layers
from mora.restarts import CYCLE4_ORDER, RestartConfig, check_restarts, next_groups, restart_adapters

EXTRA = ("embed_tokens", "norm", "lm_head")  # trainable besides the adapters, as in ReLoRA
VOCAB, SEQ = 64, 12


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(method: str, seed: int = 0, **config) -> tuple[LlamaForCausalLM, AdapterConfig]:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=SEQ))
    adapter = AdapterConfig(method=method, rank=2, trainable_modules=EXTRA, **config)
    return inject_adapters(model, adapter), adapter


def ids(seed: int, batch: int = 4) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def adapter_names(model) -> set[str]:
    """Written from the adapters' names, independently of mora.adapters.adapter_parameters."""
    return {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n or n.endswith(".mora.M")}


def adam_steps(model, optimizer, n: int = 3) -> None:
    for step in range(n):
        batch = ids(step)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# ------------------------------------------------------------------ optimizer reset


@pytest.mark.parametrize("method,wrapped", [("remora", False), ("relora", False), ("loraplus", False),
                                            ("remora", True), ("loraplus", True)])
def test_reset_drops_the_adapters_state_and_keeps_every_other(method, wrapped):
    model, adapter = tiny(method)
    optimizer = build_optimizer(model, adapter, lr=1e-2)
    if wrapped:  # accelerate's AcceleratedOptimizer, as in the training loop
        model, optimizer = Accelerator(cpu=True).prepare(model, optimizer)
    adam_steps(model, optimizer)
    inner = getattr(optimizer, "optimizer", optimizer)
    names = {p: n for n, p in model.named_parameters()}
    kept = {names[p]: {k: v.clone() for k, v in s.items()} for p, s in inner.state.items()}
    adapters = adapter_names(model)
    others = {n for n, p in model.named_parameters() if p.requires_grad} - adapters
    assert adapters <= set(kept) and others <= set(kept)  # every trainable parameter had state
    assert any(n.endswith("embed_tokens.weight") for n in others) and "lm_head.weight" in others

    restart_adapters(model, optimizer, "pair" if method == "remora" else "none")

    after = {names[p]: s for p, s in inner.state.items()}
    assert set(after) == others  # the adapters' moments and step are gone, nothing else is
    for name in others:
        assert after[name].keys() == kept[name].keys() >= {"exp_avg", "exp_avg_sq", "step"}
        assert all(torch.equal(after[name][k], kept[name][k]) for k in kept[name]), name
    adam_steps(model, optimizer, 1)
    assert all(inner.state[p]["step"].item() == 1 for p in model.parameters() if names[p] in adapters
               and p.requires_grad)  # Adam's bias correction starts again for the new adapters


def test_relora_reinit_is_kaiming_a_and_zero_b_in_the_same_parameters():
    model, adapter = tiny("relora")
    optimizer = build_optimizer(model, adapter, lr=1e-2)
    adam_steps(model, optimizer)
    params = {id(p) for p in model.parameters()}
    batch = ids(9)
    before = model(input_ids=batch).logits
    torch.manual_seed(123)
    restart_adapters(model, optimizer)
    torch.manual_seed(123)  # the re-init draws in the layers' order: redo it on blank tensors
    for layer in lora_layers(model).values():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected = nn.init.kaiming_uniform_(torch.empty_like(A), a=math.sqrt(5))
        assert torch.equal(A, expected) and not B.any()
    assert {id(p) for p in model.parameters()} == params
    torch.testing.assert_close(model(input_ids=batch).logits, before, rtol=1e-5, atol=1e-5)


def test_remora_reinit_zeroes_m_and_keeps_the_function():
    model, adapter = tiny("remora")
    optimizer = build_optimizer(model, adapter, lr=1e-2)
    adam_steps(model, optimizer)
    batch = ids(9)
    before = model(input_ids=batch).logits
    restart_adapters(model, optimizer, "pair")
    assert all(not layer.mora.M.any() for layer in mora_layers(model).values())
    torch.testing.assert_close(model(input_ids=batch).logits, before, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ Appendix B: rank growth


def randomise_m(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in mora_layers(model).values():
            layer.mora.M.copy_(torch.randn(layer.mora.M.shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("switch", ["none", "pair", "cycle4"])
def test_switching_groups_lets_the_merged_rank_exceed_r_hat(switch):
    """Two cycles with random M: with the same groups every ΔW = E' M Eᵀ shares the same r̂-wide
    column and row spaces, so rank(ΔW₁ + ΔW₂) ≤ r̂; with new groups the sum escapes them."""
    model, adapter = tiny("remora")
    model.double()
    optimizer = build_optimizer(model, adapter, lr=1e-2)
    layers = mora_layers(model)
    w0 = {n: l.base_layer.weight.clone() for n, l in layers.items()}
    randomise_m(model, 1)
    restart_adapters(model, optimizer, switch)
    randomise_m(model, 2)
    restart_adapters(model, optimizer, switch)
    for name, layer in layers.items():
        r_hat = layer.mora.r_hat
        rank = torch.linalg.matrix_rank(layer.base_layer.weight - w0[name]).item()
        assert (rank > r_hat if switch != "none" else rank <= r_hat), (name, r_hat, rank)
        assert rank <= 2 * r_hat


# ------------------------------------------------------------------ switching orders


def test_switching_orders():
    cc, bb, bc, cb = ("cyclic", "cyclic"), ("block", "block"), ("block", "cyclic"), ("cyclic", "block")
    assert CYCLE4_ORDER == (cc, bb, bc, cb)  # official mora_type 1 → 2 → 3 → 4 → 1

    def walk(start, switch, n=5):
        seen = [start]
        for _ in range(n - 1):
            seen.append(next_groups(seen[-1], switch))
        return seen

    assert walk(cc, "cycle4") == [cc, bb, bc, cb, cc]
    assert walk(bc, "cycle4", 2) == [bc, cb]
    assert walk(cc, "pair") == [cc, bb, cc, bb, cc]  # Appendix B: type 0 ↔ 1
    assert walk(bb, "none", 3) == [bb, bb, bb]


def test_restart_moves_every_layer_along_the_cycle():
    model, adapter = tiny("remora")
    optimizer = build_optimizer(model, adapter, lr=1e-2)
    for expected in CYCLE4_ORDER[1:] + CYCLE4_ORDER[:1]:
        restart_adapters(model, optimizer, "cycle4")
        layouts = {(l.mora.layout.compress_groups, l.mora.layout.decompress_groups)
                   for l in mora_layers(model).values()}
        assert layouts == {expected}


# ------------------------------------------------------------------ the one validation


@pytest.mark.parametrize("settings,field", [
    (dict(merge_every=0), "method.merge_every"),
    (dict(merge_every=2.5), "method.merge_every"),
    (dict(merge_every=4, group_switch="swap"), "method.group_switch"),
    (dict(group_switch="pair"), "method.merge_every"),                 # a switch happens at a merge
    (dict(jagged_schedule=True, restart_warmup_steps=2), "method.merge_every"),
    (dict(merge_every=4, restart_warmup_steps=-1), "method.restart_warmup_steps"),
    (dict(merge_every=4, jagged_schedule=True), "method.restart_warmup_steps"),  # nothing to climb from 0
    (dict(merge_every=4, jagged_schedule=True, restart_warmup_steps=4), "method.restart_warmup_steps"),
    (dict(merge_every=4, jagged_schedule="yes"), "method.jagged_schedule"),
])
def test_bad_restart_settings_name_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        RestartConfig(**settings)


def test_restart_settings_default_to_never():
    never = RestartConfig()
    assert not never.enabled and not any(never.restart_after(s, 10) for s in range(1, 11))
    every4 = RestartConfig(merge_every=4, jagged_schedule=True, restart_warmup_steps=1)
    assert [s for s in range(1, 13) if every4.restart_after(s, 12)] == [4, 8]  # none after the last step


@pytest.mark.parametrize("method,config,settings,field", [
    ("remora", dict(operator="rotate"), dict(merge_every=4, group_switch="pair"), "method.group_switch"),
    ("relora", {}, dict(merge_every=4, group_switch="cycle4"), "method.group_switch"),
    ("mora", {}, dict(merge_every=4), "method.merge_every"),       # mora does not restart: remora does
    ("fft", {}, dict(merge_every=4), "method.merge_every"),
])
def test_restart_settings_the_adapters_cannot_carry_out_are_refused(method, config, settings, field):
    with pytest.raises(ValueError, match=field):
        check_restarts(RestartConfig(**settings), AdapterConfig(method=method, rank=2, **config))


# ------------------------------------------------------------------ the loop: jagged LR, resume


class RandomTokens:
    """A task whose batch is a pure function of the micro-batch index (as the loop requires);
    ``stop_at`` raises before that micro-batch, standing in for a crash."""

    def __init__(self, stop_at: int | None = None):
        self.stop_at = stop_at

    def batch(self, index: int, process_index: int, num_processes: int) -> dict:
        if index == self.stop_at:
            raise KeyboardInterrupt(f"stopped before micro-batch {index}")
        tokens = ids(1000 + index)
        return {"input_ids": tokens, "labels": tokens}

    def evaluate(self, model, device) -> dict:
        tokens = ids(7).to(device)
        with torch.no_grad():
            return {"loss": model(input_ids=tokens, labels=tokens).loss.item()}


# 12 steps of 2 micro-batches; merges after steps 4 and 8 (cycle4: cc → bb → bc); checkpoints at 3,
# 6, 9, 12; restart warm-up 2, floor 0.1.
MAX_STEPS, MERGE_EVERY = 12, 4


JAGGED_SPEC = TrainSpec(max_steps=MAX_STEPS, batch_size=4, grad_accum=2, warmup_steps=1, scheduler="jagged_cosine",
                        weight_decay=0.0, grad_clip=1.0, log_every=1, ckpt_every=3, eval_steps=(6,), dtype="float32",
                        min_lr_ratio=0.1)
RESTARTS = RestartConfig(merge_every=MERGE_EVERY, group_switch="cycle4", jagged_schedule=True, restart_warmup_steps=2)


def run(out_dir, task, resume=False) -> tuple[LlamaForCausalLM, dict]:
    model, adapter = tiny("remora")
    record = RunRecord.create(out_dir, {"test": "restarts"}, resume=resume)
    final = train(model, task, adapter, JAGGED_SPEC, 1e-2, record, NullTracker(), device="cpu",
                  resume=resume, restarts=RESTARTS)
    return model, final


def test_merges_fall_where_the_jagged_rate_is_zero(tmp_path, monkeypatch):
    rates = []

    def spy(model, optimizer, group_switch):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate of the step after this merge
        restart_adapters(model, optimizer, group_switch)

    monkeypatch.setattr(training, "restart_adapters", spy)
    run(tmp_path / "run", RandomTokens())
    assert rates == [0.0, 0.0]  # after steps 4 and 8, not after the last one
    logged = {m["step"]: m["lr"] for m in read_run(tmp_path / "run")["metrics"]}
    assert [s for s, lr in logged.items() if lr == 0.0] == [4, 8]
    assert logged[12] == pytest.approx(0.1 * 1e-2)


def test_resume_between_merges_continues_identically(tmp_path):
    whole, whole_final = run(tmp_path / "whole", RandomTokens())
    with pytest.raises(KeyboardInterrupt):  # after the step-6 checkpoint, past the first merge
        run(tmp_path / "cut", RandomTokens(stop_at=7 * 2))
    saved = torch.load(tmp_path / "cut" / CHECKPOINT, map_location="cpu", weights_only=False)
    groups = {tuple(t.tolist()) for k, t in saved["weights"].items() if k.endswith(".mora.groups")}
    assert saved["loop"]["step"] == 6 and groups == {(1, 1)}  # block/block, in the layers' own state

    resumed, resumed_final = run(tmp_path / "cut", RandomTokens(), resume=True)

    rows = [[{k: v for k, v in m.items() if k != "time"} for m in read_run(tmp_path / d)["metrics"]]
            for d in ("whole", "cut")]
    assert rows[0] == rows[1] and [m["step"] for m in rows[0]] == list(range(1, MAX_STEPS + 1))
    assert resumed_final == whole_final
    groups = {(l.mora.layout.compress_groups, l.mora.layout.decompress_groups)
              for m in (whole, resumed) for l in mora_layers(m).values()}
    assert groups == {("block", "cyclic")}  # two switches: cc → bb → bc
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
