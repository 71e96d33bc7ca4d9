"""DESIGN.md §1 in float64: the oracle every backend is judged against, and :func:`explain`.

Written to be read, not to be fast: one formula per line, in the order of DESIGN.md §1, on whole
tensors, differentiable by autograd (tests take reference gradients with ``.backward()`` on
float64 leaves). Every intermediate is asserted to be float64: a bool mask times a Python float
silently gives float32, and an oracle must not round.

The log-probabilities are formed the seed's way, ``log p_j = (z_j - m) - log S`` with
``m = max z`` and ``S = Σ exp(z - m)``: never ``lse - z_j``, which loses every digit of a row like
``-1e30 + noise`` (there ``lse`` and ``z_j`` agree in all their leading digits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .loss_aux import LossAux

f64 = torch.float64


def _is64(*tensors: Tensor) -> None:
    for t in tensors:
        assert t.dtype == f64, f"reference intermediate is {t.dtype}, not float64"


def log_softmax_pair(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(log_p, m, log_s)`` for float64 scores ``z`` (..., V), the seed's way."""
    _is64(z)
    m = z.amax(-1, keepdim=True).detach()  # the result does not depend on m: no gradient through it
    shifted = z - m  # every exponent <= 0, one of them exactly 0
    log_s = torch.log(torch.exp(shifted).sum(-1, keepdim=True))  # S in [1, V]: never 0, never inf
    log_p = shifted - log_s  # (z_j - m) - log S, in this order
    _is64(shifted, log_s, log_p)
    return log_p, m.squeeze(-1), log_s.squeeze(-1)


def scores(logits: Tensor, *, softcap: float | None = None, logit_scale: float = 1.0) -> Tensor:
    """Step 1 of §1: ``z = s·x``, then ``z = k·tanh(z/k)`` when a soft cap ``k`` is set."""
    z = logits.to(f64) * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    _is64(z)
    return z


