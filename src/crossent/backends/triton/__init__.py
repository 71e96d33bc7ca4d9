"""The Triton backend: kernels only, registered with the core as ``Backend(name="triton")``.

:mod:`crossent.core.autograd` owns the custom ops, their fakes and the autograd formulas of every
loss; this package supplies the kernels those ops call, one module per op (:mod:`.cross_entropy`,
:mod:`.linear`), both built from the ``@triton.jit`` and launch helpers of :mod:`.common`.
Importing it registers the backend with :func:`crossent.core.autograd.register_backend`.

Triton is imported at once: ``crossent.backends.load`` imports this package only when a call picks
the Triton backend (``impl="triton"``, or ``"auto"`` on CUDA tensors with Triton installed), so
``import crossent`` never imports Triton. Float64 inputs never reach it (the core sends them to
the PyTorch backend: a Triton kernel's float arguments are float32).
"""

from __future__ import annotations

from ...core.autograd import Backend, register_backend
from . import cross_entropy, linear

BACKEND = register_backend(Backend(
    name="triton", cross_entropy_forward=cross_entropy.forward, cross_entropy_backward_into=cross_entropy.backward_into,
    linear_forward=linear.forward, linear_backward=linear.backward, grad_in_forward=cross_entropy.grad_in_forward,
))  # fmt: skip

__all__ = ["BACKEND"]
