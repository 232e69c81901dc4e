"""Slow, obvious oracle for the MoRA compress/decompress operators (paper Section 4).

Everything here is written with plain Python loops over indices on Python floats
(float64), so that it can serve as an independent check of a vectorised
implementation.  Two independent paths are provided:

* ``reference_forward``      -- Eq. 2: Delta x = f_decomp(M f_comp(x))
* ``reference_delta_weight`` -- the merged matrix Delta W, written entry by entry
                                from Eq. 5 / 7 / 8 / 9-10.

Eq. 3 (f_decomp(M f_comp(x)) == Delta W x) relates the two.

Conventions (all indices 0-based; k = in_features, d = out_features,
r = r_hat = M.shape[0]; M maps compressed input to compressed output,
y_i = sum_t M[i, t] c_t):

Padding.  The padded input x~ has x~_p = x_p for p < k; for p >= k it is
x_{p mod k} ("wrap", cycling as often as needed) or 0 ("zero").

truncate (Eq. 4-5): c_t = x~_t for t < r; Delta x_i = y_i for i < r, else 0.

share (Eq. 6-7): compress_groups "cyclic" pads to L = ceil(k/r)*r and puts padded
position p in group p mod r; "block" does not pad and splits the k features into
r contiguous groups, the first k mod r of size k//r + 1, the rest of size k//r.
c_g = sum of the group.  decompress_groups "cyclic": Delta x_i = y_{i mod r};
"block": the d outputs are split into contiguous groups in the same way and
Delta x_i = y_{group(i)}.

decouple (Eq. 8): n = ceil(k/r) blocks x~_b = x~[b r:(b+1) r], z_b = M x~_b,
z = concat(z_0..z_{n-1}), Delta x_i = z_{i mod (n r)}.

rotate (Eq. 9-11): as decouple but z_b = M R_b x~_b, with R_b the rotate-half
RoPE rotation: h = r/2, theta_t = 10000**(-2t/r), phi = b*theta_t, pairs (t, t+h).
"""

import math

import torch

OPERATORS = ("truncate", "share", "decouple", "rotate")
GROUP_KINDS = ("cyclic", "block")
PADDINGS = ("wrap", "zero")


# ----------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------

def _validate(M, in_features, out_features, operator, compress_groups, decompress_groups, padding):
    """Check the arguments; return r_hat.  Raises ValueError naming allowed values."""
    if operator not in OPERATORS:
        raise ValueError(f"unknown operator {operator!r}; allowed: {', '.join(OPERATORS)}")
    if compress_groups not in GROUP_KINDS:
        raise ValueError(f"unknown compress_groups {compress_groups!r}; allowed: {', '.join(GROUP_KINDS)}")
    if decompress_groups not in GROUP_KINDS:
        raise ValueError(f"unknown decompress_groups {decompress_groups!r}; allowed: {', '.join(GROUP_KINDS)}")
    if padding not in PADDINGS:
        raise ValueError(f"unknown padding {padding!r}; allowed: {', '.join(PADDINGS)}")
    if M.dim() != 2 or M.shape[0] != M.shape[1] or M.shape[0] < 1:
        raise ValueError(f"M must be a non-empty square matrix, got shape {tuple(M.shape)}")
    if in_features < 1 or out_features < 1:
        raise ValueError("in_features and out_features must be positive")
    r = M.shape[0]
    if operator == "rotate" and r % 2 != 0:
        raise ValueError(f"operator 'rotate' needs an even r_hat, got {r}")
    return r


def _matrix_to_lists(M):
    """Copy a 2-D tensor into nested lists of Python floats, element by element."""
    rows, cols = M.shape[0], M.shape[1]
    return [[float(M[i, t]) for t in range(cols)] for i in range(rows)]


def _source_feature(p, k, padding):
    """Which input feature sits at padded position p (None for a zero pad)."""
    if p < k:
        return p
    if padding == "wrap":
        return p % k
    return None


def _padded_value(x, p, k, padding):
    """x~_p: the padded input at position p (x is a list of floats)."""
    j = _source_feature(p, k, padding)
    return 0.0 if j is None else x[j]


def _ceil_div(a, b):
    return (a + b - 1) // b


def _block_group(index, total, r):
    """Contiguous grouping of `total` items into r groups: the first total % r
    groups have total // r + 1 items, the remaining ones total // r items."""
    q, m = total // r, total % r
    if index < m * (q + 1):
        return index // (q + 1)
    return m + (index - m * (q + 1)) // q