def cross_entropy(
    logits: Tensor, target: Tensor, *, weight: Tensor | None = None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
    logit_scale: float = 1.0, return_aux: bool = False,
):
    """DESIGN.md §1 in float64 for logits (..., V) and a hard (...) or soft (..., V) target.

    ``z = s·x`` (then ``k·tanh(z/k)``), ``log p = (z - m) - log S``, and per token
    ``ℓ = -(1-ε)·w_y·log p_y - (ε/V)·Σ_j w_j·log p_j + c·w_y·lse²`` (hard) or
    ``ℓ = -Σ_j w_j·p'_j·log p_j + c·lse²`` with ``p' = (1-ε)·p + ε/V`` (soft), reduced by
    ``reduction`` ("mean": Σℓ / Σ w_y, exactly 0 when that is 0). Arguments are those of
    :func:`crossent.cross_entropy` (any dtype in; every intermediate float64). An id outside
    ``[0, V)`` that is not ``ignore_index`` raises ``IndexError``.

    Returns the float64 loss (reduced as ``reduction`` says), and with ``return_aux=True`` also a
    :class:`LossAux` of float64 fields (``n_tokens`` int64).

    Example:
        >>> import torch
        >>> from crossent import reference
        >>> logits = torch.tensor([[1.2, 3.1, 0.7, 2.4, 0.9], [0.5, 1.8, 2.9, 1.1, 0.3]])
        >>> reference.cross_entropy(logits, torch.tensor([1, 2]), reduction="none")
        tensor([0.6139, 0.5087], dtype=torch.float64)
    """
    V = logits.shape[-1]
    eps, c = float(label_smoothing), float(z_loss)
    z = scores(logits, softcap=softcap, logit_scale=logit_scale)
    log_p, m, log_s = log_softmax_pair(z)
    lse = m + log_s  # used only for the z-loss and reported in LossAux
    w = torch.ones(V, dtype=f64, device=z.device) if weight is None else weight.to(f64)
    soft = target.is_floating_point()

    if soft:
        # Soft target p (a row of probabilities): ce = -Σ_j w_j p'_j log p_j, p' = (1-ε)p + ε/V.
        p = target.to(f64).detach()  # soft targets are constants
        p_smooth = (1.0 - eps) * p + eps / V
        ce = -(w * p_smooth * log_p).sum(-1)
        zl = c * lse**2 if c != 0.0 else torch.zeros_like(lse)
        keep = torch.ones(ce.shape, dtype=torch.bool, device=z.device)
        denominator = torch.tensor(float(ce.numel()), dtype=f64, device=z.device)
        hit = z.argmax(-1) == p.argmax(-1)
        _is64(p_smooth, ce, zl)
    else:
        keep = target != ignore_index
        bad = keep & ((target < 0) | (target >= V))
        if bool(bad.any()):
            position = tuple(int(i) for i in bad.nonzero()[0])
            raise IndexError(f"target {int(target[position])} at {position} is outside [0, {V})")
        y = torch.where(keep, target, 0).long()
        zero = torch.zeros((), dtype=f64, device=z.device)
        w_y = torch.where(keep, w[y], zero)  # the class weight of each kept token, 0 when ignored
        log_p_y = log_p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        # Hard target: ce = -(1-ε)·w_y·log p_y - (ε/V)·Σ_j w_j·log p_j
        ce = -(1.0 - eps) * w_y * log_p_y
        if eps != 0.0:
            ce = ce - (eps / V) * (w * log_p).sum(-1)
        zl = c * w_y * lse**2 if c != 0.0 else torch.zeros_like(lse)
        ce, zl = torch.where(keep, ce, zero), torch.where(keep, zl, zero)  # ignored: exactly 0
        denominator = w_y.sum()
        hit = z.argmax(-1) == y
        _is64(w_y, log_p_y, ce, zl, denominator)

    token_loss = ce + zl
    _is64(token_loss)

    def reduce(t: Tensor) -> Tensor:
        if reduction == "none":
            return t
        total = t.sum()
        if reduction == "sum":
            return total
        # "mean": Σℓ / Σ w_y; exactly 0 (value and gradient) when the denominator is 0
        safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        return torch.where(denominator != 0, total / safe, torch.zeros_like(total))

    loss = reduce(token_loss)
    if not return_aux:
        return loss
    p_model = torch.exp(log_p)
    entropy = -torch.where(p_model > 0, p_model * log_p, torch.zeros_like(log_p)).sum(-1)
    n_tokens = keep.sum()
    correct = (hit & keep).sum().to(f64)
    accuracy = torch.where(n_tokens > 0, correct / n_tokens.clamp(min=1), torch.zeros_like(correct))
    aux = LossAux(
        ce=reduce(ce).detach(),
        z_loss=reduce(zl).detach(),
        lse=lse.detach(),
        entropy=entropy.detach(),
        n_tokens=n_tokens,
        weight_sum=denominator.detach(),
        accuracy=accuracy,
    )
    return loss, aux


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    class_weight: Tensor | None = None,
    shift: int = 0,
    reduction: str = "mean",
    **options,
):
    """``cross_entropy(hidden @ weight.T + bias, target)`` in float64, with the causal ``shift``.

    Position t of ``hidden`` (..., T, D) predicts ``target[..., t + shift]``; with
    ``reduction="none"`` the result has the target's shape and its last ``shift`` positions are 0.

    Example:
        >>> import torch
        >>> from crossent import reference
        >>> hidden, weight, labels = torch.randn(1, 4, 3), torch.randn(7, 3), torch.tensor([[1, 2, 3, 4]])
        >>> reference.linear_cross_entropy(hidden, weight, labels, shift=1, reduction="none")[0, -1]
        tensor(0., dtype=torch.float64)
    """
    logits = hidden.to(f64) @ weight.to(f64).T
    if bias is not None:
        logits = logits + bias.to(f64)
    shift = int(shift)
    if shift:
        T = target.shape[-1]
        kept = max(T - shift, 0)  # shift >= T: no position has a target
        logits = logits[..., :kept, :]
        target = target[..., T - kept :]
        shift = T - kept  # the number of positions padded with 0
    result = cross_entropy(logits, target, weight=class_weight, reduction=reduction, **options)
    if not shift:
        return result
    # per-token values get the unshifted shape, 0 at the last `shift` positions
    loss, aux = result if isinstance(result, tuple) else (result, None)
    if reduction == "none":
        loss = F.pad(loss, (0, shift))
        if aux is not None:
            aux = aux._replace(ce=F.pad(aux.ce, (0, shift)), z_loss=F.pad(aux.z_loss, (0, shift)))
    if aux is None:
        return loss
    return loss, aux._replace(lse=F.pad(aux.lse, (0, shift)), entropy=F.pad(aux.entropy, (0, shift)))


# --------------------------------------------------------------------------------------------
# explain(): the log-sum-exp computation, step by step (teaching, and `crossent explain`)
# --------------------------------------------------------------------------------------------


