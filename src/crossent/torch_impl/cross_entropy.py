"""cross_entropy in chunked PyTorch, registered as ``torch.library`` custom ops.

Layers, as in every op file of crossent: the chunk loop (``_forward_impl`` / ``_backward_impl``),
the custom ops with their fake (meta) implementations, their autograd registration, and
:func:`cross_entropy_op`, which the public function calls.

Memory: the loop holds one chunk of rows in float32 at a time (its size from the memory budget);
forward saves O(N) — the per-token ``(m, log S)`` pair — beyond its inputs, never a copy of the
(N, V) logits or their softmax.

Where the gradient is computed: when ``logits`` requires grad in eager mode, forward writes
``∂loss/∂logits`` (scaled for the reduction) into a fresh tensor while the exponentials are at
hand; backward then only scales it by the upstream gradient, in place, and skips even that when
the upstream gradient is exactly 1 on a CPU tensor (``loss.backward()``). Measured on a 2-core CPU this is 1.3–1.5×
faster than recomputing in backward (benchmarks/RESULTS.md). Backward recomputes from the saved
pair instead — same result — under ``torch.compile`` (the traced graph stays functional), with
``inplace_backward=True`` (the gradient then overwrites the logits chunk by chunk: O(chunk) extra
memory), and for a second backward through a retained graph.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from ..options import rows_per_chunk
from .rows import (
    RowOptions,
    RowSums,
    accumulation_dtype,
    backward_rows,
    finish_rows,
    forward_rows,
    grad_terms,
    reduce,
    reduction_scale,
    smoothing_weights,
    target_terms,
)

#: The automatic chunk stops growing at this many elements (4 MiB of float32) even when the memory
#: budget allows more: larger chunks leave the caches. Smaller ones multiply the number of short
#: multi-threaded kernels, each of which waits for every thread (costly when other work shares the
#: cores): on the 2-core CI machine, with other work running, 2^20 beat 2^18 at V = 32000 and 128256.
CHUNK_ELEMENTS = 1 << 20

AUX_COLUMNS = 4  # ce, z-loss, entropy, correct


def auto_chunk_rows(vocab_size: int, acc: torch.dtype, buffers: int) -> int:
    """Rows per chunk from the memory budget (never from N: no recompile for a new length)."""
    row_bytes = vocab_size * torch.empty((), dtype=acc).element_size()
    return rows_per_chunk(row_bytes, buffers=buffers, cap=max(1, CHUNK_ELEMENTS // max(1, vocab_size)))


def scratch_buffers(soft: bool, softcap: bool, want_grad: bool, want_aux: bool) -> int:
    """How many (rows, V) buffers a chunk needs beyond ``z`` (see ``forward_rows``)."""
    return int(soft) + int(softcap and want_grad) + int(want_aux)


def row_blocks(x: Tensor) -> list[tuple[int, tuple[int, ...]]]:
    """Split the rows of ``x`` (..., V) into blocks that are 2-D views: (first flat row, index).

    Leading dims that can be merged into one row index by a view are merged; the outer ones that
    cannot (e.g. ``logits[:, :-1]`` of a (B, T, V) tensor) are iterated: block ``index`` is
    ``x[index].view(-1, V)``. Rows follow the row-major order of the leading dims, as
    ``target.reshape(-1)`` does.
    """
    V = x.shape[-1]
    lead = list(x.shape[:-1])
    if math.prod(lead) == 0:
        return []
    for k in range(len(lead) + 1):
        try:
            x[(0,) * k].view(-1, V)
        except RuntimeError:
            continue
        rows = math.prod(lead[k:])
        return [(n * rows, index) for n, index in enumerate(itertools.product(*(range(d) for d in lead[:k])))]
    raise AssertionError("unreachable: a single row is always viewable")


def aligned_chunks(chunk_rows: int, x: Tensor, *others: Tensor | None):
    """Yield (first flat row, (r, V) chunk of ``x``, the same rows of each of ``others``).

    The blocks are those of ``x`` (views, never copies). ``others`` share ``x``'s leading dims;
    a contiguous one (a fresh output) is viewed the same way; another input that cannot be is
    read through a copy of the block (``None`` entries stay ``None``).
    """
    for start, index in row_blocks(x):
        blocks = [t[index].reshape(-1, t.shape[-1]) if t is not None else None for t in (x, *others)]
        for lo in range(0, blocks[0].shape[0], chunk_rows):
            yield (start + lo, *(b[lo : lo + chunk_rows] if b is not None else None for b in blocks))


def _weights(weight: Tensor | None, vocab_size: int, acc, device) -> tuple[Tensor | None, Tensor]:
    """Class weights in the accumulation dtype, and their sum Σ_j w_j (V without weights)."""
    if weight is None:
        return None, torch.tensor(float(vocab_size), dtype=acc, device=device)
    w = weight.to(acc).contiguous()
    return w, w.sum()


def _forward_impl(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    opts: RowOptions,
    chunk_size: int,
    compute_grad: bool,
    want_aux: bool,
):
    V = logits.shape[-1]
    acc = accumulation_dtype(logits.dtype)
    device = logits.device
    soft = target.is_floating_point()
    lead_shape = logits.shape[:-1]
    N = math.prod(lead_shape)
    w, w_sum = _weights(weight, V, acc, device)

    if soft:
        terms = None
        keep = None
        denominator = torch.tensor(float(N), dtype=acc, device=device)
    else:
        terms = target_terms(target.reshape(-1), w, V, ignore_index, acc)
        keep = terms.keep
        denominator = terms.denominator

    sums = RowSums.allocate(N, acc, device, soft=soft, smooth=opts.label_smoothing != 0.0, aux=want_aux)
    grad = torch.empty(logits.shape if compute_grad else (0,), dtype=logits.dtype, device=device)
    gterms = None
    if compute_grad:
        g_all = reduction_scale(reduction, denominator).expand(N)
        if keep is not None:
            g_all = torch.where(keep, g_all, torch.zeros_like(g_all))
        gterms = grad_terms(g_all, opts, V, w_y=None if soft else terms.w_y, weight_sum=w_sum)

    n_scratch = scratch_buffers(soft, opts.softcap is not None, compute_grad, want_aux)
    smooth_w = None if soft else smoothing_weights(w, opts, V, acc, device)
    chunk_rows = max(1, min(chunk_size, N))
    z_full = torch.empty((chunk_rows, V), dtype=acc, device=device)
    scratch_full = [torch.empty((chunk_rows, V), dtype=acc, device=device) for _ in range(n_scratch)]
    for lo, x, soft_rows, grad_out in aligned_chunks(
        chunk_rows, logits, target if soft else None, grad if compute_grad else None
    ):
        r = x.shape[0]
        hi = lo + r
        forward_rows(
            x,
            z_full[:r],
            opts,
            sums.rows(lo, hi),
            weight=w,
            weight_sum=w_sum,
            y=None if soft else terms.y[lo:hi],
            soft=soft_rows,
            grad=gterms.rows(lo, hi) if compute_grad else None,
            grad_out=grad_out,
            scratch=[b[:r] for b in scratch_full],
            smooth_weight=smooth_w,
        )

    stats = finish_rows(sums, opts, V, w_y=None if soft else terms.w_y, keep=keep, weight_sum=w_sum, want_aux=want_aux)
    aux = torch.empty((N if want_aux else 0, AUX_COLUMNS), dtype=acc, device=device)
    if want_aux:
        aux = torch.stack([stats.ce, stats.zl, stats.entropy, stats.correct], dim=-1)
    loss = reduce(stats.loss, reduction, denominator)
    if reduction == "none":
        loss = loss.view(lead_shape)
    return loss, stats.m, stats.log_s, denominator, grad, aux


def _backward_impl(
    grad_loss: Tensor,
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    m: Tensor,
    log_s: Tensor,
    denominator: Tensor,
    ignore_index: int,
    reduction: str,
    opts: RowOptions,
    chunk_size: int,
    out: Tensor,
) -> None:
    """Recompute ``∂loss/∂logits · grad_loss`` chunk by chunk into ``out`` (may be ``logits``)."""
    V = logits.shape[-1]
    acc = accumulation_dtype(logits.dtype)
    N = m.shape[0]
    soft = target.is_floating_point()
    w, w_sum = _weights(weight, V, acc, logits.device)
    g_all = reduction_scale(reduction, denominator) * grad_loss.to(acc).reshape(-1)
    g_all = g_all.expand(N)
    terms = None
    if not soft:
        terms = target_terms(target.reshape(-1), w, V, ignore_index, acc)
        g_all = torch.where(terms.keep, g_all, torch.zeros_like(g_all))
    chunk_rows = max(1, min(chunk_size, N))
    z_full = torch.empty((chunk_rows, V), dtype=acc, device=logits.device)
    n_scratch = scratch_buffers(soft, opts.softcap is not None, True, False)
    scratch_full = [torch.empty((chunk_rows, V), dtype=acc, device=logits.device) for _ in range(n_scratch)]
    in_place = out is logits
    for lo, x, soft_rows, out_rows in aligned_chunks(
        chunk_rows, logits, target if soft else None, None if in_place else out
    ):
        r = x.shape[0]
        hi = lo + r
        kw = {"soft": soft_rows} if soft else {"y": terms.y[lo:hi], "w_y": terms.w_y[lo:hi]}
        backward_rows(
            x,
            z_full[:r],
            opts,
            m=m[lo:hi],
            log_s=log_s[lo:hi],
            g=g_all[lo:hi],
            grad_out=x if in_place else out_rows,
            weight=w,
            weight_sum=w_sum,
            scratch=[b[:r] for b in scratch_full],
            **kw,
        )


# --------------------------------------------------------------------------------------------
# Custom ops: forward, backward (fresh or in place), and the in-place scaling of a saved gradient
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("crossent::cross_entropy_forward", mutates_args=())
def cross_entropy_forward(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    chunk_size: int,
    compute_grad: bool,
    want_aux: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, m, log_s, denominator, grad or empty, aux (N, 4) or empty)."""
    opts = RowOptions(label_smoothing, z_loss, softcap, logit_scale)
    return _forward_impl(logits, target, weight, ignore_index, reduction, opts, chunk_size, compute_grad, want_aux)


