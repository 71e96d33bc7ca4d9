"""The vocabulary-parallel losses: the core's loops over this rank's shard, plus one combine step.

Each loss is an eager ``torch.autograd.Function`` (its forward communicates, which a
``torch.library`` custom op may not): the forward runs the core loop on the local shard
(``core.cross_entropy.shard_partials`` for logits, ``core.linear.vocab_stats`` for a classifier
shard), merges the ranks' statistics (:func:`crossent.distributed.combine.combine`) and finishes
the loss with the single-process formula; the backward is the single-process gradient loop over
the shard, from the saved global ``(m, log S)`` pair.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..core import cross_entropy as ce_loops
from ..core import linear as linear_loops
from ..core.autograd import scale_saved_gradient
from ..core.chunks import Shard
from ..core.config import OpConfig
from ..core.online import BlockPartials
from ..core.rows import accumulation_dtype, class_weights, reduce, target_terms
from ..loss_aux import build_aux, fused_result
from ..options import LossOptions, document
from ..validation import (
    cast_like_linear,
    check_class_weight,
    check_devices,
    check_float,
    check_linear_inputs,
    check_shift_target,
    check_target,
    check_target_range,
    check_tensor,
    pick_class_weight,
    shape_of,
    shift_target,
)
from .combine import combine
from .group import check_impl, reject_dtensor, shard_of


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: the local loop, then the combine step. Backward: no communication at all."""

    @staticmethod
    def forward(ctx, logits, target, weight, config: OpConfig, shard: Shard):
        with torch.autocast(logits.device.type, enabled=False):
            acc = accumulation_dtype(logits.dtype)
            cw, w_sum = class_weights(weight, shard.vocab, acc, logits.device)
            terms = target_terms(target.reshape(-1), cw, shard.vocab, config.ignore_index, acc)
            partials = ce_loops.shard_partials(logits, terms, cw, config, shard)
            stats = combine(partials, shard, config.rows, terms, w_sum, config.want_aux)
            loss = reduce(stats.loss, config.reduction, terms.denominator)
            if config.reduction == "none":
                loss = loss.view(target.shape)
        m, log_s, denominator, aux = stats.m, stats.log_s, terms.denominator, stats.aux_columns()
        ctx.config, ctx.shard = config, shard
        ctx.save_for_backward(logits, target, weight, m, log_s, denominator)
        ctx.mark_non_differentiable(m, log_s, denominator, aux)
        ctx.set_materialize_grads(False)
        return loss, m, log_s, denominator, aux

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        logits, target, weight, m, log_s, denominator = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        with torch.autocast(logits.device.type, enabled=False):
            saved = (logits, target, weight, m, log_s, denominator)
            ce_loops.backward_into(grad, grad_loss, *saved, ctx.config, ctx.shard)
        return grad, None, None, None, None


