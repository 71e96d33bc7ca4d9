"""`LossAux`: what ``return_aux=True`` adds to a loss, for logging (all detached)."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class LossAux(NamedTuple):
    """The parts and statistics of one loss call; every field is detached.

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
    """

    ce: Tensor
    z_loss: Tensor
    lse: Tensor
    entropy: Tensor
    n_tokens: Tensor
    weight_sum: Tensor
    accuracy: Tensor
