"""Losses across processes: a vocabulary split over tensor-parallel ranks, and exact normalisation.

Two problems of training across processes, solved on ``torch.distributed`` (NCCL on GPUs, gloo
on CPUs):

* **Vocabulary parallelism.** Each rank of a group holds an equal, contiguous slice of the
  classifier (Megatron's ``ColumnParallelLinear`` head): its logits are a vocabulary block of
  every token. :func:`vocab_parallel_cross_entropy` and :func:`vocab_parallel_linear_cross_entropy`
  compute the loss of the concatenated vocabulary without ever gathering it: each rank reduces
  its block to per-token statistics (DESIGN.md §1's ``(m, S)`` pair, the target score, the
  smoothing and entropy sums, the argmax), the ranks exchange those — two collectives of O(N)
  elements in the forward — and every rank then holds the exact global loss. The logits'
  backward needs no communication (the softmax of a block is ``exp((z - m) - log S)`` with the
  global pair); the linear form's backward all-reduces ``∂loss/∂hidden`` once.
* **Exact normalisation.** A mean over the tokens of a global batch split into micro-batches and
  data-parallel ranks is not a mean of per-micro-batch means. :func:`global_normalizer` gives the
  global denominator so that ``reduction="sum"`` divided by it is exact (the README's recipe).

Importing this module initialises nothing. With ``group=None`` the default process group is used;
when ``torch.distributed`` is not initialised at all, a call runs as a world of one process.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .functional import (
    _shape,
    build_aux,
    check_class_weight,
    check_devices,
    check_float,
    check_target,
    check_target_range,
    check_tensor,
    pick_class_weight,
    shift_target,
)
from .options import LossOptions, document, rows_per_chunk
from .torch_impl.linear_cross_entropy import logits_into, vocab_chunk_rows
from .torch_impl.rows import (
    OnlineStats,
    RowOptions,
    RowSums,
    accumulation_dtype,
    backward_rows,
    finish_rows,
    reduce,
    reduction_scale,
    scores_into,
    target_terms,
    weighted,
)

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy", "global_normalizer"]


# --------------------------------------------------------------------------------------------
# The group and this rank's slice of the vocabulary
# --------------------------------------------------------------------------------------------


def _group_of(group) -> tuple[object, int, int]:
    """(group, rank in it, its size); a world of one when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(
                "group was given but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group first (or pass group=None for one process)"
            )
        return None, 0, 1
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of group")
    return group, rank, world


@dataclass(frozen=True)
class _Shard:
    """This rank's columns ``[col0, col0 + local)`` of a vocabulary of ``vocab`` real classes."""

    group: object
    rank: int
    world: int
    local: int  # columns per rank (the padded vocabulary is world·local)
    vocab: int  # the real V: columns at or past it are padding

    @property
    def col0(self) -> int:
        return self.rank * self.local

    @property
    def width(self) -> int:
        """Real (unpadded) columns on this rank, 0 to ``local``."""
        return max(0, min(self.local, self.vocab - self.col0))


def _check_vocab_size(vocab_size, world: int, local: int) -> int:
    padded = world * local
    if vocab_size is None:
        return padded
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int (the real vocabulary size) or None, got {vocab_size!r}")
    if not 1 <= vocab_size <= padded:
        raise ValueError(
            f"vocab_size must be in [1, {padded}]: the real vocabulary, at most the {world} rank(s) × {local} "
            f"columns of the shards, got {vocab_size}"
        )
    return vocab_size


def _check_not_dtensor(name: str, t: Tensor) -> None:
    if type(t).__name__ == "DTensor":
        raise TypeError(
            f"{name} is a DTensor; the vocabulary-parallel losses take this rank's plain local shard: "
            f"pass {name}.to_local() (an equal, contiguous slice per rank) and group=<the mesh dimension's "
            "process group>"
        )


# --------------------------------------------------------------------------------------------
# The two forward collectives (the only communication of the logits' loss)
# --------------------------------------------------------------------------------------------


def _all_gather(out: Tensor, t: Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)


