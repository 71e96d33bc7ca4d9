"""The public loss functions: validate every argument, then hand one config to the core.

Nothing here computes a loss: :mod:`crossent.core.autograd` runs the op, whose kernels come from
the backend the call picks (the PyTorch loops of :mod:`crossent.core` for every device; the Triton
kernels of :mod:`crossent.backends.triton` for CUDA tensors, imported only when used).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from .core import autograd
from .core.config import OpConfig
from .core.linear import choose_schedule
from .loss_aux import build_aux, fused_result
from .options import LossOptions, document
from .validation import (
    cast_like_linear,
    check_class_weight,
    check_devices,
    check_float,
    check_inplace_backward,
    check_linear_inputs,
    check_shift_target,
    check_target,
    check_target_range,
    check_tensor,
    choose_impl,
    is_dtensor,
    pick_class_weight,
    shape_of,
    shift_target,
)


def backend_for(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs a call: ``impl`` resolved for the device (``choose_impl``), then
    float64 to PyTorch (a Triton kernel's float arguments are float32: options like ε or s would
    be rounded before a float64 kernel saw them). Loads the chosen backend's kernels."""
    name = choose_impl(impl, device)
    if dtype == torch.float64:
        name = "torch"
    backends.load(name)
    return name


# --------------------------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------------------------


@document
def cross_entropy(
    logits: Tensor, target: Tensor, *, weight: Tensor | None = None, class_weight: Tensor | None = None,
    ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
    softcap: float | None = None, logit_scale: float = 1.0, inplace_backward: bool = False,
    chunk_size: int | None = None, return_aux: bool = False, impl: str = "auto",
):
    """Cross entropy (with z-loss) of logits against class ids or probabilities, exact and lean.

    For each token with logits ``x`` (V,): ``z = s·x`` (then ``k·tanh(z/k)`` with a soft cap),
    ``m = max z``, ``S = Σ exp(z - m)``, ``log p_j = (z_j - m) - log S``, ``lse = m + log S``, and

        ℓ = -(1-ε)·w_y·log p_y - (ε/V)·Σ_j w_j·log p_j + c·w_y·lse²     (hard target y)
        ℓ = -Σ_j w_j·p'_j·log p_j + c·lse²,  p' = (1-ε)·p + ε/V          (soft target p)

    reduced by ``reduction``. With ``ε = c = 0``, ``s = 1`` and no cap this is
    ``F.cross_entropy`` (class dim last; see docs/guide.md for the documented differences). The
    (N, V) logits are processed in chunks: no float32 copy of them and no softmax is kept; forward
    saves the per-token pair ``(m, log S)``.

    Args:
        logits: (..., V) float16, bfloat16, float32 or float64; any strides (never copied whole).
        target: (...) integer class ids in ``[0, V)`` or ``ignore_index``, or (..., V)
            floating probabilities (soft targets: no ``ignore_index``, no gradient).
        {args: weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale}
        {args: inplace_backward, chunk_size, return_aux, impl}

    Returns:
        The loss: 0-dim, or the target's shape (``"none"``); float32 for 16-bit and float32
        inputs, float64 for float64. With ``return_aux=True``, ``(loss, LossAux)``.

    Example:
        >>> import torch, crossent
        >>> logits = torch.tensor([[1.2, 3.1, 0.7, 2.4, 0.9], [0.5, 1.8, 2.9, 1.1, 0.3]])
        >>> loss = crossent.cross_entropy(logits, torch.tensor([1, 2]), z_loss=1e-4)
        >>> round(loss.item(), 4)
        0.5626
    """
    check_tensor("logits", logits, "(..., V) floating")
    check_float("logits", logits, "of shape (..., V)")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1 classes, got {shape_of(logits)}")
    opts = LossOptions.from_arguments(locals())
    V = logits.shape[-1]
    soft = check_target(target, logits.shape[:-1], V, allow_soft=True, where="cross_entropy")
    weight = pick_class_weight(weight, class_weight)
    check_class_weight("weight" if class_weight is None else "class_weight", weight, V)
    device = check_devices(logits=logits, target=target, weight=weight)
    backend = backend_for(opts.impl, device, logits.dtype)
    if not soft:
        check_target_range(target, V, opts.ignore_index)
    check_inplace_backward(logits, opts.inplace_backward)
    config = OpConfig.of(opts, backend)
    loss, m, log_s, denominator, aux = autograd.cross_entropy(logits, target, weight, config, opts.inplace_backward)
    if not opts.return_aux:
        return loss
    keep = None if soft else target != opts.ignore_index
    return loss, build_aux(aux, m, log_s, denominator, keep, logits.shape[:-1], opts.reduction)


