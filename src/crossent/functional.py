"""The public loss functions: validate every argument, then dispatch on ``impl``.

Nothing here computes a loss: the backends do (``torch_impl`` for every device, ``triton_impl``
for CUDA tensors, imported only when used).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .loss_aux import LossAux
from .options import LossOptions, document

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Validation of tensors (DESIGN.md §3): raise before any kernel runs, naming the argument, the
# expected form and what was given.
# --------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def check_tensor(name: str, value, expected: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({expected}), got {type(value).__name__}")
    return value


def check_float(name: str, t: Tensor, expected: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float16, bfloat16, float32 or float64) {expected}, got dtype {t.dtype}"
        )


def check_devices(**tensors: Tensor | None) -> torch.device:
    """All given tensors on one device; returns it."""
    present = {k: v for k, v in tensors.items() if v is not None}
    first_name, first = next(iter(present.items()))
    for name, t in present.items():
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}: "
                "every tensor of a loss call must be on one device"
            )
    return first.device


def check_class_weight(name: str, weight: Tensor | None, vocab_size: int) -> None:
    if weight is None:
        return
    check_tensor(name, weight, f"({vocab_size},) class weights")
    check_float(name, weight, f"of shape ({vocab_size},)")
    if weight.dim() != 1 or weight.shape[0] != vocab_size:
        raise ValueError(f"{name} must have shape ({vocab_size},) (one weight per class), got {_shape(weight)}")


def pick_class_weight(weight: Tensor | None, class_weight: Tensor | None) -> Tensor | None:
    if weight is not None and class_weight is not None:
        raise ValueError("give class weights as weight= or as class_weight=, not both")
    return weight if weight is not None else class_weight


def check_target(target, lead_shape: torch.Size, vocab_size: int, *, allow_soft: bool, where: str) -> bool:
    """Validate a hard (...) or soft (..., V) target against the logits; return True if soft."""
    lead = tuple(lead_shape)
    check_tensor("target", target, f"class ids of shape {lead}")
    if target.is_floating_point():
        if not allow_soft:
            raise TypeError(f"target must hold integer class ids of shape {lead} for {where}, got dtype {target.dtype}")
        if tuple(target.shape) != lead + (vocab_size,):
            raise ValueError(
                f"soft target must have the logits' shape {lead + (vocab_size,)} "
                f"(probabilities over the last dim), got {_shape(target)}"
            )
        return True
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class ids (or float probabilities), got dtype {target.dtype}")
    if tuple(target.shape) != lead:
        raise ValueError(
            f"target must have shape {lead} (the logits' leading dims; the class dim is last), got {_shape(target)}"
        )
    return False


def check_target_range(target: Tensor, vocab_size: int, ignore_index: int) -> None:
    """Eager CPU only: an IndexError naming the first bad position and value (no host sync
    elsewhere: there an out-of-range id gives a NaN loss)."""
    if target.device.type != "cpu" or torch.compiler.is_compiling() or target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab_size))
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        value = int(target[position])
        raise IndexError(
            f"target {value} at position {position} is outside [0, {vocab_size}) "
            f"(and is not ignore_index={ignore_index})"
        )


def may_overlap(t: Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (e.g. an ``expand``ed tensor), from its
    sizes and strides alone: True unless each dim's stride clears the span of the smaller ones."""
    dims = sorted((abs(st), n) for n, st in zip(t.shape, t.stride(), strict=True) if n > 1)
    span = 0  # elements covered by the dims of smaller stride, minus one
    for stride, size in dims:
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def check_inplace_backward(logits: Tensor, inplace_backward: bool) -> None:
    if inplace_backward and logits.requires_grad and may_overlap(logits):
        raise ValueError(
            "inplace_backward=True writes the gradient into the logits' storage, but elements of these "
            f"logits share memory (shape {_shape(logits)}, strides {tuple(logits.stride())}, e.g. from "
            "expand()); pass inplace_backward=False, or logits.contiguous()"
        )


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_impl(impl: str, device: torch.device) -> str:
    """``"auto"``: Triton for CUDA tensors when it is installed, else PyTorch."""
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise ValueError(
                'impl="triton" needs the triton package (pip install crossent[triton]), '
                'which is not installed; use impl="torch" or "auto"'
            )
        if device.type != "cuda" and not interpreter_on():
            raise ValueError(
                f'impl="triton" needs CUDA tensors, got tensors on {device} '
                "(or set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"
            )
    return impl