@dataclass
class Explanation:
    """Every step of the stable cross entropy of a batch of hard targets, in float64.

    ``row_max`` M, ``shifted`` = logits − M, ``target_shifted`` = x_t − M, ``exp`` = exp(logits − M),
    ``row_sums`` S = Σ exp(logits − M), ``log_sum_exp`` = log S, ``losses`` = log S − (x_t − M)
    per token, ``mean`` of them, and ``torch_loss`` = ``F.cross_entropy`` on the same input.
    """

    logits: Tensor
    target: Tensor
    row_max: Tensor
    shifted: Tensor
    target_shifted: Tensor
    exp: Tensor
    row_sums: Tensor
    log_sum_exp: Tensor
    losses: Tensor
    mean: Tensor
    torch_loss: Tensor

    def __str__(self) -> str:
        def row(values: Tensor) -> str:
            return "  ".join(f"{float(v):9.4f}" for v in values)

        V = self.logits.shape[-1]
        head = "  ".join(f"{'x' + str(j):>9}" for j in range(V))
        lines = [
            "Cross entropy, step by step (log-sum-exp with the row maximum M subtracted first)",
            "",
            f"logits (target marked *)   {head}",
        ]
        for i in range(self.logits.shape[0]):
            marks = "  ".join(
                f"{float(v):8.4f}{'*' if j == int(self.target[i]) else ' '}" for j, v in enumerate(self.logits[i])
            )
            lines.append(f"  token {i}  (target {int(self.target[i])})   {marks}")
        lines += [
            "",
            "1. M = max_j x_j, so that every exponent below is <= 0 and one of them is exactly 0",
            "   M = " + ", ".join(f"{float(v):.4f}" for v in self.row_max),
            "2. x − M",
        ]
        lines += [f"   token {i}: {row(r)}" for i, r in enumerate(self.shifted)]
        lines += ["3. exp(x − M): each in (0, 1], so the sum can neither overflow nor be 0"]
        lines += [f"   token {i}: {row(r)}" for i, r in enumerate(self.exp)]
        lines += [
            "4. S = Σ_j exp(x_j − M)  (row sums, between 1 and V)",
            "   S = " + ", ".join(f"{float(v):.4f}" for v in self.row_sums),
            "5. log S",
            "   log S = " + ", ".join(f"{float(v):.4f}" for v in self.log_sum_exp),
            "6. target score x_t − M",
            "   x_t − M = " + ", ".join(f"{float(v):.4f}" for v in self.target_shifted),
            "7. loss = −log p_t = −((x_t − M) − log S)",
            "   losses = " + ", ".join(f"{float(v):.4f}" for v in self.losses),
            f"8. mean = {float(self.mean):.4f}",
            f"   F.cross_entropy on the same input: {float(self.torch_loss):.4f}",
        ]
        return "\n".join(lines)


def explain(logits: Tensor, target: Tensor) -> Explanation:
    """Trace the stable cross entropy of ``logits`` (N, V) against class ids ``target`` (N,).

    Per token, in float64: ``M = max_j x_j``, ``S = Σ_j exp(x_j - M)`` (in ``[1, V]``: every
    exponent is <= 0 and one is 0), and ``loss = -((x_t - M) - log S)``; then their mean, beside
    ``F.cross_entropy`` on the same input. ``print(trace)`` shows every step (what
    ``crossent explain`` prints); docs/math.md §1 walks through the seed's example.

    Args:
        logits: (N, V) scores, any real dtype (converted to float64); no options apply.
        target: (N,) integer class ids in ``[0, V)`` (there is no ``ignore_index`` here).

    Returns:
        An :class:`Explanation`: ``row_max``, ``shifted``, ``exp``, ``row_sums``,
        ``log_sum_exp``, ``target_shifted``, ``losses``, ``mean`` and ``torch_loss``, all float64.

    Example:
        >>> import torch, crossent
        >>> trace = crossent.explain(torch.tensor([[1.2, 3.1, 0.7]]), torch.tensor([1]))
        >>> trace.row_max, trace.row_sums
        (tensor([3.1000], dtype=torch.float64), tensor([1.2403], dtype=torch.float64))
        >>> round(float(trace.mean), 4), round(float(trace.torch_loss), 4)
        (0.2153, 0.2153)
    """
    x = torch.as_tensor(logits, dtype=f64)
    t = torch.as_tensor(target, dtype=torch.long)
    if x.dim() != 2 or t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"explain expects logits (N, V) and target (N,), got {tuple(x.shape)} and {tuple(t.shape)}")
    V = x.shape[1]
    if bool(((t < 0) | (t >= V)).any()):
        raise IndexError(f"explain: every target must be in [0, {V}), got {t.tolist()}")
    row_max = x.amax(-1, keepdim=True)
    shifted = x - row_max
    exp = torch.exp(shifted)
    row_sums = exp.sum(-1)
    log_sum_exp = torch.log(row_sums)
    target_shifted = shifted.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    losses = log_sum_exp - target_shifted  # = −((x_t − M) − log S)
    _is64(row_max, shifted, exp, row_sums, log_sum_exp, target_shifted, losses)
    return Explanation(
        logits=x,
        target=t,
        row_max=row_max.squeeze(-1),
        shifted=shifted,
        target_shifted=target_shifted,
        exp=exp,
        row_sums=row_sums,
        log_sum_exp=log_sum_exp,
        losses=losses,
        mean=losses.mean(),
        torch_loss=F.cross_entropy(x, t),
    )


__all__ = ["cross_entropy", "linear_cross_entropy", "explain", "Explanation", "log_softmax_pair"]
