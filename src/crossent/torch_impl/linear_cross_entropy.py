"""linear_cross_entropy in chunked PyTorch: ``cross_entropy(hidden @ weight.T + bias)`` without
ever holding the (N, V) logits, registered as ``torch.library`` custom ops.

Layers: the two loops (token-outer and vocabulary-outer, DESIGN.md §4), the custom ops with
their fake implementations, their autograd registration, and :func:`linear_cross_entropy_op`.

``"token"`` — chunks of tokens against the whole vocabulary: per chunk the logits (one product),
the loss and ``∂ℓ/∂z`` in place (``rows.forward_rows``), then ``∂ℓ/∂hidden`` and ``∂ℓ/∂W`` (two
products). Three products in all, the gradients computed during the forward when they are needed;
backward only scales them by the upstream gradient. A 16-bit weight needs a float32 accumulator
for its gradient (2×|W| bytes) and a float32 copy of itself.

``"vocab"`` — chunks of the vocabulary against all tokens: a first pass merges the per-token
``(m, log S)`` pair over the chunks (``rows.OnlineStats``); a second pass recomputes each chunk's
logits and writes that chunk's rows of ``∂ℓ/∂W`` in one product (float32 accumulation inside the
product, rounded once), accumulating ``∂ℓ/∂hidden`` in float32. Four products, no V×D accumulator.

``"auto"`` takes ``"token"`` unless the weight is 16-bit, needs a gradient and its float32
accumulator (4·V·D bytes) exceeds the memory budget: then ``"vocab"``. The rule reads shapes,
dtypes and the budget only, so a run is reproducible bit for bit.

Products run in the accumulation dtype (float32; float64 for float64 inputs): 16-bit operands are
converted a chunk at a time. On CPUs without bfloat16 matrix units this is also the fast path
(measured: float32 products ~6× faster than bfloat16 ones on the AVX2 machines here). With
``reduction="none"`` the upstream gradient differs per token, which no scaling of a finished
classifier gradient can apply: forward then computes no gradient, and backward recomputes it from
the saved pair (one product more for ``"token"``: four in all). In CPU eager mode ignored tokens
are dropped before any product; on other devices (no host sync) they are computed with a zero
gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..options import get_memory_budget, rows_per_chunk
from .cross_entropy import AUX_COLUMNS, CHUNK_ELEMENTS, scale_saved_gradient
from .rows import (
    OnlineStats,
    RowOptions,
    RowSums,
    accumulation_dtype,
    backward_rows,
    finish_rows,
    forward_rows,
    grad_terms,
    reduce,
    reduction_scale,
    scores_into,
    smoothing_weights,
    target_terms,
)

#: Token chunks larger than this gain nothing in product efficiency.
MAX_TOKEN_ROWS = 1024

#: Automatic chunks (tokens or classes) of 16 or more rows are cut to a multiple of this: the CPU
#: matrix products run AVX2 tiles of 8 floats, and a ragged edge costs more than its share. Paired
#: runs on the 2-core CI machine (N=2048, D=512, V=128256 float32, token schedule, forward and
#: backward): 264 rows took 0.91× the time of the budget's 261, 256 and 240 rows 0.97–1.03× that
#: of 264; the ∂W product alone ran at ~96 GFLOP/s with 261 rows, ~104 with 256 or 264. The vocab
#: schedule's chunks there (13107 → 13104 classes) went from 1.72–1.86× to 1.49–1.50× the floor.
PRODUCT_ROWS_MULTIPLE = 8

#: On the CPU the logits product runs over blocks of the classifier of about this many bytes,
#: each of which stays in the caches while every token of the chunk meets it; one product over the
#: whole classifier re-reads (re-packs) all of it from memory for every chunk of tokens. Measured on
#: the 2-core CI machine (N=2048, D=512, V=128256 float32, then 261-token chunks): blocks of 1024
#: classes (2 MiB) took the logits products from 2.9 s to 2.2 s (the unchunked product: 2.8 s);
#: 512 classes 2.3 s, 2048 classes 2.7 s.
PRODUCT_BLOCK_BYTES = 2 << 20


def logits_into(out: Tensor, h: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """``out = h @ w.T + bias``: (n, D) tokens against (c, D) classes into ``out`` (n, c), all in
    the accumulation dtype; on the CPU a cache-sized block of classes at a time (one product
    elsewhere). Shared by every linear loop (the distributed one too)."""
    c = w.shape[0]
    step = c
    if h.device.type == "cpu":
        step = max(1, PRODUCT_BLOCK_BYTES // max(1, w.shape[1] * w.element_size()))
    for lo in range(0, c, step):
        hi = min(c, lo + step)
        if bias is not None:
            torch.addmm(bias[lo:hi], h, w[lo:hi].T, out=out[:, lo:hi])
        else:
            torch.mm(h, w[lo:hi].T, out=out[:, lo:hi])
    return out


def choose_schedule(schedule: str, vocab_size: int, hidden_size: int, weight: Tensor, weight_needs_grad: bool) -> str:
    """The documented ``"auto"`` rule: "vocab" when a 16-bit weight's float32 gradient
    accumulator (4·V·D bytes) would exceed the memory budget, else "token"."""
    if schedule != "auto":
        return schedule
    acc = accumulation_dtype(weight.dtype)
    needs_accumulator = weight_needs_grad and weight.dtype != acc
    if needs_accumulator and 4 * vocab_size * hidden_size > get_memory_budget():
        return "vocab"
    return "token"


def _scratch_count(softcap: bool, want_grad: bool, want_aux: bool) -> int:
    return int(softcap and want_grad) + int(want_aux)


def token_chunk_rows(vocab_size: int, acc, buffers: int) -> int:
    row_bytes = vocab_size * torch.empty((), dtype=acc).element_size()
    return rows_per_chunk(row_bytes, buffers=buffers, cap=MAX_TOKEN_ROWS, multiple=PRODUCT_ROWS_MULTIPLE)


def vocab_chunk_rows(n_tokens: int, hidden_size: int, acc, buffers: int) -> int:
    """Vocabulary rows per chunk: ``buffers`` (N, w) score buffers plus the weight slice."""
    item = torch.empty((), dtype=acc).element_size()
    return rows_per_chunk(item * (max(1, n_tokens) * buffers + hidden_size), multiple=PRODUCT_ROWS_MULTIPLE)


class _Problem:
    """The inputs of one call, flattened, in the accumulation dtype, ignored tokens dropped
    (CPU) — shared by the forward and the backward loops."""

    def __init__(self, hidden, weight, bias, target, class_weight, ignore_index, reduction, opts):
        self.acc = acc = accumulation_dtype(weight.dtype)
        self.N, self.D = hidden.shape
        self.V = weight.shape[0]
        self.opts, self.reduction = opts, reduction
        self.device = hidden.device
        self.cw = class_weight.to(acc).contiguous() if class_weight is not None else None
        self.w_sum = (
            self.cw.sum() if self.cw is not None else torch.tensor(float(self.V), dtype=acc, device=self.device)
        )
        terms = target_terms(target, self.cw, self.V, ignore_index, acc)
        self.denominator = terms.denominator
        self.rows = None  # indices of the kept tokens when the others are dropped
        if self.device.type == "cpu" and not bool(terms.keep.all()):
            self.rows = terms.keep.nonzero().squeeze(-1)  # CPU: a host read costs nothing
            terms.y, terms.w_y, terms.keep = terms.y[self.rows], terms.w_y[self.rows], terms.keep[self.rows]
        self.terms = terms
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.n = self.N if self.rows is None else self.rows.shape[0]  # tokens that go through the products
        self._h_all = None

    def h_rows(self, lo: int, hi: int) -> Tensor:
        """Kept tokens ``[lo, hi)`` of ``hidden`` in the accumulation dtype (a view when possible):
        a token loop converts one chunk at a time."""
        h = self.hidden[lo:hi] if self.rows is None else self.hidden.index_select(0, self.rows[lo:hi])
        return h.to(self.acc)

    @property
    def h_all(self) -> Tensor:
        """All kept tokens in the accumulation dtype (the vocabulary loop multiplies them by every
        chunk): one (n, D) copy for 16-bit inputs or dropped tokens, else a view."""
        if self._h_all is None:
            self._h_all = self.h_rows(0, self.n)
        return self._h_all

    def weight_slice(self, lo: int, hi: int) -> Tensor:
        return self.weight[lo:hi].to(self.acc)

    def scores(self, h: Tensor, lo: int, hi: int, out: Tensor, w: Tensor | None = None) -> Tensor:
        """``out = h @ W[lo:hi].T + b[lo:hi]`` in the accumulation dtype."""
        w = self.weight_slice(lo, hi) if w is None else w
        return logits_into(out, h, w, self.bias[lo:hi].to(self.acc) if self.bias is not None else None)

    def row_scale(self, grad_loss: Tensor | None) -> Tensor:
        """``∂loss/∂ℓ_i`` for the kept tokens (times the upstream gradient when given)."""
        g = reduction_scale(self.reduction, self.denominator).expand(self.n)
        if grad_loss is not None:
            upstream = grad_loss.to(self.acc).reshape(-1)
            if upstream.numel() > 1 and self.rows is not None:
                upstream = upstream[self.rows]
            g = g * upstream
        return torch.where(self.terms.keep, g, torch.zeros_like(g))

    def scatter(self, values: Tensor, fill: float = 0.0, dtype: torch.dtype | None = None) -> Tensor:
        """Per-kept-token values back to all N tokens (dropped ones get ``fill``), in ``dtype``
        (default: theirs), converted a budget's chunk of rows at a time."""
        dtype = dtype or values.dtype
        if self.rows is None:
            return values.to(dtype)
        out = torch.full((self.N,) + values.shape[1:], fill, dtype=dtype, device=values.device)
        rows = rows_per_chunk(values[:1].numel() * out.element_size())
        for lo in range(0, self.n, rows):
            out.index_copy_(0, self.rows[lo : lo + rows], values[lo : lo + rows].to(dtype))
        return out


