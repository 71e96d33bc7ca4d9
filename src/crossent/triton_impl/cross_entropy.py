"""cross_entropy as Triton kernels, registered as ``torch.library`` custom ops.

Four layers, as in every op file of crossent:

1. the ``@triton.jit`` kernels: :func:`_forward_kernel` (one program per row: the online
   ``(m, S)`` merge of DESIGN.md §1 over blocks of the vocabulary, the loss terms, what
   ``return_aux`` reports, and optionally the gradient in a second loop over the row) and
   :func:`_backward_kernel` (the gradient recomputed from the saved pair);
2. the typed launchers :func:`launch_forward` / :func:`launch_backward` (one launch per 2-D block
   of rows: strides are passed, the logits are never copied);
3. the custom ops ``crossent::triton_cross_entropy_forward`` / ``..._backward`` /
   ``..._backward_`` (in place) with fake implementations and autograd registration, so that
   ``torch.compile(fullgraph=True)`` traces through them without a graph break;
4. :func:`cross_entropy_op`, which ``crossent.functional`` calls.

Numerics (DESIGN.md §1): scores, ``(m, log S)`` and every sum are float32 whatever the input
dtype (16-bit values are converted right after loading). The log-probability is formed as
``(z_j - m) - log S``; the softmax of the gradient as ``exp((z_j - m) - log S)``. Sums that are
taken relative to the running maximum (the smoothing sum ``Σ w_j (z_j - m)``, the soft-target sum
``Σ w_j p'_j (z_j - m)`` and the entropy's ``Σ e_j (z_j - m)``) are re-based exactly as ``S`` is
when the maximum grows, so a row like ``-1e30 + noise`` loses nothing. Float64 inputs go to the
PyTorch backend: a Triton kernel's float arguments are float32, so options like ``ε`` or ``s``
would be rounded before a float64 kernel saw them.

Where the gradient is computed (eager mode, logits requiring grad):

* on CUDA, in backward, recomputed from the saved pair: forward reads the logits once, backward
  reads them once and writes the gradient once — the memory-traffic floor. Computing it in
  forward instead costs a second read there, and backward must then scale the stored gradient by
  the upstream gradient (a read and a write of the whole (N, V) tensor) because on a GPU the
  upstream value is not known without a host sync;
* on the CPU (the Triton interpreter) in forward, as the PyTorch backend does: there the scale is
  skipped when the upstream gradient is exactly 1.

:data:`GRAD_IN_FORWARD` overrides that choice (``benchmarks/gpu_check.py`` measures both).
Under ``torch.compile``, with ``inplace_backward=True`` and for a second backward the gradient is
always recomputed in backward (with ``inplace_backward`` it overwrites the logits).

Ignored tokens cost nothing in the kernels: their programs read no logits and write zeros (with
``return_aux`` their ``(m, log S)`` and entropy are still computed, as the reference reports
them). Out-of-range target ids are never used as an address: the row reads class 0 and its class
weight becomes NaN, so its loss and gradient are NaN (no host sync).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

from ..functional import interpreter_on
from ..options import LossOptions
from ..torch_impl.cross_entropy import row_blocks
from ..torch_impl.rows import reduce, reduction_scale, target_terms

AUX_COLUMNS = 4  # ce, z-loss, entropy, correct

#: Largest vocabulary block one loop iteration handles (a power of two). Read at every call.
MAX_BLOCK_V = 8192

#: ``None``: the gradient is computed in forward on the CPU (interpreter) and in backward on CUDA
#: (see the module docstring); ``True`` / ``False`` force one mode in eager mode.
GRAD_IN_FORWARD: bool | None = None

_NEG_INF = tl.constexpr(float("-inf"))


# --------------------------------------------------------------------------------------------
# 1. Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _tanh(a, LIBDEVICE: tl.constexpr):
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
def _scores(x, s, k, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, LIBDEVICE: tl.constexpr):
    """Step 1 of §1 in float32: ``z = s·x``, then ``z = k·tanh(z/k)``; also ``∂z/∂x``'s cap
    factor ``t = tanh(z/k)`` (0 without a cap)."""
    z = x.to(tl.float32)
    if HAS_SCALE:
        z = z * s
    t = 0.0
    if HAS_SOFTCAP:
        t = _tanh(z / k, LIBDEVICE)
        z = k * t
    return z, t


@triton.jit
def _offsets(cols, stride, UNIT: tl.constexpr):
    """Element offsets of columns ``cols`` in a row: int64 unless the stride is 1."""
    if UNIT:
        off = cols
    else:
        off = cols.to(tl.int64) * stride
    return off


@triton.jit
def _target_of_row(
    t_row,
    w_ptr,
    V,
    ignore_index,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    """(y, keep, w_y) of a row: a safe class id, not-ignored, and its class weight (0 ignored,
    NaN out of range), exactly as ``rows.target_terms`` computes them."""
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
def _hard_coefficients(w_y, lse, w_sum_ptr, V, one_minus_eps, eps_over_v, c, HAS_WEIGHT, HAS_SMOOTH, HAS_ZLOSS):
    """The two parts of softmax_j's factor in ∂ℓ/∂z_j (hard target): ``(1-ε)·w_y`` and
    ``(ε/V)·Σw + 2c·w_y·lse``, kept apart so that a tiny z-loss term is not rounded away in
    their sum before the target's ``(1-ε)·w_y`` is taken off (see ``_gradient_row``)."""
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
def _gradient_row(
    x_row,
    x_cs,
    gx_row,
    gx_cs,
    t_row,
    t_cs,
    w_ptr,
    V,
    y,
    keep,
    base,
    log_s,
    g,
    coef,
    rest,
    one_minus_eps,
    eps_over_v,
    k,
    s,
    BLOCK_V: tl.constexpr,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    X_UNIT: tl.constexpr,
    T_UNIT: tl.constexpr,
    G_UNIT: tl.constexpr,
    LIBDEVICE: tl.constexpr,
):
    """``g·∂ℓ/∂x`` of one row into ``gx_row`` (DESIGN.md §1, gradients); zeros for an ignored row,
    whose logits are not read.

    hard: ∂ℓ/∂z_j = (softmax_j - [j=y])·coef + softmax_j·rest - (ε/V)·w_j,
          coef = (1-ε)w_y, rest = (ε/V)Σw + 2c·w_y·lse
    soft: ∂ℓ/∂z_j = (softmax_j·coef - w_j·p'_j) + softmax_j·rest,  coef = Σ w_k p'_k, rest = 2c·lse
    then the chain rule through the soft cap and the scale. The cross entropy's part and the rest
    are added, never folded into one factor: at V = 1 (softmax = 1) the first part is exactly 0
    and the z-loss gradient is exact. ``gx_row`` may be ``x_row`` (in place): every element is
    read before it is written, by the same program.
    """
    lanes = tl.arange(0, BLOCK_V)
    g_coef = g * coef
    g_rest = g * rest
    g_smooth = g * eps_over_v
    for start in range(0, V, BLOCK_V):
        cols = start + lanes
        mask = cols < V
        live = mask & keep
        x = tl.load(x_row + _offsets(cols, x_cs, X_UNIT), mask=live, other=0.0)
        z, t = _scores(x, s, k, HAS_SCALE, HAS_SOFTCAP, LIBDEVICE)
        p = tl.exp(tl.where(live, (z - base) - log_s, _NEG_INF))  # softmax_j, the seed's order
        if SOFT:
            q = tl.load(t_row + _offsets(cols, t_cs, T_UNIT), mask=mask, other=0.0).to(tl.float32)
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
        tl.store(gx_row + _offsets(cols, gx_cs, G_UNIT), gz.to(gx_row.dtype.element_ty), mask=mask)


