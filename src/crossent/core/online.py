"""Per-token statistics of rows seen one vocabulary block at a time (DESIGN.md §1's online merge).

Used by every loop whose chunks are columns of the logits rather than whole rows: the "vocab"
schedule of the fused loss, and any loop over a vocabulary shard (the vocabulary-parallel losses).
:class:`BlockPartials` is what one block (or one rank's shard) contributes before blocks are
merged across ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .rows import (
    RowOptions,
    RowStats,
    RowSums,
    exp_,
    finish_rows,
    finite_floor,
    put_wide_rows,
    row_max,
    rowdot,
    weighted,
)


class OnlineStats:
    """Per-token statistics of rows seen one vocabulary block at a time (the "vocab" loops).

    Each :meth:`update` takes the scores of columns ``[col0, col0 + w)`` for every token and
    merges them into the running pair with DESIGN.md §1's rule ``m' = max(m1, m2)``,
    ``S' = S1·e^(m1−m') + S2·e^(m2−m')``, together with the target score, the smoothing sum
    ``(ε/V)·Σ w_j (z_j − m)`` (``V`` = ``vocab_size``, the whole vocabulary's) and, for
    ``return_aux``, the entropy sum and the argmax.
    """

    def __init__(self, opts: RowOptions, vocab_size: int, *, weight_sum: Tensor, y: Tensor, want_aux: bool):
        self.opts, self.weight_sum, self.y, self.want_aux = opts, weight_sum, y, want_aux
        self.smooth_scale = opts.label_smoothing / vocab_size  # ε/V of the whole vocabulary
        self.m = self.s = self.z_y = self.wz = self.w_seen = self.ent = self.best = None

    def update(self, z: Tensor, col0: int, weight: Tensor | None, scratch: Tensor | None = None) -> None:
        """Merge the block ``z`` (N, w) of scaled, capped scores; ``z`` is overwritten.

        ``weight`` is the block's slice of the class weights; ``scratch`` an (N, w) buffer
        (needed only with ``want_aux``).
        """
        width = z.shape[-1]
        local = self.y - col0
        inside = (local >= 0) & (local < width)
        z_y = z.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)  # raw score
        smooth = self.opts.label_smoothing != 0.0
        w = None
        if smooth:  # pre-scaled by ε/V (see smoothing_weights)
            w = torch.full((width,), self.smooth_scale, dtype=z.dtype, device=z.device)
            if weight is not None:
                w = w * weight
            w_b = w.sum()
        m_b, wide = row_max(z, z.dtype, w)
        if self.want_aux:
            best_b = z.argmax(-1) + col0
        z.sub_(m_b.unsqueeze(-1))
        if smooth:
            wz_b = z @ w
            put_wide_rows(wz_b, wide)
        if self.want_aux:
            e = exp_(z, out=scratch)
            t_b = rowdot(e, finite_floor(z))
        else:
            e = exp_(z)
        s_b = e.sum(-1)

        if self.m is None:  # the first block
            self.m, self.s = m_b, s_b
            self.z_y = torch.where(inside, z_y, torch.full_like(z_y, float("nan")))
            if smooth:
                self.wz, self.w_seen = wz_b, w_b
            if self.want_aux:
                self.ent, self.best = t_b, best_b
            return
        m = torch.maximum(self.m, m_b)
        d_old, d_new = self.m - m, m_b - m  # <= 0; exactly 0 for the block holding the maximum
        a, b = torch.exp(d_old), torch.exp(d_new)
        if self.want_aux:  # Σ e^(z−m)(z−m) = e^(m_b−m)·(Σ e^(z−m_b)(z−m_b) + (m_b−m)·S_b)
            self.ent = weighted(a, self.ent + d_old * self.s) + weighted(b, t_b + d_new * s_b)
            self.best = torch.where(m_b > self.m, best_b, self.best)  # ties keep the first index
        self.s = a * self.s + b * s_b
        if smooth:  # Σ w_j (z_j − m) = Σ w_j (z_j − m_b) + (m_b − m)·Σ w_j, per block (w pre-scaled);
            # the differences of maxima in halves, which cannot overflow
            half_old, half_new = self.m * 0.5 - m * 0.5, m_b * 0.5 - m * 0.5
            self.wz = self.wz + 2.0 * (half_old * self.w_seen) + wz_b + 2.0 * (half_new * w_b)
            self.w_seen = self.w_seen + w_b
        self.z_y = torch.where(inside, z_y, self.z_y)
        self.m = m

    def finish(self, vocab_size: int, w_y: Tensor, keep: Tensor) -> RowStats:
        log_s = self.s.log()
        sums = RowSums(m=self.m, log_s=log_s, z_y=self.z_y - self.m, wz=self.wz)
        if self.want_aux:
            sums.p_dot_z = self.ent / self.s
            sums.hit = (self.best == self.y).to(self.m.dtype)
        return finish_rows(
            sums, self.opts, vocab_size, w_y=w_y, keep=keep, weight_sum=self.weight_sum, want_aux=self.want_aux
        )


@dataclass
class BlockPartials:
    """Per-token statistics of one vocabulary block (a rank's shard), relative to its own max."""

    m: Tensor  # max over the block (-inf for a block of padding only)
    s: Tensor  # Σ exp(z - m) over the block (0 for padding only)
    z_y: Tensor  # raw score of the target where the block holds it (anything elsewhere)
    inside: Tensor  # bool: the block holds the target's column
    wz: Tensor | None = None  # Σ w_j (z_j - m) over the block (label smoothing, w pre-scaled by ε/V)
    w_sum: Tensor | float = 0.0  # Σ w_j over the block's real columns (label smoothing)
    ent: Tensor | None = None  # Σ e^(z - m) (z - m) over the block (aux)
    best: Tensor | None = None  # global index of the block's first argmax (aux)

    @staticmethod
    def padding_only(n: int, acc, device, smooth: bool, want_aux: bool) -> BlockPartials:
        zeros = torch.zeros(n, dtype=acc, device=device)
        return BlockPartials(
            m=torch.full((n,), -math.inf, dtype=acc, device=device),
            s=zeros,
            z_y=zeros,
            inside=torch.zeros(n, dtype=torch.bool, device=device),
            wz=zeros if smooth else None,
            ent=zeros if want_aux else None,
            best=torch.full((n,), -1, dtype=torch.long, device=device) if want_aux else None,
        )

    @staticmethod
    def of(stats: OnlineStats, y: Tensor, col0: int, width: int) -> BlockPartials:
        local = y - col0
        return BlockPartials(
            m=stats.m,
            s=stats.s,
            z_y=stats.z_y,
            inside=(local >= 0) & (local < width),
            wz=stats.wz,
            w_sum=stats.w_seen if stats.wz is not None else 0.0,
            ent=stats.ent,
            best=stats.best,
        )