@cross_entropy_forward.register_fake
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
    chunk_size,
    compute_grad,
    want_aux,
):
    acc = accumulation_dtype(logits.dtype)
    lead = logits.shape[:-1]
    N = math.prod(lead)
    loss = logits.new_empty(lead if reduction == "none" else (), dtype=acc)
    vec = logits.new_empty((N,), dtype=acc)
    grad = logits.new_empty(logits.shape if compute_grad else (0,))
    aux = logits.new_empty((N if want_aux else 0, AUX_COLUMNS), dtype=acc)
    return loss, vec, logits.new_empty((N,), dtype=acc), logits.new_empty((), dtype=acc), grad, aux


@torch.library.custom_op("crossent::cross_entropy_backward", mutates_args=())
def cross_entropy_backward(
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
    chunk_size: int,
) -> Tensor:
    """A fresh ``∂loss/∂logits`` (logits' shape and dtype), recomputed from the saved pair."""
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    opts = RowOptions(label_smoothing, z_loss, softcap, logit_scale)
    _backward_impl(
        grad_loss,
        logits,
        target,
        weight,
        m,
        log_s,
        denominator,
        ignore_index,
        reduction,
        opts,
        chunk_size,
        out,
    )
    return out


@cross_entropy_backward.register_fake
def _(grad_loss, logits, *rest):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("crossent::cross_entropy_backward_", mutates_args=("logits",))
def cross_entropy_backward_(
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
    chunk_size: int,
) -> None:
    """``inplace_backward=True``: the gradient overwrites ``logits``, chunk by chunk."""
    opts = RowOptions(label_smoothing, z_loss, softcap, logit_scale)
    _backward_impl(
        grad_loss,
        logits,
        target,
        weight,
        m,
        log_s,
        denominator,
        ignore_index,
        reduction,
        opts,
        chunk_size,
        logits,
    )