@dataclass
class _Local:
    """Per-token statistics of this rank's block (accumulation dtype; relative to its own max)."""

    m: Tensor  # max over the block (-inf for a rank holding only padding)
    s: Tensor  # Σ exp(z - m) over the block (0 for padding only)
    z_y: Tensor  # raw score of the target where this rank holds it (anything elsewhere)
    inside: Tensor  # bool: this rank holds the target's column
    wz: Tensor | None = None  # Σ w_j (z_j - m) over the block (label smoothing)
    w_sum: Tensor | float = 0.0  # Σ w_j over the block's real columns (label smoothing)
    ent: Tensor | None = None  # Σ e^(z - m) (z - m) over the block (aux)
    best: Tensor | None = None  # global index of the block's first argmax (aux)

    @staticmethod
    def padding_only(n: int, acc, device, smooth: bool, want_aux: bool) -> _Local:
        zeros = torch.zeros(n, dtype=acc, device=device)
        return _Local(
            m=torch.full((n,), -math.inf, dtype=acc, device=device),
            s=zeros,
            z_y=zeros,
            inside=torch.zeros(n, dtype=torch.bool, device=device),
            wz=zeros if smooth else None,
            ent=zeros if want_aux else None,
            best=torch.full((n,), -1, dtype=torch.long, device=device) if want_aux else None,
        )

    @staticmethod
    def of(stats: OnlineStats, y: Tensor, col0: int, width: int) -> _Local:
        local = y - col0
        return _Local(
            m=stats.m,
            s=stats.s,
            z_y=stats.z_y,
            inside=(local >= 0) & (local < width),
            wz=stats.wz,
            w_sum=stats.w_seen if stats.wz is not None else 0.0,
            ent=stats.ent,
            best=stats.best,
        )


def _combine(loc: _Local, shard: _Shard, opts: RowOptions, terms, weight_sum: Tensor, want_aux: bool):
    """Every rank's block statistics merged into the global per-token :class:`RowStats`.

    Collective 1 gathers the per-rank pairs ``(m_r, S_r)`` (2·world·n elements) and merges them
    by DESIGN.md §1's rule, identically on every rank. Each rank then rebases its partial sums on
    the global maximum and collective 2 sums them, packed in one (n, k) tensor: the target score
    ``z_y - m`` (from the rank holding it), ``Σ w_j (z_j - m)``, ``Σ e^(z_j - m)(z_j - m)`` and
    the argmax hit (from the rank holding the first maximum).
    """
    n = loc.m.shape[0]
    pair = torch.stack([loc.m, loc.s], dim=-1)
    if shard.world > 1:
        gathered = pair.new_empty((shard.world * n, 2))  # concatenated in rank order
        _all_gather(gathered, pair, shard.group)
        gathered = gathered.view(shard.world, n, 2)
    else:
        gathered = pair.unsqueeze(0)
    ms, ss = gathered[..., 0], gathered[..., 1]
    m = ms.amax(0)
    s = (ss * torch.exp(ms - m)).sum(0)  # S = Σ_r S_r·e^(m_r - m), in rank order on every rank

    empty = shard.width == 0
    d = loc.m - m  # <= 0: this rank's maximum against the global one
    zero = torch.zeros_like(m)
    columns = [torch.where(loc.inside & terms.keep, loc.z_y - m, zero)]
    smooth = opts.label_smoothing != 0.0
    if smooth:  # Σ w_j (z_j - m) = Σ w_j (z_j - m_r) + (m_r - m)·Σ w_j, w pre-scaled by ε/V, m_r - m in halves
        columns.append(zero if empty else loc.wz + 2.0 * ((loc.m * 0.5 - m * 0.5) * loc.w_sum))
    if want_aux:  # Σ e^(z-m)(z-m) = e^(m_r-m)·(Σ e^(z-m_r)(z-m_r) + (m_r-m)·S_r)
        columns.append(zero if empty else weighted(torch.exp(d), loc.ent + d * loc.s))
        first = (ms == m).to(torch.uint8).argmax(0)  # the rank of the first maximum (ties: lowest)
        hit = (first == shard.rank) & (loc.best == terms.y)
        columns.append(hit.to(m.dtype))
    packed = torch.stack(columns, dim=-1)
    if shard.world > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=shard.group)
    sums = RowSums(m=m, log_s=s.log(), z_y=packed[:, 0])
    k = 1
    if smooth:
        sums.wz, k = packed[:, k], k + 1
    if want_aux:
        sums.p_dot_z, sums.hit = packed[:, k] / s, packed[:, k + 1]
    return finish_rows(
        sums, opts, shard.vocab, w_y=terms.w_y, keep=terms.keep, weight_sum=weight_sum, want_aux=want_aux
    )


def _class_weights(weight: Tensor | None, vocab: int, acc, device) -> tuple[Tensor | None, Tensor]:
    """Class weights in the accumulation dtype and their global sum Σ_j w_j (V without weights)."""
    if weight is None:
        return None, torch.tensor(float(vocab), dtype=acc, device=device)
    w = weight.to(acc).contiguous()
    return w, w.sum()


def _block_weight(cw: Tensor | None, lo: int, hi: int) -> Tensor | None:
    return cw[lo:hi] if cw is not None else None


