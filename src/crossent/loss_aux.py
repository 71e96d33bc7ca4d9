"""`LossAux`: what ``return_aux=True`` adds to a loss, for logging (all detached)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .core.rows import reduce


class LossAux(NamedTuple):
    """The parts and statistics of one loss call; every field is detached.

    With ``m = max_j z_j``, ``S = Σ_j exp(z_j - m)`` and ``p_j = exp(z_j - m) / S`` per token
    (``z`` the scaled, capped logits): ``lse = m + log S``, ``entropy = -Σ_j p_j·log p_j =
    log S - Σ_j p_j·(z_j - m)``, and ``ce + z_loss`` is the loss. Everything is computed in the
    loss's own pass, without a host sync. :func:`crossent.linear_cross_entropy` (and the
    vocabulary-parallel linear loss) report ``lse`` and ``entropy`` as 0 at ignored positions;
    :func:`crossent.cross_entropy` reports them for every row.

    Fields:
        ce: the cross-entropy part, reduced like the loss.
        z_loss: the z-loss part ``c·w_y·lse²``, reduced like the loss (0 when ``z_loss=0``).
        lse: per-token log-sum-exp ``m + log S`` of the (scaled, capped) logits; float32
            (float64 for float64 inputs), the target's shape (rows for soft targets).
        entropy: per-token entropy ``-Σ p log p`` of the predicted distribution; same form as
            ``lse``.
        n_tokens: non-ignored tokens (rows, for soft targets); 0-dim int64, no host sync.
        weight_sum: ``Σ w_y`` over non-ignored tokens, the ``"mean"`` denominator; 0-dim float32.
        accuracy: fraction of non-ignored tokens whose argmax is the target (soft targets: the
            argmax of the target row); 0 when there are none. 0-dim float32.

    Example:
        >>> import torch, crossent
        >>> logits = torch.tensor([[1.2, 3.1, 0.7, 2.4, 0.9], [0.5, 1.8, 2.9, 1.1, 0.3]])
        >>> loss, aux = crossent.cross_entropy(logits, torch.tensor([1, -100]), z_loss=1e-4, return_aux=True)
        >>> int(aux.n_tokens), aux.accuracy.item(), torch.allclose(aux.ce + aux.z_loss, loss)
        (1, 1.0, True)
        >>> aux.lse
        tensor([3.7139, 3.4087])
    """

    ce: Tensor
    z_loss: Tensor
    lse: Tensor
    entropy: Tensor
    n_tokens: Tensor
    weight_sum: Tensor
    accuracy: Tensor


def build_aux(
    aux: Tensor,
    m: Tensor,
    log_s: Tensor,
    denominator: Tensor,
    keep: Tensor | None,
    lead_shape,
    reduction: str,
    *,
    zero_ignored: bool = False,
) -> LossAux:
    """Assemble :class:`LossAux` from a backend's per-token columns (ce, z-loss, entropy, correct).

    ``keep`` marks the kept tokens (None: every row, soft targets); with ``zero_ignored`` the
    per-token ``lse`` and ``entropy`` are 0 where a token is not kept (the fused losses, which
    never read the logits of an ignored token).
    """
    aux, m, log_s, denominator = aux.detach(), m.detach(), log_s.detach(), denominator.detach()
    n_tokens = keep.sum() if keep is not None else torch.tensor(m.shape[0], device=m.device)
    correct = aux[:, 3].sum()
    accuracy = torch.where(n_tokens > 0, correct / n_tokens.clamp(min=1), torch.zeros_like(correct))
    lse, entropy = (m + log_s).reshape(lead_shape), aux[:, 2].reshape(lead_shape)
    if zero_ignored:
        kept = keep.reshape(lead_shape)
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        lse, entropy = torch.where(kept, lse, zero), torch.where(kept, entropy, zero)
    reduced_shape = lead_shape if reduction == "none" else ()
    return LossAux(
        ce=reduce(aux[:, 0], reduction, denominator).reshape(reduced_shape),
        z_loss=reduce(aux[:, 1], reduction, denominator).reshape(reduced_shape),
        lse=lse,
        entropy=entropy,
        n_tokens=n_tokens.to(torch.int64),
        weight_sum=denominator.to(torch.float32),
        accuracy=accuracy.to(torch.float32),
    )


def fused_result(outputs, aligned: Tensor, reduction: str, ignore_index: int, return_aux: bool):
    """What a fused (classifier + loss) call returns, from its op's (loss, m, log_s, denominator,
    aux) and its shifted target: the loss in the target's shape for ``"none"``, and with
    ``return_aux`` its :class:`LossAux` (``lse`` and ``entropy`` 0 at ignored positions)."""
    loss, m, log_s, denominator, aux = outputs
    lead = aligned.shape
    if reduction == "none":
        loss = loss.reshape(lead)
    if not return_aux:
        return loss
    keep = aligned != ignore_index
    return loss, build_aux(aux, m, log_s, denominator, keep, lead, reduction, zero_ignored=True)
