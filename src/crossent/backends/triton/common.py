"""The pieces both Triton ops are built from: ``@triton.jit`` helpers and launch helpers.

Two layers, used by :mod:`.cross_entropy` (rows of logits) and :mod:`.linear` (chunks of logits
formed by cuBLAS products):

1. ``@triton.jit`` helpers, inlined into the kernels: :func:`scores` (step 1 of DESIGN.md §1, with
   :func:`tanh` for the soft cap), :func:`target_of_row` (a hard target made safe to address),
   :func:`merge_scores` and :func:`merge_smoothing` (one block of the online ``(m, S)`` merge),
   :func:`saved_pair` (what a backward reads per row), :func:`hard_coefficients` and
   :func:`gradient_row` (``g·∂ℓ/∂x`` of a row, or of a block of columns of a row);
2. launch helpers in plain Python: :func:`scalars` (the kernels' runtime scalars and constexpr
   flags from a :class:`~crossent.core.config.OpConfig`), :func:`class_weights`, :func:`hard_rows`,
   :func:`row_factors` (the per-row factor of a recomputed gradient) and :func:`num_warps`.

Numerics (DESIGN.md §1): every score and sum is float32 whatever the input dtype (16-bit values
are converted right after loading). Sums taken relative to the running maximum are re-based
exactly as ``S`` is when the maximum grows, so a row like ``-1e30 + noise`` loses nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from ...core.config import OpConfig
from ...core.rows import reduction_scale
from ...validation import interpreter_on

NEG_INF = tl.constexpr(float("-inf"))


# --------------------------------------------------------------------------------------------
# 1. @triton.jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def tanh(a, LIBDEVICE: tl.constexpr):
    """tanh to a few ulps: libdevice on a GPU; in the interpreter (no libdevice there),
    ``-expm1(-2|a|) / (2 + expm1(-2|a|))`` with ``expm1(x)``: Kahan's exact ``(u-1)·x / log u``
    near 0, plain ``u - 1`` once ``u = e^x < 1/2`` (no cancellation there; and a subnormal ``u``
    has too few bits for ``log u`` to be used)."""
    if LIBDEVICE:
        t = libdevice.tanh(a)
    else:
        x = -2.0 * tl.abs(a)
        u = tl.exp(x)
        safe_u = tl.where((u < 0.5) | (u == 1.0), 0.5, u)
        em1 = tl.where(u == 1.0, x, (u - 1.0) * x / tl.log(safe_u))
        em1 = tl.where(u < 0.5, u - 1.0, em1)
        t = -em1 / (2.0 + em1)
        t = tl.where(a < 0.0, -t, t)
    return t


@triton.jit
def scores(x, s, k, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr):
    """Step 1 of §1 in float32: ``z = s·x``, then ``z = k·tanh(z/k)``; also ``∂z/∂x``'s cap
    factor ``t = tanh(z/k)`` (0 without a cap)."""
    z = x.to(tl.float32)
    if HAS_SCALE:
        z = z * s
    t = 0.0
    if HAS_SOFTCAP:
        t = tanh(z / k, LIBDEVICE)
        z = k * t
    return z, t


@triton.jit
def offsets(cols, stride, UNIT: tl.constexpr):
    """Element offsets of columns ``cols`` in a row: int64 unless the stride is 1."""
    if UNIT:
        off = cols
    else:
        off = cols.to(tl.int64) * stride
    return off


@triton.jit
def target_of_row(t_row, w_ptr, V, ignore_index, SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """(y, keep, w_y) of a row: a safe class id, not-ignored, and its class weight (0 ignored,
    NaN out of range), exactly as ``core.rows.target_terms`` computes them."""
    if SOFT:
        keep = tl.full([], 1, tl.int1)
        y = tl.full([], 0, tl.int64)
        w_y = tl.full([], 1.0, tl.float32)
    else:
        t = tl.load(t_row).to(tl.int64)
        keep = t != ignore_index
        valid = (t >= 0) & (t < V)
        y = tl.where(keep & valid, t, 0)
        if HAS_WEIGHT:
            w_y = tl.load(w_ptr + y).to(tl.float32)
        else:
            w_y = tl.full([], 1.0, tl.float32)
        w_y = tl.where(valid, w_y, float("nan"))
        w_y = tl.where(keep, w_y, 0.0)
    return y, keep, w_y


@triton.jit
def merge_scores(
    x_row, x_cs, cols, mask, index0, m, base, sum_e, sum_ez, best_i, k, s,
    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_AUX: tl.constexpr, X_UNIT: tl.constexpr,
    LIBDEVICE: tl.constexpr,
):  # fmt: skip
    """One block of DESIGN.md §1's online ``(m, S)`` merge: the scores ``z`` of the columns
    ``cols`` of a row (-inf where masked), merged into the running maximum ``m``, ``S`` and the
    entropy sum ``Σ e_j (z_j - m)``, and the argmax (the block's first class id is ``index0``;
    first on ties, as ``torch.argmax``).

    Every running sum is relative to ``base`` (``m``, or 0 while ``m`` is -inf); ``S`` and the
    entropy sum are re-based here when the maximum grows, the caller's other sums with the
    returned ``shift``. Returns ``(z, z - base_new, shift, m_new, base_new, S, entropy sum, best)``.
    """
    x = tl.load(x_row + offsets(cols, x_cs, X_UNIT), mask=mask, other=0.0)
    z, _t = scores(x, s, k, HAS_SCALE, HAS_SOFTCAP, LIBDEVICE)
    z = tl.where(mask, z, NEG_INF)
    m_blk = tl.max(z, 0)
    if WANT_AUX:
        best_i = tl.where(m_blk > m, (index0 + tl.argmax(z, 0)).to(tl.int32), best_i)
    m_new = tl.maximum(m, m_blk)
    base_new = tl.where(m_new == NEG_INF, 0.0, m_new)
    shift = base - base_new  # <= 0 once a finite value was seen
    alpha = tl.where(sum_e == 0.0, 0.0, tl.exp(tl.minimum(shift, 0.0)))  # nothing to re-base while S is 0
    zs = z - base_new
    e = tl.exp(zs)  # masked lanes: exp(-inf) = 0
    if WANT_AUX:
        rebased = tl.where(alpha == 0.0, 0.0, alpha * (sum_ez + shift * sum_e))  # shift may be -inf
        sum_ez = rebased + tl.sum(e * tl.where(e > 0.0, zs, 0.0), 0)
    sum_e = alpha * sum_e + tl.sum(e, 0)
    return z, zs, shift, m_new, base_new, sum_e, sum_ez, best_i


@triton.jit
def merge_smoothing(w_ptr, cols, mask, z, base, base_new, sum_wz, sum_w, eps_over_v, HAS_WEIGHT: tl.constexpr):
    """The smoothing sums of a hard target over one block: ``(ε/V)·Σ w_j (z_j - base)/2`` and
    ``(ε/V)·Σ w_j``, re-based from ``base`` to ``base_new``.

    The weights are pre-scaled by ε/V, and the sum is kept in halves (``z/2 - base/2`` is exact
    and cannot overflow): ``Σ w_j (z_j - m)`` is then finite wherever the loss is, also for a row
    spanning more than the float range, where ``z_j - m`` itself is -inf.
    """
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * eps_over_v
    else:
        w = tl.where(mask, eps_over_v, 0.0)
    zs_half = tl.where(mask, z * 0.5 - base_new * 0.5, 0.0)
    sum_wz = sum_wz + (base * 0.5 - base_new * 0.5) * sum_w + tl.sum(w * zs_half, 0)
    sum_w = sum_w + tl.sum(w, 0)
    return sum_wz, sum_w


@triton.jit
def saved_pair(m_ptr, log_s_ptr, g_ptr, g_stride, row):
    """What a backward reads of a row: ``(base, log S, lse, g)`` from the saved ``(m, log S)``
    (``base``: ``m``, or 0 where it is -inf) and the row's factor ``g`` (``g_stride`` 0: one for
    every row)."""
    m = tl.load(m_ptr + row).to(tl.float32)
    base = tl.where(m == NEG_INF, 0.0, m)
    log_s = tl.load(log_s_ptr + row).to(tl.float32)
    lse = base + log_s
    g = tl.load(g_ptr + row * g_stride).to(tl.float32)
    return base, log_s, lse, g


@triton.jit
def hard_coefficients(w_y, lse, w_sum_ptr, V, one_minus_eps, eps_over_v, c, HAS_WEIGHT, HAS_SMOOTH, HAS_ZLOSS):
    """The two parts of softmax_j's factor in ∂ℓ/∂z_j (hard target): ``(1-ε)·w_y`` and
    ``(ε/V)·Σw + 2c·w_y·lse``, kept apart so that a tiny z-loss term is not rounded away in
    their sum before the target's ``(1-ε)·w_y`` is taken off (see :func:`gradient_row`)."""
    rest = tl.full([], 0.0, tl.float32)
    if HAS_SMOOTH:
        if HAS_WEIGHT:
            w_sum = tl.load(w_sum_ptr).to(tl.float32)
        else:
            w_sum = V * 1.0
        rest = rest + eps_over_v * w_sum
    if HAS_ZLOSS:
        rest = rest + 2.0 * c * w_y * lse
    return one_minus_eps * w_y, rest