# --------------------------------------------------------------------------------------------
# linear_cross_entropy
# --------------------------------------------------------------------------------------------


def _reject_sharded(name: str, t: Tensor) -> None:
    if is_dtensor(t):
        raise TypeError(
            f"{name} is a sharded DTensor (e.g. from FSDP2's fully_shard); linear_cross_entropy needs the "
            "full local tensor. Use crossent.LinearCrossEntropyHead as the model's classifier (its forward "
            "runs inside the module, so FSDP gathers the weight first), or pass weight.full_tensor()"
        )


@document
def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Tensor | None = None, class_weight: Tensor | None = None,
    ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
    softcap: float | None = None, logit_scale: float = 1.0, shift: int = 0, chunk_size: int | None = None,
    schedule: str = "auto", return_aux: bool = False, impl: str = "auto",
):
    """The classifier and the loss fused: ``cross_entropy(hidden @ weight.T + bias, target)``
    computed without ever holding the (N, V) logits.

    The logits ``x = hidden·Wᵀ + b`` are formed one chunk at a time (of tokens, or of vocabulary
    rows: ``schedule``) and go through exactly the math of :func:`crossent.cross_entropy`
    (``z = s·x``, soft cap, ``m``, ``log S``, ``ℓ = -(1-ε)·w_y·log p_y - (ε/V)·Σ_j w_j·log p_j +
    c·w_y·lse²``). The gradients of ``hidden``, ``weight`` and ``bias`` are exact: the classifier's
    is accumulated in float32 whatever the input dtype. Memory beyond the inputs and their
    gradients is bounded by the memory budget and does not grow with N.

    Args:
        hidden: (..., D) float16, bfloat16, float32 or float64 hidden states.
        weight: (V, D) classifier weight (``nn.Linear`` layout), the dtype of ``hidden``.
        target: (...) integer class ids (the leading dims of ``hidden``) or ``ignore_index``.
        bias: (V,) or None.
        {args: class_weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale}
        {args: shift, schedule, return_aux, impl}
        chunk_size: tokens (``"token"``) or vocabulary rows (``"vocab"``) per chunk; ``None``
            derives it from the memory budget (:func:`crossent.set_memory_budget`).

    Returns:
        The loss (0-dim, or the target's shape for ``"none"``; float32, float64 for float64
        inputs); with ``return_aux=True``, ``(loss, LossAux)`` (``lse`` and ``entropy`` are 0 at
        ignored positions).

    Example:
        >>> import torch, crossent
        >>> hidden = torch.randn(2, 6, 16, requires_grad=True)          # (B, T, D)
        >>> lm_head = torch.nn.Linear(16, 1000, bias=False)
        >>> labels = torch.randint(0, 1000, (2, 6))
        >>> loss = crossent.linear_cross_entropy(hidden, lm_head.weight, labels, shift=1, z_loss=1e-4)
        >>> loss.backward()
        >>> lm_head.weight.grad.shape
        torch.Size([1000, 16])
    """
    V, D = check_linear_inputs(hidden, weight, bias, reject_dtensor=_reject_sharded)
    opts = LossOptions.from_arguments(locals())
    check_target(target, hidden.shape[:-1], V, allow_soft=False, where="linear_cross_entropy")
    check_shift_target(opts.shift, target)
    check_class_weight("class_weight", class_weight, V)
    device = check_devices(hidden=hidden, weight=weight, target=target, bias=bias, class_weight=class_weight)
    hidden, weight, bias = cast_like_linear(hidden, weight, bias, ("hidden", "weight", "bias"))
    backend = backend_for(opts.impl, device, hidden.dtype)
    check_target_range(target, V, opts.ignore_index)
    aligned = shift_target(target, opts.shift, opts.ignore_index)
    schedule = choose_schedule(opts.schedule, V, D, weight, weight.requires_grad and torch.is_grad_enabled())
    config = OpConfig.of(opts, backend, schedule=schedule)
    hidden2d = hidden.reshape(-1, D)  # a view whenever the leading dims allow it
    outputs = autograd.linear_cross_entropy(hidden2d, weight, bias, aligned.reshape(-1), class_weight, config)
    return fused_result(outputs, aligned, opts.reduction, opts.ignore_index, opts.return_aux)
