"""The exact ``"mean"`` denominator of a global batch, for ``reduction="sum"`` normalisation across
gradient-accumulation steps and data-parallel ranks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..core.rows import target_terms
from ..options import LossOptions
from ..validation import check_devices, check_float, check_target_range, check_tensor, shape_of
from .group import group_of


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
            raise ValueError(f"weight must have shape (V,) (one weight per class), got {shape_of(weight)}")
    device = check_devices(weight=weight, **{f"target[{i}]": t for i, t in enumerate(targets)})
    group, _, world = group_of(group)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for t in targets:
        if t.is_floating_point():
            if weight is not None and t.shape[-1:] != weight.shape:
                raise ValueError(f"a soft target's last dim must be V={weight.shape[0]}, got {shape_of(t)}")
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