def _aux_columns(stats, n: int, acc, device, want_aux: bool) -> Tensor:
    if not want_aux:
        return torch.empty((0, 4), dtype=acc, device=device)
    return torch.stack([stats.ce, stats.zl, stats.entropy, stats.correct], dim=-1)


# --------------------------------------------------------------------------------------------
# vocab_parallel_cross_entropy: the loop over row chunks of this rank's logits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    shard: _Shard
    opts: RowOptions
    ignore_index: int
    reduction: str
    chunk_size: int | None
    want_aux: bool


#: Past this many elements a chunk of rows gets no faster on a CPU (it leaves the caches).
CHUNK_ELEMENTS = 1 << 18


def _row_chunks(x: Tensor, rows: int):
    """(first flat row, (r, V_local) view) chunks of at most ``rows`` rows, never copying.

    The leading dims that merge into one row index by a view are merged; the outer ones that do
    not (e.g. a (B, T) lead stored transposed) are iterated, in row-major order.
    """
    lead, Vl = x.shape[:-1], x.shape[-1]
    if math.prod(lead) == 0:
        return
    for k in range(len(lead) + 1):
        try:
            x[(0,) * k].view(-1, Vl)
        except RuntimeError:
            continue
        per_block = math.prod(lead[k:])
        for n, index in enumerate(itertools.product(*(range(d) for d in lead[:k]))):
            block = x[index].view(-1, Vl)
            for lo in range(0, per_block, rows):
                yield n * per_block + lo, block[lo : lo + rows]
        return


def _item(acc) -> int:
    return torch.empty((), dtype=acc).element_size()