@triton.jit
def _forward_kernel(
    x_ptr,
    x_rs,
    x_cs,
    t_ptr,
    t_rs,
    t_cs,
    w_ptr,
    w_sum_ptr,
    loss_ptr,
    m_ptr,
    log_s_ptr,
    aux_ptr,
    g_ptr,
    gx_ptr,
    gx_rs,
    gx_cs,
    V,
    ignore_index,
    one_minus_eps,
    eps_over_v,
    c,
    k,
    s,
    BLOCK_V: tl.constexpr,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WANT_AUX: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    X_UNIT: tl.constexpr,
    T_UNIT: tl.constexpr,
    G_UNIT: tl.constexpr,
    LIBDEVICE: tl.constexpr,
):
    """One program per row: loss, ``(m, log S)``, aux columns and, with COMPUTE_GRAD, the
    gradient scaled by ``g`` (a 0-dim factor: the reduction's)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_rs
    t_row = t_ptr + row * t_rs
    lanes = tl.arange(0, BLOCK_V)
    y, keep, w_y = _target_of_row(t_row, w_ptr, V, ignore_index, SOFT, HAS_WEIGHT)

    # An ignored row runs no iteration (it reads nothing) unless its lse/entropy are reported.
    if SOFT or WANT_AUX:
        n_cols = V
    else:
        n_cols = tl.where(keep, V, 0)

    m = tl.full([], _NEG_INF, tl.float32)  # running max of z
    base = tl.full([], 0.0, tl.float32)  # m where finite, else 0: the base of every running sum
    sum_e = tl.full([], 0.0, tl.float32)  # S = Σ exp(z_j - base)
    sum_ez = tl.full([], 0.0, tl.float32)  # Σ exp(z_j - base)·(z_j - base)        (entropy)
    sum_wz = tl.full([], 0.0, tl.float32)  # (ε/V)·Σ w_j (z_j - base)/2  or  Σ q_j (z_j - base)  (q = w p')
    sum_w = tl.full([], 0.0, tl.float32)  # (ε/V)·Σ w_j  or  Σ q_j over the columns seen so far
    best_i = tl.full([], 0, tl.int32)  # argmax of z (first on ties, as torch.argmax)
    p_best = tl.full([], _NEG_INF, tl.float32)  # soft targets: max and argmax of p
    p_best_i = tl.full([], 0, tl.int32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + lanes
        mask = cols < V
        x = tl.load(x_row + _offsets(cols, x_cs, X_UNIT), mask=mask, other=0.0)
        z, _t = _scores(x, s, k, HAS_SCALE, HAS_SOFTCAP, LIBDEVICE)
        z = tl.where(mask, z, _NEG_INF)
        m_blk = tl.max(z, 0)
        if WANT_AUX:
            best_i = tl.where(m_blk > m, start + tl.argmax(z, 0), best_i)
        m_new = tl.maximum(m, m_blk)
        base_new = tl.where(m_new == _NEG_INF, 0.0, m_new)
        shift = base - base_new  # <= 0 once a finite value was seen
        alpha = tl.where(sum_e == 0.0, 0.0, tl.exp(tl.minimum(shift, 0.0)))  # nothing to re-base while S is 0
        zs = z - base_new
        e = tl.exp(zs)  # masked lanes: exp(-inf) = 0
        if WANT_AUX:
            rebased = tl.where(alpha == 0.0, 0.0, alpha * (sum_ez + shift * sum_e))  # shift may be -inf
            sum_ez = rebased + tl.sum(e * tl.where(e > 0.0, zs, 0.0), 0)
        sum_e = alpha * sum_e + tl.sum(e, 0)
        if SOFT:
            p = tl.load(t_row + _offsets(cols, t_cs, T_UNIT), mask=mask, other=0.0).to(tl.float32)
            if WANT_AUX:
                pm = tl.where(mask, p, _NEG_INF)
                p_blk = tl.max(pm, 0)
                p_best_i = tl.where(p_blk > p_best, start + tl.argmax(pm, 0), p_best_i)
                p_best = tl.maximum(p_best, p_blk)
            q = p
            if HAS_SMOOTH:
                q = q * one_minus_eps + eps_over_v
            if HAS_WEIGHT:
                q = q * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            q = tl.where(mask, q, 0.0)
            sum_wz = sum_wz + shift * sum_w + tl.sum(q * tl.where(mask, zs, 0.0), 0)
            sum_w = sum_w + tl.sum(q, 0)
        elif HAS_SMOOTH:
            # weights pre-scaled by ε/V, and the sum kept in halves (z/2 - base/2 is exact and
            # cannot overflow): Σ w_j (z_j - m) is then finite wherever the loss is, also for a
            # row spanning more than the float range, where z_j - m itself is -inf
            if HAS_WEIGHT:
                w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * eps_over_v
            else:
                w = tl.where(mask, eps_over_v, 0.0)
            zs_half = tl.where(mask, z * 0.5 - base_new * 0.5, 0.0)
            sum_wz = sum_wz + (base * 0.5 - base_new * 0.5) * sum_w + tl.sum(w * zs_half, 0)
            sum_w = sum_w + tl.sum(w, 0)
        m = m_new
        base = base_new

    if SOFT or WANT_AUX:
        log_s = tl.log(sum_e)
    else:
        log_s = tl.log(tl.where(keep, sum_e, 1.0))  # an ignored row ran no iteration: S is 0
    lse = base + log_s
    if SOFT:
        ce = -(sum_wz - log_s * sum_w)  # -Σ w_j p'_j ((z_j - m) - log S)
        zl = 0.0
        if HAS_ZLOSS:
            zl = c * lse * lse
        coef = sum_w
        rest = 0.0
        if HAS_ZLOSS:
            rest = 2.0 * c * lse
    else:
        x_y = tl.load(x_row + y * x_cs, mask=keep, other=0.0)
        z_y, _ty = _scores(x_y, s, k, HAS_SCALE, HAS_SOFTCAP, LIBDEVICE)
        log_p_y = (z_y - base) - log_s  # (z_y - m) - log S, the seed's order
        ce = -one_minus_eps * w_y * log_p_y
        if HAS_SMOOTH:  # sum_w = (ε/V)·Σw: the whole row was seen; sum_wz is in halves
            ce = ce - (2.0 * sum_wz - log_s * sum_w)
        zl = 0.0
        if HAS_ZLOSS:
            zl = c * w_y * lse * lse
        ce = tl.where(keep, ce, 0.0)  # an ignored token is exactly 0, whatever its logits
        zl = tl.where(keep, zl, 0.0)
        coef, rest = _hard_coefficients(
            w_y, lse, w_sum_ptr, V, one_minus_eps, eps_over_v, c, HAS_WEIGHT, HAS_SMOOTH, HAS_ZLOSS
        )
    tl.store(loss_ptr + row, ce + zl)
    if SOFT or WANT_AUX:
        tl.store(m_ptr + row, m)
        tl.store(log_s_ptr + row, log_s)
    else:
        tl.store(m_ptr + row, tl.where(keep, m, 0.0))
        tl.store(log_s_ptr + row, tl.where(keep, log_s, 0.0))
    if WANT_AUX:
        entropy = log_s - sum_ez / sum_e  # -Σ p log p = log S - Σ p_j (z_j - m)
        if SOFT:
            hit = best_i == p_best_i
        else:
            hit = (best_i.to(tl.int64) == y) & keep
        aux_row = aux_ptr + row * 4
        tl.store(aux_row, ce)
        tl.store(aux_row + 1, zl)
        tl.store(aux_row + 2, entropy)
        tl.store(aux_row + 3, tl.where(hit, 1.0, 0.0))
    if COMPUTE_GRAD:
        g = tl.load(g_ptr).to(tl.float32)
        _gradient_row(
            x_row,
            x_cs,
            gx_ptr + row * gx_rs,
            gx_cs,
            t_row,
            t_cs,
            w_ptr,
            V,
            y,
            keep,
            base,
            log_s,
            g,
            coef,
            rest,
            one_minus_eps,
            eps_over_v,
            k,
            s,
            BLOCK_V,
            SOFT,
            HAS_WEIGHT,
            HAS_SMOOTH,
            HAS_SCALE,
            HAS_SOFTCAP,
            X_UNIT,
            T_UNIT,
            G_UNIT,
            LIBDEVICE,
        )


@triton.jit
def _backward_kernel(
    x_ptr,
    x_rs,
    x_cs,
    t_ptr,
    t_rs,
    t_cs,
    w_ptr,
    w_sum_ptr,
    m_ptr,
    log_s_ptr,
    g_ptr,
    g_stride,
    gx_ptr,
    gx_rs,
    gx_cs,
    V,
    ignore_index,
    one_minus_eps,
    eps_over_v,
    c,
    k,
    s,
    BLOCK_V: tl.constexpr,
    SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    X_UNIT: tl.constexpr,
    T_UNIT: tl.constexpr,
    G_UNIT: tl.constexpr,
    LIBDEVICE: tl.constexpr,
):
    """One program per row: ``g·∂ℓ/∂x`` recomputed from the saved ``(m, log S)``; ``g`` is the
    reduction's factor times the upstream gradient (0-dim: ``g_stride`` 0, or one per row)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_rs
    t_row = t_ptr + row * t_rs
    y, keep, w_y = _target_of_row(t_row, w_ptr, V, ignore_index, SOFT, HAS_WEIGHT)
    m = tl.load(m_ptr + row).to(tl.float32)
    base = tl.where(m == _NEG_INF, 0.0, m)
    log_s = tl.load(log_s_ptr + row).to(tl.float32)
    lse = base + log_s
    g = tl.load(g_ptr + row * g_stride).to(tl.float32)
    if SOFT:
        lanes = tl.arange(0, BLOCK_V)
        coef = tl.full([], 0.0, tl.float32)  # Σ_k w_k p'_k: one pass over the target row
        for start in range(0, V, BLOCK_V):
            cols = start + lanes
            mask = cols < V
            q = tl.load(t_row + _offsets(cols, t_cs, T_UNIT), mask=mask, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                q = q * one_minus_eps + eps_over_v
            if HAS_WEIGHT:
                q = q * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            coef = coef + tl.sum(tl.where(mask, q, 0.0), 0)
        rest = 0.0
        if HAS_ZLOSS:
            rest = 2.0 * c * lse
    else:
        coef, rest = _hard_coefficients(
            w_y, lse, w_sum_ptr, V, one_minus_eps, eps_over_v, c, HAS_WEIGHT, HAS_SMOOTH, HAS_ZLOSS
        )
    _gradient_row(
        x_row,
        x_cs,
        gx_ptr + row * gx_rs,
        gx_cs,
        t_row,
        t_cs,
        w_ptr,
        V,
        y,
        keep,
        base,
        log_s,
        g,
        coef,
        rest,
        one_minus_eps,
        eps_over_v,
        k,
        s,
        BLOCK_V,
        SOFT,
        HAS_WEIGHT,
        HAS_SMOOTH,
        HAS_SCALE,
        HAS_SOFTCAP,
        X_UNIT,
        T_UNIT,
        G_UNIT,
        LIBDEVICE,
    )


# --------------------------------------------------------------------------------------------
# 2. Launchers
# --------------------------------------------------------------------------------------------


def block_size(vocab_size: int) -> int:
    """The vocabulary block of one loop iteration: the next power of two, at most MAX_BLOCK_V."""
    return max(16, min(triton.next_power_of_2(vocab_size), triton.next_power_of_2(MAX_BLOCK_V)))


def _num_warps(block_v: int) -> int:
    return 4 if block_v <= 1024 else 8 if block_v <= 4096 else 16


def _scalars(vocab_size: int, ignore_index: int, label_smoothing: float, z_loss: float, softcap, logit_scale):
    """The kernels' runtime scalars and option flags."""
    eps = label_smoothing
    scalars = dict(
        V=vocab_size,
        ignore_index=ignore_index,
        one_minus_eps=1.0 - eps,
        eps_over_v=eps / vocab_size,
        c=z_loss,
        k=1.0 if softcap is None else softcap,
        s=logit_scale,
    )
    flags = dict(
        HAS_SMOOTH=eps != 0.0,
        HAS_ZLOSS=z_loss != 0.0,
        HAS_SCALE=logit_scale != 1.0,
        HAS_SOFTCAP=softcap is not None,
        LIBDEVICE=not interpreter_on(),
    )
    return scalars, flags


def _class_weights(weight: Tensor | None, dummy: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(float32 contiguous weights, their sum (0-dim), present?); ``dummy`` (never read) without."""
    if weight is None:
        return dummy, dummy, False
    w = weight.to(torch.float32).contiguous()
    return w, w.sum(), True


def _hard_rows(target: Tensor) -> Tensor:
    """Flat class ids (N,), viewed when possible (O(N) otherwise)."""
    t = target.reshape(-1)
    if t.dtype not in (torch.int32, torch.int64):
        t = t.long()
    return t


def _blocks(logits: Tensor, target: Tensor, grad_into: Tensor | None):
    """Yield (first row, logits rows (r, V), target rows, gradient rows or None) as 2-D views.

    ``grad_into`` is ``logits`` itself (in place: the same views) or a fresh contiguous tensor.
    """
    V = logits.shape[-1]
    soft = target.is_floating_point()
    t_rows = target.reshape(-1, V) if soft else _hard_rows(target)
    for start, index in row_blocks(logits):
        x = logits[index].view(-1, V)
        r = x.shape[0]
        if grad_into is None:
            gx = None
        elif grad_into is logits:
            gx = x
        else:
            gx = grad_into.view(-1, V)[start : start + r]
        yield start, x, t_rows[start : start + r], gx


def _t_strides(t: Tensor) -> tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (t.stride(0), 1)


def launch_forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    g: Tensor,
    grad: Tensor | None,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    want_aux: bool,
    block_v: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run :func:`_forward_kernel` over every row; returns (token loss, m, log_s, aux), float32.

    ``g`` (0-dim float32) scales the gradient written into ``grad`` (logits' shape) when given.
    """
    V = logits.shape[-1]
    N = math.prod(logits.shape[:-1])
    device = logits.device
    soft = target.is_floating_point()
    token_loss = torch.empty(N, dtype=torch.float32, device=device)
    m = torch.empty(N, dtype=torch.float32, device=device)
    log_s = torch.empty(N, dtype=torch.float32, device=device)
    aux = torch.empty((N if want_aux else 0, AUX_COLUMNS), dtype=torch.float32, device=device)
    w, w_sum, has_weight = _class_weights(weight, m)
    scalars, flags = _scalars(V, ignore_index, label_smoothing, z_loss, softcap, logit_scale)
    for start, x, t, gx in _blocks(logits, target, grad):
        r = x.shape[0]
        t_rs, t_cs = _t_strides(t)
        gx_arg = gx if gx is not None else x  # never written without COMPUTE_GRAD
        _forward_kernel[(r,)](
            x,
            x.stride(0),
            x.stride(1),
            t,
            t_rs,
            t_cs,
            w,
            w_sum,
            token_loss[start:],
            m[start:],
            log_s[start:],
            aux[start:] if want_aux else m,  # not written without WANT_AUX
            g,
            gx_arg,
            gx_arg.stride(0),
            gx_arg.stride(1),
            **scalars,
            BLOCK_V=block_v,
            SOFT=soft,
            HAS_WEIGHT=has_weight,
            WANT_AUX=want_aux,
            COMPUTE_GRAD=gx is not None,
            X_UNIT=x.stride(1) == 1,
            T_UNIT=t_cs == 1,
            G_UNIT=gx_arg.stride(1) == 1,
            **flags,
            num_warps=_num_warps(block_v),
        )
    return token_loss, m, log_s, aux


def launch_backward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    m: Tensor,
    log_s: Tensor,
    g: Tensor,
    out: Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    block_v: int,
) -> None:
    """Run :func:`_backward_kernel`: ``g·∂ℓ/∂logits`` into ``out`` (may be ``logits`` itself).

    ``g`` is float32, 0-dim (one factor for every row) or (N,) (one per row).
    """
    V = logits.shape[-1]
    w, w_sum, has_weight = _class_weights(weight, m)
    scalars, flags = _scalars(V, ignore_index, label_smoothing, z_loss, softcap, logit_scale)
    soft = target.is_floating_point()
    g_stride = 0 if g.dim() == 0 else 1
    for start, x, t, gx in _blocks(logits, target, out):
        r = x.shape[0]
        t_rs, t_cs = _t_strides(t)
        _backward_kernel[(r,)](
            x,
            x.stride(0),
            x.stride(1),
            t,
            t_rs,
            t_cs,
            w,
            w_sum,
            m[start:],
            log_s[start:],
            g if g_stride == 0 else g[start:],
            g_stride,
            gx,
            gx.stride(0),
            gx.stride(1),
            **scalars,
            BLOCK_V=block_v,
            SOFT=soft,
            HAS_WEIGHT=has_weight,
            X_UNIT=x.stride(1) == 1,
            T_UNIT=t_cs == 1,
            G_UNIT=gx.stride(1) == 1,
            **flags,
            num_warps=_num_warps(block_v),
        )


# --------------------------------------------------------------------------------------------
# 3. Custom ops and autograd
# --------------------------------------------------------------------------------------------


def _denominator(target: Tensor, weight: Tensor | None, V: int, ignore_index: int, N: int) -> Tensor:
    """The "mean" denominator: Σ w_y over kept tokens (hard), N (soft); 0-dim float32."""
    if target.is_floating_point():
        return torch.full((), float(N), dtype=torch.float32, device=target.device)
    return target_terms(target.reshape(-1), weight, V, ignore_index, torch.float32).denominator


def _row_factors(target, weight, V, ignore_index, reduction, denominator, grad_loss) -> Tensor:
    """``∂loss/∂ℓ_i · upstream`` for the backward kernel: 0-dim, or (N,) for "none"."""
    g = reduction_scale(reduction, denominator) * grad_loss.to(torch.float32)
    return g.reshape(-1).contiguous() if g.dim() else g


@torch.library.custom_op("crossent::triton_cross_entropy_forward", mutates_args=())
def triton_cross_entropy_forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    block_v: int,
    compute_grad: bool,
    want_aux: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, m, log_s, denominator, grad or empty, aux (N, 4) or empty); float32 results."""
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    N = math.prod(lead)
    denominator = _denominator(target, weight, V, ignore_index, N)
    grad = torch.empty(logits.shape if compute_grad else (0,), dtype=logits.dtype, device=logits.device)
    g = reduction_scale(reduction, denominator)
    token_loss, m, log_s, aux = launch_forward(
        logits,
        target,
        weight,
        g,
        grad if compute_grad else None,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        want_aux=want_aux,
        block_v=block_v,
    )
    loss = reduce(token_loss, reduction, denominator)
    if reduction == "none":
        loss = loss.view(lead)
    return loss, m, log_s, denominator, grad, aux


@triton_cross_entropy_forward.register_fake
def _(
    logits,
    target,
    weight,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    block_v,
    compute_grad,
    want_aux,
):
    f32 = torch.float32
    lead = logits.shape[:-1]
    N = math.prod(lead)
    loss = logits.new_empty(lead if reduction == "none" else (), dtype=f32)
    grad = logits.new_empty(logits.shape if compute_grad else (0,))
    aux = logits.new_empty((N if want_aux else 0, AUX_COLUMNS), dtype=f32)
    m = logits.new_empty((N,), dtype=f32)
    log_s = logits.new_empty((N,), dtype=f32)
    return loss, m, log_s, logits.new_empty((), dtype=f32), grad, aux


def _backward_into(
    out, grad_loss, logits, target, weight, m, log_s, denominator, ignore_index, reduction, *numeric
) -> None:
    label_smoothing, z_loss, softcap, logit_scale, block_v = numeric
    V = logits.shape[-1]
    g = _row_factors(target, weight, V, ignore_index, reduction, denominator, grad_loss)
    launch_backward(
        logits,
        target,
        weight,
        m,
        log_s,
        g,
        out,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        block_v=block_v,
    )


@torch.library.custom_op("crossent::triton_cross_entropy_backward", mutates_args=())
def triton_cross_entropy_backward(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    m: Tensor,
    log_s: Tensor,
    denominator: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    block_v: int,
) -> Tensor:
    """A fresh ``∂loss/∂logits`` (logits' shape and dtype, contiguous), from the saved pair."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _backward_into(
        out,
        grad_loss,
        logits,
        target,
        weight,
        m,
        log_s,
        denominator,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        block_v,
    )
    return out


