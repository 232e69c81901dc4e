"""The benchmark's yardstick and verdicts: the straightforward MoRA equals the library's operators
(outputs, gradients, ΔW) at tiny shapes, divisible and not, and both of the library's rotation
strategies (rotate the inputs for few tokens, rotate M for many) agree with it."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from benchmarks import bench_adapters as bench
from benchmarks.report import noise_bands, verdict_text
from benchmarks.straightforward import StraightforwardMoRA
from mora.layer import MoRAAdapter, MoRALinear
from mora.operators import OPERATORS, _rotate_inputs, _shared_matrix

# (k, d, r̂): divisible, k and d not multiples of r̂, d < r̂·n (truncated), d > r̂·n (tiled), k > d, one block
pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(32, 32, 8), (37, 53, 8), (53, 37, 6), (64, 24, 8), (16, 48, 8), (6, 12, 8), (100, 7, 2)]


def layer_pair(k, d, r_hat, operator, dtype=torch.float64):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r̂ > min(d, k) warns on purpose for some shapes
        adapter = MoRAAdapter(k, d, r_hat, operator).to(dtype)
    base = nn.Linear(k, d, bias=False).to(dtype).requires_grad_(False)
    with torch.no_grad():
        adapter.M.normal_(generator=torch.Generator().manual_seed(k + d))
    layer = MoRALinear(base, adapter)
    return layer, StraightforwardMoRA(layer)


def tolerance(operator):
    # the library's rotation tables are float32 buffers by design, the straightforward ones float64
    return dict(rtol=1e-6, atol=1e-6) if operator == "rotate" else dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("k,d,r_hat", SHAPES)
@pytest.mark.parametrize("tokens", [3, 40])  # below and above r̂: both rotation strategies
def test_straightforward_equals_the_library(k, d, r_hat, operator, tokens):
    if r_hat * r_hat > k * d:
        pytest.skip("M larger than W is rejected by design")
    layer, plain = layer_pair(k, d, r_hat, operator)
    x = torch.randn(tokens, k, dtype=torch.float64, requires_grad=True)
    g = torch.randn(tokens, d, dtype=torch.float64)
    grads = []
    for module in (layer, plain):
        x.grad = None
        out = module(x)
        M = module.mora.M if module is layer else module.M
        grads.append((out, *torch.autograd.grad(out, (x, M), g)))
    for mine, theirs in zip(*grads):
        torch.testing.assert_close(mine, theirs, **tolerance(operator))
    torch.testing.assert_close(layer.mora.delta_weight(), plain.delta_weight(), **tolerance(operator))


@pytest.mark.parametrize("operator", OPERATORS)
def test_the_adapters_timed_alone_are_the_layers_without_the_frozen_gemm(operator):
    """AdapterAlone(layer)(x) = layer(x) − W0 x for both implementations, with the layer's gradients."""
    layer, plain = layer_pair(37, 53, 8, operator)
    x = torch.randn(5, 37, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 53, dtype=torch.float64)
    expected = layer(x) - layer.base_layer(x)
    expected_grads = torch.autograd.grad(layer(x), (x, layer.mora.M), g)
    for module, M in ((layer, layer.mora.M), (plain, plain.M)):
        out = bench.AdapterAlone(module)(x)
        torch.testing.assert_close(out, expected, **tolerance(operator))
        dx, dM = torch.autograd.grad(out, (x, M), g)
        W0_grad = g @ layer.base_layer.weight  # the frozen GEMM's part of ∂x, absent when timed alone
        torch.testing.assert_close(dx, expected_grads[0] - W0_grad, **tolerance(operator))
        torch.testing.assert_close(dM, expected_grads[1], **tolerance(operator))


def test_both_blockwise_strategies_are_exercised():
    """The tests above run rotation and decoupling both as one shared-M GEMM and as the stack of blocks."""
    rotate, _ = layer_pair(37, 53, 8, "rotate")
    assert _rotate_inputs(rotate.mora.layout, 3) and not _rotate_inputs(rotate.mora.layout, 40)
    assert _shared_matrix(rotate.mora.layout, 3) and not _shared_matrix(rotate.mora.layout, 40)
    decouple, _ = layer_pair(37, 53, 8, "decouple")
    assert _shared_matrix(decouple.mora.layout, 3) and not _shared_matrix(decouple.mora.layout, 40)
    exact, _ = layer_pair(32, 32, 8, "decouple")  # blocks are x itself: shared at any T
    assert _shared_matrix(exact.mora.layout, 40)
    # on a GPU (launch-bound) the shared matrix at any T: the path the tests above run at T ≤ r̂
    assert _shared_matrix(rotate.mora.layout, 40, on_gpu=True) and _shared_matrix(decouple.mora.layout, 40, on_gpu=True)