def _chunk_rows(plan: _Plan, acc, buffers: int) -> int:
    """Rows per chunk: the caller's, or from the memory budget (never from N)."""
    if plan.chunk_size is not None:
        return plan.chunk_size
    width = max(1, plan.shard.width)
    return rows_per_chunk(width * _item(acc), buffers=buffers, cap=max(1, CHUNK_ELEMENTS // width))


def _scale_(grad: Tensor, grad_loss: Tensor) -> None:
    """``grad *= grad_loss`` (a scalar), skipped when it is exactly 1 on the CPU."""
    if grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
        return
    grad.mul_(grad_loss)


def _logits_forward(logits: Tensor, target: Tensor, weight: Tensor | None, plan: _Plan):
    shard, opts = plan.shard, plan.opts
    acc = accumulation_dtype(logits.dtype)
    device = logits.device
    N = target.numel()
    cw, w_sum = _class_weights(weight, shard.vocab, acc, device)
    terms = target_terms(target.reshape(-1), cw, shard.vocab, plan.ignore_index, acc)
    smooth = opts.label_smoothing != 0.0
    width, col0 = shard.width, shard.col0
    if width == 0 or N == 0:
        loc = _Local.padding_only(N, acc, device, smooth, plan.want_aux)
    else:
        fields = {k: torch.empty(N, dtype=acc, device=device) for k in ("m", "s", "z_y")}
        if smooth:
            fields["wz"] = torch.empty(N, dtype=acc, device=device)
        if plan.want_aux:
            fields["ent"] = torch.empty(N, dtype=acc, device=device)
            fields["best"] = torch.empty(N, dtype=torch.long, device=device)
        rows = max(1, min(_chunk_rows(plan, acc, 1 + int(plan.want_aux)), N))
        z_full = torch.empty((rows, width), dtype=acc, device=device)
        scratch_full = torch.empty((rows, width), dtype=acc, device=device) if plan.want_aux else None
        block_w = _block_weight(cw, col0, col0 + width)
        w_block = None
        for lo, x in _row_chunks(logits, rows):
            r = x.shape[0]
            z = z_full[:r]
            scores_into(z, x[:, :width], opts, None)
            stats = OnlineStats(opts, shard.vocab, weight_sum=w_sum, y=terms.y[lo : lo + r], want_aux=plan.want_aux)
            stats.update(z, col0, block_w, scratch_full[:r] if plan.want_aux else None)
            for name, t in fields.items():
                t[lo : lo + r] = getattr(stats, name)
            w_block = stats.w_seen
        local = terms.y - col0
        loc = _Local(inside=(local >= 0) & (local < width), w_sum=w_block if smooth else 0.0, **fields)
    result = _combine(loc, shard, opts, terms, w_sum, plan.want_aux)
    loss = reduce(result.loss, plan.reduction, terms.denominator)
    if plan.reduction == "none":
        loss = loss.view(target.shape)
    aux = _aux_columns(result, N, acc, device, plan.want_aux)
    return loss, result.m, result.log_s, terms.denominator, aux


def _logits_backward(grad_loss, logits, target, weight, m, log_s, denominator, plan: _Plan) -> Tensor:
    """``∂loss/∂logits_shard`` from the saved global pair: no communication at all."""
    shard, opts = plan.shard, plan.opts
    acc = accumulation_dtype(logits.dtype)
    device = logits.device
    Vl = logits.shape[-1]
    N = m.shape[0]
    width, col0 = shard.width, shard.col0
    if width == 0 or N == 0:
        return torch.zeros(logits.shape, dtype=logits.dtype, device=device)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=device)
    grad[..., width:] = 0  # padding gets no gradient
    cw, w_sum = _class_weights(weight, shard.vocab, acc, device)
    terms = target_terms(target.reshape(-1), cw, shard.vocab, plan.ignore_index, acc)
    g = (reduction_scale(plan.reduction, denominator) * grad_loss.to(acc).reshape(-1)).expand(N)
    g = torch.where(terms.keep, g, torch.zeros_like(g))
    chain = opts.softcap is not None
    rows = max(1, min(_chunk_rows(plan, acc, 1 + int(chain)), N))
    z_full = torch.empty((rows, width), dtype=acc, device=device)
    scratch_full = [torch.empty((rows, width), dtype=acc, device=device)] if chain else []
    grad_rows = grad.view(-1, Vl)
    block_w = _block_weight(cw, col0, col0 + width)
    for lo, x in _row_chunks(logits, rows):
        r = x.shape[0]
        hi = lo + r
        backward_rows(
            x[:, :width],
            z_full[:r],
            opts,
            m=m[lo:hi],
            log_s=log_s[lo:hi],
            g=g[lo:hi],
            grad_out=grad_rows[lo:hi, :width],
            weight=block_w,
            weight_sum=w_sum,
            y=terms.y[lo:hi],
            w_y=terms.w_y[lo:hi],
            scratch=[b[:r] for b in scratch_full],
            col0=col0,
            vocab_size=shard.vocab,
        )
    return grad


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Eager autograd (not a ``torch.library`` custom op: the forward calls collectives)."""

    @staticmethod
    def forward(ctx, logits, target, weight, plan):
        with torch.autocast(logits.device.type, enabled=False):
            loss, m, log_s, denominator, aux = _logits_forward(logits, target, weight, plan)
        ctx.plan = plan
        ctx.save_for_backward(logits, target, weight, m, log_s, denominator)
        ctx.mark_non_differentiable(m, log_s, denominator, aux)
        ctx.set_materialize_grads(False)
        return loss, m, log_s, denominator, aux

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return None, None, None, None
        logits, target, weight, m, log_s, denominator = ctx.saved_tensors
        with torch.autocast(logits.device.type, enabled=False):
            grad = _logits_backward(grad_loss, logits, target, weight, m, log_s, denominator, ctx.plan)
        return grad, None, None, None


@document
def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    *,
    group=None,
    vocab_size: int | None = None,
    weight: Tensor | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_size: int | None = None,
    return_aux: bool = False,
    impl: str = "auto",
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
    _check_not_dtensor("logits_shard", logits_shard)
    check_float("logits_shard", logits_shard, "of shape (..., V_local)")
    if logits_shard.dim() < 1 or logits_shard.shape[-1] < 1:
        raise ValueError(
            f"logits_shard must have shape (..., V_local) with V_local >= 1 columns, got {_shape(logits_shard)}"
        )
    opts = LossOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
        return_aux=return_aux,
        impl=impl,
    )
    _check_impl(opts.impl)
    group, rank, world = _group_of(group)
    Vl = logits_shard.shape[-1]
    V = _check_vocab_size(vocab_size, world, Vl)
    check_target(target, logits_shard.shape[:-1], V, allow_soft=False, where="vocab_parallel_cross_entropy")
    weight = pick_class_weight(weight, class_weight)
    check_class_weight("weight" if class_weight is None else "class_weight", weight, V)
    check_devices(logits_shard=logits_shard, target=target, weight=weight)
    check_target_range(target, V, opts.ignore_index)

    plan = _Plan(
        shard=_Shard(group, rank, world, Vl, V),
        opts=RowOptions(opts.label_smoothing, opts.z_loss, opts.softcap, opts.logit_scale),
        ignore_index=opts.ignore_index,
        reduction=opts.reduction,
        chunk_size=opts.chunk_size,
        want_aux=opts.return_aux,
    )
    loss, m, log_s, denominator, aux = _VocabParallelCrossEntropy.apply(logits_shard, target, weight, plan)
    if not opts.return_aux:
        return loss
    keep = target.reshape(-1) != opts.ignore_index
    return loss, build_aux(aux, m, log_s, denominator, keep, logits_shard.shape[:-1], opts.reduction)


def _check_impl(impl: str) -> None:
    if impl == "triton":
        raise ValueError(
            'impl="triton" is not available for the vocabulary-parallel losses yet; use impl="auto" or "torch" '
            "(each rank's block is computed by the chunked PyTorch backend)"
        )


# --------------------------------------------------------------------------------------------
# vocab_parallel_linear_cross_entropy: the loop over vocabulary chunks of this rank's weight
# --------------------------------------------------------------------------------------------


class _LinearProblem:
    """One call's inputs, flattened, in the accumulation dtype, ignored tokens dropped on CPU
    (the target is the same on every rank, so every rank drops the same tokens)."""

    def __init__(self, hidden, weight, bias, target, class_weight, plan: _Plan):
        self.plan = plan
        self.shard = plan.shard
        self.acc = acc = accumulation_dtype(weight.dtype)
        self.device = hidden.device
        self.N, self.D = hidden.shape
        self.cw, self.w_sum = _class_weights(class_weight, plan.shard.vocab, acc, hidden.device)
        terms = target_terms(target, self.cw, plan.shard.vocab, plan.ignore_index, acc)
        self.denominator = terms.denominator
        self.rows = None
        if self.device.type == "cpu" and not bool(terms.keep.all()):
            self.rows = terms.keep.nonzero().squeeze(-1)
            hidden = hidden.index_select(0, self.rows)
            terms.y, terms.w_y, terms.keep = terms.y[self.rows], terms.w_y[self.rows], terms.keep[self.rows]
        self.terms = terms
        self.h = hidden.to(acc)
        self.n = self.h.shape[0]
        self.weight, self.bias = weight, bias

    def chunk(self, want_aux: bool, grad: bool) -> int:
        if self.plan.chunk_size is not None:
            return self.plan.chunk_size
        buffers = 1 + int(want_aux) + int(grad and self.plan.opts.softcap is not None)
        return vocab_chunk_rows(self.n, self.D, self.acc, buffers)  # the single-process vocab loop's rule

    def blocks(self, cols: int):
        """(lo, hi) local rows of the weight, over its real (unpadded) rows only."""
        for lo in range(0, self.shard.width, cols):
            yield lo, min(self.shard.width, lo + cols)

    def scores(self, lo: int, hi: int, buf: Tensor) -> tuple[Tensor, Tensor]:
        """(``h @ W[lo:hi].T + b[lo:hi]`` in a contiguous view of ``buf``, the weight slice)."""
        z = buf.view(-1)[: self.n * (hi - lo)].view(self.n, hi - lo)
        w = self.weight[lo:hi].to(self.acc)
        logits_into(z, self.h, w, self.bias[lo:hi].to(self.acc) if self.bias is not None else None)
        return z, w

    def row_scale(self, grad_loss: Tensor | None) -> Tensor:
        g = reduction_scale(self.plan.reduction, self.denominator).expand(self.n)
        if grad_loss is not None:
            upstream = grad_loss.to(self.acc).reshape(-1)
            if upstream.numel() > 1 and self.rows is not None:
                upstream = upstream[self.rows]
            g = g * upstream
        return torch.where(self.terms.keep, g, torch.zeros_like(g))

    def scatter(self, values: Tensor, fill: float = 0.0) -> Tensor:
        if self.rows is None:
            return values
        out = values.new_full((self.N,) + values.shape[1:], fill)
        return out.index_copy_(0, self.rows, values)


def _linear_stats(p: _LinearProblem, want_aux: bool):
    """Pass 1: this rank's block statistics (one product), then the two collectives."""
    plan, shard, opts, t = p.plan, p.shard, p.plan.opts, p.terms
    smooth = opts.label_smoothing != 0.0
    if shard.width == 0 or p.n == 0:
        loc = _Local.padding_only(p.n, p.acc, p.device, smooth, want_aux)
    else:
        cols = max(1, min(p.chunk(want_aux, False), shard.width))
        z_full = torch.empty(p.n * cols, dtype=p.acc, device=p.device)
        scratch_full = torch.empty(p.n * cols, dtype=p.acc, device=p.device) if want_aux else None
        stats = OnlineStats(opts, shard.vocab, weight_sum=p.w_sum, y=t.y, want_aux=want_aux)
        for lo, hi in p.blocks(cols):
            z, _ = p.scores(lo, hi, z_full)
            scores_into(z, z, opts, None)  # the scale and the soft cap
            scratch = scratch_full[: p.n * (hi - lo)].view(p.n, hi - lo) if want_aux else None
            stats.update(z, shard.col0 + lo, _block_weight(p.cw, shard.col0 + lo, shard.col0 + hi), scratch)
        loc = _Local.of(stats, t.y, shard.col0, shard.width)
    return _combine(loc, shard, opts, t, p.w_sum, plan.want_aux)


def _linear_gradients(p: _LinearProblem, m, log_s, g, need_h, need_w, need_b):
    """Pass 2: recompute each vocabulary chunk's logits and turn them into this rank's gradients:
    ∂/∂W_r and ∂/∂b_r (complete), ∂/∂hidden (this rank's partial sum, accumulation dtype)."""
    shard, opts, t = p.shard, p.plan.opts, p.terms
    Vl = p.weight.shape[0]
    grad_h = torch.zeros((p.n, p.D), dtype=p.acc, device=p.device) if need_h else None
    grad_w = torch.zeros((Vl, p.D), dtype=p.weight.dtype, device=p.device) if need_w else None
    bias_dtype = p.bias.dtype if p.bias is not None else p.weight.dtype
    grad_b = torch.zeros(Vl, dtype=bias_dtype, device=p.device) if need_b else None
    if shard.width == 0 or p.n == 0:
        return grad_h, grad_w, grad_b
    cols = max(1, min(p.chunk(False, True), shard.width))
    z_full = torch.empty(p.n * cols, dtype=p.acc, device=p.device)
    chain_full = torch.empty(p.n * cols, dtype=p.acc, device=p.device) if opts.softcap is not None else None
    for lo, hi in p.blocks(cols):
        z, w = p.scores(lo, hi, z_full)
        scratch = [chain_full[: p.n * (hi - lo)].view(p.n, hi - lo)] if chain_full is not None else []
        backward_rows(
            z,
            z,
            opts,
            m=m,
            log_s=log_s,
            g=g,
            grad_out=z,
            weight=_block_weight(p.cw, shard.col0 + lo, shard.col0 + hi),
            weight_sum=p.w_sum,
            y=t.y,
            w_y=t.w_y,
            scratch=scratch,
            col0=shard.col0 + lo,
            vocab_size=shard.vocab,
        )
        if grad_w is not None:  # this chunk's rows: float32 accumulation inside the product, rounded once
            grad_w[lo:hi] = torch.mm(z.T, p.h)
        if grad_b is not None:
            grad_b[lo:hi] = z.sum(0)
        if grad_h is not None:
            grad_h.addmm_(z, w)
    return grad_h, grad_w, grad_b


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Eager autograd (not a ``torch.library`` custom op: forward and backward communicate).

    With a scalar loss the gradients are computed during the forward (the second pass of the
    vocabulary loop); backward scales them and all-reduces ``∂loss/∂hidden`` — its only
    collective. With ``reduction="none"`` backward recomputes them from the saved pair.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, class_weight, plan, need):
        need_h, need_w, need_b = need
        with torch.autocast(hidden.device.type, enabled=False):
            p = _LinearProblem(hidden, weight, bias, target, class_weight, plan)
            stats = _linear_stats(p, plan.want_aux)
            grads = None
            if (need_h or need_w or need_b) and plan.reduction != "none":
                grads = _linear_gradients(p, stats.m, stats.log_s, p.row_scale(None), need_h, need_w, need_b)
        token_loss = p.scatter(stats.loss)
        loss = reduce(token_loss, plan.reduction, p.denominator)
        m, log_s = p.scatter(stats.m), p.scatter(stats.log_s)
        aux = _aux_columns(stats, p.n, p.acc, p.device, plan.want_aux)
        if plan.want_aux:
            aux = p.scatter(aux)
        ctx.plan, ctx.need, ctx.grads = plan, need, grads
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, bias, target, class_weight, m, log_s)
        ctx.mark_non_differentiable(m, log_s, p.denominator, aux)
        ctx.set_materialize_grads(False)
        return loss, m, log_s, p.denominator, aux

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        none = (None,) * 7
        if grad_loss is None:
            return none
        hidden, weight, bias, target, class_weight, m, log_s = ctx.saved_tensors
        need_h, need_w, need_b = ctx.need
        with torch.autocast(hidden.device.type, enabled=False):
            p = _LinearProblem(hidden, weight, bias, target, class_weight, ctx.plan)
            if ctx.grads is not None:
                grads, ctx.grads = ctx.grads, None  # scaled in place: a second backward recomputes
                for grad in grads:
                    if grad is not None:
                        _scale_(grad, grad_loss)
                grad_h, grad_w, grad_b = grads
            else:
                if p.rows is not None:
                    m, log_s = m[p.rows], log_s[p.rows]
                grad_h, grad_w, grad_b = _linear_gradients(p, m, log_s, p.row_scale(grad_loss), need_h, need_w, need_b)
            if grad_h is not None:
                if p.shard.world > 1:  # the one collective of backward: Σ over ranks of ∂/∂hidden
                    dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=p.shard.group)
                grad_h = p.scatter(grad_h).to(hidden.dtype)
        return (
            grad_h if need_h else None,
            grad_w if need_w else None,
            grad_b if (need_b and ctx.has_bias) else None,
            None,
            None,
            None,
            None,
        )


