"""The Triton backend: one file per op, each in four layers (kernel, launcher, custom op, entry).

This package imports Triton at once: ``crossent.functional`` imports it only when a call picks
``impl="triton"`` (or ``"auto"`` on CUDA tensors with Triton installed), so ``import crossent``
never imports Triton.
"""

from .cross_entropy import cross_entropy_op
from .linear_cross_entropy import linear_cross_entropy_op

__all__ = ["cross_entropy_op", "linear_cross_entropy_op"]
