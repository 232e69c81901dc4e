"""Sanity checks of the slow oracle in tests/reference.py (paper Section 4, Eq. 2-11).

The key check is Eq. 3: the independently written Delta W path must satisfy
Delta W x == f_decomp(M f_comp(x)).  The rest are small hand-checkable cases.
"""

import math

import pytest
import torch

try:
    from tests.reference import (
        reference_delta_weight,
        reference_forward,
        reference_forward_batch,
    )
except ImportError:  # tests/ not importable as a package
    from reference import reference_delta_weight, reference_forward, reference_forward_batch

SHAPES = [  # (k, d, r_hat)
    (37, 53, 8),
    (64, 24, 8),
    (5, 3, 8),
    (8, 8, 8),
    (16, 16, 8),
]
PADDINGS = ["wrap", "zero"]
GROUP_COMBOS = [(c, dc) for c in ("cyclic", "block") for dc in ("cyclic", "block")]

CASES = (
    [("truncate", "cyclic", "cyclic")]
    + [("share", c, dc) for c, dc in GROUP_COMBOS]
    + [("decouple", "cyclic", "cyclic"), ("rotate", "cyclic", "cyclic")]
)


def _random(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------------------
# Eq. 3: Delta W x == f_decomp(M f_comp(x))
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("k,d,r", SHAPES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("operator,cg,dg", CASES)
def test_delta_weight_matches_forward(k, d, r, padding, operator, cg, dg):
    M = _random((r, r), seed=k * 1000 + d)
    X = _random((3, k), seed=k + d + r)
    W = reference_delta_weight(M, k, d, operator, cg, dg, padding)
    assert W.shape == (d, k) and W.dtype == torch.float64
    Y = reference_forward_batch(X, M, k, d, operator, cg, dg, padding)
    assert Y.shape == (3, d) and Y.dtype == torch.float64
    for a in range(3):
        torch.testing.assert_close(W @ X[a], Y[a], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(reference_forward(X[a], M, k, d, operator, cg, dg, padding), Y[a])


# ----------------------------------------------------------------------------
# hand-checkable identities
# ----------------------------------------------------------------------------

def test_truncate_is_M_in_top_left_block():
    """Eq. 5 with k = d = 12, r_hat = 4."""
    M = _random((4, 4), seed=1)
    W = reference_delta_weight(M, 12, 12, "truncate")
    expected = torch.zeros(12, 12, dtype=torch.float64)
    expected[:4, :4] = M
    torch.testing.assert_close(W, expected, rtol=0, atol=0)


def test_share_cyclic_with_k_equal_d_equal_r_is_M():
    M = _random((6, 6), seed=2)
    W = reference_delta_weight(M, 6, 6, "share", "cyclic", "cyclic")
    torch.testing.assert_close(W, M, rtol=0, atol=0)


def test_decouple_is_block_diagonal():
    """Eq. 8 with k = d = 2 r_hat."""
    M = _random((4, 4), seed=3)
    W = reference_delta_weight(M, 8, 8, "decouple")
    torch.testing.assert_close(W, torch.block_diag(M, M), rtol=0, atol=0)


def test_rotate_blocks_r2():
    """Eq. 9-11 with r_hat = 2: theta_0 = 1, block 0 unrotated, block 1 = M R_1."""
    M = _random((2, 2), seed=4)
    W = reference_delta_weight(M, 4, 4, "rotate")
    c, s = math.cos(1.0), math.sin(1.0)
    R1 = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    torch.testing.assert_close(W[:2, :2], M, rtol=0, atol=0)
    torch.testing.assert_close(W[2:, 2:], M @ R1, rtol=1e-14, atol=1e-14)
    assert torch.all(W[:2, 2:] == 0) and torch.all(W[2:, :2] == 0)


def test_rotate_half_pairing_r4():
    """r_hat = 4: pairs (0, 2) with theta_0 = 1 and (1, 3) with theta_1 = 10000**-0.5."""
    M = _random((4, 4), seed=5)
    W = reference_delta_weight(M, 8, 8, "rotate")
    c0, s0 = math.cos(1.0), math.sin(1.0)
    c1, s1 = math.cos(0.01), math.sin(0.01)
    R1 = torch.tensor([[c0, 0, -s0, 0],
                       [0, c1, 0, -s1],
                       [s0, 0, c0, 0],
                       [0, s1, 0, c1]], dtype=torch.float64)
    torch.testing.assert_close(W[:4, :4], M, rtol=0, atol=0)
    torch.testing.assert_close(W[4:, 4:], M @ R1, rtol=1e-14, atol=1e-14)
    # forward: the second block of a one-hot input is rotated before M
    x = torch.zeros(8, dtype=torch.float64)
    x[4] = 1.0
    expected = torch.cat([torch.zeros(4, dtype=torch.float64), M @ R1[:, 0]])
    torch.testing.assert_close(reference_forward(x, M, 8, 8, "rotate"), expected)


def test_share_block_block_is_kronecker():
    """k = d = 2 r_hat with contiguous groups of size 2: Delta W = M kron ones(2, 2)."""
    M = _random((3, 3), seed=6)
    W = reference_delta_weight(M, 6, 6, "share", "block", "block")
    expected = torch.kron(M, torch.ones(2, 2, dtype=torch.float64))
    torch.testing.assert_close(W, expected, rtol=0, atol=0)


def test_share_cyclic_wrap_and_zero_padding_columns():
    """k = 5, r_hat = 4, cyclic: L = 8, padded positions 5, 6, 7 hold features
    0, 1, 2 (groups 1, 2, 3) under wrap padding; zero padding drops them."""
    M = _random((4, 4), seed=7)
    W = reference_delta_weight(M, 5, 4, "share", "cyclic", "cyclic", "wrap")
    expected_cols = [M[:, 0] + M[:, 1], M[:, 1] + M[:, 2], M[:, 2] + M[:, 3], M[:, 3], M[:, 0]]
    for j in range(5):
        torch.testing.assert_close(W[:, j], expected_cols[j], rtol=0, atol=0)
    Wz = reference_delta_weight(M, 5, 4, "share", "cyclic", "cyclic", "zero")
    for j in range(5):
        torch.testing.assert_close(Wz[:, j], M[:, j % 4], rtol=0, atol=0)


def test_block_group_sizes():
    """Block groups: k = 10, r_hat = 4 -> sizes 3, 3, 2, 2; k = 3 < r_hat -> 1, 1, 1, 0."""
    eye = torch.eye(4, dtype=torch.float64)
    out = reference_forward(torch.ones(10, dtype=torch.float64), eye, 10, 4, "share", "block", "cyclic")
    torch.testing.assert_close(out, torch.tensor([3.0, 3.0, 2.0, 2.0], dtype=torch.float64))
    out = reference_forward(torch.ones(3, dtype=torch.float64), eye, 3, 4, "share", "block", "cyclic")
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    # decompress block with d = 6: groups of output rows are {0,1}, {2,3}, {4}, {5}
    y = torch.tensor([10.0, 20.0, 30.0, 40.0], dtype=torch.float64)
    out = reference_forward(y, eye, 4, 6, "share", "cyclic", "block")
    torch.testing.assert_close(out, torch.tensor([10.0, 10.0, 20.0, 20.0, 30.0, 40.0], dtype=torch.float64))


def test_decouple_tiles_and_truncates_output():
    """d > n r_hat tiles z, d < n r_hat truncates it (k = 3, r_hat = 2 -> n r_hat = 4)."""
    M = torch.eye(2, dtype=torch.float64)
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    wrap = reference_forward(x, M, 3, 6, "decouple", padding="wrap")
    torch.testing.assert_close(wrap, torch.tensor([1.0, 2.0, 3.0, 1.0, 1.0, 2.0], dtype=torch.float64))
    zero = reference_forward(x, M, 3, 3, "decouple", padding="zero")
    torch.testing.assert_close(zero, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


def test_truncate_pads_short_input():
    """k < r_hat: c_t = x~_t; wrap repeats x, zero pads with 0; rows >= r_hat are zero."""
    M = torch.eye(4, dtype=torch.float64)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    out = reference_forward(x, M, 2, 6, "truncate", padding="wrap")
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 1.0, 2.0, 0.0, 0.0], dtype=torch.float64))
    out = reference_forward(x, M, 2, 6, "truncate", padding="zero")
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))


