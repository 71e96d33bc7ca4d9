"""The per-chunk math of DESIGN.md §1, shared by every loop of every loss.

Two shapes of chunk occur. A *row chunk* is r whole rows of logits (r, V): :func:`forward_rows`
computes, in the accumulation dtype (float32, float64 for float64 inputs), the per-token
``(m, log S)`` pair, the loss terms and what ``return_aux`` reports, and when asked the gradient,
scaled per row by ``g``. A *vocabulary block* is the columns ``[col0, col0 + w)`` of every row:
:class:`crossent.core.online.OnlineStats` merges blocks into the same per-token statistics (DESIGN.md §1's online
``(m, S)`` merge), and :func:`backward_rows` recomputes the gradient of any block — a whole row
being the block ``col0 = 0, w = V`` — from the saved pair, as ``exp((z - m) - log S)``. Both
loops end in :func:`finish_rows`, so the loss has one formula. Everything works in caller-owned
scratch buffers, so a loop allocates nothing per chunk.

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


def class_weights(weight: Tensor | None, vocab_size: int, acc, device) -> tuple[Tensor | None, Tensor]:
    """Class weights in the accumulation dtype, and their sum Σ_j w_j (V without weights)."""
    if weight is None:
        return None, torch.tensor(float(vocab_size), dtype=acc, device=device)
    w = weight.to(acc).contiguous()
    return w, w.sum()


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
    if reduction == "sum":
        return token_values.sum()
    # "mean": summed in float64, so a mean that is representable is finite even when the sum of
    # the per-token losses is not (e.g. a few losses near 3e38 in float32)
    wide = torch.float64 if token_values.device.type != "mps" else token_values.dtype
    mean = token_values.to(wide).sum() * reduction_scale(reduction, denominator.to(wide))
    return mean.to(token_values.dtype)


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products of two (r, V) tensors without an (r, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


#: log2(e): ``e^z = 2^(z·log2 e)``.
LOG2_E = 1.4426950408889634


def exp_(z: Tensor, out: Tensor | None = None) -> Tensor:
    """``e^z`` of the shifted scores ``z`` (≤ 0), in place or into ``out``.

    float32 on the CPU goes through ``2^(z·log2 e)``: ATen's vectorised ``exp2`` is cheaper than
    its ``exp``, the multiplication included, and ``exp`` is the largest part of the loss's own
    work (docs/guide.md, "Exponentials"). The product's rounding adds ``|z|·2⁻²⁴`` to an
    element's relative error, which is weighted by ``e^z`` itself wherever it matters (the sums,
    the largest gradient elements), so the norm-wise error stays far below PyTorch's own
    (docs/math.md). ``exp(0)`` stays exactly 1 and ``-inf`` gives 0. Elsewhere (float64, other
    devices, where the extra pass would cost more) plain ``exp``.
    """
    if z.dtype == torch.float32 and z.device.type == "cpu":
        return torch.mul(z, LOG2_E, out=z if out is None else out).exp2_()
    return z.exp_() if out is None else torch.exp(z, out=out)


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


def smoothing_weights(weight: Tensor | None, opts: RowOptions, vocab_size: int, acc, device) -> Tensor | None:
    """``(ε/V)·w_j`` (V,) for the smoothing sum, or None without smoothing.

    The sum ``Σ_j w_j (z_j - m)`` is taken with weights already scaled by ``ε/V``: its terms can
    be near the float32 maximum (a 3e38 logit), so the unscaled sum may overflow where the
    smoothing term itself is representable.
    """
    if opts.label_smoothing == 0.0:
        return None
    scale = opts.label_smoothing / vocab_size
    if weight is None:
        return torch.full((vocab_size,), scale, dtype=acc, device=device)
    return weight.to(acc) * scale


@dataclass
class RowSums:
    """Per-token sums that a loop fills in chunk by chunk (accumulation dtype, one value per token).

    Only the (r, V) work happens inside a loop; :func:`finish_rows` then turns these sums into the
    loss of every token at once, so a loop costs few operations per chunk.
    """

    m: Tensor  # max_j z_j
    log_s: Tensor  # log Σ_j exp(z_j - m)
    z_y: Tensor | None = None  # z_y - m (hard target)
    wz: Tensor | None = None  # (ε/V)·Σ_j w_j (z_j - m), pre-scaled (hard target with label smoothing)
    q_dot_z: Tensor | None = None  # Σ_j w_j p'_j (z_j - m) (soft target)
    q_sum: Tensor | None = None  # Σ_j w_j p'_j (soft target)
    p_dot_z: Tensor | None = None  # Σ_j p_j (z_j - m) (aux: the entropy is log S minus this)
    hit: Tensor | None = None  # 1.0 where the argmax is the target (aux)

    @staticmethod
    def allocate(n: int, acc, device, *, soft: bool, smooth: bool, aux: bool) -> RowSums:
        def vec(wanted: bool = True):
            return torch.empty(n, dtype=acc, device=device) if wanted else None

        return RowSums(
            m=vec(),
            log_s=vec(),
            z_y=vec(not soft),
            wz=vec(smooth and not soft),
            q_dot_z=vec(soft),
            q_sum=vec(soft),
            p_dot_z=vec(aux),
            hit=vec(aux),
        )

    def rows(self, lo: int, hi: int) -> RowSums:
        return RowSums(**{k: (v[lo:hi] if v is not None else None) for k, v in vars(self).items()})


#: Per-token columns that ``return_aux`` adds: ce, z-loss, entropy, correct.
AUX_COLUMNS = 4


@dataclass
class RowStats:
    """Per-token results (accumulation dtype)."""

    loss: Tensor  # ℓ = ce + zl (0 for ignored tokens)
    m: Tensor  # row maximum of z
    log_s: Tensor  # log Σ exp(z - m)
    ce: Tensor | None = None  # with aux
    zl: Tensor | None = None  # with aux
    entropy: Tensor | None = None  # with aux
    correct: Tensor | None = None  # with aux: 1.0 where the argmax is the target and the token is kept

    def aux_columns(self) -> Tensor:
        """(N, AUX_COLUMNS): ce, z-loss, entropy and correct per token; (0, AUX_COLUMNS) without aux."""
        if self.ce is None:
            return torch.empty((0, AUX_COLUMNS), dtype=self.m.dtype, device=self.m.device)
        return torch.stack([self.ce, self.zl, self.entropy, self.correct], dim=-1)


def finish_rows(
    sums: RowSums,
    opts: RowOptions,
    vocab_size: int,
    *,
    w_y: Tensor | None = None,
    keep: Tensor | None = None,
    weight_sum: Tensor | None = None,
    want_aux: bool = False,
) -> RowStats:
    """The loss terms of DESIGN.md §1 (3–5) for every token, from its sums.

    hard: ce = -(1-ε)·w_y·((z_y - m) - log S) - ((ε/V)·Σ_j w_j (z_j - m) - log S·(ε/V)·Σ_j w_j)
    soft: ce = -(Σ_j w_j p'_j (z_j - m) - log S·Σ_j w_j p'_j)
    z-loss: c·w_y·lse² (hard), c·lse² (soft), with lse = m + log S; not computed when c = 0.
    """
    eps, c, m, log_s = opts.label_smoothing, opts.z_loss, sums.m, sums.log_s
    lse = m + log_s
    if sums.q_dot_z is not None:
        ce = -(sums.q_dot_z - log_s * sums.q_sum)
        zl = c * lse * lse if c != 0.0 else None
    else:
        ce = -(1.0 - eps) * w_y * (sums.z_y - log_s)  # (z_y - m) - log S: the seed's order
        if eps != 0.0:
            ce = ce - (sums.wz - log_s * ((eps / vocab_size) * weight_sum))
        zero = torch.zeros_like(ce)
        ce = torch.where(keep, ce, zero)  # an ignored token is exactly 0, whatever its logits
        zl = torch.where(keep, c * w_y * lse * lse, zero) if c != 0.0 else None
    stats = RowStats(loss=ce if zl is None else ce + zl, m=m, log_s=log_s)
    if want_aux:
        stats.ce, stats.zl = ce, (zl if zl is not None else torch.zeros_like(ce))
        stats.entropy = log_s - sums.p_dot_z  # -Σ p log p = log S - Σ p_j (z_j - m)
        stats.correct = sums.hit if keep is None else torch.where(keep, sums.hit, torch.zeros_like(sums.hit))
    return stats


@dataclass
class GradTerms:
    """Per-token factors of the gradient, computed once for all tokens (DESIGN.md §1).

    ``g`` is ``∂loss/∂ℓ_i`` (0 for ignored tokens). For hard targets, with ``gs = g·s``:
    ``a0 = gs·((1-ε)w_y + (ε/V)Σw)`` and ``az = gs·2c·w_y`` make the factor of softmax_j
    (``a0 + az·lse``), ``gy = gs·(1-ε)w_y`` is taken off at the target, ``b = gs·ε/V`` everywhere.
    ``a1 = gs·(ε/V)Σw`` is ``a0 - gy`` formed without the subtraction: the target's element is
    ``gy·(p_y - 1) + p_y·(a1 + az·lse)``, so a tiny z-loss term is not lost in ``1 + 2c·lse``.
    """

    g: Tensor
    w_y: Tensor | None = None
    a0: Tensor | None = None
    az: Tensor | None = None
    gy: Tensor | None = None
    b: Tensor | None = None
    a1: Tensor | None = None

    def rows(self, lo: int, hi: int) -> GradTerms:
        return GradTerms(**{k: (v[lo:hi] if v is not None else None) for k, v in vars(self).items()})


def grad_terms(g: Tensor, opts: RowOptions, vocab_size: int, *, w_y=None, weight_sum=None) -> GradTerms:
    if w_y is None:
        return GradTerms(g=g)
    eps, c = opts.label_smoothing, opts.z_loss
    gs = g * opts.logit_scale
    gy = gs * (1.0 - eps) * w_y
    a1 = gs * (eps / vocab_size) * weight_sum if eps != 0.0 else None
    a0 = gy + a1 if a1 is not None else gy
    az = gs * (2.0 * c) * w_y if c != 0.0 else None
    b = gs * (eps / vocab_size) if eps != 0.0 else None
    return GradTerms(g=g, w_y=w_y, a0=a0, az=az, gy=gy, b=b, a1=a1)


def forward_rows(
    x: Tensor,
    z: Tensor,
    opts: RowOptions,
    out: RowSums,
    *,
    weight: Tensor | None,
    weight_sum: Tensor | None,
    y: Tensor | None = None,
    soft: Tensor | None = None,
    grad: GradTerms | None = None,
    grad_out: Tensor | None = None,
    scratch: list[Tensor] | None = None,
    smooth_weight: Tensor | None = None,
) -> None:
    """Fill ``out`` (the rows' :class:`RowSums`) from r full rows ``x`` (r, V); with ``grad``
    also write their gradient ``g_i · ∂ℓ_i/∂x_i`` into ``grad_out`` (r, V), in its dtype.

    ``z`` is an (r, V) accumulation-dtype buffer that the call overwrites (it may be ``x``
    itself; ``grad_out`` may be ``x`` too: ``x`` is read in full first). Hard targets pass ``y``,
    soft targets ``soft`` (r, V) probabilities. ``scratch`` holds up to three more (r, V)
    buffers for the options that need them (soft targets, soft cap with gradient, entropy).
    ``smooth_weight`` is :func:`smoothing_weights` (hard targets with label smoothing).
    """
    scratch = list(scratch or [])
    want_aux = out.p_dot_z is not None
    chain = scratch.pop() if (grad is not None and opts.softcap is not None) else None
    q = _soft_weights(soft, weight, opts, scratch.pop()) if soft is not None else None

    smooth_w = smooth_weight if out.wz is not None else None
    if opts.logit_scale == 1.0 and opts.softcap is None and x.stride(-1) == 1:
        # z = x: the maximum is taken on the input and the shift fused with the conversion (a
        # strided class dim is instead read once, by the copy of scores_into)
        m, wide = row_max(x, z.dtype, smooth_w)
        torch.sub(x, m.unsqueeze(-1), out=z)  # z_j - m: every exponent <= 0, one is exactly 0
    else:
        scores_into(z, x, opts, chain)
        m, wide = row_max(z, z.dtype, smooth_w)
        z.sub_(m.unsqueeze(-1))
    out.m.copy_(m)
    if want_aux:
        torch.eq(z.argmax(-1), soft.argmax(-1) if soft is not None else y, out=out.hit)

    # z_y - m (hard), Σ w_j (z_j - m) (smoothing), Σ w_j p'_j (z_j - m) (soft): all taken
    # before the exponentials overwrite z
    if q is not None:
        out.q_dot_z.copy_(rowdot(q, z))
        torch.sum(q, -1, out=out.q_sum)
    else:
        torch.gather(z, -1, y.unsqueeze(-1), out=out.z_y.unsqueeze(-1))
        if out.wz is not None:
            torch.mv(z, smooth_weight, out=out.wz)
            put_wide_rows(out.wz, wide)

    e = z
    if want_aux:
        e = exp_(z, out=scratch.pop())
        out.p_dot_z.copy_(rowdot(e, finite_floor(z)))
    else:
        exp_(e)
    s = e.sum(-1)
    torch.log(s, out=out.log_s)
    if want_aux:
        out.p_dot_z.div_(s)
    if grad is None:
        return
    if q is None and chain is None and (weight is None or opts.label_smoothing == 0.0):
        _hard_gradient_into(grad_out, e, s, out, grad, y)
    else:
        lse = m + out.log_s
        e.mul_((grad.g / s).unsqueeze(-1))  # g · softmax
        _finish_gradient(e, grad.g, lse, opts, x.shape[-1], 0, weight, weight_sum, y, grad.w_y, q, chain)
        grad_out.copy_(e)


def smoothing_sum_in_halves(scores: Tensor, m: Tensor, w: Tensor) -> Tensor:
    """``Σ_j w_j (z_j - m)`` of rows of ``scores`` (before ``m`` is taken off) as
    ``2·Σ_j w_j (z_j/2 - m/2)``: halving is exact and a difference of halves cannot overflow, so
    the sum is finite wherever it is representable, also for a row that spans more than the
    float range (a 3e38 and a -3e38 logit), where ``z_j - m`` itself is -inf."""
    half = scores * 0.5 - (m * 0.5).unsqueeze(-1)
    return (half @ w) * 2.0


def row_max(scores: Tensor, acc, smooth_weight: Tensor | None):
    """``(m, wide)``: the row maxima of ``scores`` in ``acc``, and with label smoothing the
    smoothing sums of the rows wider than the float range (``m - min`` not finite: there
    ``z_j - m`` is -inf), taken in halves now, before ``m`` is subtracted (:func:`put_wide_rows`
    puts them in place). On the CPU the min comes with the max (one pass) and only those rows
    are summed (finding them is a free host sync there); elsewhere every row is, without a sync.
    """
    if smooth_weight is None:
        return scores.amax(-1).to(acc), None
    if scores.device.type != "cpu":
        m = scores.amax(-1).to(acc)
        return m, (None, smoothing_sum_in_halves(scores.to(acc), m, smooth_weight))
    low, m = torch.aminmax(scores, dim=-1)
    m = m.to(acc)
    rows = (~torch.isfinite(m - low.to(acc))).nonzero().squeeze(-1)
    if rows.numel() == 0:
        return m, None
    return m, (rows, smoothing_sum_in_halves(scores[rows].to(acc), m[rows], smooth_weight))


def put_wide_rows(wz: Tensor, wide) -> None:
    """Replace the smoothing sums of the rows :func:`row_max` found too wide."""
    if wide is None:
        return
    rows, sums = wide
    if rows is None:
        wz.copy_(torch.where(torch.isfinite(wz), wz, sums))
    else:
        wz[rows] = sums


def finite_floor(z: Tensor) -> Tensor:
    """``z - m`` with -inf raised to the lowest finite value, so that ``e^(z-m)·(z-m)`` is 0, not
    NaN, where a logit is -inf (a masked class) or a row is wider than the float range."""
    return z.clamp_(min=torch.finfo(z.dtype).min)


def weighted(a: Tensor, v: Tensor) -> Tensor:
    """``a·v``, exactly 0 where ``a`` is 0 (``v`` may then be infinite; a NaN stays NaN)."""
    return torch.where(a == 0, torch.zeros_like(v), a * v)


def _hard_gradient_into(grad_out, e, s, sums: RowSums, t: GradTerms, y) -> None:
    """The common case (hard target, no soft cap, no class-weighted smoothing) in one pass.

    ``grad_out = e·a - b`` row by row, with ``a = (a0 + az·lse)/S``, written straight into the
    output dtype; then the target element ``gy·(p_y - 1) + p_y·(a1 + az·lse) - b``, formed in
    the accumulation dtype, overwrites its slot, so it is rounded once.
    """
    lse = sums.m + sums.log_s
    a = t.a0 if t.az is None else t.a0 + t.az * lse
    a = a / s
    p_y = e.gather(-1, y.unsqueeze(-1)).squeeze(-1) / s
    at_y = t.gy * (p_y - 1.0)  # exactly 0 when p_y = 1 (V = 1)
    rest = t.a1 if t.az is None else (t.az * lse if t.a1 is None else t.a1 + t.az * lse)
    if rest is not None:
        at_y = at_y + p_y * rest
    if t.b is not None:
        at_y = at_y - t.b
        torch.addcmul(t.b.neg().unsqueeze(-1), e, a.unsqueeze(-1), out=grad_out)
    else:
        torch.mul(e, a.unsqueeze(-1), out=grad_out)
    grad_out.scatter_(-1, y.unsqueeze(-1), at_y.unsqueeze(-1).to(grad_out.dtype))


def _coefficient(w_y, lse, opts: RowOptions, vocab_size: int, weight_sum, with_true_class: bool = True):
    """The factor of softmax_j in ∂ℓ/∂z_j (hard target): (1-ε)w_y + (ε/V)Σw + 2c·w_y·lse.

    Without ``with_true_class``, the terms after the first (None when there are none).
    """
    eps, c = opts.label_smoothing, opts.z_loss
    coef = (1.0 - eps) * w_y if with_true_class else None
    if eps != 0.0:
        smooth = (eps / vocab_size) * weight_sum
        coef = smooth if coef is None else coef + smooth
    if c != 0.0:
        zl = 2.0 * c * w_y * lse
        coef = zl if coef is None else coef + zl
    return coef


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
    col0: int = 0,
    vocab_size: int | None = None,
) -> None:
    """``g_i · ∂ℓ_i/∂x_ij`` for the block ``x`` (r, w) from the saved pair, into ``grad_out``.

    The block is columns ``[col0, col0 + w)`` of rows of ``vocab_size`` classes (whole rows by
    default); ``weight`` is the block's slice of the class weights. The softmax is recomputed as
    ``exp((z - m) - log S)`` (never from ``lse``). ``grad_out`` may be ``x`` itself (in-place
    backward) or ``z``: ``x`` is read in full before ``grad_out`` is written.
    """
    V = x.shape[-1] if vocab_size is None else vocab_size
    scratch = list(scratch or [])
    chain = scratch.pop() if opts.softcap is not None else None
    q = _soft_weights(soft, weight, opts, scratch.pop()) if soft is not None else None
    scores_into(z, x, opts, chain)
    exp_(z.sub_(m.unsqueeze(-1)).sub_(log_s.unsqueeze(-1))).mul_(g.unsqueeze(-1))  # g · softmax
    _finish_gradient(z, g, m + log_s, opts, V, col0, weight, weight_sum, y, w_y, q, chain)
    if grad_out is not z:
        grad_out.copy_(z)


def _finish_gradient(p, g, lse, opts, vocab_size, col0, weight, weight_sum, y, w_y, q, chain) -> None:
    """Turn ``p = g·softmax`` (r, w) into ``g·∂ℓ/∂x`` in place (DESIGN.md §1, gradients).

    hard: ∂ℓ/∂z_j = softmax_j·((1-ε)w_y + (ε/V)Σw + 2c·w_y·lse) - (1-ε)w_y[j=y] - (ε/V)w_j
    soft: ∂ℓ/∂z_j = softmax_j·(Σ_k w_k p'_k + 2c·lse) - w_j p'_j
    then the chain rule through the soft cap and the scale. ``p`` holds the columns
    ``[col0, col0 + w)``; ``weight`` is their slice of the class weights.
    """
    eps, c, V, width = opts.label_smoothing, opts.z_loss, vocab_size, p.shape[-1]
    if q is not None:
        # (p·Σq - g·q) + p·2c·lse: the z-loss term is added to the cross entropy's, never folded
        # into the factor Σq + 2c·lse, where a tiny one would round away (V = 1: p = g, q = Σq)
        coef = q.sum(-1).unsqueeze(-1)
        if c != 0.0:
            q.mul_(-g.unsqueeze(-1)).addcmul_(p, coef)
            p.mul_((2.0 * c * lse).unsqueeze(-1)).add_(q)
        else:
            p.mul_(coef).addcmul_(q, g.unsqueeze(-1), value=-1.0)
    else:
        local = y - col0
        inside = None
        if col0 != 0 or width != V:
            inside = (local >= 0) & (local < width)
            local = local.clamp(0, width - 1)
        local = local.unsqueeze(-1)
        p_y = p.gather(-1, local).squeeze(-1)  # g·softmax_y
        coef = _coefficient(w_y, lse, opts, V, weight_sum)
        p.mul_(coef.unsqueeze(-1))
        # the true class, formed here in the accumulation dtype and rounded once at the end, as
        # (1-ε)w_y·(g·p_y - g) + g·p_y·((ε/V)Σw + 2c·w_y·lse): no cancellation in the factor
        at_y = (1.0 - eps) * w_y * (p_y - g)
        rest = _coefficient(w_y, lse, opts, V, weight_sum, with_true_class=False)
        if rest is not None:
            at_y = at_y + p_y * rest
        if inside is not None:
            at_y = torch.where(inside, at_y, p_y * coef)
        p.scatter_(-1, local, at_y.unsqueeze(-1))
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
