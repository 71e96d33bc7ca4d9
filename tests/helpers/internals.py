"""The one place where the tests name crossent's internal modules.

Test modules reach internals only through these functions, so that a move inside the package is
one edit here. Triton modules are imported on call, never at import time: the interpreter reads
``TRITON_INTERPRET`` when kernels are defined (tests/conftest.py sets it first).
"""

from __future__ import annotations

from types import ModuleType


def triton_available() -> bool:
    from crossent.validation import triton_available as available

    return available()


def interpreter_on() -> bool:
    from crossent.validation import interpreter_on as on

    return on()


def options_class():
    """The validated options object (``LossOptions``)."""
    from crossent.options import LossOptions

    return LossOptions


def options_module() -> ModuleType:
    """The options module: ``rows_per_chunk`` (automatic chunk sizes), ``DEFAULT_MEMORY_BUDGET``."""
    import crossent.options as options

    return options


def autograd() -> ModuleType:
    """The core's autograd layer: the custom ops and the backend registry (``register_backend``,
    ``backend_named``)."""
    import crossent.core.autograd as module

    return module


def op_config(**fields):
    """An ``OpConfig`` (the per-call state a backend's kernels receive); ``label_smoothing``,
    ``z_loss``, ``softcap`` and ``logit_scale`` go into its row options."""
    from crossent.core.config import OpConfig
    from crossent.core.rows import RowOptions

    numbers = {k: fields.pop(k) for k in ("label_smoothing", "z_loss", "softcap", "logit_scale") if k in fields}
    return OpConfig(rows=RowOptions(**numbers), **fields)


def _load(impl: str) -> None:
    import crossent.backends

    crossent.backends.load(impl)


def cross_entropy_op(logits, target, weight, options):
    """cross_entropy through the core's op on inputs the public function would reject (no
    validation): ``options`` a ``LossOptions`` whose ``impl`` names the backend. Returns
    (loss, m, log_s, denominator, aux)."""
    from crossent.core.config import OpConfig

    _load(options.impl)
    config = OpConfig.of(options, options.impl)
    return autograd().cross_entropy(logits, target, weight, config, options.inplace_backward)


def linear_cross_entropy_op(hidden2d, weight, bias, target, class_weight, options, schedule: str):
    """linear_cross_entropy through the core's op on flattened inputs the public function would
    reject; returns (loss, m, log_s, denominator, aux)."""
    from crossent.core.config import OpConfig

    _load(options.impl)
    config = OpConfig.of(options, options.impl, schedule=schedule)
    return autograd().linear_cross_entropy(hidden2d, weight, bias, target, class_weight, config)


def triton_cross_entropy() -> ModuleType:
    """The Triton cross_entropy module: ``MAX_BLOCK_V``, ``GRAD_IN_FORWARD``, its kernels."""
    from crossent.backends.triton import cross_entropy

    return cross_entropy


def triton_linear() -> ModuleType:
    """The Triton linear_cross_entropy module: its kernels, ``forward``/``backward``, ``mixed_products``."""
    from crossent.backends.triton import linear

    return linear


def triton_package_name() -> str:
    """The Triton backend package's module name, without importing it (to check that it is not)."""
    return "crossent.backends.triton"


def triton_package() -> ModuleType:
    import crossent.backends.triton as package

    return package


def torch_linear() -> ModuleType:
    """The PyTorch linear_cross_entropy loops: ``choose_schedule``, chunk sizes, ``PRODUCT_BLOCK_BYTES``."""
    from crossent.core import linear

    return linear


def seed_inputs():
    """(logits, targets) of the seed walkthrough, as nested lists."""
    from crossent.seed import SEED_LOGITS, SEED_TARGETS

    return SEED_LOGITS, SEED_TARGETS