@pytest.mark.parametrize("operator", ["decouple", "rotate"])
def test_blockwise_gradcheck_on_both_strategies(operator):
    layer, _ = layer_pair(21, 30, 6, operator)
    M = layer.mora.M.detach().clone().requires_grad_(True)
    for tokens in (2, 9):  # r̂ = 6: one shared-M GEMM, then the stack of blocks
        x = torch.randn(tokens, 21, dtype=torch.float64, requires_grad=True)

        def f(x, M):
            from mora.operators import add_mora_update
            return add_mora_update(layer.base_layer(x), x, M, layer.mora.layout, layer.mora.cos, layer.mora.sin)

        assert torch.autograd.gradcheck(f, (x, M), eps=1e-6, atol=1e-6)


def test_straightforward_refuses_layouts_it_does_not_cover():
    adapter = MoRAAdapter(32, 32, 8, "share", "block", "block")
    with pytest.raises(ValueError, match="cyclic"):
        StraightforwardMoRA(MoRALinear(nn.Linear(32, 32), adapter))


def fake_entry(method, step=1.0, delta=1.0, memory=100, shape="4->4", tokens=2, rank=8, adapter=1.0):
    return dict(shape=shape, tokens=tokens, rank=rank, method=method, step_s=step, delta_weight_s=delta,
                copy_s=1.0, memory={"saved_activation_bytes": memory}, adapter_s=adapter)


def test_verdicts_follow_the_targets():
    entries = [fake_entry("bare"), fake_entry("bare-again", step=1.02), fake_entry("lora", memory=100),
               fake_entry("rotate", step=0.99, delta=1.9, memory=105), fake_entry("rotate-sf", step=1.0, delta=2.0),
               fake_entry("share", step=1.01, delta=0.5, memory=90), fake_entry("share-sf", step=1.0, delta=1.0),
               fake_entry("decouple", step=0.9, delta=2.5, memory=106), fake_entry("decouple-sf", delta=3.0),
               fake_entry("truncate", delta=1.2), fake_entry("truncate-sf", delta=1.0)]
    for e in entries:
        if e["method"].startswith("bare"):
            del e["delta_weight_s"]
    bench.add_ratios(entries, "cpu")
    by = {e["method"]: e for e in entries}
    assert all(v["met"] for v in by["rotate"]["verdicts"].values())
    assert not by["share"]["verdicts"]["step_vs_straightforward"]["met"]
    assert not by["decouple"]["verdicts"]["delta_weight_vs_copy"]["met"]          # 2.5 > 2× copy
    assert not by["decouple"]["verdicts"]["memory_vs_lora"]["met"]                # 1.06 > LoRA + 5%
    assert not by["truncate"]["verdicts"]["delta_weight_vs_straightforward"]["met"]
    assert by["lora"]["verdicts"] == {} and by["rotate-sf"]["verdicts"] == {}
    assert bench.verdict_cell(by["share"], noise_bands({"noise": {"max_abs_deviation": 0.0}})) == "MISS step"
    assert bench.noise_band(entries)["max_abs_deviation"] == pytest.approx(0.02)


def test_flop_bound_matches_the_issue_formula():
    k = d = 4096
    share = bench.flop_bound("share", k, d, 8, 256)
    assert share == pytest.approx(1 + (3 * 256 ** 2 + 2 * (k + d)) / (2 * d * k))
    assert bench.flop_bound("rotate", k, d, 8, 256) > bench.flop_bound("decouple", k, d, 8, 256) > share
    assert bench.flop_bound("rotate-sf", k, d, 8, 256) == bench.flop_bound("rotate", k, d, 8, 256)
    assert bench.flop_bound("bare-again", k, d, 8, None) == 1.0