class _Gradients:
    """Where the gradients go. ``"token"`` writes ``∂hidden`` chunk by chunk straight into the
    output and accumulates the classifier gradient over token chunks: in place for a weight in the
    accumulation dtype, else in a float32 accumulator. ``"vocab"`` accumulates ``∂hidden`` over
    vocabulary chunks in float32 and writes each chunk's classifier rows once, straight into a
    gradient of the weight's own dtype."""

    def __init__(self, p: _Problem, need_h: bool, need_w: bool, need_b: bool, schedule: str):
        acc, dev = p.acc, p.device
        self.p, self.schedule = p, schedule
        if not need_h:
            self.h = None
        elif schedule == "token":  # the output itself; dropped tokens keep a zero gradient
            make = torch.zeros if p.rows is not None else torch.empty
            self.h = make((p.N, p.D), dtype=p.hidden.dtype, device=dev)
        else:
            self.h = torch.zeros((p.n, p.D), dtype=acc, device=dev)
        if not need_w:
            self.w = None
        elif schedule == "token":  # the first chunk's product writes it (no zero fill, no re-read)
            self.w = (torch.empty if p.n > 0 else torch.zeros)((p.V, p.D), dtype=acc, device=dev)
        else:
            self.w = torch.empty((p.V, p.D), dtype=p.weight.dtype, device=dev)
        self.b = torch.zeros(p.V, dtype=acc, device=dev) if need_b else None

    def put_h(self, lo: int, hi: int, dz: Tensor, w: Tensor) -> None:
        """Token loop: the gradient ``dz @ w`` of kept tokens ``[lo, hi)``, written by the product
        itself where the output has their rows and dtype."""
        if self.p.rows is None and self.h.dtype == dz.dtype:
            torch.mm(dz, w, out=self.h[lo:hi])
        elif self.p.rows is None:
            self.h[lo:hi] = dz @ w
        else:
            self.h.index_copy_(0, self.p.rows[lo:hi], (dz @ w).to(self.h.dtype))

    def outputs(self, hidden_dtype, weight_dtype, bias_dtype):
        p = self.p

        def out(t, dtype):
            return t.to(dtype) if t is not None else torch.empty(0, dtype=dtype, device=p.device)

        grad_h = self.h
        if self.schedule == "vocab" and grad_h is not None:  # no float32 (N, D) temporary
            grad_h = p.scatter(grad_h, dtype=hidden_dtype)
        return out(grad_h, hidden_dtype), out(self.w, weight_dtype), out(self.b, bias_dtype)


