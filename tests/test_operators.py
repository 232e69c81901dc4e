"""MoRA operators against the slow oracle (tests/reference.py), peft's MiSS, and Eq. 3."""

import itertools
import warnings

import pytest
import torch
from torch import nn

from mora import operators
from mora.budget import lora_parameter_count, mora_r_hat
from mora.layer import MoRAAdapter, MoRALinear
from mora.operators import OFFICIAL_MORA_TYPES, OPERATORS, add_mora_update
from tests.reference import reference_delta_weight, reference_forward_batch

SHARE_GROUPS = list(itertools.product(("cyclic", "block"), repeat=2))
# every operator with every layout it admits, both paddings
LAYOUTS = [(op, cg, dg, pad) for op in OPERATORS
           for (cg, dg) in (SHARE_GROUPS if op == "share" else [("cyclic", "cyclic")])
           for pad in ("wrap", "zero")]
# (k, d, r̂): odd/non-divisible, d ≠ k both ways, one block (k ≤ r̂), pad longer than input, d < r̂
ODD_SHAPES = [(37, 53, 8), (64, 24, 8), (53, 37, 6), (5, 3, 2), (3, 40, 8), (6, 12, 8), (37, 5, 8), (100, 7, 2)]


def random_adapter(k, d, r_hat, layout, dtype=torch.float64, seed=0):
    op, cg, dg, pad = layout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r̂ > min(d, k) warns on purpose for some shapes
        adapter = MoRAAdapter(k, d, r_hat, op, cg, dg, pad).to(dtype)
    with torch.no_grad():
        adapter.M.copy_(torch.randn(r_hat, r_hat, generator=torch.Generator().manual_seed(seed)))
    return adapter


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "-".join(l))
@pytest.mark.parametrize("k,d,r_hat", ODD_SHAPES)
def test_forward_and_delta_match_reference(k, d, r_hat, layout):
    if r_hat * r_hat > k * d:
        pytest.skip("M larger than W is rejected by design")
    adapter = random_adapter(k, d, r_hat, layout)
    x = torch.randn(5, k, dtype=torch.float64)
    M = adapter.M.detach()
    # rotation tables are float32 buffers by design, the oracle is float64: 1e-6 relative
    tol = dict(rtol=1e-6, atol=1e-6) if layout[0] == "rotate" else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapter(x), reference_forward_batch(x, M, k, d, *layout), **tol)
    torch.testing.assert_close(adapter.delta_weight(), reference_delta_weight(M, k, d, *layout), **tol)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "-".join(l))
@pytest.mark.parametrize("k,d,r_hat", ODD_SHAPES)
def test_eq3_identity_on_odd_shapes(k, d, r_hat, layout):
    """adapter(I)ᵀ == ΔW and base(x) + Δ(x) == x (W + ΔW)ᵀ, float64, tight."""
    if r_hat * r_hat > k * d:
        pytest.skip("M larger than W is rejected by design")
    adapter = random_adapter(k, d, r_hat, layout)
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(adapter(eye).T, adapter.delta_weight(), rtol=1e-12, atol=1e-12)
    base = nn.Linear(k, d, bias=True).double()
    layer = MoRALinear(base, adapter)
    x = torch.randn(2, 3, k, dtype=torch.float64)
    expected = x @ (base.weight + adapter.delta_weight()).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_matches_peft_miss_mini():
    """peft's MiSS with r = mini_r = r̂, init 'mini' is cyclic/tile sharing with M = Dᵀ, zero pad."""
    from peft import MissConfig, inject_adapter_in_model

    k, d, r_hat = 40, 24, 8
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(k, d))
    net = inject_adapter_in_model(MissConfig(r=r_hat, mini_r=r_hat, init_weights="mini",
                                             target_modules=["0"]), net)
    block = net[0].miss_block["default"]  # D ∈ R^{r̂×mini_r}
    with torch.no_grad():
        block.copy_(torch.randn_like(block))
    adapter = MoRAAdapter(k, d, r_hat, "share", "cyclic", "cyclic", "zero")
    with torch.no_grad():
        adapter.M.copy_(block.T)
    x = torch.randn(7, k)
    base = net[0].base_layer(x)
    torch.testing.assert_close(net(x) - base, adapter(x), rtol=1e-5, atol=1e-5)


