"""How a call is cut into chunks: row blocks that are views, chunk sizes from the memory budget, and
the vocabulary shard a loop runs over.

Chunk sizes depend on shapes, dtypes and the memory budget only (never on N where that would
recompile a compiled graph for a new sequence length, never on free memory), so a run is
reproducible bit for bit.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import CHUNK_ELEMENTS, MAX_TOKEN_ROWS, PRODUCT_ROWS_MULTIPLE, rows_per_chunk


@dataclass(frozen=True)
class Shard:
    """The columns ``[col0, col0 + local)`` of a vocabulary of ``vocab`` real classes that this
    process holds: rank ``rank`` of ``world`` in ``group`` (a whole vocabulary: one rank of one).
    Columns at or past ``vocab`` are padding."""

    group: object
    rank: int
    world: int
    local: int  # columns per rank (the padded vocabulary is world·local)
    vocab: int  # the real V

    @staticmethod
    def whole(vocab_size: int) -> Shard:
        return Shard(group=None, rank=0, world=1, local=vocab_size, vocab=vocab_size)

    @property
    def col0(self) -> int:
        return self.rank * self.local

    @property
    def width(self) -> int:
        """Real (unpadded) columns of this shard, 0 to ``local``."""
        return max(0, min(self.local, self.vocab - self.col0))


def item_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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


def logit_chunk_rows(width: int, acc: torch.dtype, buffers: int) -> int:
    """Rows per chunk of a logits loop: ``buffers`` float buffers of ``width`` columns within the
    budget, and at most :data:`CHUNK_ELEMENTS` elements (never from N: no recompile for a new length)."""
    width = max(1, width)
    return rows_per_chunk(width * item_size(acc), buffers=buffers, cap=max(1, CHUNK_ELEMENTS // width))


def token_chunk_rows(vocab_size: int, acc: torch.dtype, buffers: int) -> int:
    """Tokens per chunk of the linear "token" schedule (whole product tiles)."""
    row_bytes = vocab_size * item_size(acc)
    return rows_per_chunk(row_bytes, buffers=buffers, cap=MAX_TOKEN_ROWS, multiple=PRODUCT_ROWS_MULTIPLE)


def vocab_chunk_rows(n_tokens: int, hidden_size: int, acc: torch.dtype, buffers: int) -> int:
    """Vocabulary rows per chunk of the linear "vocab" schedule: ``buffers`` (N, w) score buffers
    plus the weight slice within the budget (whole product tiles)."""
    return rows_per_chunk(item_size(acc) * (max(1, n_tokens) * buffers + hidden_size), multiple=PRODUCT_ROWS_MULTIPLE)


def cache_blocks(lo: int, hi: int, width: int):
    """Sub-ranges of the rows ``[lo, hi)`` of a chunk ``width`` columns wide, of at most
    :data:`CHUNK_ELEMENTS` elements each: the products take the whole chunk (large products are
    efficient), the row math a block that stays in the caches across its passes."""
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    for a in range(lo, hi, step):
        yield a, min(hi, a + step)


def scratch_buffers(*, soft=False, softcap=False, want_grad=False, want_aux=False) -> int:
    """How many (rows, width) float buffers a chunk's row math needs beyond the scores ``z``: one
    for soft-target weights, one for the soft cap's chain factor (with a gradient), one for the
    entropy's exponentials (with ``return_aux``)."""
    return int(soft) + int(softcap and want_grad) + int(want_aux)


def token_chunks(p, rows: int):
    """The "token" loop of a fused classifier, for every backend: yield ``(lo, hi, h, z, w)`` per
    chunk of ``rows`` tokens — their hidden states ``h`` (r, D), their logits ``z`` (r, V) against
    the whole classifier, formed by one product into a reused buffer, and the classifier ``w`` as
    the product took it.

    ``p`` is a backend's view of the call: ``n`` tokens, ``V`` classes, ``h_rows(lo, hi)``,
    ``weight_rows(lo, hi)``, ``logits(h, w, lo, hi, out)`` and ``buffer(numel)``.
    """
    rows = max(1, min(rows, p.n))
    V = p.weight.shape[0]
    buffer = p.buffer(rows * V)
    w = p.weight_rows(0, V)
    for lo in range(0, p.n, rows):
        hi = min(p.n, lo + rows)
        h = p.h_rows(lo, hi)
        yield lo, hi, h, p.logits(h, w, 0, V, buffer[: (hi - lo) * V].view(hi - lo, V)), w


def column_chunks(p, cols: int):
    """The "vocab" loop of a fused classifier, for every backend: yield ``(lo, hi, z, w)`` per
    chunk of ``cols`` rows of the classifier (local rows of ``p.shard``'s real columns) — the
    logits ``z`` (n, hi - lo) of every token against them, formed by one product into a reused
    buffer, and the rows ``w`` as the product took them."""
    width = p.shard.width
    cols = max(1, min(cols, width))
    buffer = p.buffer(max(1, p.n) * cols)
    for lo in range(0, width, cols):
        hi = min(width, lo + cols)
        w = p.weight_rows(lo, hi)
        yield lo, hi, p.logits(p.h_all, w, lo, hi, buffer[: p.n * (hi - lo)].view(p.n, hi - lo)), w