def scale_saved_gradient(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """Eager backward of a gradient computed in forward: ``grad *= grad_loss`` in place (a
    scalar, or one value per row), skipped when it is exactly 1 on a CPU tensor (no host sync
    elsewhere). The gradient is the call's own buffer, handed over once (see ``_setup_context``)."""
    if grad_loss.dim() == 0:
        if not (grad_loss.device.type == "cpu" and float(grad_loss) == 1.0):
            grad.mul_(grad_loss)  # the usual `loss.backward()` on a CPU makes no pass at all
    else:
        grad.view(-1, grad.shape[-1]).mul_(grad_loss.reshape(-1, 1))
    return grad


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------

_OPTION_NAMES = (
    "ignore_index",
    "reduction",
    "label_smoothing",
    "z_loss",
    "softcap",
    "logit_scale",
    "chunk_size",
)


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
        chunk_size,
        compute_grad,
        want_aux,
    ) = inputs
    loss, m, log_s, denominator, grad, aux = output
    ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, chunk_size)
    ctx.set_materialize_grads(False)
    # A gradient computed in forward (eager only) is handed to the first backward through this box,
    # not saved: backward scales it in place and lets go of it, so autograd can take it as `.grad`
    # without a copy, and a second backward through a retained graph recomputes from the inputs.
    ctx.grad_box = [grad] if compute_grad else []
    ctx.grad_in_forward = compute_grad
    ctx.save_for_backward(logits, target, weight, m, log_s, denominator)