LLAMA7B_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 1024)]  # (k, d); last: GQA


@pytest.mark.slow
@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize("rank", [8, 256])
@pytest.mark.parametrize("k,d", LLAMA7B_SHAPES)
@pytest.mark.filterwarnings("ignore:r_hat=")  # r=256 on 4096→1024 gives r̂ > d on purpose
def test_eq3_on_llama2_7b_shapes(k, d, rank, operator):
    adapter = MoRAAdapter.from_rank(k, d, rank, operator).double()
    with torch.no_grad():
        adapter.M.normal_(generator=torch.Generator().manual_seed(rank))
    x = torch.randn(3, k, dtype=torch.float64)
    torch.testing.assert_close(adapter(x), x @ adapter.delta_weight().T, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("k,d", LLAMA7B_SHAPES)
@pytest.mark.parametrize("rank", [8, 16, 32, 64, 128, 256])
def test_parameter_parity_with_lora(k, d, rank):
    lora = lora_parameter_count(k, d, rank)
    for even in (False, True):
        nearest = mora_r_hat(k, d, rank, "nearest", even) ** 2
        assert abs(nearest - lora) / lora <= 0.005
        assert mora_r_hat(k, d, rank, "floor", even) ** 2 <= lora


def test_official_r_hat_examples():
    """Values stated for the official code (reference facts): int(√((k+d)r) + 0.5), even for rotation."""
    assert mora_r_hat(4096, 4096, 8) == 256
    assert mora_r_hat(4096, 11008, 8) == 348
    # already even, so rotation keeps 348 (the shared reference notes say 346; the arithmetic of
    # int(√(15104·8) + 0.5) // 2 * 2 gives 348)
    assert mora_r_hat(4096, 11008, 8, even=True) == 348
    assert mora_r_hat(4096, 4096, 8, even=True) == 256
    assert mora_r_hat(4096, 11008, 7, even=True) == 324  # 325 rounded down to even
    assert mora_r_hat(4096, 1024, 8) == 202
    assert mora_r_hat(4096, 4096, 256) == 1448  # paper text: ≈ 1024 at r=128, 4 rows per group


def test_rank_of_delta_weight():
    k = d = 64
    torch.manual_seed(0)
    ranks = {}
    for op in OPERATORS:
        adapter = MoRAAdapter(k, d, 16, op).double()
        with torch.no_grad():
            adapter.M.normal_()
        ranks[op] = torch.linalg.matrix_rank(adapter.delta_weight()).item()
    assert ranks["truncate"] <= 16 and ranks["share"] <= 16   # r̂-limited
    assert ranks["decouple"] == 64 and ranks["rotate"] == 64    # can reach min(d, k)
    lora_rank = torch.linalg.matrix_rank(torch.randn(d, 2, dtype=torch.float64) @ torch.randn(2, k, dtype=torch.float64))
    assert lora_rank <= 2 < ranks["share"]


def test_gradients_reach_only_M():
    base = nn.Linear(24, 40)
    base.requires_grad_(False)
    layer = MoRALinear(base, MoRAAdapter.from_rank(24, 40, 2, "rotate"))
    x = torch.randn(4, 24, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.mora.M.grad is not None
    assert base.weight.grad is None and base.bias.grad is None
    # zero-initialised M: the first gradient is still non-zero (unlike LoRA with A and B both zero)
    assert layer.mora.M.grad.abs().sum() > 0


def test_buffers_stay_float32_and_follow_dtype_changes():
    adapter = MoRAAdapter(64, 64, 16, "rotate").to(torch.bfloat16)
    assert adapter.cos.dtype == torch.float32 and adapter.M.dtype == torch.bfloat16
    assert "cos" not in adapter.state_dict()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert adapter(x).dtype == torch.bfloat16


def test_merge_unmerge_and_reinit():
    torch.manual_seed(0)
    base = nn.Linear(37, 53).double()
    layer = MoRALinear(base, MoRAAdapter(37, 53, 8, "share").double())
    with torch.no_grad():
        layer.mora.M.normal_()
    x = torch.randn(6, 37, dtype=torch.float64)
    w0, unmerged = base.weight.clone(), layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0)
    layer.merge_and_reinit(groups=("block", "block"))
    torch.testing.assert_close(layer(x), unmerged)
    assert not layer.merged and layer.mora.M.abs().sum() == 0
    assert layer.mora.layout.compress_groups == "block"


def test_merge_refuses_non_finite():
    layer = MoRALinear(nn.Linear(16, 16), MoRAAdapter(16, 16, 4))
    with torch.no_grad():
        layer.mora.M[0, 0] = float("nan")
    w0 = layer.base_layer.weight.clone()
    with pytest.raises(FloatingPointError):
        layer.merge()
    torch.testing.assert_close(layer.base_layer.weight, w0)


@pytest.mark.parametrize("kwargs,field", [
    (dict(operator="spin"), "operator"),
    (dict(compress_groups="adjacent"), "compress_groups"),
    (dict(decompress_groups="x"), "decompress_groups"),
    (dict(padding="reflect"), "padding"),
])
def test_bad_names_are_rejected_with_the_allowed_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MoRAAdapter(64, 64, 8, **kwargs)


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="even r_hat"):
        MoRAAdapter(64, 64, 7, "rotate")
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        MoRAAdapter.from_rank(64, 64, 0)
    with pytest.raises(ValueError, match="more entries"):
        MoRAAdapter(8, 8, 9)
    with pytest.warns(UserWarning, match="exceeds min"):
        MoRAAdapter(64, 8, 16, "share")