# ----------------------------------------------------------------------------
# argument validation
# ----------------------------------------------------------------------------

def test_rotate_odd_rank_raises():
    M = _random((3, 3), seed=8)
    with pytest.raises(ValueError):
        reference_delta_weight(M, 6, 6, "rotate")
    with pytest.raises(ValueError):
        reference_forward(torch.zeros(6, dtype=torch.float64), M, 6, 6, "rotate")


def test_unknown_operator_raises_with_allowed_names():
    M = _random((2, 2), seed=9)
    with pytest.raises(ValueError) as info:
        reference_delta_weight(M, 4, 4, "bogus")
    for name in ("truncate", "share", "decouple", "rotate"):
        assert name in str(info.value)


@pytest.mark.parametrize("kwargs,allowed", [
    ({"compress_groups": "strided"}, ("cyclic", "block")),
    ({"decompress_groups": "strided"}, ("cyclic", "block")),
    ({"padding": "reflect"}, ("wrap", "zero")),
])
def test_unknown_group_or_padding_raises(kwargs, allowed):
    M = _random((2, 2), seed=10)
    with pytest.raises(ValueError) as info:
        reference_forward(torch.zeros(4, dtype=torch.float64), M, 4, 4, "share", **kwargs)
    for name in allowed:
        assert name in str(info.value)