def _cache_blocks(lo: int, hi: int, width: int):
    """Sub-ranges of the tokens ``[lo, hi)`` of a chunk of logits ``width`` columns wide, of at
    most ``CHUNK_ELEMENTS`` logits each: the products take the whole chunk (large products are
    efficient), the row math a block that stays in the caches across its passes (the whole chunk,
    up to the budget, would not)."""
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    for a in range(lo, hi, step):
        yield a, min(hi, a + step)


def _token_forward(p: _Problem, g: Tensor | None, grads: _Gradients | None, chunk: int, want_aux: bool):
    """Token-outer forward; with ``g`` also the gradients (three products)."""
    n, V, acc, opts, t = p.n, p.V, p.acc, p.opts, p.terms
    sums = RowSums.allocate(n, acc, p.device, soft=False, smooth=opts.label_smoothing != 0.0, aux=want_aux)
    gterms = grad_terms(g, opts, V, w_y=t.w_y, weight_sum=p.w_sum) if g is not None else None
    rows = max(1, min(chunk, n))
    z_full = torch.empty((rows, V), dtype=acc, device=p.device)
    n_scratch = _scratch_count(opts.softcap is not None, g is not None, want_aux)
    scratch_full = [torch.empty((rows, V), dtype=acc, device=p.device) for _ in range(n_scratch)]
    w_acc = p.weight_slice(0, V)  # a view for a weight already in the accumulation dtype
    smooth_w = smoothing_weights(p.cw, opts, V, acc, p.device)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        h = p.h_rows(lo, hi)
        z = p.scores(h, 0, V, z_full[: hi - lo], w_acc)
        for a, b in _cache_blocks(lo, hi, V):
            block = z[a - lo : b - lo]
            forward_rows(
                block,
                block,
                opts,
                sums.rows(a, b),
                weight=p.cw,
                weight_sum=p.w_sum,
                y=t.y[a:b],
                grad=gterms.rows(a, b) if g is not None else None,
                grad_out=block,
                scratch=[buf[: b - a] for buf in scratch_full],
                smooth_weight=smooth_w,
            )
        if g is not None:
            _accumulate_token_chunk(grads, z, h, w_acc, lo, hi)
    return _rows_result(
        p, finish_rows(sums, opts, V, w_y=t.w_y, keep=t.keep, weight_sum=p.w_sum, want_aux=want_aux), want_aux
    )