@triton.jit
def gradient_row(
    x_row, x_cs, gx_row, gx_cs, t_row, t_cs, w_ptr, V, y, keep, base, log_s, g, coef, rest, one_minus_eps,
    eps_over_v, k, s, BLOCK_V: tl.constexpr, SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, X_UNIT: tl.constexpr,
    T_UNIT: tl.constexpr, G_UNIT: tl.constexpr, LIBDEVICE: tl.constexpr,
):  # fmt: skip
    """``g·∂ℓ/∂x`` of one row into ``gx_row`` (DESIGN.md §1, gradients); zeros for an ignored row,
    whose logits are not read.

    hard: ∂ℓ/∂z_j = (softmax_j - [j=y])·coef + softmax_j·rest - (ε/V)·w_j,
          coef = (1-ε)w_y, rest = (ε/V)Σw + 2c·w_y·lse
    soft: ∂ℓ/∂z_j = (softmax_j·coef - w_j·p'_j) + softmax_j·rest,  coef = Σ w_k p'_k, rest = 2c·lse
    then the chain rule through the soft cap and the scale. The cross entropy's part and the rest
    are added, never folded into one factor: at V = 1 (softmax = 1) the first part is exactly 0
    and the z-loss gradient is exact. ``gx_row`` may be ``x_row`` (in place): every element is
    read before it is written, by the same program. A block of columns of a row is a row of its
    own here, with ``y`` and ``w_ptr`` shifted by the block's first column.
    """
    lanes = tl.arange(0, BLOCK_V)
    g_coef = g * coef
    g_rest = g * rest
    g_smooth = g * eps_over_v
    for start in range(0, V, BLOCK_V):
        cols = start + lanes
        mask = cols < V
        live = mask & keep
        x = tl.load(x_row + offsets(cols, x_cs, X_UNIT), mask=live, other=0.0)
        z, t = scores(x, s, k, HAS_SCALE, HAS_SOFTCAP, LIBDEVICE)
        p = tl.exp(tl.where(live, (z - base) - log_s, NEG_INF))  # softmax_j, the seed's order
        if SOFT:
            q = tl.load(t_row + offsets(cols, t_cs, T_UNIT), mask=mask, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                q = q * one_minus_eps + eps_over_v
            if HAS_WEIGHT:
                q = q * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            gz = (p * coef - q) * g + p * g_rest
        else:
            gz = tl.where(cols == y, p - 1.0, p) * g_coef + p * g_rest
            if HAS_SMOOTH:
                if HAS_WEIGHT:
                    gz = gz - g_smooth * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                else:
                    gz = gz - g_smooth
        if HAS_SOFTCAP:
            chain = 1.0 - t * t
            if HAS_SCALE:
                chain = chain * s
            gz = gz * chain
        elif HAS_SCALE:
            gz = gz * s
        gz = tl.where(keep, gz, 0.0)
        tl.store(gx_row + offsets(cols, gx_cs, G_UNIT), gz.to(gx_row.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# 2. Launch helpers
# --------------------------------------------------------------------------------------------


def num_warps(block_v: int) -> int:
    return 4 if block_v <= 1024 else 8 if block_v <= 4096 else 16


def scalars(vocab_size: int, config: OpConfig) -> tuple[dict, dict]:
    """The kernels' runtime scalars and constexpr option flags, as keyword arguments."""
    opts = config.rows
    eps = opts.label_smoothing
    values = dict(
        V=vocab_size,
        ignore_index=config.ignore_index,
        one_minus_eps=1.0 - eps,
        eps_over_v=eps / vocab_size,
        c=opts.z_loss,
        k=1.0 if opts.softcap is None else opts.softcap,
        s=opts.logit_scale,
    )
    flags = dict(
        HAS_SMOOTH=eps != 0.0,
        HAS_ZLOSS=opts.z_loss != 0.0,
        HAS_SCALE=opts.logit_scale != 1.0,
        HAS_SOFTCAP=opts.softcap is not None,
        LIBDEVICE=not interpreter_on(),
    )
    return values, flags


def class_weights(weight: Tensor | None, dummy: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(float32 contiguous weights, their sum (0-dim), present?); ``dummy`` (never read) without."""
    if weight is None:
        return dummy, dummy, False
    w = weight.to(torch.float32).contiguous()
    return w, w.sum(), True


def row_factors(reduction: str, denominator: Tensor, grad_loss: Tensor) -> Tensor:
    """``∂loss/∂ℓ_i · upstream`` for a recomputed gradient: 0-dim, or (N,) for "none"."""
    g = reduction_scale(reduction, denominator) * grad_loss.to(torch.float32)
    return g.reshape(-1).contiguous() if g.dim() else g


def hard_rows(target: Tensor) -> Tensor:
    """Flat class ids (N,), viewed when possible (O(N) otherwise)."""
    t = target.reshape(-1)
    if t.dtype not in (torch.int32, torch.int64):
        t = t.long()
    return t
