"""The chunk loops of ``linear_cross_entropy``: ``cross_entropy(hidden @ weight.T + bias)`` without
ever holding the (N, V) logits. These are the PyTorch backend's kernels (``backends.pytorch``
registers :func:`forward` and :func:`backward`); the vocabulary loop also runs over a shard of the
classifier, which is all the vocabulary-parallel loss adds (``crossent.distributed``).

``"token"`` — chunks of tokens against the whole vocabulary: per chunk the logits (one product),
the loss and ``∂ℓ/∂z`` in place (``rows.forward_rows``), then ``∂ℓ/∂hidden`` and ``∂ℓ/∂W`` (two
products). Three products in all, the gradients computed during the forward when they are needed;
backward only scales them by the upstream gradient. A 16-bit weight needs a float32 accumulator
for its gradient (2×|W| bytes) and a float32 copy of itself.

``"vocab"`` — chunks of the vocabulary against all tokens: a first pass merges the per-token
``(m, log S)`` pair over the chunks (``online.OnlineStats``); a second pass recomputes each chunk's
logits and writes that chunk's rows of ``∂ℓ/∂W`` in one product (float32 accumulation inside the
product, rounded once), accumulating ``∂ℓ/∂hidden`` in float32. Four products, no V×D accumulator.

``"auto"`` takes ``"token"`` unless the weight is 16-bit, needs a gradient and its float32
accumulator (4·V·D bytes) exceeds the memory budget: then ``"vocab"``. The rule reads shapes,
dtypes and the budget only, so a run is reproducible bit for bit.

Products run in the accumulation dtype (float32; float64 for float64 inputs): 16-bit operands are
converted a chunk at a time. On CPUs without bfloat16 matrix units this is also the fast path
(benchmarks/RESULTS.md). With
``reduction="none"`` the upstream gradient differs per token, which no scaling of a finished
classifier gradient can apply: forward then computes no gradient, and backward recomputes it from
the saved pair (one product more for ``"token"``: four in all). In CPU eager mode ignored tokens
are dropped before any product; on other devices (no host sync) they are computed with a zero
gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import PRODUCT_BLOCK_BYTES, get_memory_budget, rows_per_chunk
from .chunks import (
    Shard,
    cache_blocks,
    column_chunks,
    scratch_buffers,
    token_chunk_rows,
    token_chunks,
    vocab_chunk_rows,
)
from .config import OpConfig
from .online import OnlineStats
from .rows import (
    RowStats,
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


def logits_into(out: Tensor, h: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
    """``out = h @ w.T + bias``: (n, D) tokens against (c, D) classes into ``out`` (n, c), all in
    the accumulation dtype; on the CPU a cache-sized block of classes at a time (one product
    elsewhere)."""
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


class LinearProblem:
    """The inputs of one call, flattened, in the accumulation dtype, ignored tokens dropped (CPU),
    over this process's ``shard`` of the classifier's rows (the whole vocabulary by default) —
    shared by the forward and the backward loops. The target is global (the same on every rank),
    so every rank drops the same tokens."""

    def __init__(self, hidden, weight, bias, target, class_weight, config: OpConfig, shard: Shard | None = None):
        self.acc = acc = accumulation_dtype(weight.dtype)
        self.N, self.D = hidden.shape
        self.shard = shard or Shard.whole(weight.shape[0])
        self.V = self.shard.vocab  # the vocabulary of the math (global, real classes)
        self.opts, self.reduction = config.rows, config.reduction
        self.device = hidden.device
        self.cw, self.w_sum = class_weights(class_weight, self.V, acc, self.device)
        terms = target_terms(target, self.cw, self.V, config.ignore_index, acc)
        self.denominator = terms.denominator
        self.kept = None  # indices of the kept tokens when the others are dropped
        if self.device.type == "cpu" and not bool(terms.keep.all()):
            self.kept = terms.keep.nonzero().squeeze(-1)  # CPU: a host read costs nothing
            terms.y, terms.w_y, terms.keep = terms.y[self.kept], terms.w_y[self.kept], terms.keep[self.kept]
        self.terms = terms
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.n = self.N if self.kept is None else self.kept.shape[0]  # tokens that go through the products
        self._h_all = None

    def h_rows(self, lo: int, hi: int) -> Tensor:
        """Kept tokens ``[lo, hi)`` of ``hidden`` in the accumulation dtype (a view when possible):
        a token loop converts one chunk at a time."""
        h = self.hidden[lo:hi] if self.kept is None else self.hidden.index_select(0, self.kept[lo:hi])
        return h.to(self.acc)

    @property
    def h_all(self) -> Tensor:
        """All kept tokens in the accumulation dtype (the vocabulary loop multiplies them by every
        chunk): one (n, D) copy for 16-bit inputs or dropped tokens, else a view."""
        if self._h_all is None:
            self._h_all = self.h_rows(0, self.n)
        return self._h_all

    def weight_rows(self, lo: int, hi: int) -> Tensor:
        """Rows ``[lo, hi)`` of the classifier in the accumulation dtype (a view when it is)."""
        return self.weight[lo:hi].to(self.acc)

    def buffer(self, numel: int) -> Tensor:
        """A reusable flat buffer for chunks of logits (the accumulation dtype)."""
        return torch.empty(numel, dtype=self.acc, device=self.device)

    def class_weight_slice(self, col0: int, width: int) -> Tensor | None:
        """The class weights of the global columns ``[col0, col0 + width)`` (None without)."""
        return self.cw[col0 : col0 + width] if self.cw is not None else None

    def logits(self, h: Tensor, w: Tensor, lo: int, hi: int, out: Tensor) -> Tensor:
        """``out = h @ w.T + b[lo:hi]`` in the accumulation dtype, ``w`` the rows ``[lo, hi)``."""
        return logits_into(out, h, w, self.bias[lo:hi].to(self.acc) if self.bias is not None else None)

    def row_scale(self, grad_loss: Tensor | None) -> Tensor:
        """``∂loss/∂ℓ_i`` for the kept tokens (times the upstream gradient when given)."""
        g = reduction_scale(self.reduction, self.denominator).expand(self.n)
        if grad_loss is not None:
            upstream = grad_loss.to(self.acc).reshape(-1)
            if upstream.numel() > 1 and self.kept is not None:
                upstream = upstream[self.kept]
            g = g * upstream
        return torch.where(self.terms.keep, g, torch.zeros_like(g))

    def scatter(self, values: Tensor, fill: float = 0.0, dtype: torch.dtype | None = None) -> Tensor:
        """Per-kept-token values back to all N tokens (dropped ones get ``fill``), in ``dtype``
        (default: theirs), converted a budget's chunk of rows at a time."""
        dtype = dtype or values.dtype
        if self.kept is None:
            return values.to(dtype)
        out = torch.full((self.N,) + values.shape[1:], fill, dtype=dtype, device=values.device)
        rows = rows_per_chunk(values[:1].numel() * out.element_size())
        for lo in range(0, self.n, rows):
            out.index_copy_(0, self.kept[lo : lo + rows], values[lo : lo + rows].to(dtype))
        return out

    def chunk(self, schedule: str, chunk_size: int, want_grad: bool, want_aux: bool) -> int:
        """Tokens ("token") or vocabulary rows ("vocab") per chunk: the caller's, or from the budget."""
        if chunk_size > 0:
            return chunk_size
        buffers = 1 + scratch_buffers(softcap=self.opts.softcap is not None, want_grad=want_grad, want_aux=want_aux)
        if schedule == "token":
            return token_chunk_rows(self.V, self.acc, buffers)
        return vocab_chunk_rows(self.n, self.D, self.acc, buffers)


