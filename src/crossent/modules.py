"""``nn.Module`` forms of the losses: options fixed at construction, class weights as a buffer."""

from __future__ import annotations

from torch import Tensor, nn

from .functional import check_class_weight, check_tensor, cross_entropy, pick_class_weight
from .options import LossOptions


class CrossEntropyLoss(nn.Module):
    """:func:`crossent.cross_entropy` as a module: ``forward(logits, target)``.

    The options are those of :func:`crossent.cross_entropy`, validated here once; class weights
    (``weight=`` or ``class_weight=``) are registered as the buffer ``weight`` so that ``.to()``
    moves them with the model.

    Example:
        >>> import torch, crossent
        >>> loss_fn = crossent.CrossEntropyLoss(label_smoothing=0.1)
        >>> loss = loss_fn(torch.randn(4, 10), torch.tensor([1, 2, 3, -100]))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, *, weight: Tensor | None = None, class_weight: Tensor | None = None, **options):
        super().__init__()
        self.options = LossOptions(**options)
        weight = pick_class_weight(weight, class_weight)
        if weight is not None:
            check_tensor("weight", weight, "(V,) class weights")
            check_class_weight("weight", weight, weight.shape[0] if weight.dim() == 1 else -1)
        self.register_buffer("weight", weight)

    def forward(self, logits: Tensor, target: Tensor):
        o = self.options
        return cross_entropy(
            logits,
            target,
            weight=self.weight,
            ignore_index=o.ignore_index,
            reduction=o.reduction,
            label_smoothing=o.label_smoothing,
            z_loss=o.z_loss,
            softcap=o.softcap,
            logit_scale=o.logit_scale,
            inplace_backward=o.inplace_backward,
            chunk_size=o.chunk_size,
            return_aux=o.return_aux,
            impl=o.impl,
        )

    def extra_repr(self) -> str:
        defaults = LossOptions()
        changed = {k: v for k, v in vars(self.options).items() if getattr(defaults, k) != v}
        return ", ".join(f"{k}={v!r}" for k, v in changed.items())


__all__ = ["CrossEntropyLoss"]