@triton_cross_entropy_backward.register_fake
def _(grad_loss, logits, *rest):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("crossent::triton_cross_entropy_backward_", mutates_args=("logits",))
def triton_cross_entropy_backward_(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    m: Tensor,
    log_s: Tensor,
    denominator: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    block_v: int,
) -> None:
    """``inplace_backward=True``: the gradient overwrites ``logits`` (each row read, then written)."""
    _backward_into(
        logits,
        grad_loss,
        logits,
        target,
        weight,
        m,
        log_s,
        denominator,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        block_v,
    )


def _scale_saved_gradient(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """``grad *= grad_loss`` in place (0-dim, or one value per token), skipped when it is exactly 1
    on a CPU tensor — the usual ``loss.backward()`` then makes no pass at all (no host sync on a GPU,
    where the gradient is recomputed in backward by default instead)."""
    if grad_loss.dim() == 0:
        if not (grad_loss.device.type == "cpu" and float(grad_loss) == 1.0):
            grad.mul_(grad_loss)
    else:
        grad.view(-1, grad.shape[-1]).mul_(grad_loss.reshape(-1, 1))
    return grad


def _setup_context(ctx, inputs, output):
    (
        logits,
        target,
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        block_v,
        compute_grad,
        want_aux,
    ) = inputs
    loss, m, log_s, denominator, grad, aux = output
    ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, block_v)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(m, log_s, denominator, grad, aux)
    ctx.save_for_backward(logits, target, weight, m, log_s, denominator)
    # The gradient computed in forward is kept outside save_for_backward: backward scales it in
    # place, and a second backward through a retained graph (which recomputes) must still be able
    # to unpack the saved tensors. It is non-differentiable, so this makes no reference cycle.
    ctx.grad_from_forward = grad if compute_grad else None