class Gradients:
    """Where the gradients go. ``"token"`` writes ``∂hidden`` chunk by chunk straight into the
    output and accumulates the classifier gradient over token chunks: in place for a weight in the
    accumulation dtype, else in a float32 accumulator. ``"vocab"`` accumulates ``∂hidden`` over
    vocabulary chunks in the accumulation dtype and writes each chunk's classifier rows once,
    straight into a gradient of the weight's own dtype (rows of a shard's padding stay 0)."""

    def __init__(self, p: LinearProblem, needs: tuple[bool, bool, bool], schedule: str):
        need_h, need_w, need_b = needs
        acc, dev = p.acc, p.device
        rows = p.weight.shape[0]
        self.p, self.schedule = p, schedule
        if not need_h:
            self.h = None
        elif schedule == "token":  # the output itself; dropped tokens keep a zero gradient
            make = torch.zeros if p.kept is not None else torch.empty
            self.h = make((p.N, p.D), dtype=p.hidden.dtype, device=dev)
        else:
            self.h = torch.zeros((p.n, p.D), dtype=acc, device=dev)
        if not need_w:
            self.w = None
        elif schedule == "token":  # the first chunk's product writes it (no zero fill, no re-read)
            self.w = (torch.empty if p.n > 0 else torch.zeros)((rows, p.D), dtype=acc, device=dev)
        else:
            padded = p.n == 0 or p.shard.width < rows
            self.w = (torch.zeros if padded else torch.empty)((rows, p.D), dtype=p.weight.dtype, device=dev)
        self.b = torch.zeros(rows, dtype=acc, device=dev) if need_b else None

    def put_h(self, lo: int, hi: int, dz: Tensor, w: Tensor) -> None:
        """Token loop: the gradient ``dz @ w`` of kept tokens ``[lo, hi)``, written by the product
        itself where the output has their rows and dtype."""
        if self.p.kept is None and self.h.dtype == dz.dtype:
            torch.mm(dz, w, out=self.h[lo:hi])
        elif self.p.kept is None:
            self.h[lo:hi] = dz @ w
        else:
            self.h.index_copy_(0, self.p.kept[lo:hi], (dz @ w).to(self.h.dtype))

    def token_chunk(self, dz: Tensor, h: Tensor, w_acc: Tensor, lo: int, hi: int) -> None:
        """The gradients of the token chunk ``[lo, hi)`` from its ``∂ℓ/∂x`` rows ``dz`` (r, V)."""
        if self.h is not None:
            self.put_h(lo, hi, dz, w_acc)
        if self.w is not None:
            if lo == 0:  # the first chunk of tokens (every token loop starts there)
                torch.mm(dz.T, h, out=self.w)
            else:
                self.w.addmm_(dz.T, h)
        if self.b is not None:
            self.b += dz.sum(0)

    def vocab_chunk(self, dz: Tensor, w_acc: Tensor, lo: int, hi: int) -> None:
        """The gradients of the local classifier rows ``[lo, hi)`` from their ``∂ℓ/∂x`` columns
        ``dz`` (n, w): those rows of ``∂W`` and ``∂b`` (accumulated in the product, rounded once),
        and their share of ``∂hidden``."""
        p = self.p
        if self.w is not None:
            if self.w.dtype == p.acc:
                torch.mm(dz.T, p.h_all, out=self.w[lo:hi])
            else:
                self.w[lo:hi] = torch.mm(dz.T, p.h_all)
        if self.b is not None:
            self.b[lo:hi] = dz.sum(0)
        if self.h is not None:
            self.h.addmm_(dz, w_acc)

    def outputs(self, hidden_dtype, weight_dtype, bias_dtype):
        """(grad_h, grad_w, grad_b) in their dtypes; distinct empty placeholders for the ones not
        wanted (outputs of a custom op may not alias)."""
        p = self.p

        def out(t, dtype):
            return t.to(dtype) if t is not None else torch.empty(0, dtype=dtype, device=p.device)

        grad_h = self.h
        if self.schedule == "vocab" and grad_h is not None:  # no float32 (N, D) temporary
            grad_h = p.scatter(grad_h, dtype=hidden_dtype)
        return out(grad_h, hidden_dtype), out(self.w, weight_dtype), out(self.b, bias_dtype)