def _backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return (None,) * 12
    if ctx.grad_box:
        return (scale_saved_gradient(ctx.grad_box.pop(), grad_loss),) + (None,) * 11
    logits, target, weight, m, log_s, denominator = ctx.saved_tensors
    if ctx.grad_in_forward:
        # a second eager backward: the forward's own gradient path again, so that repeated
        # backward passes agree bit for bit (gradcheck's reentrancy check)
        grad = cross_entropy_forward(logits, target, weight, *ctx.options, True, False)[4]
        return (scale_saved_gradient(grad, grad_loss),) + (None,) * 11
    grad = cross_entropy_backward(grad_loss, logits, target, weight, m, log_s, denominator, *ctx.options)
    return (grad,) + (None,) * 11


cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


class _InplaceBackward(torch.autograd.Function):
    """Eager ``inplace_backward=True``: forward as the op; backward overwrites the logits.

    A plain autograd.Function (not the custom op's registration) because writing into a saved
    input is an eager-mode contract: under ``torch.compile`` the functional path is used.
    """

    @staticmethod
    def forward(ctx, logits, target, weight, options, want_aux):
        outputs = cross_entropy_forward(logits, target, weight, *options, False, want_aux)
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
        cross_entropy_backward_(grad_loss, logits, target, weight, m, log_s, denominator, *ctx.options)
        return logits, None, None, None, None


def cross_entropy_op(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    *,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    chunk_size: int | None,
    inplace_backward: bool,
    want_aux: bool,
):
    """Run the op; returns (loss, m, log_s, denominator, aux). Inputs are validated already."""
    V = logits.shape[-1]
    needs_grad = logits.requires_grad and torch.is_grad_enabled()
    compiling = torch.compiler.is_compiling()
    if chunk_size is None:
        acc = accumulation_dtype(logits.dtype)
        soft = target.is_floating_point()
        chunk_size = auto_chunk_rows(V, acc, 1 + scratch_buffers(soft, softcap is not None, True, want_aux))
    options = (ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, chunk_size)
    if inplace_backward and needs_grad and not compiling:
        loss, m, log_s, denominator, _, aux = _InplaceBackward.apply(logits, target, weight, options, want_aux)
    else:
        compute_grad = needs_grad and not compiling
        loss, m, log_s, denominator, _, aux = cross_entropy_forward(
            logits, target, weight, *options, compute_grad, want_aux
        )
    return loss, m, log_s, denominator, aux