def _backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return (None,) * 12
    logits, target, weight, m, log_s, denominator = ctx.saved_tensors
    grad = ctx.grad_from_forward
    if grad is not None:
        ctx.grad_from_forward = None  # scaled in place: a second backward recomputes instead
        _scale_saved_gradient(grad, grad_loss)
    else:
        grad = triton_cross_entropy_backward(grad_loss, logits, target, weight, m, log_s, denominator, *ctx.options)
    return (grad,) + (None,) * 11


triton_cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


class _InplaceBackward(torch.autograd.Function):
    """Eager ``inplace_backward=True``: forward as the op; backward overwrites the logits.

    A plain autograd.Function because writing into a saved input is an eager-mode contract:
    under ``torch.compile`` the functional path is used.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, options, want_aux):
        outputs = triton_cross_entropy_forward(logits, target, weight, *options, False, want_aux)
        loss, m, log_s, denominator, grad, aux = outputs
        ctx.save_for_backward(logits, target, weight, m, log_s, denominator)
        ctx.options = options
        ctx.mark_non_differentiable(m, log_s, denominator, grad, aux)
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        logits, target, weight, m, log_s, denominator = ctx.saved_tensors
        if grad_loss is None:
            return (None,) * 5
        triton_cross_entropy_backward_(grad_loss, logits, target, weight, m, log_s, denominator, *ctx.options)
        return logits, None, None, None, None


# --------------------------------------------------------------------------------------------
# 4. The entry point
# --------------------------------------------------------------------------------------------


def grad_in_forward(device: torch.device) -> bool:
    """Whether eager mode computes the gradient in forward (see the module docstring)."""
    if GRAD_IN_FORWARD is not None:
        return GRAD_IN_FORWARD
    return device.type != "cuda"


def cross_entropy_op(logits: Tensor, target: Tensor, weight: Tensor | None, opts: LossOptions):
    """Run the op; returns (loss, m, log_s, denominator, aux). Inputs are validated already."""
    if logits.dtype == torch.float64:  # float32 kernel arguments: see the module docstring
        from ..torch_impl.cross_entropy import cross_entropy_op as torch_op

        return torch_op(
            logits,
            target,
            weight,
            ignore_index=opts.ignore_index,
            reduction=opts.reduction,
            label_smoothing=opts.label_smoothing,
            z_loss=opts.z_loss,
            softcap=opts.softcap,
            logit_scale=opts.logit_scale,
            chunk_size=opts.chunk_size,
            inplace_backward=opts.inplace_backward,
            want_aux=opts.return_aux,
        )
    needs_grad = logits.requires_grad and torch.is_grad_enabled()
    compiling = torch.compiler.is_compiling()
    options = (
        opts.ignore_index,
        opts.reduction,
        opts.label_smoothing,
        opts.z_loss,
        opts.softcap,
        opts.logit_scale,
        block_size(logits.shape[-1]),
    )
    if opts.inplace_backward and needs_grad and not compiling:
        outputs = _InplaceBackward.apply(logits, target, weight, options, opts.return_aux)
    else:
        compute_grad = needs_grad and not compiling and grad_in_forward(logits.device)
        outputs = triton_cross_entropy_forward(logits, target, weight, *options, compute_grad, opts.return_aux)
    loss, m, log_s, denominator, _, aux = outputs
    return loss, m, log_s, denominator, aux