def token_forward(p: LinearProblem, g: Tensor | None, grads: Gradients | None, chunk: int, want_aux: bool) -> RowStats:
    """Token-outer forward; with ``g`` also the gradients (three products)."""
    n, V, acc, opts, t = p.n, p.V, p.acc, p.opts, p.terms
    sums = RowSums.allocate(n, acc, p.device, soft=False, smooth=opts.label_smoothing != 0.0, aux=want_aux)
    gterms = grad_terms(g, opts, V, w_y=t.w_y, weight_sum=p.w_sum) if g is not None else None
    n_scratch = scratch_buffers(softcap=opts.softcap is not None, want_grad=g is not None, want_aux=want_aux)
    scratch_full = _scratch(p, max(1, min(chunk, n)), V, n_scratch)
    smooth_w = smoothing_weights(p.cw, opts, V, acc, p.device)
    for lo, hi, h, z, w in token_chunks(p, chunk):
        for a, b in cache_blocks(lo, hi, V):
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
            grads.token_chunk(z, h, w, lo, hi)
    return finish_rows(sums, opts, V, w_y=t.w_y, keep=t.keep, weight_sum=p.w_sum, want_aux=want_aux)


def _scratch(p: LinearProblem, rows: int, cols: int, count: int) -> list[Tensor]:
    """``count`` (rows, cols) scratch buffers for the row math of a chunk."""
    return [torch.empty((rows, cols), dtype=p.acc, device=p.device) for _ in range(count)]


def vocab_stats(p: LinearProblem, chunk: int, want_aux: bool) -> OnlineStats:
    """Vocabulary-outer first pass over the shard: the merged per-token statistics (one product)."""
    col0 = p.shard.col0
    stats = OnlineStats(p.opts, p.V, weight_sum=p.w_sum, y=p.terms.y, want_aux=want_aux)
    scratch = _scratch(p, p.n, max(1, min(chunk, p.shard.width)), int(want_aux))
    for lo, hi, z, _w in column_chunks(p, chunk):
        scores_into(z, z, p.opts, None)  # the scale and the soft cap
        block_scratch = scratch[0][:, : hi - lo] if want_aux else None
        stats.update(z, col0 + lo, p.class_weight_slice(col0 + lo, hi - lo), block_scratch)
    return stats


