"""The backends: the kernels that the core's one autograd layer calls (``core.autograd.Backend``).

``"torch"`` is the core's own chunked PyTorch loops (:mod:`crossent.backends.pytorch`), for every
device, registered when crossent is imported; ``"triton"`` is :mod:`crossent.backends.triton`,
for CUDA tensors, imported the first time a call picks it, so that ``import crossent`` never
imports Triton.
"""

from __future__ import annotations

from . import pytorch  # noqa: F401  (registers the "torch" backend)


def load(name: str) -> None:
    """Import (once) the module that registers backend ``name`` with the core. A plain import
    statement, which ``torch.compile`` traces (it does not trace ``importlib``)."""
    if name == "triton":
        from . import triton  # noqa: F401
