"""The PyTorch backend: the core's chunked loops, on every device PyTorch runs on.

Registering it is all this module does: the loops and their row math live in :mod:`crossent.core`
(``core.cross_entropy`` for logits, ``core.linear`` for the fused classifier), because every other
loss, the distributed ones included, runs the same loops.
"""

from __future__ import annotations

from ..core import cross_entropy, linear
from ..core.autograd import Backend, register_backend

BACKEND = register_backend(
    Backend(
        name="torch",
        cross_entropy_forward=cross_entropy.forward,
        cross_entropy_backward_into=cross_entropy.backward_into,
        linear_forward=linear.forward,
        linear_backward=linear.backward,
        grad_in_forward=cross_entropy.grad_in_forward,
    )
)