def test_official_type_codes_cover_the_named_axes():
    assert set(OFFICIAL_MORA_TYPES.values()) == {
        ("share", cg, dg) for cg, dg in SHARE_GROUPS} | {("rotate", "cyclic", "cyclic")}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "-".join(l))
@pytest.mark.parametrize("k,d,r_hat", [(37, 53, 8), (64, 24, 8), (3, 40, 8)])
def test_gradients_of_x_M_and_W_are_exact(k, d, r_hat, layout):
    """gradcheck through the custom backward passes (compress, in-place adds into the base output)."""
    adapter = random_adapter(k, d, r_hat, layout)
    base = nn.Linear(k, d).double()
    layer = MoRALinear(base, adapter)
    x = torch.randn(2, 3, k, dtype=torch.float64, requires_grad=True)

    def f(x, M, W):
        with torch.no_grad():
            adapter.M.copy_(M)
            base.weight.copy_(W)
        out = nn.functional.linear(x, W, base.bias)
        return add_mora_update(out, x, M, adapter.layout, adapter.cos, adapter.sin)

    M = adapter.M.detach().clone().requires_grad_(True)
    W = base.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (x, M, W), eps=1e-6, atol=1e-6)
    torch.testing.assert_close(f(x, M, W), layer(x))


@pytest.mark.parametrize("operator", OPERATORS)
def test_unbatched_and_batched_inputs_agree(operator):
    adapter = random_adapter(37, 53, 8, (operator, "cyclic", "cyclic", "wrap"))
    x = torch.randn(2, 4, 37, dtype=torch.float64)
    torch.testing.assert_close(adapter(x[1, 2]), adapter(x)[1, 2])


@pytest.mark.parametrize("k, n_wrapped", [(7, 3), (7, 7), (3, 8), (1, 5)])
def test_add_wrapped_folds_each_padded_column_onto_the_input_it_copies(k, n_wrapped):
    """Padded position p = k, k+1, … reads feature p mod k: one wrap (n ≤ k) is a contiguous add, several wraps
    (an input narrower than the padding) accumulate; both equal the index_add_ definition, in bfloat16 too."""
    from mora.operators import add_wrapped

    for dtype in (torch.float64, torch.bfloat16):
        target = torch.randn(4, k, dtype=torch.float64).to(dtype)
        wrapped = torch.randn(4, n_wrapped, dtype=torch.float64).to(dtype)
        expected = target.clone().index_add_(-1, torch.arange(k, k + n_wrapped) % k, wrapped)
        add_wrapped(target, wrapped)
        assert torch.equal(target, expected)


