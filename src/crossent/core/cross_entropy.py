"""The chunk loops of ``cross_entropy``: rows of logits a chunk at a time, optionally over a
vocabulary shard. These are the PyTorch backend's kernels (``backends.pytorch`` registers
:func:`forward` and :func:`backward_into`) and the local half of the vocabulary-parallel loss.

Memory: a loop holds one chunk of rows in the accumulation dtype at a time (its size from the
memory budget); forward returns O(N) — the per-token ``(m, log S)`` pair — beyond its inputs,
never a copy of the (N, V) logits or their softmax.

Where the gradient is computed: when asked (eager mode, logits requiring grad), :func:`forward`
writes ``∂loss/∂logits`` (scaled for the reduction) into a fresh tensor while the exponentials are
at hand; :func:`backward_into` recomputes it from the saved pair instead — the same result —
chunk by chunk into any output, the logits themselves included (``inplace_backward``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .chunks import Shard, aligned_chunks, logit_chunk_rows, scratch_buffers
from .config import OpConfig
from .online import BlockPartials, OnlineStats
from .rows import (
    RowSums,
    accumulation_dtype,
    backward_rows,
    class_weights,
    finish_rows,
    forward_rows,
    grad_terms,
    reduce,
    reduction_scale,
    scores_into,
    smoothing_weights,
    target_terms,
)


def grad_in_forward(device: torch.device) -> bool:
    """The PyTorch backend forms the gradient during the forward in eager mode, on every device."""
    return True


def _chunk_rows(config: OpConfig, width: int, acc, n: int, **needs) -> int:
    """Rows per chunk: the caller's, or from the memory budget; at least 1, at most ``n``."""
    rows = config.chunk_size or logit_chunk_rows(width, acc, 1 + scratch_buffers(**needs))
    return max(1, min(rows, n))


def forward(logits: Tensor, target: Tensor, weight: Tensor | None, config: OpConfig, compute_grad: bool):
    """(loss, m, log_s, denominator, grad or empty, aux or empty) of whole rows of logits."""
    V = logits.shape[-1]
    acc = accumulation_dtype(logits.dtype)
    device = logits.device
    soft = target.is_floating_point()
    opts, want_aux = config.rows, config.want_aux
    lead_shape = logits.shape[:-1]
    N = math.prod(lead_shape)
    w, w_sum = class_weights(weight, V, acc, device)
    if soft:
        terms, keep = None, None
        denominator = torch.tensor(float(N), dtype=acc, device=device)
    else:
        terms = target_terms(target.reshape(-1), w, V, config.ignore_index, acc)
        keep, denominator = terms.keep, terms.denominator

    sums = RowSums.allocate(N, acc, device, soft=soft, smooth=opts.label_smoothing != 0.0, aux=want_aux)
    grad = torch.empty(logits.shape if compute_grad else (0,), dtype=logits.dtype, device=device)
    gterms = None
    if compute_grad:
        g_all = reduction_scale(config.reduction, denominator).expand(N)
        if keep is not None:
            g_all = torch.where(keep, g_all, torch.zeros_like(g_all))
        gterms = grad_terms(g_all, opts, V, w_y=None if soft else terms.w_y, weight_sum=w_sum)

    softcap = opts.softcap is not None
    chunk_rows = _chunk_rows(config, V, acc, N, soft=soft, softcap=softcap, want_grad=True, want_aux=want_aux)
    n_scratch = scratch_buffers(soft=soft, softcap=softcap, want_grad=compute_grad, want_aux=want_aux)
    smooth_w = None if soft else smoothing_weights(w, opts, V, acc, device)
    z_full = torch.empty((chunk_rows, V), dtype=acc, device=device)
    scratch_full = [torch.empty((chunk_rows, V), dtype=acc, device=device) for _ in range(n_scratch)]
    soft_target = target if soft else None
    for lo, x, soft_rows, grad_out in aligned_chunks(chunk_rows, logits, soft_target, grad if compute_grad else None):
        r = x.shape[0]
        forward_rows(
            x,
            z_full[:r],
            opts,
            sums.rows(lo, lo + r),
            weight=w,
            weight_sum=w_sum,
            y=None if soft else terms.y[lo : lo + r],
            soft=soft_rows,
            grad=gterms.rows(lo, lo + r) if compute_grad else None,
            grad_out=grad_out,
            scratch=[b[:r] for b in scratch_full],
            smooth_weight=smooth_w,
        )

    stats = finish_rows(sums, opts, V, w_y=None if soft else terms.w_y, keep=keep, weight_sum=w_sum, want_aux=want_aux)
    loss = reduce(stats.loss, config.reduction, denominator)
    if config.reduction == "none":
        loss = loss.view(lead_shape)
    return loss, stats.m, stats.log_s, denominator, grad, stats.aux_columns()