def _triton_backend():
    from . import triton_impl

    return triton_impl


# --------------------------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------------------------


@document
def cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    weight: Tensor | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    inplace_backward: bool = False,
    chunk_size: int | None = None,
    return_aux: bool = False,
    impl: str = "auto",
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
        raise ValueError(f"logits must have shape (..., V) with V >= 1 classes, got {_shape(logits)}")
    opts = LossOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
        return_aux=return_aux,
        impl=impl,
        inplace_backward=inplace_backward,
    )
    V = logits.shape[-1]
    soft = check_target(target, logits.shape[:-1], V, allow_soft=True, where="cross_entropy")
    weight = pick_class_weight(weight, class_weight)
    check_class_weight("weight" if class_weight is None else "class_weight", weight, V)
    device = check_devices(logits=logits, target=target, weight=weight)
    backend = choose_impl(opts.impl, device)
    if not soft:
        check_target_range(target, V, opts.ignore_index)
    check_inplace_backward(logits, opts.inplace_backward)
    if backend == "triton":
        loss, m, log_s, denominator, aux = _triton_backend().cross_entropy_op(logits, target, weight, opts)
    else:
        from .torch_impl.cross_entropy import cross_entropy_op

        loss, m, log_s, denominator, aux = cross_entropy_op(
            logits,
            target,
            weight,
            ignore_index=opts.ignore_index,
            reduction=opts.reduction,
            label_smoothing=opts.label_smoothing,
            z_loss=opts.z_loss,
            softcap=opts.softcap,
            logit_scale=opts.logit_scale,
            chunk_size=opts.chunk_size,
            inplace_backward=opts.inplace_backward,
            want_aux=opts.return_aux,
        )
    if not opts.return_aux:
        return loss
    keep = None if soft else target != opts.ignore_index
    return loss, build_aux(aux, m, log_s, denominator, keep, logits.shape[:-1], opts.reduction)


def build_aux(
    aux: Tensor,
    m: Tensor,
    log_s: Tensor,
    denominator: Tensor,
    keep: Tensor | None,
    lead_shape,
    reduction: str,
) -> LossAux:
    """Assemble :class:`LossAux` from a backend's per-token columns (ce, z-loss, entropy, correct)."""
    from .torch_impl.rows import reduce

    aux, m, log_s, denominator = aux.detach(), m.detach(), log_s.detach(), denominator.detach()
    n_tokens = keep.sum() if keep is not None else torch.tensor(m.shape[0], device=m.device)
    correct = aux[:, 3].sum()
    accuracy = torch.where(n_tokens > 0, correct / n_tokens.clamp(min=1), torch.zeros_like(correct))
    return LossAux(
        ce=reduce(aux[:, 0], reduction, denominator).reshape(lead_shape if reduction == "none" else ()),
        z_loss=reduce(aux[:, 1], reduction, denominator).reshape(lead_shape if reduction == "none" else ()),
        lse=(m + log_s).reshape(lead_shape),
        entropy=aux[:, 2].reshape(lead_shape),
        n_tokens=n_tokens.to(torch.int64),
        weight_sum=denominator.to(torch.float32),
        accuracy=accuracy.to(torch.float32),
    )


# --------------------------------------------------------------------------------------------
# linear_cross_entropy
# --------------------------------------------------------------------------------------------


def _check_not_dtensor(name: str, t: Tensor) -> None:
    if type(t).__name__ == "DTensor":
        raise TypeError(
            f"{name} is a sharded DTensor (e.g. from FSDP2's fully_shard); linear_cross_entropy needs the "
            "full local tensor. Use crossent.LinearCrossEntropyHead as the model's classifier (its forward "
            "runs inside the module, so FSDP gathers the weight first), or pass weight.full_tensor()"
        )