@pytest.mark.parametrize("r_hat, n_blocks", [(1448, 2), (256, 16), (6, 3)])
def test_rotated_blocks_into_a_narrower_strided_out_round_once_as_the_whole_matrix_formula(r_hat, n_blocks):
    """A bfloat16 M with float32 tables writes P^i = M R_i into ΔW's block diagonal (a strided bfloat16 view) in
    row chunks (r̂ = 1448: 45 rows a chunk): bitwise the formula on whole matrices, computed in float32 and
    rounded once, and nothing outside the diagonal blocks is touched."""
    from mora.operators import rotated_blocks, rotation_tables

    torch.manual_seed(0)
    M = torch.randn(r_hat, r_hat).bfloat16()
    cos, sin = rotation_tables(r_hat, n_blocks)
    h = r_hat // 2
    expected = torch.addcmul(M.float() * cos[:, None], torch.cat([M[:, h:], -M[:, :h]], -1).float(),
                             sin[:, None]).bfloat16()                                   # (n, r̂, r̂)
    delta = torch.full((n_blocks * r_hat + 3, n_blocks * r_hat + 5), 7.0, dtype=torch.bfloat16)
    size = n_blocks * r_hat
    diagonal = delta[:size, :size].unflatten(0, (n_blocks, r_hat)).unflatten(-1, (n_blocks, r_hat)) \
        .diagonal(dim1=0, dim2=2).permute(2, 0, 1)                                      # (n, r̂, r̂) view
    with torch.no_grad():
        rotated_blocks(M, cos, sin, out=diagonal)
    assert torch.equal(diagonal, expected)
    untouched = torch.ones_like(delta, dtype=torch.bool)
    for b in range(n_blocks):
        untouched[b * r_hat:(b + 1) * r_hat, b * r_hat:(b + 1) * r_hat] = False
    assert bool((delta[untouched] == 7.0).all())


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "-".join(l))
@pytest.mark.parametrize("k,d,r_hat", ODD_SHAPES)
def test_plain_autograd_path_equals_the_functions(k, d, r_hat, layout, monkeypatch):
    """GPU_AUTOGRAD = "plain" (torch's own backward; taken on CUDA only) gives the functions' output and
    gradients of x and M: run here on the CPU by forcing the switch."""
    import mora.operators as operators

    if r_hat * r_hat > k * d:
        pytest.skip("M larger than W is rejected by design")
    adapter = random_adapter(k, d, r_hat, layout)
    x = torch.randn(2, 3, k, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, d, dtype=torch.float64)
    results = []
    for plain in (False, True):
        monkeypatch.setattr(operators, "_plain_autograd", lambda t, plain=plain: plain)
        out = adapter(x)
        results.append((out, *torch.autograd.grad(out, (x, adapter.M), g)))
    tol = dict(rtol=1e-6, atol=1e-6) if layout[0] == "rotate" else dict(rtol=1e-12, atol=1e-12)
    for functions, plain in zip(*results):
        torch.testing.assert_close(plain, functions, **tol)


@pytest.mark.parametrize("transpose", [False, True])
def test_bfloat16_rotation_on_the_cpu_is_the_float32_rotation_rounded_once(transpose):
    # A CPU runs bfloat16-by-float32 element-wise ops in a slow mixed-dtype loop (and rounded after each pass);
    # _rotate computes in float32 there and rounds once: bitwise the float32 result cast to bfloat16.
    r_hat, n = 64, 5
    cos, sin = operators.rotation_tables(r_hat, n)
    v = torch.randn(7, n, r_hat, generator=torch.Generator().manual_seed(0)).bfloat16()
    expected = operators._rotate(v.float(), cos, sin, transpose).bfloat16()
    assert torch.equal(operators._rotate(v, cos, sin, transpose), expected)
    out = torch.empty_like(v)
    assert operators._rotate(v, cos, sin, transpose, out=out) is out and torch.equal(out, expected)
