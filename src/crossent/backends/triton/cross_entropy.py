"""cross_entropy as Triton kernels: the Triton backend's ``cross_entropy_forward`` and
``cross_entropy_backward_into`` (:class:`crossent.core.autograd.Backend`).

Three layers; the custom ops, their fakes and the autograd formula are the core's
(:mod:`crossent.core.autograd`), which calls the third:

1. the ``@triton.jit`` kernels: :func:`forward_kernel` (one program per row: the online
   ``(m, S)`` merge of DESIGN.md §1 over blocks of the vocabulary, the loss terms, what
   ``return_aux`` reports, and optionally the gradient in a second loop over the row) and
   :func:`backward_kernel` (the gradient recomputed from the saved pair), built from the helpers
   of :mod:`.common`;
2. the typed launchers :func:`launch_forward` / :func:`launch_backward` (one launch per 2-D block
   of rows: strides are passed, the logits are never copied);
3. the functions the core calls: :func:`forward`, :func:`backward_into` (into a fresh tensor, or
   over the logits themselves for ``inplace_backward``) and :func:`grad_in_forward`.

Numerics (DESIGN.md §1): scores, ``(m, log S)`` and every sum are float32 whatever the input
dtype (16-bit values are converted right after loading). The log-probability is formed as
``(z_j - m) - log S``; the softmax of the gradient as ``exp((z_j - m) - log S)``. Sums that are
taken relative to the running maximum (the smoothing sum ``Σ w_j (z_j - m)``, the soft-target sum
``Σ w_j p'_j (z_j - m)`` and the entropy's ``Σ e_j (z_j - m)``) are re-based exactly as ``S`` is
when the maximum grows, so a row like ``-1e30 + noise`` loses nothing. Float64 inputs never reach
this backend (the core sends them to PyTorch's): a Triton kernel's float arguments are float32,
so options like ``ε`` or ``s`` would be rounded before a float64 kernel saw them.

Where the gradient is computed (eager mode, logits requiring grad; :func:`grad_in_forward`):

* on CUDA, in backward, recomputed from the saved pair: forward reads the logits once, backward
  reads them once and writes the gradient once — the memory-traffic floor. Computing it in
  forward instead costs a second read there, and backward must then scale the stored gradient by
  the upstream gradient (a read and a write of the whole (N, V) tensor) because on a GPU the
  upstream value is not known without a host sync;
* on the CPU (the Triton interpreter) in forward, as the PyTorch backend does: there the scale is
  skipped when the upstream gradient is exactly 1.

:data:`GRAD_IN_FORWARD` overrides that choice (``benchmarks/gpu_check.py`` measures both).
Under ``torch.compile``, with ``inplace_backward=True`` and for a second backward the core has the
gradient recomputed in backward (with ``inplace_backward`` it overwrites the logits).

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

from ...core.chunks import row_blocks
from ...core.config import OpConfig
from ...core.rows import AUX_COLUMNS, reduce, reduction_scale, target_terms
from .common import (
    NEG_INF,
    class_weights,
    gradient_row,
    hard_coefficients,
    hard_rows,
    merge_scores,
    merge_smoothing,
    num_warps,
    offsets,
    row_factors,
    saved_pair,
    scalars,
    scores,
    target_of_row,
)

#: Largest vocabulary block one loop iteration handles (a power of two), in both ops. Read at
#: every call (:func:`block_size`).
MAX_BLOCK_V = 8192

#: ``None``: the gradient is computed in forward on the CPU (interpreter) and in backward on CUDA
#: (see the module docstring); ``True`` / ``False`` force one mode in eager mode.
GRAD_IN_FORWARD: bool | None = None


# --------------------------------------------------------------------------------------------
# 1. Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def forward_kernel(
    x_ptr, x_rs, x_cs, t_ptr, t_rs, t_cs, w_ptr, w_sum_ptr, loss_ptr, m_ptr, log_s_ptr, aux_ptr, g_ptr,
    gx_ptr, gx_rs, gx_cs, V, ignore_index, one_minus_eps, eps_over_v, c, k, s,
    BLOCK_V: tl.constexpr, SOFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr,
    HAS_ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_AUX: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, X_UNIT: tl.constexpr, T_UNIT: tl.constexpr, G_UNIT: tl.constexpr,
    LIBDEVICE: tl.constexpr,
):  # fmt: skip
    """One program per row: loss, ``(m, log S)``, aux columns and, with COMPUTE_GRAD, the
    gradient scaled by ``g`` (a 0-dim factor: the reduction's)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_rs
    t_row = t_ptr + row * t_rs
    lanes = tl.arange(0, BLOCK_V)
    y, keep, w_y = target_of_row(t_row, w_ptr, V, ignore_index, SOFT, HAS_WEIGHT)

    # An ignored row runs no iteration (it reads nothing) unless its lse/entropy are reported.
    if SOFT or WANT_AUX:
        n_cols = V
    else:
        n_cols = tl.where(keep, V, 0)

    m = tl.full([], NEG_INF, tl.float32)  # running max of z
    base = tl.full([], 0.0, tl.float32)  # m where finite, else 0: the base of every running sum
    sum_e = tl.full([], 0.0, tl.float32)  # S = Σ exp(z_j - base)
    sum_ez = tl.full([], 0.0, tl.float32)  # Σ exp(z_j - base)·(z_j - base)        (entropy)
    sum_wz = tl.full([], 0.0, tl.float32)  # (ε/V)·Σ w_j (z_j - base)/2  or  Σ q_j (z_j - base)  (q = w p')
    sum_w = tl.full([], 0.0, tl.float32)  # (ε/V)·Σ w_j  or  Σ q_j over the columns seen so far
    best_i = tl.full([], 0, tl.int32)  # argmax of z (first on ties, as torch.argmax)
    p_best = tl.full([], NEG_INF, tl.float32)  # soft targets: max and argmax of p
    p_best_i = tl.full([], 0, tl.int32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + lanes
        mask = cols < V
        z, zs, shift, m_new, base_new, sum_e, sum_ez, best_i = merge_scores(
            x_row, x_cs, cols, mask, start, m, base, sum_e, sum_ez, best_i, k, s,
            HAS_SCALE, HAS_SOFTCAP, WANT_AUX, X_UNIT, LIBDEVICE,
        )  # fmt: skip
        if SOFT:
            p = tl.load(t_row + offsets(cols, t_cs, T_UNIT), mask=mask, other=0.0).to(tl.float32)
            if WANT_AUX:
                pm = tl.where(mask, p, NEG_INF)
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
            sum_wz, sum_w = merge_smoothing(w_ptr, cols, mask, z, base, base_new, sum_wz, sum_w, eps_over_v, HAS_WEIGHT)
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
        z_y, _ty = scores(x_y, s, k, HAS_SCALE, HAS_SOFTCAP, LIBDEVICE)
        log_p_y = (z_y - base) - log_s  # (z_y - m) - log S, the seed's order
        ce = -one_minus_eps * w_y * log_p_y
        if HAS_SMOOTH:  # sum_w = (ε/V)·Σw: the whole row was seen; sum_wz is in halves
            ce = ce - (2.0 * sum_wz - log_s * sum_w)
        zl = 0.0
        if HAS_ZLOSS:
            zl = c * w_y * lse * lse
        ce = tl.where(keep, ce, 0.0)  # an ignored token is exactly 0, whatever its logits
        zl = tl.where(keep, zl, 0.0)
        coef, rest = hard_coefficients(
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
        gradient_row(
            x_row, x_cs, gx_ptr + row * gx_rs, gx_cs, t_row, t_cs, w_ptr, V, y, keep, base, log_s, g, coef, rest,
            one_minus_eps, eps_over_v, k, s, BLOCK_V, SOFT, HAS_WEIGHT, HAS_SMOOTH, HAS_SCALE, HAS_SOFTCAP,
            X_UNIT, T_UNIT, G_UNIT, LIBDEVICE,
        )  # fmt: skip


@triton.jit
def backward_kernel(
    x_ptr, x_rs, x_cs, t_ptr, t_rs, t_cs, w_ptr, w_sum_ptr, m_ptr, log_s_ptr, g_ptr, g_stride, gx_ptr, gx_rs,
    gx_cs, V, ignore_index, one_minus_eps, eps_over_v, c, k, s, BLOCK_V: tl.constexpr, SOFT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_ZLOSS: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, X_UNIT: tl.constexpr, T_UNIT: tl.constexpr, G_UNIT: tl.constexpr,
    LIBDEVICE: tl.constexpr,
):  # fmt: skip
    """One program per row: ``g·∂ℓ/∂x`` recomputed from the saved ``(m, log S)``; ``g`` is the
    reduction's factor times the upstream gradient (0-dim: ``g_stride`` 0, or one per row)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_rs
    t_row = t_ptr + row * t_rs
    y, keep, w_y = target_of_row(t_row, w_ptr, V, ignore_index, SOFT, HAS_WEIGHT)
    base, log_s, lse, g = saved_pair(m_ptr, log_s_ptr, g_ptr, g_stride, row)
    if SOFT:
        lanes = tl.arange(0, BLOCK_V)
        coef = tl.full([], 0.0, tl.float32)  # Σ_k w_k p'_k: one pass over the target row
        for start in range(0, V, BLOCK_V):
            cols = start + lanes
            mask = cols < V
            q = tl.load(t_row + offsets(cols, t_cs, T_UNIT), mask=mask, other=0.0).to(tl.float32)
            if HAS_SMOOTH:
                q = q * one_minus_eps + eps_over_v
            if HAS_WEIGHT:
                q = q * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            coef = coef + tl.sum(tl.where(mask, q, 0.0), 0)
        rest = 0.0
        if HAS_ZLOSS:
            rest = 2.0 * c * lse
    else:
        coef, rest = hard_coefficients(
            w_y, lse, w_sum_ptr, V, one_minus_eps, eps_over_v, c, HAS_WEIGHT, HAS_SMOOTH, HAS_ZLOSS
        )
    gradient_row(
        x_row, x_cs, gx_ptr + row * gx_rs, gx_cs, t_row, t_cs, w_ptr, V, y, keep, base, log_s, g, coef, rest,
        one_minus_eps, eps_over_v, k, s, BLOCK_V, SOFT, HAS_WEIGHT, HAS_SMOOTH, HAS_SCALE, HAS_SOFTCAP,
        X_UNIT, T_UNIT, G_UNIT, LIBDEVICE,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# 2. Launchers
# --------------------------------------------------------------------------------------------


def block_size(vocab_size: int) -> int:
    """The vocabulary block of one loop iteration: the next power of two, at most
    :data:`MAX_BLOCK_V` (read now, so that setting it takes effect at the next call)."""
    return max(16, min(triton.next_power_of_2(vocab_size), triton.next_power_of_2(MAX_BLOCK_V)))


def _blocks(logits: Tensor, target: Tensor, grad_into: Tensor | None):
    """Yield (first row, logits rows (r, V), target rows, gradient rows or None) as 2-D views.

    ``grad_into`` is ``logits`` itself (in place: the same views) or a fresh contiguous tensor.
    """
    V = logits.shape[-1]
    soft = target.is_floating_point()
    t_rows = target.reshape(-1, V) if soft else hard_rows(target)
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
    logits: Tensor, target: Tensor, weight: Tensor | None, g: Tensor, grad: Tensor | None, config: OpConfig,
    block_v: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Run :func:`forward_kernel` over every row; returns (token loss, m, log_s, aux), float32.

    ``g`` (0-dim float32) scales the gradient written into ``grad`` (logits' shape) when given.
    """
    V = logits.shape[-1]
    N = math.prod(logits.shape[:-1])
    device = logits.device
    soft = target.is_floating_point()
    want_aux = config.want_aux
    token_loss = torch.empty(N, dtype=torch.float32, device=device)
    m = torch.empty(N, dtype=torch.float32, device=device)
    log_s = torch.empty(N, dtype=torch.float32, device=device)
    aux = torch.empty((N if want_aux else 0, AUX_COLUMNS), dtype=torch.float32, device=device)
    w, w_sum, has_weight = class_weights(weight, m)
    values, flags = scalars(V, config)
    for start, x, t, gx in _blocks(logits, target, grad):
        t_rs, t_cs = _t_strides(t)
        gx_arg = gx if gx is not None else x  # never written without COMPUTE_GRAD
        forward_kernel[(x.shape[0],)](
            x, x.stride(0), x.stride(1), t, t_rs, t_cs, w, w_sum, token_loss[start:], m[start:], log_s[start:],
            aux[start:] if want_aux else m,  # not written without WANT_AUX
            g, gx_arg, gx_arg.stride(0), gx_arg.stride(1), **values, BLOCK_V=block_v, SOFT=soft,
            HAS_WEIGHT=has_weight, WANT_AUX=want_aux, COMPUTE_GRAD=gx is not None, X_UNIT=x.stride(1) == 1,
            T_UNIT=t_cs == 1, G_UNIT=gx_arg.stride(1) == 1, **flags, num_warps=num_warps(block_v),
        )  # fmt: skip
    return token_loss, m, log_s, aux


def launch_backward(
    logits: Tensor, target: Tensor, weight: Tensor | None, m: Tensor, log_s: Tensor, g: Tensor, out: Tensor,
    config: OpConfig, block_v: int,
) -> None:  # fmt: skip
    """Run :func:`backward_kernel`: ``g·∂ℓ/∂logits`` into ``out`` (may be ``logits`` itself).

    ``g`` is float32, 0-dim (one factor for every row) or (N,) (one per row).
    """
    w, w_sum, has_weight = class_weights(weight, m)
    values, flags = scalars(logits.shape[-1], config)
    g_stride = 0 if g.dim() == 0 else 1
    for start, x, t, gx in _blocks(logits, target, out):
        t_rs, t_cs = _t_strides(t)
        backward_kernel[(x.shape[0],)](
            x, x.stride(0), x.stride(1), t, t_rs, t_cs, w, w_sum, m[start:], log_s[start:],
            g if g_stride == 0 else g[start:], g_stride, gx, gx.stride(0), gx.stride(1), **values,
            BLOCK_V=block_v, SOFT=target.is_floating_point(), HAS_WEIGHT=has_weight, X_UNIT=x.stride(1) == 1,
            T_UNIT=t_cs == 1, G_UNIT=gx.stride(1) == 1, **flags, num_warps=num_warps(block_v),
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# 3. The functions the core calls (registered by the package)
# --------------------------------------------------------------------------------------------


def grad_in_forward(device: torch.device) -> bool:
    """Whether eager mode computes the gradient in forward (see the module docstring)."""
    if GRAD_IN_FORWARD is not None:
        return GRAD_IN_FORWARD
    return device.type != "cuda"


def _denominator(target: Tensor, weight: Tensor | None, V: int, ignore_index: int, N: int) -> Tensor:
    """The "mean" denominator: Σ w_y over kept tokens (hard), N (soft); 0-dim float32."""
    if target.is_floating_point():
        return torch.full((), float(N), dtype=torch.float32, device=target.device)
    return target_terms(target.reshape(-1), weight, V, ignore_index, torch.float32).denominator


def forward(logits: Tensor, target: Tensor, weight: Tensor | None, config: OpConfig, compute_grad: bool):
    """(loss, m, log_s, denominator, grad or empty, aux (N, 4) or empty), float32 but ``grad``
    (the logits' dtype: ``∂loss/∂logits`` for an upstream gradient of 1, when ``compute_grad``)."""
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    denominator = _denominator(target, weight, V, config.ignore_index, math.prod(lead))
    grad = torch.empty(logits.shape if compute_grad else (0,), dtype=logits.dtype, device=logits.device)
    g = reduction_scale(config.reduction, denominator)
    token_loss, m, log_s, aux = launch_forward(
        logits, target, weight, g, grad if compute_grad else None, config, block_size(V)
    )
    loss = reduce(token_loss, config.reduction, denominator)
    if config.reduction == "none":
        loss = loss.view(lead)
    return loss, m, log_s, denominator, grad, aux


def backward_into(
    out: Tensor, grad_loss: Tensor, logits: Tensor, target: Tensor, weight: Tensor | None, m: Tensor,
    log_s: Tensor, denominator: Tensor, config: OpConfig,
) -> None:  # fmt: skip
    """``∂loss/∂logits · grad_loss`` from the saved pair into ``out`` (may be ``logits``: each row
    is read, then written, by one program)."""
    g = row_factors(config.reduction, denominator, grad_loss)
    launch_backward(logits, target, weight, m, log_s, g, out, config, block_size(logits.shape[-1]))