def gradient_in_blocks(p: LinearProblem, z: Tensor, row0: int, col0: int, m, log_s, g, scratch_full) -> None:
    """``g·∂ℓ/∂z`` in place for the logits ``z`` of the kept tokens ``[row0, row0 + len(z))`` and
    the global classes ``[col0, col0 + width)``, a cache-sized block of tokens at a time."""
    t, width = p.terms, z.shape[-1]
    weight = p.class_weight_slice(col0, width)
    for a, b in cache_blocks(row0, row0 + z.shape[0], width):
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


def vocab_gradients(p: LinearProblem, chunk: int, m: Tensor, log_s: Tensor, g: Tensor, grads: Gradients) -> None:
    """Vocabulary-outer gradient pass over the shard: each chunk's logits again, their ``g·∂ℓ/∂z``
    from the saved pair, and that chunk's share of every gradient (:meth:`Gradients.vocab_chunk`)."""
    col0 = p.shard.col0
    n_scratch = scratch_buffers(softcap=p.opts.softcap is not None, want_grad=True)
    scratch = _scratch(p, p.n, max(1, min(chunk, p.shard.width)), n_scratch)
    for lo, hi, z, w in column_chunks(p, chunk):
        gradient_in_blocks(p, z, 0, col0 + lo, m, log_s, g, scratch)
        grads.vocab_chunk(z, w, lo, hi)


def token_gradients(p: LinearProblem, chunk: int, m: Tensor, log_s: Tensor, g: Tensor, grads: Gradients) -> None:
    """Token-outer gradient pass: each chunk's logits again and their gradients, from the saved pair."""
    n_scratch = scratch_buffers(softcap=p.opts.softcap is not None, want_grad=True)
    scratch = _scratch(p, max(1, min(chunk, p.n)), p.V, n_scratch)
    for lo, hi, h, z, w in token_chunks(p, chunk):
        gradient_in_blocks(p, z, lo, 0, m, log_s, g, scratch)
        grads.token_chunk(z, h, w, lo, hi)


def _dtypes(hidden: Tensor, weight: Tensor, bias: Tensor | None):
    return hidden.dtype, weight.dtype, bias.dtype if bias is not None else weight.dtype


def forward(hidden, weight, bias, target, class_weight, config: OpConfig):
    """(loss, m, log_s, denominator, grad_h, grad_w, grad_b, aux) of the flattened call; the
    gradients are formed when ``config.grads_in_forward`` (empty placeholders otherwise)."""
    p = LinearProblem(hidden, weight, bias, target, class_weight, config)
    want_grad, want_aux = config.grads_in_forward, config.want_aux
    chunk = p.chunk(config.schedule, config.chunk_size, want_grad, want_aux)
    grads = Gradients(p, config.needs, config.schedule) if want_grad else None
    g = p.row_scale(None) if want_grad else None
    if config.schedule == "token":
        stats = token_forward(p, g, grads, chunk, want_aux)
    else:
        stats = vocab_stats(p, chunk, want_aux).finish(p.V, p.terms.w_y, p.terms.keep)
        if want_grad:
            vocab_gradients(p, chunk, stats.m, stats.log_s, g, grads)
    dtypes = _dtypes(hidden, weight, bias)
    if grads is not None:
        grad_h, grad_w, grad_b = grads.outputs(*dtypes)
    else:  # three distinct empty placeholders (outputs of a custom op may not alias)
        grad_h, grad_w, grad_b = (torch.empty(0, dtype=d, device=hidden.device) for d in dtypes)
    loss = reduce(p.scatter(stats.loss), config.reduction, p.denominator)
    aux = stats.aux_columns()
    aux = p.scatter(aux) if want_aux else aux
    return loss, p.scatter(stats.m), p.scatter(stats.log_s), p.denominator, grad_h, grad_w, grad_b, aux


def backward(grad_loss, hidden, weight, bias, target, class_weight, m, log_s, config: OpConfig):
    """The gradients recomputed from the saved pair, times the upstream gradient."""
    p = LinearProblem(hidden, weight, bias, target, class_weight, config)
    if p.kept is not None:
        m, log_s = m[p.kept], log_s[p.kept]
    chunk = p.chunk(config.schedule, config.chunk_size, True, False)
    grads = Gradients(p, config.needs, config.schedule)
    gradient_pass = token_gradients if config.schedule == "token" else vocab_gradients
    gradient_pass(p, chunk, m, log_s, p.row_scale(grad_loss), grads)
    return grads.outputs(*_dtypes(hidden, weight, bias))
