"""Validation of the tensors of a loss call (DESIGN.md §3), shared by every entry point.

Every check raises before any kernel runs, naming the argument, the expected form and what was
given; nothing is silently clamped or broadcast. The options themselves are validated by
:class:`crossent.options.LossOptions`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------------------------
# Validation of tensors (DESIGN.md §3): raise before any kernel runs, naming the argument, the
# expected form and what was given.
# --------------------------------------------------------------------------------------------


def shape_of(t: Tensor) -> str:
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
        raise ValueError(f"{name} must have shape ({vocab_size},) (one weight per class), got {shape_of(weight)}")


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
                f"(probabilities over the last dim), got {shape_of(target)}"
            )
        return True
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class ids (or float probabilities), got dtype {target.dtype}")
    if tuple(target.shape) != lead:
        raise ValueError(
            f"target must have shape {lead} (the logits' leading dims; the class dim is last), got {shape_of(target)}"
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
            f"logits share memory (shape {shape_of(logits)}, strides {tuple(logits.stride())}, e.g. from "
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




def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing that module)."""
    return type(t).__name__ == "DTensor"


def check_linear_inputs(
    hidden,
    weight,
    bias,
    *,
    weight_name: str = "weight",
    bias_name: str = "bias",
    rows: str = "V",
    bias_role: str = "one per class of weight",
    reject_dtensor=None,
) -> tuple[int, int]:
    """Validate ``hidden`` (..., D), a classifier ``weight`` (rows, D) and ``bias`` (rows,) or None;
    return (rows, D). ``reject_dtensor(name, t)`` raises for a DTensor weight or bias."""
    check_tensor("hidden", hidden, "(..., D) floating")
    check_tensor(weight_name, weight, f"({rows}, D) floating")
    if reject_dtensor is not None:
        reject_dtensor(weight_name, weight)
    check_float("hidden", hidden, "of shape (..., D)")
    check_float(weight_name, weight, f"of shape ({rows}, D)")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape (..., D), got {shape_of(hidden)}")
    if weight.dim() != 2 or weight.shape[0] < 1:
        raise ValueError(
            f"{weight_name} must have shape ({rows}, D) with {rows} >= 1 (nn.Linear layout), got {shape_of(weight)}"
        )
    V, D = weight.shape
    if hidden.shape[-1] != D:
        raise ValueError(
            f"hidden's last dim must equal {weight_name}'s D={D} ({weight_name} is ({rows}, D) = "
            f"{tuple(weight.shape)}), got hidden of shape {shape_of(hidden)}"
        )
    if bias is not None:
        check_tensor(bias_name, bias, f"({V},)")
        if reject_dtensor is not None:
            reject_dtensor(bias_name, bias)
        check_float(bias_name, bias, f"of shape ({V},)")
        if bias.dim() != 1 or bias.shape[0] != V:
            raise ValueError(f"{bias_name} must have shape ({V},) ({bias_role}), got {shape_of(bias)}")
    return V, D


def cast_like_linear(hidden: Tensor, weight: Tensor, bias: Tensor | None, names: tuple[str, str, str]):
    """Under ``torch.autocast`` cast as it casts ``F.linear`` (every operand that is not float64 to
    the autocast dtype); then require one dtype for the three. Returns the (cast) tensors."""
    device_type = hidden.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast:
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t):
            return t.to(dtype) if t is not None and t.dtype != torch.float64 else t

        hidden, weight, bias = cast(hidden), cast(weight), cast(bias)
    for name, t in zip(names[1:], (weight, bias), strict=True):
        if t is not None and t.dtype != hidden.dtype:
            where = "after torch.autocast's casts" if autocast else "outside torch.autocast"
            raise TypeError(
                f"{names[0]}, {names[1]} and {names[2]} must share one dtype ({where}); got hidden {hidden.dtype} "
                f"and {name} {t.dtype}"
            )
    return hidden, weight, bias


def check_shift_target(shift: int, target: Tensor) -> None:
    if shift and target.dim() < 1:
        raise ValueError(f"shift={shift} needs a target with a sequence dim (..., T), got {shape_of(target)}")


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