def shift_target(target: Tensor, shift: int, ignore_index: int) -> Tensor:
    """Align a causal target with every position: position t gets ``target[..., t + shift]``
    and the last ``shift`` positions get ``ignore_index`` (as Hugging Face pads its labels)."""
    if shift == 0:
        return target
    T = target.shape[-1]
    if shift >= T:
        return torch.full_like(target, ignore_index)
    pad = torch.full(target.shape[:-1] + (shift,), ignore_index, dtype=target.dtype, device=target.device)
    return torch.cat([target[..., shift:], pad], dim=-1)


@document
def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    shift: int = 0,
    chunk_size: int | None = None,
    schedule: str = "auto",
    return_aux: bool = False,
    impl: str = "auto",
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
    check_tensor("hidden", hidden, "(..., D) floating")
    check_tensor("weight", weight, "(V, D) floating")
    _check_not_dtensor("weight", weight)
    check_float("hidden", hidden, "of shape (..., D)")
    check_float("weight", weight, "of shape (V, D)")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape (..., D), got {_shape(hidden)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape (V, D) with V >= 1 (nn.Linear layout), got {_shape(weight)}")
    V, D = weight.shape
    if hidden.shape[-1] != D:
        raise ValueError(
            f"hidden's last dim must equal weight's D={D} (weight is (V, D) = {tuple(weight.shape)}), "
            f"got hidden of shape {_shape(hidden)}"
        )
    if bias is not None:
        check_tensor("bias", bias, f"({V},)")
        _check_not_dtensor("bias", bias)
        check_float("bias", bias, f"of shape ({V},)")
        if bias.dim() != 1 or bias.shape[0] != V:
            raise ValueError(f"bias must have shape ({V},) (one per class of weight), got {_shape(bias)}")
    opts = LossOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        logit_scale=logit_scale,
        chunk_size=chunk_size,
        return_aux=return_aux,
        impl=impl,
        shift=shift,
        schedule=schedule,
    )
    check_target(target, hidden.shape[:-1], V, allow_soft=False, where="linear_cross_entropy")
    if opts.shift and target.dim() < 1:
        raise ValueError(f"shift={opts.shift} needs a target with a sequence dim (..., T), got {_shape(target)}")
    check_class_weight("class_weight", class_weight, V)
    device = check_devices(hidden=hidden, weight=weight, target=target, bias=bias, class_weight=class_weight)
    autocast = torch.is_autocast_enabled(device.type)
    if autocast:
        # cast as autocast casts F.linear: every operand that is not float64 to the autocast dtype
        dtype = torch.get_autocast_dtype(device.type)

        def cast(t):
            return t.to(dtype) if t is not None and t.dtype != torch.float64 else t

        hidden, weight, bias = cast(hidden), cast(weight), cast(bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            where = "after torch.autocast's casts" if autocast else "outside torch.autocast"
            raise TypeError(
                f"hidden, weight and bias must share one dtype ({where}); got hidden {hidden.dtype} and "
                f"{name} {t.dtype}"
            )
    backend = choose_impl(opts.impl, device)
    check_target_range(target, V, opts.ignore_index)
    aligned = shift_target(target, opts.shift, opts.ignore_index)

    from .torch_impl.linear_cross_entropy import choose_schedule

    sched = choose_schedule(opts.schedule, V, D, weight, weight.requires_grad and torch.is_grad_enabled())
    hidden2d = hidden.reshape(-1, D)  # a view whenever the leading dims allow it
    target1d = aligned.reshape(-1)
    if backend == "triton":
        run = _triton_backend().linear_cross_entropy_op
    else:
        from .torch_impl.linear_cross_entropy import linear_cross_entropy_op as run
    loss, m, log_s, denominator, aux = run(hidden2d, weight, bias, target1d, class_weight, opts, sched)
    lead = hidden.shape[:-1]
    if opts.reduction == "none":
        loss = loss.reshape(lead)
    if not opts.return_aux:
        return loss
    keep = aligned != opts.ignore_index
    aux_out = build_aux(aux, m, log_s, denominator, keep, lead, opts.reduction)
    zero = torch.zeros((), dtype=aux_out.lse.dtype, device=device)
    return loss, aux_out._replace(
        lse=torch.where(keep, aux_out.lse, zero), entropy=torch.where(keep, aux_out.entropy, zero)
    )