def shard_partials(logits: Tensor, terms, weight: Tensor | None, config: OpConfig, shard: Shard) -> BlockPartials:
    """Per-token statistics of this shard's block of every row (hard targets): the local half of
    the vocabulary-parallel forward, merged across ranks by ``distributed.combine``.

    ``weight`` is the global class weights in the accumulation dtype (or None); ``terms`` the
    call's :func:`~crossent.core.rows.target_terms` over the global vocabulary.
    """
    acc = accumulation_dtype(logits.dtype)
    device = logits.device
    N = terms.y.shape[0]
    opts, want_aux = config.rows, config.want_aux
    smooth = opts.label_smoothing != 0.0
    width, col0 = shard.width, shard.col0
    if width == 0 or N == 0:
        return BlockPartials.padding_only(N, acc, device, smooth, want_aux)
    w_sum = weight.sum() if weight is not None else torch.tensor(float(shard.vocab), dtype=acc, device=device)
    fields = {k: torch.empty(N, dtype=acc, device=device) for k in ("m", "s", "z_y")}
    if smooth:
        fields["wz"] = torch.empty(N, dtype=acc, device=device)
    if want_aux:
        fields["ent"] = torch.empty(N, dtype=acc, device=device)
        fields["best"] = torch.empty(N, dtype=torch.long, device=device)
    rows = _chunk_rows(config, width, acc, N, want_aux=want_aux)
    z_full = torch.empty((rows, width), dtype=acc, device=device)
    scratch_full = torch.empty((rows, width), dtype=acc, device=device) if want_aux else None
    block_weight = weight[col0 : col0 + width] if weight is not None else None
    seen = 0.0
    for lo, x in aligned_chunks(rows, logits):
        r = x.shape[0]
        z = z_full[:r]
        scores_into(z, x[:, :width], opts, None)
        stats = OnlineStats(opts, shard.vocab, weight_sum=w_sum, y=terms.y[lo : lo + r], want_aux=want_aux)
        stats.update(z, col0, block_weight, scratch_full[:r] if want_aux else None)
        for name, t in fields.items():
            t[lo : lo + r] = getattr(stats, name)
        seen = stats.w_seen
    local = terms.y - col0
    return BlockPartials(inside=(local >= 0) & (local < width), w_sum=seen if smooth else 0.0, **fields)


def backward_into(
    out: Tensor,
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    m: Tensor,
    log_s: Tensor,
    denominator: Tensor,
    config: OpConfig,
    shard: Shard | None = None,
) -> None:
    """Recompute ``∂loss/∂logits · grad_loss`` chunk by chunk into ``out`` (may be ``logits``).

    With a ``shard``, ``logits`` are this rank's columns and ``m``, ``log_s`` the saved global
    pair: no communication is needed; padding columns get a zero gradient.
    """
    V = logits.shape[-1]
    shard = shard or Shard.whole(V)
    width, col0 = shard.width, shard.col0
    acc = accumulation_dtype(logits.dtype)
    N = m.shape[0]
    if width < V:
        out[..., width:] = 0  # padding gets no gradient
    if width == 0 or N == 0:
        return
    soft = target.is_floating_point()
    opts = config.rows
    w, w_sum = class_weights(weight, shard.vocab, acc, logits.device)
    g_all = (reduction_scale(config.reduction, denominator) * grad_loss.to(acc).reshape(-1)).expand(N)
    terms = None
    if not soft:
        terms = target_terms(target.reshape(-1), w, shard.vocab, config.ignore_index, acc)
        g_all = torch.where(terms.keep, g_all, torch.zeros_like(g_all))
    softcap = opts.softcap is not None
    chunk_rows = _chunk_rows(
        config, width, acc, N, soft=soft, softcap=softcap, want_grad=True, want_aux=config.want_aux
    )
    z_full = torch.empty((chunk_rows, width), dtype=acc, device=logits.device)
    n_scratch = scratch_buffers(soft=soft, softcap=softcap, want_grad=True)
    scratch_full = [torch.empty((chunk_rows, width), dtype=acc, device=logits.device) for _ in range(n_scratch)]
    block_weight = w[col0 : col0 + width] if w is not None else None
    in_place = out is logits
    soft_target = target if soft else None
    for lo, x, soft_rows, out_rows in aligned_chunks(chunk_rows, logits, soft_target, None if in_place else out):
        r = x.shape[0]
        hi = lo + r
        kw = {"soft": soft_rows} if soft else {"y": terms.y[lo:hi], "w_y": terms.w_y[lo:hi]}
        backward_rows(
            x[:, :width],
            z_full[:r],
            opts,
            m=m[lo:hi],
            log_s=log_s[lo:hi],
            g=g_all[lo:hi],
            grad_out=(x if in_place else out_rows)[:, :width],
            weight=block_weight,
            weight_sum=w_sum,
            scratch=[b[:r] for b in scratch_full],
            col0=col0,
            vocab_size=shard.vocab,
            **kw,
        )