@document
def vocab_parallel_linear_cross_entropy(
    hidden: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    *,
    bias_shard: Tensor | None = None,
    group=None,
    vocab_size: int | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    shift: int = 0,
    chunk_size: int | None = None,
    return_aux: bool = False,
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
    check_tensor("hidden", hidden, "(..., D) floating")
    check_tensor("weight_shard", weight_shard, "(V_local, D) floating")
    _check_not_dtensor("hidden", hidden)
    _check_not_dtensor("weight_shard", weight_shard)
    check_float("hidden", hidden, "of shape (..., D)")
    check_float("weight_shard", weight_shard, "of shape (V_local, D)")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape (..., D), got {_shape(hidden)}")
    if weight_shard.dim() != 2 or weight_shard.shape[0] < 1:
        raise ValueError(
            f"weight_shard must have shape (V_local, D) with V_local >= 1 (nn.Linear layout), "
            f"got {_shape(weight_shard)}"
        )
    Vl, D = weight_shard.shape
    if hidden.shape[-1] != D:
        raise ValueError(
            f"hidden's last dim must equal weight_shard's D={D} (weight_shard is (V_local, D) = "
            f"{tuple(weight_shard.shape)}), got hidden of shape {_shape(hidden)}"
        )
    if bias_shard is not None:
        check_tensor("bias_shard", bias_shard, f"({Vl},)")
        _check_not_dtensor("bias_shard", bias_shard)
        check_float("bias_shard", bias_shard, f"of shape ({Vl},)")
        if bias_shard.dim() != 1 or bias_shard.shape[0] != Vl:
            raise ValueError(
                f"bias_shard must have shape ({Vl},) (one per row of weight_shard), got {_shape(bias_shard)}"
            )
    opts = LossOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
        return_aux=return_aux,
        impl=impl,
        shift=shift,
    )
    _check_impl(opts.impl)
    group, rank, world = _group_of(group)
    V = _check_vocab_size(vocab_size, world, Vl)
    check_target(target, hidden.shape[:-1], V, allow_soft=False, where="vocab_parallel_linear_cross_entropy")
    if opts.shift and target.dim() < 1:
        raise ValueError(f"shift={opts.shift} needs a target with a sequence dim (..., T), got {_shape(target)}")
    check_class_weight("class_weight", class_weight, V)
    device = check_devices(
        hidden=hidden, weight_shard=weight_shard, target=target, bias_shard=bias_shard, class_weight=class_weight
    )
    if torch.is_autocast_enabled(device.type):  # cast as F.linear is cast under autocast
        dtype = torch.get_autocast_dtype(device.type)
        hidden, weight_shard = hidden.to(dtype), weight_shard.to(dtype)
        bias_shard = bias_shard.to(dtype) if bias_shard is not None else None
    else:
        for name, t in (("weight_shard", weight_shard), ("bias_shard", bias_shard)):
            if t is not None and t.dtype != hidden.dtype:
                raise TypeError(
                    f"hidden, weight_shard and bias_shard must share one dtype outside torch.autocast; got "
                    f"hidden {hidden.dtype} and {name} {t.dtype}"
                )
    check_target_range(target, V, opts.ignore_index)
    aligned = shift_target(target, opts.shift, opts.ignore_index)

    plan = _Plan(
        shard=_Shard(group, rank, world, Vl, V),
        opts=RowOptions(opts.label_smoothing, opts.z_loss, opts.softcap, opts.logit_scale),
        ignore_index=opts.ignore_index,
        reduction=opts.reduction,
        chunk_size=opts.chunk_size,
        want_aux=opts.return_aux,
    )
    grad_on = torch.is_grad_enabled()
    need = (
        grad_on and hidden.requires_grad,
        grad_on and weight_shard.requires_grad,
        grad_on and bias_shard is not None and bias_shard.requires_grad,
    )
    lead = hidden.shape[:-1]
    loss, m, log_s, denominator, aux = _VocabParallelLinearCrossEntropy.apply(
        hidden.reshape(-1, D), weight_shard, bias_shard, aligned.reshape(-1), class_weight, plan, need
    )
    if opts.reduction == "none":
        loss = loss.reshape(lead)
    if not opts.return_aux:
        return loss
    keep = aligned != opts.ignore_index
    aux_out = build_aux(aux, m, log_s, denominator, keep.reshape(-1), lead, opts.reduction)
    zero = torch.zeros((), dtype=aux_out.lse.dtype, device=device)
    return loss, aux_out._replace(
        lse=torch.where(keep, aux_out.lse, zero), entropy=torch.where(keep, aux_out.entropy, zero)
    )


