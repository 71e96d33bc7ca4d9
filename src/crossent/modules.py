"""``nn.Module`` forms of the losses: options fixed at construction, class weights as a buffer."""

from __future__ import annotations

from torch import Tensor, nn

from .functional import cross_entropy, linear_cross_entropy
from .options import CROSS_ENTROPY_OPTIONS, LINEAR_OPTIONS, LossOptions
from .validation import check_class_weight, check_tensor, pick_class_weight


class CrossEntropyLoss(nn.Module):
    """:func:`crossent.cross_entropy` as a module: ``forward(logits, target)``.

    Per token, ``ℓ = -(1-ε)·w_y·log p_y - (ε/V)·Σ_j w_j·log p_j + c·w_y·lse²`` with
    ``log p_j = (z_j - m) - log S`` (soft targets: ``-Σ_j w_j·p'_j·log p_j + c·lse²``), reduced as
    ``reduction`` says (DESIGN.md §1).

    Args:
        weight: (V,) floating class weights (``class_weight=`` is the same; give one of the two),
            registered as the buffer ``weight`` so that ``.to()`` moves them with the model.
        **options: the keyword options of :func:`crossent.cross_entropy` (``ignore_index``,
            ``reduction``, ``label_smoothing``, ``z_loss``, ``softcap``, ``logit_scale``,
            ``inplace_backward``, ``chunk_size``, ``return_aux``, ``impl``), validated here once.

    ``forward(logits, target)``: logits (..., V) floating; target (...) integer class ids or
    (..., V) probabilities. Returns what :func:`crossent.cross_entropy` returns.

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
        return cross_entropy(logits, target, weight=self.weight, **self.options.keywords(CROSS_ENTROPY_OPTIONS))

    def extra_repr(self) -> str:
        defaults = LossOptions()
        changed = {k: v for k, v in vars(self.options).items() if getattr(defaults, k) != v}
        return ", ".join(f"{k}={v!r}" for k, v in changed.items())


class LinearCrossEntropyLoss(nn.Module):
    """:func:`crossent.linear_cross_entropy` as a module: ``forward(hidden, weight, target, bias=None)``.

    The loss of ``cross_entropy(hidden @ weight.T + bias, target)`` (DESIGN.md §1) computed
    without holding the (N, V) logits.

    Args:
        class_weight: (V,) floating class weights, registered as a buffer.
        **options: the keyword options of :func:`crossent.linear_cross_entropy` (``ignore_index``,
            ``reduction``, ``label_smoothing``, ``z_loss``, ``softcap``, ``logit_scale``, ``shift``,
            ``chunk_size``, ``schedule``, ``return_aux``, ``impl``), validated here once.

    ``forward(hidden, weight, target, bias=None)``: hidden (..., D), weight (V, D), target (...)
    integer class ids, bias (V,) or None, all floating tensors of one dtype.

    Example:
        >>> import torch, crossent
        >>> loss_fn = crossent.LinearCrossEntropyLoss(z_loss=1e-4, shift=1)
        >>> hidden, weight = torch.randn(2, 5, 8), torch.randn(100, 8)
        >>> loss_fn(hidden, weight, torch.randint(0, 100, (2, 5))).shape
        torch.Size([])
    """

    def __init__(self, *, class_weight: Tensor | None = None, **options):
        super().__init__()
        self.options = LossOptions(**options)
        if class_weight is not None:
            check_tensor("class_weight", class_weight, "(V,) class weights")
            check_class_weight("class_weight", class_weight, class_weight.shape[0] if class_weight.dim() == 1 else -1)
        self.register_buffer("class_weight", class_weight)

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None):
        return linear_cross_entropy(
            hidden, weight, target, bias=bias, class_weight=self.class_weight, **self.options.keywords(LINEAR_OPTIONS)
        )

    extra_repr = CrossEntropyLoss.extra_repr


class LinearCrossEntropyHead(nn.Linear):
    """An ``nn.Linear`` classifier whose forward also computes the fused loss.

    ``forward(hidden)`` returns the logits ``hidden @ weight.T + bias`` like ``nn.Linear``;
    ``forward(hidden, target)`` returns :func:`crossent.linear_cross_entropy` of them without
    building the logits. The weight is used inside this module's own forward, so sharding
    wrappers (FSDP, DeepSpeed ZeRO-3) gather it through their hooks, and tying it to the input
    embedding (``head.weight = embedding.weight``) keeps working. The loss options are fixed at
    construction.

    Args:
        in_features: D, the size of the hidden states.
        vocab_size: V, the number of classes (the weight is (V, D), as in ``nn.Linear``).
        bias: whether the head has a (V,) bias.
        device, dtype: as for ``nn.Linear``.
        class_weight: (V,) floating class weights, registered as a buffer.
        **options: the keyword options of :func:`crossent.linear_cross_entropy`.

    ``forward(hidden, target=None)``: hidden (..., D); without ``target`` the logits (..., V);
    with ``target`` (...) integer class ids, the loss (as :func:`crossent.linear_cross_entropy`).

    Example:
        >>> import torch, crossent
        >>> head = crossent.LinearCrossEntropyHead(16, 1000, z_loss=1e-4, shift=1)
        >>> hidden, labels = torch.randn(2, 6, 16), torch.randint(0, 1000, (2, 6))
        >>> head(hidden).shape                      # logits, as nn.Linear
        torch.Size([2, 6, 1000])
        >>> head(hidden, labels).shape              # the fused loss
        torch.Size([])
    """

    def __init__(
        self,
        in_features: int,
        vocab_size: int,
        bias: bool = False,
        *,
        device=None,
        dtype=None,
        class_weight: Tensor | None = None,
        **options,
    ):
        super().__init__(in_features, vocab_size, bias=bias, device=device, dtype=dtype)
        self.options = LossOptions(**options)
        if class_weight is not None:
            check_class_weight("class_weight", class_weight, vocab_size)
        self.register_buffer("class_weight", class_weight)

    def forward(self, hidden: Tensor, target: Tensor | None = None):
        if target is None:
            return super().forward(hidden)
        options = self.options.keywords(LINEAR_OPTIONS)
        class_weight = self.class_weight
        return linear_cross_entropy(hidden, self.weight, target, bias=self.bias, class_weight=class_weight, **options)
