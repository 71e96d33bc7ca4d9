"""The per-chunk math of DESIGN.md §1 on a block of full logit rows, shared by every loop.

A chunk is ``r`` whole rows of logits (r, V). :func:`forward_rows` computes, in the accumulation
dtype (float32, float64 for float64 inputs), the per-token ``(m, log S)`` pair, the loss terms and
what ``return_aux`` reports, and, when asked, the gradient of the loss with respect to the raw
logits, scaled per row by ``g``. :func:`backward_rows` recomputes that gradient from the saved pair,
as ``exp((z - m) - log S)``. Both work in a caller-owned scratch buffer so a loop allocates nothing
per chunk.

The per-token inputs that depend on the target alone (class id ``y``, its weight ``w_y``, the keep
mask) are prepared once per call by :func:`target_terms`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowOptions:
    """The numeric options of §1 (a slice of ``LossOptions`` that plain Python can pass around)."""

    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0


@dataclass
class TargetTerms:
    """Per-token values derived from a hard target, computed once per call (all O(N))."""

    y: Tensor  # (N,) int64 class ids, 0 where ignored or out of range (a safe address)
    keep: Tensor  # (N,) bool: target != ignore_index
    w_y: Tensor  # (N,) acc: class weight of the target; 0 ignored; NaN out of range
    denominator: Tensor  # 0-dim acc: Σ w_y over kept tokens (the "mean" denominator)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (DESIGN.md §1, step 2)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def target_terms(target: Tensor, weight: Tensor | None, vocab_size: int, ignore_index: int, acc) -> TargetTerms:
    """Class ids made safe to address, class weights per token, and the "mean" denominator.

    An id outside ``[0, V)`` that is not ``ignore_index`` is never used as an address: it reads
    class 0 and gets weight NaN, so its loss, its gradient row and a mean over it are NaN.
    """
    keep = target != ignore_index
    valid = (target >= 0) & (target < vocab_size)
    y = torch.where(keep & valid, target, 0).long()
    w_y = torch.ones(y.shape, dtype=acc, device=y.device) if weight is None else weight.to(acc)[y]
    w_y = torch.where(valid, w_y, torch.full_like(w_y, float("nan")))
    w_y = torch.where(keep, w_y, torch.zeros_like(w_y))
    return TargetTerms(y=y, keep=keep, w_y=w_y, denominator=w_y.sum())


def reduction_scale(reduction: str, denominator: Tensor) -> Tensor:
    """The factor ``d loss / d ℓ_i`` of every token: 1/denominator for "mean" (0 when it is 0)."""
    one = torch.ones_like(denominator)
    if reduction != "mean":
        return one
    safe = torch.where(denominator != 0, denominator, one)
    return torch.where(denominator != 0, one / safe, torch.zeros_like(denominator))


def reduce(token_values: Tensor, reduction: str, denominator: Tensor) -> Tensor:
    """Reduce per-token values as the loss is reduced ("mean": Σ / denominator, 0 when it is 0)."""
    if reduction == "none":
        return token_values
    total = token_values.sum()
    return total * reduction_scale(reduction, denominator) if reduction == "mean" else total


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products of two (r, V) tensors without an (r, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def scores_into(z: Tensor, x: Tensor, opts: RowOptions, chain: Tensor | None) -> None:
    """Step 1 of §1 into the accumulation buffer ``z``: ``z = s·x``, then the soft cap.

    When ``chain`` is given it receives ``∂z/∂x = s·(1 - tanh²(s·x/k))`` (soft cap only).
    """
    z.copy_(x)
    if opts.logit_scale != 1.0:
        z.mul_(opts.logit_scale)
    if opts.softcap is not None:
        z.div_(opts.softcap).tanh_()
        if chain is not None:
            torch.mul(z, z, out=chain).neg_().add_(1.0).mul_(opts.logit_scale)
        z.mul_(opts.softcap)


def _soft_weights(p: Tensor, weight: Tensor | None, opts: RowOptions, out: Tensor) -> Tensor:
    """``w_j·p'_j`` with ``p' = (1-ε)·p + ε/V`` into ``out`` (r, V)."""
    eps, V = opts.label_smoothing, p.shape[-1]
    out.copy_(p)
    if eps != 0.0:
        out.mul_(1.0 - eps).add_(eps / V)
    if weight is not None:
        out.mul_(weight)
    return out


@dataclass
class RowStats:
    """What :func:`forward_rows` returns for a chunk of r rows (accumulation dtype)."""

    loss: Tensor  # (r,) ℓ = ce + zl (0 for ignored tokens)
    m: Tensor  # (r,) row maximum of z
    log_s: Tensor  # (r,) log Σ exp(z - m)
    ce: Tensor | None = None  # (r,) with aux
    zl: Tensor | None = None  # (r,) with aux
    entropy: Tensor | None = None  # (r,) with aux
    correct: Tensor | None = None  # (r,) 1.0 where the argmax is the target and the token is kept


def forward_rows(
    x: Tensor,
    z: Tensor,
    opts: RowOptions,
    *,
    weight: Tensor | None,
    weight_sum: Tensor | None,
    y: Tensor | None = None,
    w_y: Tensor | None = None,
    keep: Tensor | None = None,
    soft: Tensor | None = None,
    g: Tensor | None = None,
    grad_out: Tensor | None = None,
    scratch: list[Tensor] | None = None,
    want_aux: bool = False,
) -> RowStats:
    """Loss terms of r full rows ``x`` (r, V), and with ``g`` (r,) their scaled gradient.

    ``z`` is an (r, V) accumulation-dtype buffer that the call overwrites. Hard targets pass
    ``y, w_y, keep`` (from :func:`target_terms`); soft targets pass ``soft`` (r, V) probabilities.
    With ``g``, the gradient ``g_i · ∂ℓ_i/∂x_i`` is written into ``grad_out`` (r, V), in its dtype.
    ``scratch`` holds up to two more (r, V) buffers for the options that need them (soft targets,
    soft cap with gradient, entropy).
    """
    eps, c, V = opts.label_smoothing, opts.z_loss, x.shape[-1]
    scratch = list(scratch or [])
    want_grad = g is not None
    chain = scratch.pop() if (want_grad and opts.softcap is not None) else None
    q = _soft_weights(soft, weight, opts, scratch.pop()) if soft is not None else None

    if opts.logit_scale == 1.0 and opts.softcap is None:
        # z = x: the maximum is taken on the input and the shift fused with the conversion
        m = x.amax(-1).to(z.dtype)
        torch.sub(x, m.unsqueeze(-1), out=z)  # z_j - m: every exponent <= 0, one is exactly 0
    else:
        scores_into(z, x, opts, chain)
        m = z.amax(-1)
        z.sub_(m.unsqueeze(-1))
    stats_correct = None
    if want_aux:
        best = z.argmax(-1)
        target_best = soft.argmax(-1) if soft is not None else y
        hit = best == target_best
        if keep is not None:
            hit = hit & keep
        stats_correct = hit.to(z.dtype)

    # The loss needs z_y - m (hard), Σ w_j (z_j - m) (smoothing), Σ w_j p'_j (z_j - m) (soft):
    # all taken before the exponentials overwrite z.
    if soft is not None:
        q_dot_z = rowdot(q, z)
    else:
        z_y = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        if eps != 0.0:
            wz = z @ weight if weight is not None else z.sum(-1)

    e = z
    if want_aux:
        e = torch.exp(z, out=scratch.pop())
        zsum = rowdot(e, z)  # Σ e_j (z_j - m), for the entropy
    else:
        e.exp_()
    s = e.sum(-1)
    log_s = s.log()
    lse = m + log_s

    if soft is not None:
        q_sum = q.sum(-1)  # Σ_j w_j p'_j
        ce = -(q_dot_z - log_s * q_sum)  # -Σ w_j p'_j ((z_j - m) - log S)
        zl = c * lse * lse if c != 0.0 else None
    else:
        log_p_y = z_y - log_s  # (z_y - m) - log S, the seed's order
        ce = -(1.0 - eps) * w_y * log_p_y
        if eps != 0.0:
            ce = ce - (eps / V) * (wz - log_s * weight_sum)
        zl = c * w_y * lse * lse if c != 0.0 else None
        zero = torch.zeros_like(ce)
        ce = torch.where(keep, ce, zero)  # an ignored token is exactly 0, whatever its logits
        if zl is not None:
            zl = torch.where(keep, zl, zero)
    loss = ce if zl is None else ce + zl

    stats = RowStats(loss=loss, m=m, log_s=log_s)
    if want_aux:
        stats.ce, stats.zl = ce, (zl if zl is not None else torch.zeros_like(ce))
        stats.entropy = log_s - zsum / s  # -Σ p log p = log S - Σ p_j (z_j - m)
        stats.correct = stats_correct

    if want_grad:
        if soft is None and chain is None and (eps == 0.0 or weight is None):
            _hard_gradient_into(grad_out, e, s, g, lse, opts, weight_sum, y, w_y)
        else:
            e.mul_((g / s).unsqueeze(-1))  # g · softmax
            _finish_gradient(e, g, lse, opts, weight, weight_sum, y, w_y, q, chain)
            grad_out.copy_(e)
    return stats


def _hard_gradient_into(out, e, s, g, lse, opts, weight_sum, y, w_y) -> None:
    """The common case (hard target, no soft cap, no class-weighted smoothing) in one pass.

    ``out = e·a - b`` row by row, with ``a = g·coef/S`` and ``b = g·(ε/V)`` (the smoothing),
    written straight into the output dtype; then the target element, formed in the accumulation
    dtype from the same ``e_y``, overwrites its slot, so it is rounded once.
    """
    eps, c, V, scale = opts.label_smoothing, opts.z_loss, e.shape[-1], opts.logit_scale
    coef = (1.0 - eps) * w_y
    if eps != 0.0:
        coef = coef + (eps / V) * weight_sum
    if c != 0.0:
        coef = coef + 2.0 * c * w_y * lse
    a = (g * scale) * coef / s
    e_y = e.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    at_y = e_y * a - (g * scale) * (1.0 - eps) * w_y
    if eps != 0.0:
        b = (g * scale) * (eps / V)
        at_y = at_y - b
        torch.addcmul(b.neg().unsqueeze(-1), e, a.unsqueeze(-1), out=out)
    else:
        torch.mul(e, a.unsqueeze(-1), out=out)
    out.scatter_(-1, y.unsqueeze(-1), at_y.unsqueeze(-1).to(out.dtype))


def backward_rows(
    x: Tensor,
    z: Tensor,
    opts: RowOptions,
    *,
    m: Tensor,
    log_s: Tensor,
    g: Tensor,
    grad_out: Tensor,
    weight: Tensor | None,
    weight_sum: Tensor | None,
    y: Tensor | None = None,
    w_y: Tensor | None = None,
    soft: Tensor | None = None,
    scratch: list[Tensor] | None = None,
) -> None:
    """``g_i · ∂ℓ_i/∂x_i`` for r rows from the saved pair, written into ``grad_out`` (r, V).

    The softmax is recomputed as ``exp((z - m) - log S)`` (never from ``lse``). ``grad_out`` may be
    ``x`` itself (in-place backward): ``x`` is read in full before ``grad_out`` is written.
    """
    scratch = list(scratch or [])
    chain = scratch.pop() if opts.softcap is not None else None
    q = _soft_weights(soft, weight, opts, scratch.pop()) if soft is not None else None
    scores_into(z, x, opts, chain)
    z.sub_(m.unsqueeze(-1)).sub_(log_s.unsqueeze(-1)).exp_().mul_(g.unsqueeze(-1))  # g · softmax
    _finish_gradient(z, g, m + log_s, opts, weight, weight_sum, y, w_y, q, chain)
    grad_out.copy_(z)


def _finish_gradient(p, g, lse, opts, weight, weight_sum, y, w_y, q, chain) -> None:
    """Turn ``p = g·softmax`` (r, V) into ``g·∂ℓ/∂x`` in place (DESIGN.md §1, gradients).

    hard: ∂ℓ/∂z_j = softmax_j·((1-ε)w_y + (ε/V)Σw + 2c·w_y·lse) - (1-ε)w_y[j=y] - (ε/V)w_j
    soft: ∂ℓ/∂z_j = softmax_j·(Σ_k w_k p'_k + 2c·lse) - w_j p'_j
    then the chain rule through the soft cap and the scale.
    """
    eps, c, V = opts.label_smoothing, opts.z_loss, p.shape[-1]
    if q is not None:
        coef = q.sum(-1)
        if c != 0.0:
            coef = coef + 2.0 * c * lse
        p.mul_(coef.unsqueeze(-1))
        p.addcmul_(q, g.unsqueeze(-1), value=-1.0)
    else:
        coef = (1.0 - eps) * w_y
        if eps != 0.0:
            coef = coef + (eps / V) * weight_sum
        if c != 0.0:
            coef = coef + 2.0 * c * w_y * lse
        p.mul_(coef.unsqueeze(-1))
        # the true class: formed here in the accumulation dtype, rounded once at the end
        p.scatter_add_(-1, y.unsqueeze(-1), (-(1.0 - eps) * w_y * g).unsqueeze(-1))
        if eps != 0.0:
            smooth = g * (eps / V)  # pre-scaled by ε/V
            if weight is None:
                p.sub_(smooth.unsqueeze(-1))
            else:
                p.addr_(smooth, weight, alpha=-1.0)
    if chain is not None:
        p.mul_(chain)
    elif opts.logit_scale != 1.0:
        p.mul_(opts.logit_scale)