def _rows_result(p: _Problem, stats, want_aux: bool):
    aux = torch.empty((p.n if want_aux else 0, AUX_COLUMNS), dtype=p.acc, device=p.device)
    if want_aux:
        aux = torch.stack([stats.ce, stats.zl, stats.entropy, stats.correct], dim=-1)
    return stats.loss, stats.m, stats.log_s, aux


def _accumulate_token_chunk(grads: _Gradients, dz: Tensor, h: Tensor, w_acc: Tensor, lo: int, hi: int) -> None:
    if grads.h is not None:
        grads.put_h(lo, hi, dz, w_acc)
    if grads.w is not None:
        if lo == 0:  # the first chunk of tokens (every token loop starts there)
            torch.mm(dz.T, h, out=grads.w)
        else:
            grads.w.addmm_(dz.T, h)
    if grads.b is not None:
        grads.b += dz.sum(0)


def _vocab_forward(p: _Problem, chunk: int, want_aux: bool):
    """Vocabulary-outer first pass: the merged ``(m, log S)`` pair and the loss (one product)."""
    n, V, acc, opts = p.n, p.V, p.acc, p.opts
    t = p.terms
    cols = max(1, min(chunk, V))
    z_full = torch.empty((n, cols), dtype=acc, device=p.device)
    scratch = torch.empty((n, cols), dtype=acc, device=p.device) if want_aux else None
    stats = OnlineStats(opts, V, weight_sum=p.w_sum, y=t.y, want_aux=want_aux)
    for lo in range(0, V, cols):
        hi = min(V, lo + cols)
        z = z_full[:, : hi - lo] if hi - lo < cols else z_full
        p.scores(p.h_all, lo, hi, z)
        scores_into(z, z, opts, None)  # the scale and the soft cap
        stats.update(z, lo, p.cw[lo:hi] if p.cw is not None else None, scratch[:, : hi - lo] if want_aux else None)
    return _rows_result(p, stats.finish(V, t.w_y, t.keep), want_aux)