@document
def vocab_parallel_cross_entropy(
    logits_shard: Tensor, target: Tensor, *, group=None, vocab_size: int | None = None, weight: Tensor | None = None,
    class_weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None, logit_scale: float = 1.0,
    chunk_size: int | None = None, return_aux: bool = False, impl: str = "auto",
):
    """Cross entropy over a vocabulary split across the ranks of ``group``, never gathered.

    Rank ``r`` of ``P`` holds the columns ``[r·V_l, (r+1)·V_l)`` of the logits ``x`` over the
    padded vocabulary ``P·V_l``; the columns at or past ``vocab_size`` (V, the real vocabulary)
    are padding: they get no probability, no smoothing share and no gradient. With the global
    ``z = s·x`` (then ``k·tanh(z/k)``), ``m = max_{j<V} z_j``, ``S = Σ_{j<V} exp(z_j - m)``,
    ``log p_j = (z_j - m) - log S`` and ``lse = m + log S``, every rank returns the same

        ℓ = -(1-ε)·w_y·log p_y - (ε/V)·Σ_{j<V} w_j·log p_j + c·w_y·lse²

    reduced by ``reduction`` — the single-process :func:`crossent.cross_entropy` of the
    concatenated (unpadded) logits; smoothing spreads over the global real V and the z-loss uses
    the global ``lse``. Each rank reduces its block to per-token statistics (the pair
    ``(m_r, S_r)``, merged as DESIGN.md §1's online rule; the target score; the smoothing,
    entropy and argmax partials). Communication, all O(N): forward one all-gather of the pairs
    and one all-reduce of the packed partials; backward none (each rank's gradient is
    ``exp((z - m) - log S)``-based from the saved global pair). Nothing of size V crosses the
    wire. Implemented as a ``torch.autograd.Function`` (eager mode) because it communicates.

    If the shard is ``hidden @ W_r.T`` of a ``hidden`` replicated over the group, the gradient
    that reaches ``hidden`` through it is this rank's partial sum: all-reduce it (Megatron's
    ``copy_to_tensor_model_parallel_region``), or use :func:`vocab_parallel_linear_cross_entropy`,
    which does.

    Args:
        logits_shard: (..., V_l) float16, bfloat16, float32 or float64: this rank's equal,
            contiguous slice of the vocabulary, slices in rank order; any strides.
        target: (...) integer class ids in ``[0, vocab_size)`` (global ids, the same on every
            rank) or ``ignore_index``. Soft targets are not supported here.
        group: the ``torch.distributed`` process group the vocabulary is split over; ``None``: the
            default group (a world of one when ``torch.distributed`` is not initialised).
        vocab_size: the real vocabulary size V, ``(P-1)·V_l < V <= P·V_l`` typically; ``None``:
            ``P·V_l`` (no padding).
        weight: (V,) floating class weights ``w`` over the global real vocabulary, the same on
            every rank (``class_weight=`` is the same; give one of the two). ``None``: all ones.
        {args: ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale}
        {args: chunk_size, return_aux}
        impl: ``"auto"`` or ``"torch"`` (the chunked PyTorch backend computes the local block);
            ``"triton"`` is not available for the vocabulary-parallel losses yet.

    Returns:
        The loss, identical on every rank: 0-dim, or the target's shape for ``"none"``; float32
        (float64 for float64 inputs). With ``return_aux=True``, ``(loss, LossAux)``, also
        identical on every rank.

    Example:
        >>> import torch
        >>> from crossent.distributed import vocab_parallel_cross_entropy
        >>> # On every rank of a tensor-parallel group (here one process: a world of one), this
        >>> # rank's columns of a vocabulary of 50257 classes padded to 50304:
        >>> logits_shard = torch.randn(2, 6, 50304, requires_grad=True)
        >>> labels = torch.randint(0, 50257, (2, 6))
        >>> loss = vocab_parallel_cross_entropy(logits_shard, labels, vocab_size=50257, z_loss=1e-4)
        >>> loss.backward()                                      # no communication in backward
        >>> logits_shard.grad[..., 50257:].abs().max().item()   # padding gets no gradient
        0.0
    """
    check_tensor("logits_shard", logits_shard, "(..., V_local) floating")
    reject_dtensor("logits_shard", logits_shard)
    check_float("logits_shard", logits_shard, "of shape (..., V_local)")
    if logits_shard.dim() < 1 or logits_shard.shape[-1] < 1:
        raise ValueError(
            f"logits_shard must have shape (..., V_local) with V_local >= 1 columns, got {shape_of(logits_shard)}"
        )
    opts = LossOptions.from_arguments(locals())
    check_impl(opts.impl)
    shard = shard_of(group, vocab_size, logits_shard.shape[-1])
    check_target(target, logits_shard.shape[:-1], shard.vocab, allow_soft=False, where="vocab_parallel_cross_entropy")
    weight = pick_class_weight(weight, class_weight)
    check_class_weight("weight" if class_weight is None else "class_weight", weight, shard.vocab)
    check_devices(logits_shard=logits_shard, target=target, weight=weight)
    check_target_range(target, shard.vocab, opts.ignore_index)

    config = OpConfig.of(opts, "torch")
    loss, m, log_s, denominator, aux = _VocabParallelCrossEntropy.apply(logits_shard, target, weight, config, shard)
    if not opts.return_aux:
        return loss
    keep = target.reshape(-1) != opts.ignore_index
    return loss, build_aux(aux, m, log_s, denominator, keep, logits_shard.shape[:-1], opts.reduction)


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Forward: the vocabulary loop over this rank's rows of the classifier, the combine step, and
    with a scalar loss the gradient pass too. Backward: the gradients scaled (or, for
    ``reduction="none"``, recomputed from the saved pair) and ``∂loss/∂hidden`` summed over the
    ranks — its only collective."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, config: OpConfig, shard: Shard):
        with torch.autocast(hidden.device.type, enabled=False):
            p = linear_loops.LinearProblem(hidden, weight, bias, target, class_weight, config, shard)
            chunk = p.chunk("vocab", config.chunk_size, config.grads_in_forward, config.want_aux)
            if shard.width == 0 or p.n == 0:
                smooth = config.rows.label_smoothing != 0.0
                partials = BlockPartials.padding_only(p.n, p.acc, p.device, smooth, config.want_aux)
            else:
                stats = linear_loops.vocab_stats(p, chunk, config.want_aux)
                partials = BlockPartials.of(stats, p.terms.y, shard.col0, shard.width)
            result = combine(partials, shard, config.rows, p.terms, p.w_sum, config.want_aux)
            grads = None
            if config.grads_in_forward:
                grads = linear_loops.Gradients(p, config.needs, "vocab")
                linear_loops.vocab_gradients(p, chunk, result.m, result.log_s, p.row_scale(None), grads)
        loss = reduce(p.scatter(result.loss), config.reduction, p.denominator)
        m, log_s = p.scatter(result.m), p.scatter(result.log_s)
        aux = result.aux_columns()
        aux = p.scatter(aux) if config.want_aux else aux
        ctx.config, ctx.shard, ctx.grads = config, shard, grads
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias, target, class_weight, m, log_s)
        ctx.mark_non_differentiable(m, log_s, p.denominator, aux)
        ctx.set_materialize_grads(False)
        return loss, m, log_s, p.denominator, aux

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if grad_loss is None:
            return (None,) * 7
        hidden, weight, bias, target, class_weight, m, log_s = ctx.saved_tensors
        config, shard = ctx.config, ctx.shard
        with torch.autocast(hidden.device.type, enabled=False):
            p = linear_loops.LinearProblem(hidden, weight, bias, target, class_weight, config, shard)
            grads, ctx.grads = ctx.grads, None  # scaled in place once: a second backward recomputes
            if grads is not None:
                for grad in (grads.h, grads.w, grads.b):
                    if grad is not None:
                        scale_saved_gradient(grad, grad_loss)
            else:
                if p.kept is not None:
                    m, log_s = m[p.kept], log_s[p.kept]
                grads = linear_loops.Gradients(p, config.needs, "vocab")
                chunk = p.chunk("vocab", config.chunk_size, True, False)
                linear_loops.vocab_gradients(p, chunk, m, log_s, p.row_scale(grad_loss), grads)
            grad_h = grads.h
            if grad_h is not None:
                if shard.world > 1:  # the one collective of backward: Σ over ranks of ∂/∂hidden
                    dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=shard.group)
                grad_h = p.scatter(grad_h, dtype=hidden.dtype)
        need_h, need_w, need_b = config.needs
        grad_b = grads.b.to(bias.dtype) if (need_b and ctx.has_bias) else None
        return grad_h if need_h else None, grads.w if need_w else None, grad_b, None, None, None, None


