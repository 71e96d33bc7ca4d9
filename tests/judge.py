"""The tolerance rule of DESIGN.md §6, in one place for every test.

crossent's error against the float64 oracle, measured norm-wise (‖a − ref‖ / ‖ref‖), must be no
worse than twice that of the same formula computed by PyTorch at the input's dtype, plus a slack
per dtype. ``torch_error`` is that PyTorch error, computed by the caller with plain PyTorch ops
(``F.cross_entropy`` where it has the option, the composed expression where it does not).
"""

from __future__ import annotations

import torch

SLACK = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_error(value: torch.Tensor, ref: torch.Tensor) -> float:
    """‖value − ref‖ / ‖ref‖ in float64 (absolute error when ‖ref‖ is 0)."""
    value, ref = value.detach().double(), ref.detach().double()
    if value.shape != ref.shape:
        raise AssertionError(f"shape {tuple(value.shape)} != reference shape {tuple(ref.shape)}")
    both_nan = torch.isnan(value) & torch.isnan(ref)
    if bool((torch.isnan(value) != torch.isnan(ref)).any()):
        raise AssertionError("NaN pattern differs from the reference")
    value, ref = value[~both_nan], ref[~both_nan]
    diff = float((value - ref).norm())
    scale = float(ref.norm())
    return diff / scale if scale > 0 else diff


def assert_close_to_reference(name: str, value, ref, torch_value, dtype: torch.dtype) -> None:
    """Assert the §6 rule for one quantity: err(value) <= 2·err(torch_value) + slack[dtype]."""
    ours = rel_error(value, ref)
    baseline = rel_error(torch_value, ref) if torch_value is not None else 0.0
    bound = 2.0 * baseline + SLACK[dtype]
    assert ours <= bound, (
        f"{name}: relative error {ours:.3e} > 2 × PyTorch's {baseline:.3e} + {SLACK[dtype]:.0e} at {dtype}"
    )