def _gradient_in_blocks(p: _Problem, z: Tensor, row0: int, col0: int, m, log_s, g, scratch_full) -> None:
    """``g·∂ℓ/∂z`` in place for the logits ``z`` of the kept tokens ``[row0, row0 + len(z))`` and
    the classes ``[col0, col0 + width)``, a cache-sized block of tokens at a time (both schedules)."""
    t, width = p.terms, z.shape[-1]
    weight = p.cw[col0 : col0 + width] if p.cw is not None else None
    for a, b in _cache_blocks(row0, row0 + z.shape[0], width):
        block = z[a - row0 : b - row0]
        backward_rows(
            block,
            block,
            p.opts,
            m=m[a:b],
            log_s=log_s[a:b],
            g=g[a:b],
            grad_out=block,
            weight=weight,
            weight_sum=p.w_sum,
            y=t.y[a:b],
            w_y=t.w_y[a:b],
            scratch=[buf[a - row0 : b - row0, :width] for buf in scratch_full],
            col0=col0,
            vocab_size=p.V,
        )


def _gradient_pass(p: _Problem, schedule: str, chunk: int, m: Tensor, log_s: Tensor, g: Tensor, grads: _Gradients):
    """Recompute the logits chunk by chunk and turn them into the gradients (from the saved pair)."""
    n, V, acc, opts = p.n, p.V, p.acc, p.opts
    n_scratch = _scratch_count(opts.softcap is not None, True, False)
    if schedule == "token":
        rows = max(1, min(chunk, n))
        z_full = torch.empty((rows, V), dtype=acc, device=p.device)
        scratch_full = [torch.empty((rows, V), dtype=acc, device=p.device) for _ in range(n_scratch)]
        w_acc = p.weight_slice(0, V)
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            h = p.h_rows(lo, hi)
            z = p.scores(h, 0, V, z_full[: hi - lo], w_acc)
            _gradient_in_blocks(p, z, lo, 0, m, log_s, g, scratch_full)
            _accumulate_token_chunk(grads, z, h, w_acc, lo, hi)
        return
    cols = max(1, min(chunk, V))
    z_full = torch.empty((n, cols), dtype=acc, device=p.device)
    scratch_full = [torch.empty((n, cols), dtype=acc, device=p.device) for _ in range(n_scratch)]
    for lo in range(0, V, cols):
        hi = min(V, lo + cols)
        w = hi - lo
        z = z_full[:, :w] if w < cols else z_full
        w_acc = p.weight_slice(lo, hi)
        p.scores(p.h_all, lo, hi, z, w_acc)
        _gradient_in_blocks(p, z, 0, lo, m, log_s, g, scratch_full)
        if grads.w is not None:  # this chunk's rows, accumulated in the product, rounded once
            if grads.w.dtype == acc:
                torch.mm(z.T, p.h_all, out=grads.w[lo:hi])
            else:
                grads.w[lo:hi] = torch.mm(z.T, p.h_all)
        if grads.b is not None:
            grads.b[lo:hi] = z.sum(0)
        if grads.h is not None:
            grads.h.addmm_(z, w_acc)


def _chunk_for(p: _Problem, schedule: str, chunk_size: int, want_grad: bool, want_aux: bool) -> int:
    if chunk_size > 0:
        return chunk_size
    scratch = 1 + _scratch_count(p.opts.softcap is not None, want_grad, want_aux)
    if schedule == "token":
        return token_chunk_rows(p.V, p.acc, scratch)
    return vocab_chunk_rows(p.n, p.D, p.acc, scratch)


