"""crossent: numerically stable, memory-efficient cross-entropy losses for large vocabularies.

The whole public API is listed in ``__all__`` below. Importing crossent imports neither Triton
nor transformers: each is imported when first used.
"""

from .functional import cross_entropy, linear_cross_entropy
from .loss_aux import LossAux
from .modules import CrossEntropyLoss, LinearCrossEntropyHead, LinearCrossEntropyLoss
from .options import DEFAULT_MEMORY_BUDGET, get_memory_budget, set_memory_budget
from .reference import explain

__version__ = "0.1.0"

# Submodules loaded on first use: `crossent.distributed` (torch.distributed) and
# `crossent.transformers` (Hugging Face; transformers itself is imported only by its functions).
_LAZY_SUBMODULES = ("distributed", "transformers")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
    "LinearCrossEntropyHead",
    "LossAux",
    "explain",
    "set_memory_budget",
    "get_memory_budget",
    "DEFAULT_MEMORY_BUDGET",
    "__version__",
]