# --------------------------------------------------------------------------------------------
# global_normalizer
# --------------------------------------------------------------------------------------------


def global_normalizer(
    target: Tensor | Sequence[Tensor],
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    group=None,
) -> Tensor:
    """The ``"mean"`` denominator of a whole global batch, summed over micro-batches and ranks.

    For hard targets, ``n = Σ_{ranks} Σ_{micro-batches} Σ_{tokens kept} w_y`` (the number of
    non-ignored tokens without class weights); a soft target (..., V) counts its rows. Dividing
    each micro-batch's ``reduction="sum"`` loss by ``n`` makes the accumulated gradient exactly
    that of the mean over the global batch — not a mean of per-micro-batch means, which weights a
    token by the inverse of its micro-batch's size. Under DDP, which averages gradients over its
    ``W`` ranks, multiply the loss by ``W`` (``dist.get_world_size(group)``)::

        n = global_normalizer([mb.labels for mb in micro_batches], group=dp_group)   # once
        for mb in micro_batches:                                                       # per step
            loss = crossent.cross_entropy(model(mb.x), mb.labels, reduction="sum") * W / n
            loss.backward()

    One all-reduce (of one element) per call: give it the targets of every micro-batch of the
    step at once. It is 0 only when no token counts anywhere (every loss is then 0 too).

    Args:
        target: (...) integer class ids, or a list of them (one per micro-batch; any shapes), on
            this rank. A floating (..., V) tensor is a soft target: its rows count 1 each.
        weight: (V,) class weights (the loss's ``weight=`` / ``class_weight=``): the count becomes
            ``Σ w_y``. ``None``: every kept token counts 1.
        ignore_index: target id that does not count (default -100).
        group: the data-parallel process group to sum over; ``None``: the default group (no
            communication when ``torch.distributed`` is not initialised).

    Returns:
        0-dim float32 tensor (float64 for float64 class weights) on the targets' device, the same
        on every rank; summed in float64, so token counts are exact.

    Example:
        >>> import torch
        >>> from crossent.distributed import global_normalizer
        >>> micro_batches = [torch.tensor([[3, 1, -100]]), torch.tensor([[2, -100, -100, 5]])]
        >>> global_normalizer(micro_batches)  # on one process; with DDP: summed over the ranks
        tensor(4.)
    """
    targets = [target] if isinstance(target, Tensor) else list(target) if isinstance(target, (list, tuple)) else None
    if not targets:
        raise TypeError(
            f"target must be a torch.Tensor of class ids or a non-empty list of them, got {type(target).__name__}"
        )
    opts = LossOptions(ignore_index=ignore_index)
    for i, t in enumerate(targets):
        name = "target" if isinstance(target, Tensor) else f"target[{i}]"
        check_tensor(name, t, "class ids")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"{name} must hold integer class ids (or float probabilities), got dtype {t.dtype}")
    if weight is not None:
        check_tensor("weight", weight, "(V,) class weights")
        check_float("weight", weight, "of shape (V,)")
        if weight.dim() != 1:
            raise ValueError(f"weight must have shape (V,) (one weight per class), got {_shape(weight)}")
    device = check_devices(weight=weight, **{f"target[{i}]": t for i, t in enumerate(targets)})
    group, _, world = _group_of(group)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in targets:
        if t.is_floating_point():
            if weight is not None and t.shape[-1:] != weight.shape:
                raise ValueError(f"a soft target's last dim must be V={weight.shape[0]}, got {_shape(t)}")
            total += math.prod(t.shape[:-1])
        elif weight is None:
            total += (t != opts.ignore_index).sum()
        else:
            check_target_range(t, weight.shape[0], opts.ignore_index)
            terms = target_terms(t.reshape(-1), weight, weight.shape[0], opts.ignore_index, torch.float64)
            total += terms.denominator
    if world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.to(torch.float64 if weight is not None and weight.dtype == torch.float64 else torch.float32)