def test_a_timed_ratio_within_the_noise_band_is_a_tie_and_memory_is_never_one():
    """A timed ratio above its target by no more than the run's A/A band is a tie (it cannot be told from a
    met one); beyond the band it is a miss; memory, counted not timed, has no band."""
    from benchmarks.report import overall_verdict

    entries = [fake_entry("bare"), fake_entry("bare-again", step=1.03), fake_entry("lora", memory=100),
               fake_entry("share", step=1.02, delta=0.5, memory=100), fake_entry("share-sf", step=1.0, delta=1.0),
               fake_entry("rotate", step=1.05, delta=0.5, memory=100), fake_entry("rotate-sf", step=1.0, delta=1.0),
               fake_entry("decouple", step=0.9, delta=0.5, memory=106), fake_entry("decouple-sf", delta=1.0)]
    for e in entries:
        if e["method"].startswith("bare"):
            del e["delta_weight_s"]
    bench.add_ratios(entries, "cpu")
    by = {e["method"]: e for e in entries}
    bands = noise_bands({"noise": bench.noise_band(entries)})
    assert bands["step_vs_straightforward"] == pytest.approx(0.03)
    assert verdict_text([by["share"]], bands) == "tie step (within ±0.030)"         # 1.02 ≤ 1.00 + 0.03
    assert verdict_text([by["rotate"]], bands) == "MISS step"                      # 1.05 > 1.03
    assert verdict_text([by["decouple"]], bands) == "MISS mem"                     # 1.06 > 1.05, no band
    assert verdict_text([by["share"]], dict.fromkeys(bands, 0.0)) == "MISS step"
    result = dict(noise=bench.noise_band(entries), entries=[by["share"]])
    assert overall_verdict(result) == "within the noise band"
    assert overall_verdict({**result, "entries": [by["share"], by["rotate"]]}) == "no"
    assert overall_verdict({**result, "noise": {"max_abs_deviation": 0.01}, "entries": [by["decouple"]]}) == "no"


def test_the_adapters_alone_have_their_own_noise_band():
    """The adapters timed alone are judged against the A/A band of the sharing adapter timed twice, not the
    bare layer's: 1.015× is a tie within an adapter band of 0.02 and a miss within 0.01, whatever the step's."""
    def run(adapter_again):
        entries = [fake_entry("bare"), fake_entry("bare-again", step=1.001), fake_entry("lora"),
                   fake_entry("share", adapter=1.015, delta=0.5), fake_entry("share-sf", delta=1.0)]
        entries[3]["adapter_again_s"] = adapter_again
        del entries[0]["delta_weight_s"], entries[1]["delta_weight_s"]
        bench.add_ratios(entries, "cpu")
        return entries, noise_bands({"noise": bench.noise_band(entries)})

    entries, bands = run(adapter_again=1.015 * 1.02)
    share = entries[3]
    assert share["ratios"]["adapter_vs_straightforward"] == pytest.approx(1.015)
    assert bands["adapter_vs_straightforward"] == pytest.approx(0.02)
    assert bands["step_vs_straightforward"] == pytest.approx(0.001)
    assert verdict_text([share], bands) == "tie adapter (within ±0.020)"
    entries, bands = run(adapter_again=1.015 * 1.01)
    assert verdict_text([entries[3]], bands) == "MISS adapter"


def test_the_rounds_spread_widens_a_lucky_a_a_band():
    """One A/A pair is one draw of the noise; the rounds' pooled spread gives two standard errors of a ratio of
    medians, and the verdicts take the wider. log-times 0, ±0.1 over 3 rounds: σ² pooled over the
    configurations, band 2·√2·√(π/2)·σ/√3; the bare layer, repeated per rank, counts once, single rounds never."""
    import math

    from benchmarks.report import configuration_rounds, rounds_band

    spread = [1.0, math.exp(0.1), math.exp(-0.1)]
    entries = [fake_entry("bare", rank=8), fake_entry("bare", rank=256), fake_entry("bare-again", rank=8),
               fake_entry("share", rank=8), fake_entry("share-sf", rank=8)]
    for e in entries:
        e["step_s_all"] = spread if e["method"] != "bare-again" else [1.0, 1.0, 1.0]
    entries[4]["step_s_all"] = [1.0]                   # one round: no spread to read
    # bare (once, not per rank), bare-again, share: (0.01 + 0 + 0.01) / 3, not (0.01·3 + 0) / 4
    expected = 2 * math.sqrt(2) * math.sqrt(math.pi / 2) * math.sqrt((0.01 + 0 + 0.01) / 3) / math.sqrt(3)
    assert len(configuration_rounds(entries, "step_s_all")) == 4                 # bare, bare-again, share, share-sf
    assert rounds_band(configuration_rounds(entries, "step_s_all")) == pytest.approx(expected)
    assert rounds_band(configuration_rounds(entries, "adapter_s_all")) == 0.0
    lucky = dict(max_abs_deviation=0.001, adapter_max_abs_deviation=0.3)
    bands = noise_bands(dict(noise=lucky, entries=entries))
    assert bands["step_vs_straightforward"] == pytest.approx(expected)   # the rounds' band beats a lucky A/A
    assert bands["adapter_vs_straightforward"] == 0.3                     # a wide A/A stays