def _forward_impl(
    hidden,
    weight,
    bias,
    target,
    class_weight,
    ignore_index,
    reduction,
    opts,
    schedule,
    chunk_size,
    need_h,
    need_w,
    need_b,
    want_aux,
):
    p = _Problem(hidden, weight, bias, target, class_weight, ignore_index, reduction, opts)
    want_grad = (need_h or need_w or need_b) and reduction != "none"
    chunk = _chunk_for(p, schedule, chunk_size, want_grad, want_aux)
    grads = _Gradients(p, need_h, need_w, need_b, schedule) if want_grad else None
    g = p.row_scale(None) if want_grad else None
    if schedule == "token":
        loss, m, log_s, aux = _token_forward(p, g, grads, chunk, want_aux)
    else:
        loss, m, log_s, aux = _vocab_forward(p, chunk, want_aux)
        if want_grad:
            _gradient_pass(p, "vocab", chunk, m, log_s, g, grads)
    bias_dtype = bias.dtype if bias is not None else weight.dtype
    if grads is not None:
        grad_h, grad_w, grad_b = grads.outputs(hidden.dtype, weight.dtype, bias_dtype)
    else:  # three distinct empty placeholders (outputs of a custom op may not alias)
        grad_h, grad_w, grad_b = (
            torch.empty(0, dtype=d, device=hidden.device) for d in (hidden.dtype, weight.dtype, bias_dtype)
        )
    token_loss = p.scatter(loss)
    out = reduce(token_loss, reduction, p.denominator)
    return (
        out,
        p.scatter(m),
        p.scatter(log_s),
        p.denominator,
        grad_h,
        grad_w,
        grad_b,
        p.scatter(aux) if want_aux else aux,
    )


def _backward_impl(
    grad_loss,
    hidden,
    weight,
    bias,
    target,
    class_weight,
    m,
    log_s,
    ignore_index,
    reduction,
    opts,
    schedule,
    chunk_size,
    need_h,
    need_w,
    need_b,
):
    p = _Problem(hidden, weight, bias, target, class_weight, ignore_index, reduction, opts)
    if p.rows is not None:
        m, log_s = m[p.rows], log_s[p.rows]
    chunk = _chunk_for(p, schedule, chunk_size, True, False)
    grads = _Gradients(p, need_h, need_w, need_b, schedule)
    _gradient_pass(p, schedule, chunk, m, log_s, p.row_scale(grad_loss), grads)
    return grads.outputs(hidden.dtype, weight.dtype, bias.dtype if bias is not None else weight.dtype)


# --------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("crossent::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
    schedule: str,
    chunk_size: int,
    need_h: bool,
    need_w: bool,
    need_b: bool,
    want_aux: bool,
    eager: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, m, log_s, denominator, grad_hidden, grad_weight, grad_bias, aux); hidden is (N, D).

    ``eager`` only tells the autograd registration how to keep the gradients (see ``_setup_context``).
    """
    opts = RowOptions(label_smoothing, z_loss, softcap, logit_scale)
    return _forward_impl(
        hidden,
        weight,
        bias,
        target,
        class_weight,
        ignore_index,
        reduction,
        opts,
        schedule,
        chunk_size,
        need_h,
        need_w,
        need_b,
        want_aux,
    )


def _grad_shapes(hidden, weight, bias, need_h, need_w, need_b, with_grads):
    def grad_like(t, need, dtype):
        if with_grads and need and t is not None:
            return t.new_empty(t.shape)
        return hidden.new_empty((0,), dtype=dtype)

    bias_dtype = bias.dtype if bias is not None else weight.dtype
    return (
        grad_like(hidden, need_h, hidden.dtype),
        grad_like(weight, need_w, weight.dtype),
        grad_like(bias, need_b, bias_dtype),
    )


@linear_cross_entropy_forward.register_fake
def _(
    hidden,
    weight,
    bias,
    target,
    class_weight,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    schedule,
    chunk_size,
    need_h,
    need_w,
    need_b,
    want_aux,
    eager,
):
    acc = accumulation_dtype(weight.dtype)
    N = hidden.shape[0]
    loss = hidden.new_empty((N,) if reduction == "none" else (), dtype=acc)
    with_grads = (need_h or need_w or need_b) and reduction != "none"
    grads = _grad_shapes(hidden, weight, bias, need_h, need_w, need_b, with_grads)
    aux = hidden.new_empty((N if want_aux else 0, AUX_COLUMNS), dtype=acc)
    return (
        loss,
        hidden.new_empty((N,), dtype=acc),
        hidden.new_empty((N,), dtype=acc),
        hidden.new_empty((), dtype=acc),
        *grads,
        aux,
    )


@torch.library.custom_op("crossent::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(
    grad_loss: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    m: Tensor,
    log_s: Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    logit_scale: float,
    schedule: str,
    chunk_size: int,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients recomputed from the saved pair, times the upstream gradient."""
    opts = RowOptions(label_smoothing, z_loss, softcap, logit_scale)
    return _backward_impl(
        grad_loss,
        hidden,
        weight,
        bias,
        target,
        class_weight,
        m,
        log_s,
        ignore_index,
        reduction,
        opts,
        schedule,
        chunk_size,
        need_h,
        need_w,
        need_b,
    )