def _matvec(M, v):
    """y_i = sum_t M[i][t] v_t (M, v as lists)."""
    y = []
    for i in range(len(M)):
        s = 0.0
        for t in range(len(v)):
            s += M[i][t] * v[t]
        y.append(s)
    return y


# ----------------------------------------------------------------------------
# share (Eq. 6-7): group maps
# ----------------------------------------------------------------------------

def _share_input_positions(k, r, compress_groups):
    """Padded positions that f_comp sums over: ceil(k/r)*r for cyclic, k for block."""
    return _ceil_div(k, r) * r if compress_groups == "cyclic" else k


def _share_in_group(p, k, r, compress_groups):
    """g~_p of Eq. 7: the input group of padded position p."""
    return p % r if compress_groups == "cyclic" else _block_group(p, k, r)


def _share_out_group(i, d, r, decompress_groups):
    """g~'_i of Eq. 6-7: the group (row of M) feeding output i."""
    return i % r if decompress_groups == "cyclic" else _block_group(i, d, r)


# ----------------------------------------------------------------------------
# rotate (Eq. 10-11): the RoPE rotation, written two independent ways
# ----------------------------------------------------------------------------

def _theta(t, r):
    """theta_t = 10000 ** (-2 t / r_hat) (Eq. 11, 0-based t)."""
    return 10000.0 ** (-2.0 * t / r)


def _rotate_vector(v, b, r):
    """a^b of Eq. 10: rotate-half RoPE applied to v by angles b * theta_t."""
    h = r // 2
    out = [0.0] * r
    for t in range(h):
        phi = b * _theta(t, r)
        out[t] = v[t] * math.cos(phi) - v[t + h] * math.sin(phi)
        out[t + h] = v[t + h] * math.cos(phi) + v[t] * math.sin(phi)
    return out


def _rotation_matrix(b, r):
    """R_b as an explicit r x r matrix (Eq. 11 with the rotate-half pairing)."""
    h = r // 2
    R = [[0.0] * r for _ in range(r)]
    for t in range(h):
        phi = b * _theta(t, r)
        R[t][t] = math.cos(phi)
        R[t][t + h] = -math.sin(phi)
        R[t + h][t + h] = math.cos(phi)
        R[t + h][t] = math.sin(phi)
    return R


def _block_matrix(M, b, r, operator):
    """The b-th diagonal block of Delta W: M for decouple (Eq. 8),
    P_b = M R_b for rotate (Eq. 10), P_b[i, s] = sum_u M[i, u] R_b[u, s]."""
    if operator == "decouple":
        return M
    R = _rotation_matrix(b, r)
    P = [[0.0] * r for _ in range(r)]
    for i in range(r):
        for s in range(r):
            for u in range(r):
                P[i][s] += M[i][u] * R[u][s]
    return P


# ----------------------------------------------------------------------------
# forward path: Delta x = f_decomp(M f_comp(x))   (Eq. 2)
# ----------------------------------------------------------------------------

def _forward_truncate(x, M, k, d, r, padding):
    """Eq. 4: c = x~[0:r], y = M c, Delta x = [y; 0] cut/padded to length d."""
    c = [_padded_value(x, t, k, padding) for t in range(r)]
    y = _matvec(M, c)
    return [y[i] if i < r else 0.0 for i in range(d)]


def _forward_share(x, M, k, d, r, compress_groups, decompress_groups, padding):
    """Eq. 6: c_g = sum_{p in g} x~_p, y = M c, Delta x_i = y_{g~'_i}."""
    c = [0.0] * r
    for p in range(_share_input_positions(k, r, compress_groups)):
        c[_share_in_group(p, k, r, compress_groups)] += _padded_value(x, p, k, padding)
    y = _matvec(M, c)
    return [y[_share_out_group(i, d, r, decompress_groups)] for i in range(d)]


def _forward_blocks(x, M, k, d, r, operator, padding):
    """Eq. 8 (decouple) / Eq. 9-10 (rotate): z_b = M (R_b) x~_b, Delta x_i = z_{i mod n r}."""
    n = _ceil_div(k, r)
    z = []
    for b in range(n):
        v = [_padded_value(x, b * r + s, k, padding) for s in range(r)]
        if operator == "rotate":
            v = _rotate_vector(v, b, r)
        z.extend(_matvec(M, v))
    return [z[i % (n * r)] for i in range(d)]


