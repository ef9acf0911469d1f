"""The ``@triton.jit`` kernels of :mod:`smaso.triton_kernels` (imported on first use:
this module needs ``triton``).

Every kernel works on a 2-D tile of units as rows (:func:`smaso.fused.fold`):
``BLOCK_M`` rows (units) by ``BLOCK_L`` positions of those rows, loaded in the input's
dtype and computed in float32 (float64 for float64 inputs, ``F64``). Programs are
numbered along one grid axis (no limit of 65535 on the second axis of CUDA grids).

A backward kernel writes the input gradient and, in the same pass, the per-row partial
sums of the parameter gradients (dη, and the slopes' and offsets' for the maxout):
program (row block, split) sums the positions of its ``chunk`` of each row and stores
one partial per (row, split). The launcher adds the splits (a tiny second stage, fixed
order: deterministic). One split, the common case, is the row's sum itself.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _compute(v, F64: tl.constexpr):
    """``v`` in the compute dtype: float64 for float64 inputs, else float32."""
    if F64:  # noqa: SIM108 (an if on a constexpr: one branch is compiled)
        out = v.to(tl.float64)
    else:
        out = v.to(tl.float32)
    return out


@triton.jit
def _weight(u, ALPHA: tl.constexpr):
    """(w(u), dw/du) of the two-region weight: α = 1 the sigmoid of Eq. (9), σ(u)
    and σ(u)(1 − σ(u)); α = 2 and 1.5 the α-entropy weights of (8.3) of the book
    (:func:`smaso.tsallis.tsallis_sigmoid` and its slope
    :func:`smaso.tsallis.tsallis_sigmoid_slope`)."""
    if ALPHA == 1.0:
        w = 1.0 / (1.0 + tl.exp(-u))
        dw = w * (1.0 - w)
    elif ALPHA == 2.0:
        p = (u + 1.0) / 2.0
        w = tl.minimum(tl.maximum(p, 0.0), 1.0)
        dw = tl.where((p > 0.0) & (p < 1.0), 0.5, 0.0)
    else:  # α = 1.5
        d = tl.minimum(tl.maximum(u / 2.0, -1.0), 1.0)
        r = tl.sqrt(2.0 - d * d)
        q = (d + r) / 2.0
        w = q * q
        dw = q * (1.0 - d / r) / 2.0
    return w, dw


@triton.jit
def two_piece_forward_kernel(
    x_ptr,
    eta_ptr,
    y_ptr,
    M,
    L,
    eta_stride,
    n_col_blocks,
    SLOPE: tl.constexpr,
    ALPHA: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """y = x (s + c w(u)), u = η c x, c = 1 − s (Theorem 3 with R = 2, Eq. 9; Eq. 2):
    :func:`smaso.activations.two_piece_vq` on rows ``x`` (M, L), one η per row."""
    pid = tl.program_id(0)
    rows = (pid // n_col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_col_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < L)[None, :]
    offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
    x = _compute(tl.load(x_ptr + offs, mask=mask, other=0.0), F64)
    eta = tl.load(eta_ptr + rows.to(tl.int64) * eta_stride, mask=row_ok, other=0.0)
    eta = _compute(eta, F64)
    w, _ = _weight(eta[:, None] * ((1.0 - SLOPE) * x), ALPHA)
    y = x * (SLOPE + (1.0 - SLOPE) * w)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def two_piece_backward_kernel(
    g_ptr,
    x_ptr,
    eta_ptr,
    gx_ptr,
    part_ptr,
    M,
    L,
    eta_stride,
    n_split,
    chunk,
    SLOPE: tl.constexpr,
    ALPHA: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """grad_x = g (s + c (w + u w′)) and the partial row sums of g (c x)² w′ (dη):
    :func:`smaso.activations.two_piece_vq_grads`, fused in one pass."""
    pid = tl.program_id(0)
    split = pid % n_split
    rows = (pid // n_split) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    base = rows.to(tl.int64)[:, None] * L
    eta = tl.load(eta_ptr + rows.to(tl.int64) * eta_stride, mask=row_ok, other=0.0)
    eta = _compute(eta, F64)[:, None]
    acc = _compute(tl.zeros([BLOCK_M, BLOCK_L], tl.float32), F64)
    for start in range(0, chunk, BLOCK_L):
        cols = split * chunk + start + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < L)[None, :]
        offs = base + cols[None, :]
        x = _compute(tl.load(x_ptr + offs, mask=mask, other=0.0), F64)
        g = _compute(tl.load(g_ptr + offs, mask=mask, other=0.0), F64)
        v = (1.0 - SLOPE) * x
        u = eta * v
        w, dw = _weight(u, ALPHA)
        gx = g * (SLOPE + (1.0 - SLOPE) * (w + u * dw))
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        acc += g * (v * v * dw)  # masked positions have g = 0
    tl.store(part_ptr + rows.to(tl.int64) * n_split + split, tl.sum(acc, 1), row_ok)


@triton.jit
def _window_offsets(rows, cols, H, W, Wo, KH: tl.constexpr, KW: tl.constexpr):
    """Offset of the top-left entry of output position ``cols`` of unit ``rows`` in
    (units, H, W) inputs, kh×kw windows with stride kh×kw."""
    oh = cols // Wo
    ow = cols - oh * Wo
    return rows.to(tl.int64)[:, None] * H * W + (oh * KH * W + ow * KW)[None, :]


@triton.jit
def pool_forward_kernel(
    x_ptr,
    eta_ptr,
    y_ptr,
    y_acc_ptr,
    lse_ptr,
    M,
    C,
    H,
    W,
    Wo,
    Lo,
    eta_stride,
    n_col_blocks,
    KH: tl.constexpr,
    KW: tl.constexpr,
    F64: tl.constexpr,
    SAVE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """β-softmax pooling y = Σ_i w_i u_i, w = softmax(η u) over each window
    (Proposition 4, Eq. 9), and lse = log Σ_i exp(η u_i):
    :func:`smaso.activations.softmax_pool_windows`. Unit m has η of channel m mod C.
    ``SAVE_ACC``: y also in the compute dtype (for the backward of a low-precision
    input: y rounded to bfloat16 would spoil u_i − y)."""
    pid = tl.program_id(0)
    rows = (pid // n_col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_col_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < Lo)[None, :]
    eta = tl.load(eta_ptr + (rows % C).to(tl.int64) * eta_stride, row_ok, other=0.0)
    eta = _compute(eta, F64)[:, None]
    top_left = _window_offsets(rows, cols, H, W, Wo, KH, KW)
    high = eta * _compute(tl.load(x_ptr + top_left, mask=mask, other=0.0), F64)
    for i in tl.static_range(KH):  # the window's largest η u
        for j in tl.static_range(KW):
            u = tl.load(x_ptr + top_left + (i * W + j), mask=mask, other=0.0)
            high = tl.maximum(high, eta * _compute(u, F64))
    z = tl.zeros_like(high)
    zu = tl.zeros_like(high)
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            u = tl.load(x_ptr + top_left + (i * W + j), mask=mask, other=0.0)
            u = _compute(u, F64)
            e = tl.exp(eta * u - high)
            z += e
            zu += e * u
    offs = rows.to(tl.int64)[:, None] * Lo + cols[None, :]
    y = zu / z
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if SAVE_ACC:
        tl.store(y_acc_ptr + offs, y, mask=mask)
    tl.store(lse_ptr + offs, (high + tl.log(z)).to(lse_ptr.dtype.element_ty), mask)


@triton.jit
def pool_backward_kernel(
    g_ptr,
    x_ptr,
    eta_ptr,
    y_ptr,
    lse_ptr,
    gx_ptr,
    part_ptr,
    M,
    C,
    H,
    W,
    Wo,
    Lo,
    eta_stride,
    n_split,
    chunk,
    KH: tl.constexpr,
    KW: tl.constexpr,
    F64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """grad_u_i = g w_i (1 + η (u_i − y)) for every entry, and the partial unit sums
    of g w_i u_i (u_i − y) (dη), with w_i = exp(η u_i − lse) from the forward's
    (y, lse): :func:`smaso.activations.softmax_pool_grads`, fused in one pass."""
    pid = tl.program_id(0)
    split = pid % n_split
    rows = (pid // n_split) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    eta = tl.load(eta_ptr + (rows % C).to(tl.int64) * eta_stride, row_ok, other=0.0)
    eta = _compute(eta, F64)[:, None]
    acc = _compute(tl.zeros([BLOCK_M, BLOCK_L], tl.float32), F64)
    for start in range(0, chunk, BLOCK_L):
        cols = split * chunk + start + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < Lo)[None, :]
        offs = rows.to(tl.int64)[:, None] * Lo + cols[None, :]
        g = _compute(tl.load(g_ptr + offs, mask=mask, other=0.0), F64)
        y = _compute(tl.load(y_ptr + offs, mask=mask, other=0.0), F64)
        lse = _compute(tl.load(lse_ptr + offs, mask=mask, other=0.0), F64)
        top_left = _window_offsets(rows, cols, H, W, Wo, KH, KW)
        for i in tl.static_range(KH):
            for j in tl.static_range(KW):
                at = top_left + (i * W + j)
                u = _compute(tl.load(x_ptr + at, mask=mask, other=0.0), F64)
                w = tl.exp(eta * u - lse)
                d = u - y
                gu = g * (w * (1.0 + eta * d))
                tl.store(gx_ptr + at, gu.to(gx_ptr.dtype.element_ty), mask=mask)
                acc += g * (w * u * d)  # masked positions have g = 0
    tl.store(part_ptr + rows.to(tl.int64) * n_split + split, tl.sum(acc, 1), row_ok)


@triton.jit
def _max_affine_weights(x, a, b, eta, r_ok):
    """Scores s_r = a_r x + b_r (BLOCK_M, R_P2, BLOCK_L) and T = softmax(η s) over the
    pieces (axis 1; Eq. 9), stabilised by the max score; padded pieces get T = 0."""
    s = x[:, None, :] * a[:, :, None] + b[:, :, None]
    valid = r_ok[None, :, None]
    top = tl.max(tl.where(valid, s, float("-inf")), 1)
    z = tl.where(valid, tl.exp(eta[:, None, None] * (s - top[:, None, :])), 0.0)
    return s, z * (1.0 / tl.sum(z, 1))[:, None, :]


@triton.jit
def _max_affine_params(a_ptr, b_ptr, rows, r, pm, a_s0, a_s1, b_s0, b_s1, F64):
    """Slopes and offsets (BLOCK_M, R_P2) of the rows, 0 on padded pieces."""
    rows = rows.to(tl.int64)[:, None]
    a = tl.load(a_ptr + rows * a_s0 + r[None, :] * a_s1, mask=pm, other=0.0)
    b = tl.load(b_ptr + rows * b_s0 + r[None, :] * b_s1, mask=pm, other=0.0)
    return _compute(a, F64), _compute(b, F64)


@triton.jit
def max_affine_forward_kernel(
    x_ptr,
    a_ptr,
    b_ptr,
    eta_ptr,
    y_ptr,
    M,
    L,
    R,
    a_s0,
    a_s1,
    b_s0,
    b_s1,
    eta_stride,
    n_col_blocks,
    F64: tl.constexpr,
    R_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """y = Σ_r T_r s_r, s_r = a_r x + b_r, T = softmax(η s) (Theorem 3, Eq. 9; Eq. 2):
    :func:`smaso.activations.max_affine_vq` on rows, R pieces per row."""
    pid = tl.program_id(0)
    rows = (pid // n_col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % n_col_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < L)[None, :]
    r = tl.arange(0, R_P2)
    r_ok = r < R
    pm = row_ok[:, None] & r_ok[None, :]
    a, b = _max_affine_params(a_ptr, b_ptr, rows, r, pm, a_s0, a_s1, b_s0, b_s1, F64)
    eta = tl.load(eta_ptr + rows.to(tl.int64) * eta_stride, mask=row_ok, other=0.0)
    eta = _compute(eta, F64)
    offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
    x = _compute(tl.load(x_ptr + offs, mask=mask, other=0.0), F64)
    s, T = _max_affine_weights(x, a, b, eta, r_ok)
    y = tl.sum(T * s, 1)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def max_affine_backward_kernel(
    g_ptr,
    x_ptr,
    a_ptr,
    b_ptr,
    eta_ptr,
    gx_ptr,
    part_a_ptr,
    part_b_ptr,
    part_eta_ptr,
    M,
    L,
    R,
    a_s0,
    a_s1,
    b_s0,
    b_s1,
    eta_stride,
    n_split,
    chunk,
    F64: tl.constexpr,
    R_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """∂y/∂s_r = T_r (1 + η (s_r − y)) and ∂y/∂η = Σ_r T_r s_r (s_r − y)
    (:func:`smaso.activations.max_affine_vq_grads`): grad_x = g Σ_r a_r ∂y/∂s_r, and
    the partial row sums of g x ∂y/∂s_r (slopes), g ∂y/∂s_r (offsets) and g ∂y/∂η."""
    pid = tl.program_id(0)
    split = pid % n_split
    rows = (pid // n_split) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    r = tl.arange(0, R_P2)
    r_ok = r < R
    pm = row_ok[:, None] & r_ok[None, :]
    a, b = _max_affine_params(a_ptr, b_ptr, rows, r, pm, a_s0, a_s1, b_s0, b_s1, F64)
    eta = tl.load(eta_ptr + rows.to(tl.int64) * eta_stride, mask=row_ok, other=0.0)
    eta = _compute(eta, F64)
    acc_a = _compute(tl.zeros([BLOCK_M, R_P2], tl.float32), F64)
    acc_b = _compute(tl.zeros([BLOCK_M, R_P2], tl.float32), F64)
    acc_eta = _compute(tl.zeros([BLOCK_M, BLOCK_L], tl.float32), F64)
    for start in range(0, chunk, BLOCK_L):
        cols = split * chunk + start + tl.arange(0, BLOCK_L)
        mask = row_ok[:, None] & (cols < L)[None, :]
        offs = rows.to(tl.int64)[:, None] * L + cols[None, :]
        x = _compute(tl.load(x_ptr + offs, mask=mask, other=0.0), F64)
        g = _compute(tl.load(g_ptr + offs, mask=mask, other=0.0), F64)
        s, T = _max_affine_weights(x, a, b, eta, r_ok)
        d = s - tl.sum(T * s, 1)[:, None, :]
        gs = g[:, None, :] * (T * (1.0 + eta[:, None, None] * d))
        gx = tl.sum(a[:, :, None] * gs, 1)
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        acc_a += tl.sum(gs * x[:, None, :], 2)  # masked positions have g = 0
        acc_b += tl.sum(gs, 2)
        acc_eta += g * tl.sum(T * s * d, 1)
    at = rows.to(tl.int64) * n_split + split
    tl.store(part_eta_ptr + at, tl.sum(acc_eta, 1), mask=row_ok)
    at_r = at[:, None] * R + r[None, :]
    tl.store(part_a_ptr + at_r, acc_a, mask=pm)
    tl.store(part_b_ptr + at_r, acc_b, mask=pm)