@linear_cross_entropy_backward.register_fake
def _(
    grad_loss,
    hidden,
    weight,
    bias,
    target,
    class_weight,
    m,
    log_s,
    ignore_index,
    reduction,
    label_smoothing,
    z_loss,
    softcap,
    logit_scale,
    schedule,
    chunk_size,
    need_h,
    need_w,
    need_b,
):
    return _grad_shapes(hidden, weight, bias, need_h, need_w, need_b, True)


def _setup_context(ctx, inputs, output):
    (
        hidden,
        weight,
        bias,
        target,
        class_weight,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        schedule,
        chunk_size,
        need_h,
        need_w,
        need_b,
        want_aux,
        eager,
    ) = inputs
    loss, m, log_s, denominator, grad_h, grad_w, grad_b = output[:7]
    ctx.options = (
        ignore_index,
        reduction,
        label_smoothing,
        z_loss,
        softcap,
        logit_scale,
        schedule,
        chunk_size,
        need_h,
        need_w,
        need_b,
    )
    ctx.need = (need_h, need_w, need_b)
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)
    in_forward = (need_h or need_w or need_b) and reduction != "none"
    # Eager: the gradients computed in forward are handed to the first backward through a box
    # (scaled in place, then let go; a second backward recomputes). Under torch.compile they are
    # saved and scaled out of place, which keeps the traced graph functional.
    ctx.grad_box = [grad_h, grad_w, grad_b] if in_forward and eager else []
    ctx.eager_in_forward = in_forward and eager
    ctx.grads_saved = in_forward and not eager
    saved_grads = (grad_h, grad_w, grad_b) if ctx.grads_saved else ()
    ctx.save_for_backward(hidden, weight, bias, target, class_weight, m, log_s, *saved_grads)


def _backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return (None,) * 18
    if ctx.grad_box:
        grads = [
            scale_saved_gradient(g, grad_loss) if need else None for g, need in zip(ctx.grad_box, ctx.need, strict=True)
        ]
        ctx.grad_box = []
    else:
        saved = ctx.saved_tensors
        if ctx.grads_saved:
            grads = [g * grad_loss if need else None for g, need in zip(saved[7:], ctx.need, strict=True)]
        elif ctx.eager_in_forward:
            # a second eager backward: the forward's own gradient path again, so that repeated
            # backward passes agree bit for bit (gradcheck's reentrancy check)
            grads = linear_cross_entropy_forward(*saved[:5], *ctx.options, False, True)[4:7]
            grads = [
                scale_saved_gradient(g, grad_loss) if need else None for g, need in zip(grads, ctx.need, strict=True)
            ]
        else:
            grads = list(linear_cross_entropy_backward(grad_loss, *saved[:7], *ctx.options))
    grads = [grad if need else None for grad, need in zip(grads, ctx.need, strict=True)]
    if not ctx.has_bias:
        grads[2] = None
    return (grads[0], grads[1], grads[2]) + (None,) * 15


linear_cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy_op(
    hidden2d: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    target: Tensor,
    class_weight: Optional[Tensor],
    opts,
    schedule: str,
):
    """Run the op on flattened, validated inputs; returns (loss, m, log_s, denominator, aux)."""
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden2d.requires_grad
    need_w = grad_on and weight.requires_grad
    need_b = grad_on and bias is not None and bias.requires_grad
    loss, m, log_s, denominator, _, _, _, aux = linear_cross_entropy_forward(
        hidden2d,
        weight,
        bias,
        target,
        class_weight,
        opts.ignore_index,
        opts.reduction,
        opts.label_smoothing,
        opts.z_loss,
        opts.softcap,
        opts.logit_scale,
        schedule,
        opts.chunk_size or 0,
        need_h,
        need_w,
        need_b,
        opts.return_aux,
        not torch.compiler.is_compiling(),
    )
    return loss, m, log_s, denominator, aux


__all__ = ["choose_schedule", "linear_cross_entropy_op"]