def reference_forward(x, M, in_features, out_features, operator,
                      compress_groups="cyclic", decompress_groups="cyclic", padding="wrap"):
    """Delta x = f_decomp(M f_comp(x)) for one input vector x of length in_features (Eq. 2).

    Returns a float64 1-D tensor of length out_features.  See the module
    docstring for the exact conventions of each operator."""
    r = _validate(M, in_features, out_features, operator, compress_groups, decompress_groups, padding)
    if x.dim() != 1 or x.shape[0] != in_features:
        raise ValueError(f"x must be 1-D of length {in_features}, got shape {tuple(x.shape)}")
    xs = [float(x[j]) for j in range(in_features)]
    Ms = _matrix_to_lists(M)
    k, d = in_features, out_features
    if operator == "truncate":
        out = _forward_truncate(xs, Ms, k, d, r, padding)
    elif operator == "share":
        out = _forward_share(xs, Ms, k, d, r, compress_groups, decompress_groups, padding)
    else:
        out = _forward_blocks(xs, Ms, k, d, r, operator, padding)
    return torch.tensor(out, dtype=torch.float64)


def reference_forward_batch(X, M, in_features, out_features, operator,
                            compress_groups="cyclic", decompress_groups="cyclic", padding="wrap"):
    """Apply reference_forward to every row of a 2-D X of shape (n, in_features); returns (n, out_features)."""
    rows = [reference_forward(X[a], M, in_features, out_features, operator,
                              compress_groups, decompress_groups, padding)
            for a in range(X.shape[0])]
    if not rows:
        return torch.zeros(0, out_features, dtype=torch.float64)
    return torch.stack(rows)


# ----------------------------------------------------------------------------
# merged path: Delta W entry by entry
# ----------------------------------------------------------------------------

def _delta_weight_truncate(M, k, d, r, padding):
    """Eq. 5: Delta W = [[M, 0], [0, 0]]; padded columns t >= k fold onto their source feature."""
    W = [[0.0] * k for _ in range(d)]
    for i in range(min(d, r)):
        for j in range(k):
            for t in range(r):
                if _source_feature(t, k, padding) == j:
                    W[i][j] += M[i][t]
    return W


def _delta_weight_share(M, k, d, r, compress_groups, decompress_groups, padding):
    """Eq. 7: Delta W[i, j] = sum over padded p with source j of M[g~'_i, g~_p]."""
    L = _share_input_positions(k, r, compress_groups)
    W = [[0.0] * k for _ in range(d)]
    for i in range(d):
        row = _share_out_group(i, d, r, decompress_groups)
        for j in range(k):
            for p in range(L):
                if _source_feature(p, k, padding) == j:
                    W[i][j] += M[row][_share_in_group(p, k, r, compress_groups)]
    return W


def _delta_weight_blocks(M, k, d, r, operator, padding):
    """Eq. 8 / 9: block-diagonal of M (or P_b = M R_b) on the n r padded space;
    output row i reads padded row i mod (n r); padded columns fold onto their source."""
    n = _ceil_div(k, r)
    blocks = [_block_matrix(M, b, r, operator) for b in range(n)]
    W = [[0.0] * k for _ in range(d)]
    for i in range(d):
        padded_row = i % (n * r)
        b, a = padded_row // r, padded_row % r
        for j in range(k):
            for s in range(r):
                if _source_feature(b * r + s, k, padding) == j:
                    W[i][j] += blocks[b][a][s]
    return W


def reference_delta_weight(M, in_features, out_features, operator,
                           compress_groups="cyclic", decompress_groups="cyclic", padding="wrap"):
    """Delta W of shape (out_features, in_features), float64, built directly from
    Eq. 5 / 7 / 8 / 9-10 (not from reference_forward), so that Eq. 3 can be tested."""
    r = _validate(M, in_features, out_features, operator, compress_groups, decompress_groups, padding)
    Ms = _matrix_to_lists(M)
    k, d = in_features, out_features
    if operator == "truncate":
        W = _delta_weight_truncate(Ms, k, d, r, padding)
    elif operator == "share":
        W = _delta_weight_share(Ms, k, d, r, compress_groups, decompress_groups, padding)
    else:
        W = _delta_weight_blocks(Ms, k, d, r, operator, padding)
    return torch.tensor(W, dtype=torch.float64)
