"""The one step that the vocabulary-parallel losses add to the core's loops: every rank's block
statistics merged into the global per-token statistics, with two collectives of O(N) elements."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..core.chunks import Shard
from ..core.online import BlockPartials
from ..core.rows import RowOptions, RowStats, RowSums, TargetTerms, finish_rows, weighted


def _all_gather(out, t, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t, group=group)


def combine(
    loc: BlockPartials, shard: Shard, opts: RowOptions, terms: TargetTerms, weight_sum, want_aux: bool
) -> RowStats:
    """Every rank's block statistics merged into the global per-token :class:`RowStats`.

    Collective 1 gathers the per-rank pairs ``(m_r, S_r)`` (2·world·n elements) and merges them
    by DESIGN.md §1's rule, identically on every rank. Each rank then rebases its partial sums on
    the global maximum and collective 2 sums them, packed in one (n, k) tensor: the target score
    ``z_y - m`` (from the rank holding it), ``Σ w_j (z_j - m)``, ``Σ e^(z_j - m)(z_j - m)`` and
    the argmax hit (from the rank holding the first maximum). A world of one communicates nothing.
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