@document
def vocab_parallel_linear_cross_entropy(
    hidden: Tensor, weight_shard: Tensor, target: Tensor, *, bias_shard: Tensor | None = None, group=None,
    vocab_size: int | None = None, class_weight: Tensor | None = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
    logit_scale: float = 1.0, shift: int = 0, chunk_size: int | None = None, return_aux: bool = False,
    impl: str = "auto",
):
    """A vocabulary-parallel classifier and its loss fused: the cross entropy of
    ``hidden @ W.T + b`` where rank ``r`` holds the rows ``[r·V_l, (r+1)·V_l)`` of ``W`` and ``b``.

    ``hidden`` is replicated over the group (the input of Megatron's column-parallel head); each
    rank forms the logits of its own vocabulary rows, one chunk of rows at a time (never the
    (N, V_l) block at once), and the loss is that of :func:`vocab_parallel_cross_entropy`:

        ℓ = -(1-ε)·w_y·log p_y - (ε/V)·Σ_{j<V} w_j·log p_j + c·w_y·lse²,
        log p_j = (z_j - m) - log S over the global real vocabulary (j < ``vocab_size``)

    identical on every rank. Rows of the shards at or past ``vocab_size`` are padding: no
    probability, no smoothing share, zero gradient. Gradients: ``∂/∂weight_shard`` and
    ``∂/∂bias_shard`` are this rank's rows, exact (float32 accumulation inside the products);
    ``∂/∂hidden`` is the full gradient on every rank (the sum over ranks). Communication, all
    O(N): forward one all-gather of per-token pairs and one all-reduce of packed partials;
    backward one all-reduce of ``∂loss/∂hidden`` (N·D). Implemented as a
    ``torch.autograd.Function`` (eager mode) because it communicates.

    Args:
        hidden: (..., D) float16, bfloat16, float32 or float64 hidden states, the same on every
            rank of ``group``.
        weight_shard: (V_l, D) this rank's equal, contiguous slice of the classifier weight
            (``nn.Linear`` layout), slices in rank order; the dtype of ``hidden``.
        target: (...) integer class ids in ``[0, vocab_size)`` (global ids, the same on every
            rank; the leading dims of ``hidden``) or ``ignore_index``.
        bias_shard: (V_l,) this rank's slice of the bias, or None.
        group: the process group the vocabulary is split over; ``None``: the default group (a
            world of one when ``torch.distributed`` is not initialised).
        vocab_size: the real vocabulary size V (the rest of ``P·V_l`` is padding); ``None``:
            ``P·V_l``.
        class_weight: (V,) floating class weights over the global real vocabulary, the same on
            every rank. ``None``: all ones.
        {args: ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, shift}
        chunk_size: vocabulary rows of the shard per chunk; ``None`` derives it from the memory
            budget (:func:`crossent.set_memory_budget`).
        {args: return_aux}
        impl: ``"auto"`` or ``"torch"``; ``"triton"`` is not available here yet.

    Returns:
        The loss, identical on every rank (0-dim, or the target's shape for ``"none"``; float32,
        float64 for float64 inputs); with ``return_aux=True``, ``(loss, LossAux)`` (``lse`` and
        ``entropy`` are 0 at ignored positions).

    Example:
        >>> import torch
        >>> from crossent.distributed import vocab_parallel_linear_cross_entropy
        >>> # On every rank: the same hidden states, this rank's rows of the classifier
        >>> # (here one process, a world of one, a vocabulary of 1000 padded to 1024).
        >>> hidden = torch.randn(2, 6, 16, requires_grad=True)
        >>> weight_shard = torch.randn(1024, 16, requires_grad=True)
        >>> labels = torch.randint(0, 1000, (2, 6))
        >>> loss = vocab_parallel_linear_cross_entropy(hidden, weight_shard, labels, vocab_size=1000, shift=1)
        >>> loss.backward()                                      # one all-reduce of hidden.grad
        >>> weight_shard.grad[1000:].abs().max().item()         # padding rows: no gradient
        0.0
    """
    reject_dtensor("hidden", hidden)
    Vl, D = check_linear_inputs(
        hidden,
        weight_shard,
        bias_shard,
        weight_name="weight_shard",
        bias_name="bias_shard",
        rows="V_local",
        bias_role="one per row of weight_shard",
        reject_dtensor=reject_dtensor,
    )
    opts = LossOptions.from_arguments(locals())
    check_impl(opts.impl)
    shard = shard_of(group, vocab_size, Vl)
    V = shard.vocab
    check_target(target, hidden.shape[:-1], V, allow_soft=False, where="vocab_parallel_linear_cross_entropy")
    check_shift_target(opts.shift, target)
    check_class_weight("class_weight", class_weight, V)
    check_devices(
        hidden=hidden, weight_shard=weight_shard, target=target, bias_shard=bias_shard, class_weight=class_weight
    )
    hidden, weight_shard, bias_shard = cast_like_linear(
        hidden, weight_shard, bias_shard, ("hidden", "weight_shard", "bias_shard")
    )
    check_target_range(target, V, opts.ignore_index)
    aligned = shift_target(target, opts.shift, opts.ignore_index)

    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight_shard.requires_grad,
        grad_on and bias_shard is not None and bias_shard.requires_grad,
    )
    config = OpConfig.of(opts, "torch", schedule="vocab", needs=needs)
    outputs = _VocabParallelLinearCrossEntropy.apply(
        hidden.reshape(-1, D), weight_shard, bias_shard, aligned.reshape(-1), class_weight, config, shard
    )
    return fused_result(outputs, aligned, opts.reduction, opts.ignore_index, opts.return_aux)
