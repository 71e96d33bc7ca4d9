"""The options every loss shares, validated once, and the text that documents them.

Every public entry point (``cross_entropy``, ``linear_cross_entropy``, the modules, the
distributed losses) builds one :class:`LossOptions`; every backend reads that object. Validation
lives here alone so that the rules and their error messages cannot drift between entry points.

The memory budget (:func:`set_memory_budget`) is the one knob that bounds the scratch memory of
every chunked loop. Chunk sizes are derived from shapes, dtypes and this budget only, never from
free memory, so a run is reproducible bit for bit.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TypeVar

REDUCTIONS = ("mean", "sum", "none")
#: The option keywords of each public loss, in signature order (modules pass them on whole).
CROSS_ENTROPY_OPTIONS = (
    "ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "logit_scale",
    "inplace_backward", "chunk_size", "return_aux", "impl",
)  # fmt: skip
LINEAR_OPTIONS = (
    "ignore_index", "reduction", "label_smoothing", "z_loss", "softcap", "logit_scale",
    "shift", "chunk_size", "schedule", "return_aux", "impl",
)  # fmt: skip
IMPLS = ("auto", "torch", "triton")
SCHEDULES = ("auto", "token", "vocab")

# --------------------------------------------------------------------------------------------
# The memory budget
# --------------------------------------------------------------------------------------------

#: Default bound on the scratch memory (bytes) a chunked loop may hold at once: 128 MiB.
DEFAULT_MEMORY_BUDGET = 128 * 2**20

_memory_budget = DEFAULT_MEMORY_BUDGET


def set_memory_budget(nbytes: int | None) -> int:
    """Set the scratch-memory budget, in bytes, of every chunked loop; return the previous one.

    The budget bounds the float32 working memory a loss holds at once beyond its inputs, outputs
    and gradients (chunks of logits, their softmax, partial products). Automatic chunk sizes are
    derived from it and from shapes and dtypes alone, never from free memory, so a result is
    reproducible bit for bit. ``None`` restores :data:`DEFAULT_MEMORY_BUDGET` (128 MiB). However
    small the budget, a loop still runs: one token (or one vocabulary row) per chunk. A chunk of
    ``r`` rows that needs ``b`` float32 buffers of V values gets ``r = budget // (4·V·b)`` (at
    least 1; some loops cap it further, see docs/guide.md §9); ``chunk_size=`` on a call
    overrides it. Under ``torch.compile`` the budget is read when the graph is traced, and a
    change recompiles.

    Args:
        nbytes: a positive int (bytes), or ``None`` for the default. Global to the process.

    Returns:
        The previous budget in bytes (an int).

    Example:
        >>> import crossent
        >>> previous = crossent.set_memory_budget(64 * 2**20)
        >>> crossent.get_memory_budget()
        67108864
        >>> _ = crossent.set_memory_budget(previous)
    """
    global _memory_budget
    if nbytes is None:
        nbytes = DEFAULT_MEMORY_BUDGET
    if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral) or nbytes < 1:
        raise ValueError(f"memory budget must be a positive int (bytes) or None, got {nbytes!r}")
    previous, _memory_budget = _memory_budget, int(nbytes)
    return previous


def get_memory_budget() -> int:
    """The current scratch-memory budget in bytes (see :func:`set_memory_budget`).

    Example:
        >>> import crossent
        >>> crossent.get_memory_budget() == crossent.DEFAULT_MEMORY_BUDGET == 128 * 2**20
        True
    """
    return _memory_budget


def rows_per_chunk(row_bytes: int, *, buffers: int = 1, cap: int | None = None, multiple: int = 1) -> int:
    """How many rows of ``row_bytes`` each fit ``buffers`` times into the memory budget (>= 1).

    ``cap`` bounds the answer from above (e.g. a size past which a loop gets no faster). An answer
    of at least ``2·multiple`` rows is cut down to a multiple of ``multiple`` (whole tiles of the
    matrix products that take the chunk). The answer depends on the arguments and the budget only.
    """
    rows = max(1, _memory_budget // max(1, row_bytes * buffers))
    if cap is not None:
        rows = max(1, min(rows, cap))
    return rows - rows % multiple if rows >= 2 * multiple else rows


# --------------------------------------------------------------------------------------------
# Chunking constants of the loops (the measurements behind them: benchmarks/RESULTS.md)
# --------------------------------------------------------------------------------------------

#: A chunk of rows stops growing at this many elements (4 MiB of float32) even when the budget
#: allows more: larger chunks leave the caches, while smaller ones multiply the short
#: multi-threaded kernels, each of which waits for every thread (costly on a shared machine).
#: The linear loops also run their row math on blocks of this size inside a chunk.
CHUNK_ELEMENTS = 1 << 20

#: Token chunks of the linear "token" schedule larger than this gain nothing in product efficiency.
MAX_TOKEN_ROWS = 1024

#: Automatic linear chunks (tokens or classes) of 16 or more rows are cut to a multiple of this:
#: the CPU matrix products run tiles of 8 floats, and a ragged edge costs more than its share.
PRODUCT_ROWS_MULTIPLE = 8

#: On the CPU the logits product runs over blocks of the classifier of about this many bytes, each
#: of which stays in the caches while every token of a chunk meets it (one product over the whole
#: classifier re-reads all of it from memory for every chunk of tokens).
PRODUCT_BLOCK_BYTES = 2 << 20

#: The Triton backend's "token" schedule: at most this many tokens per chunk (on a GPU the memory
#: budget usually binds first).
TRITON_MAX_TOKEN_ROWS = 8192

#: The Triton backend's automatic linear chunks of 128 or more rows are cut to a multiple of this
#: (whole GEMM tiles of the GPU products).
GEMM_TILE_ROWS = 64


# --------------------------------------------------------------------------------------------
# The validated options
# --------------------------------------------------------------------------------------------


def _number(name: str, value, expected: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    value = float(value)
    if value != value:  # NaN (plain comparisons: torch.compile traces them as constants)
        raise ValueError(f"{name} must be {expected}, got nan")
    return value


def _finite(value: float) -> bool:
    return -math.inf < value < math.inf


def _integer(name: str, value, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    return int(value)


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        allowed = " | ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


@dataclass(frozen=True)
class LossOptions:
    """Every option of DESIGN.md §1, validated on construction (see ``ARGUMENT_DOCS``).

    Values are normalised once (``shift=True`` becomes 1, numbers become floats); a bad value
    raises a ``ValueError`` or ``TypeError`` naming the option, the expected form and the value.

    Example:
        >>> from crossent.options import LossOptions
        >>> LossOptions(z_loss=1e-4, shift=True).shift
        1
        >>> LossOptions(label_smoothing=1.5)
        Traceback (most recent call last):
          ...
        ValueError: label_smoothing must be a float in [0, 1], got 1.5
    """

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    logit_scale: float = 1.0
    chunk_size: int | None = None
    return_aux: bool = False
    impl: str = "auto"
    # cross_entropy only
    inplace_backward: bool = False
    # linear_cross_entropy only
    shift: int = 0
    schedule: str = "auto"

    @classmethod
    def from_arguments(cls, arguments: Mapping) -> LossOptions:
        """The options among a public function's arguments (its ``locals()``), validated."""
        return cls(**{name: arguments[name] for name in OPTION_NAMES if name in arguments})

    def keywords(self, names: tuple[str, ...]) -> dict:
        """The options ``names`` as keyword arguments (to pass them on to a public function)."""
        return {name: getattr(self, name) for name in names}

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalise the values once, here
        put(self, "ignore_index", _integer("ignore_index", self.ignore_index, "an int"))
        put(self, "reduction", _choice("reduction", self.reduction, REDUCTIONS))
        eps = _number("label_smoothing", self.label_smoothing, "a float in [0, 1]")
        if not 0.0 <= eps <= 1.0:
            raise ValueError(f"label_smoothing must be a float in [0, 1], got {eps!r}")
        put(self, "label_smoothing", eps)
        c = _number("z_loss", self.z_loss, "a finite float >= 0")
        if not (c >= 0.0 and _finite(c)):
            raise ValueError(f"z_loss must be a finite float >= 0, got {c!r}")
        put(self, "z_loss", c)
        if self.softcap is not None:
            k = _number("softcap", self.softcap, "a finite float > 0 or None")
            if not (k > 0.0 and _finite(k)):
                raise ValueError(f"softcap must be a finite float > 0 or None, got {k!r}")
            put(self, "softcap", k)
        s = _number("logit_scale", self.logit_scale, "a finite, non-zero float")
        if s == 0.0 or not _finite(s):
            raise ValueError(f"logit_scale must be a finite, non-zero float, got {s!r}")
        put(self, "logit_scale", s)
        if self.chunk_size is not None:
            n = _integer("chunk_size", self.chunk_size, "an int >= 1 or None")
            if n < 1:
                raise ValueError(f"chunk_size must be an int >= 1 or None, got {n!r}")
            put(self, "chunk_size", n)
        for flag in ("return_aux", "inplace_backward"):
            if not isinstance(getattr(self, flag), bool):
                value = getattr(self, flag)
                raise TypeError(f"{flag} must be a bool, got {type(value).__name__} {value!r}")
        put(self, "impl", _choice("impl", self.impl, IMPLS))
        # shift: an int >= 0; True means 1 (Hugging Face's causal shift), False means 0.
        shift = int(self.shift) if isinstance(self.shift, bool) else self.shift
        shift = _integer("shift", shift, "an int >= 0 (True == 1)")
        if shift < 0:
            raise ValueError(f"shift must be an int >= 0 (True == 1), got {shift!r}")
        put(self, "shift", shift)
        put(self, "schedule", _choice("schedule", self.schedule, SCHEDULES))


#: Every option's name (read once: a compiled caller does not re-inspect the dataclass).
OPTION_NAMES = tuple(f.name for f in fields(LossOptions))


# --------------------------------------------------------------------------------------------
# Argument documentation, written once
# --------------------------------------------------------------------------------------------

ARGUMENT_DOCS: dict[str, str] = {
    "weight": "(V,) floating class weights ``w``, as in ``F.cross_entropy`` (``class_weight=`` is "
    "the same; give one of the two). ``None``: all ones.",
    "class_weight": "(V,) floating class weights ``w`` (the ``weight=`` of ``F.cross_entropy``). ``None``: all ones.",
    "ignore_index": "target id whose tokens contribute 0 and get a zero gradient (default -100). "
    "It may equal a real class id.",
    "reduction": '``"mean"`` (Σℓ / Σ w_y over kept tokens, or Σℓ / N for soft targets; exactly 0 '
    'when that is 0), ``"sum"`` or ``"none"`` (per token: the shape of a hard target, the logits\' '
    "leading dims for soft targets).",
    "label_smoothing": "ε in [0, 1]: PyTorch's smoothing, ε/V spread over all V classes.",
    "z_loss": "c >= 0: adds c·w_y·lse² per token (c·lse² for soft targets; PaLM uses 1e-4); 0 computes nothing.",
    "softcap": "k > 0 or None: logits become k·tanh(z/k) after scaling (Gemma 2 uses 30).",
    "logit_scale": "s, finite and non-zero: logits are multiplied by s first (Granite: 1/8).",
    "chunk_size": "rows per chunk; ``None`` derives it from the memory budget (:func:`crossent.set_memory_budget`).",
    "return_aux": "``True`` returns ``(loss, LossAux)``: the parts, per-token lse and entropy, "
    "counts and accuracy, all detached.",
    "impl": '``"auto"`` (Triton for CUDA tensors when it is installed, else PyTorch), ``"torch"`` or ``"triton"``; '
    "float64 inputs always run the PyTorch backend.",
    "inplace_backward": "``True`` lets backward write the gradient into ``logits``' own storage, "
    "which the call then consumes: do not read ``logits`` after backward (eager mode; under "
    "``torch.compile`` the gradient is a fresh tensor).",
    "shift": "int >= 0 (``True`` == 1): position t of ``hidden`` predicts ``target[..., t+shift]``, "
    'as Hugging Face shifts causal-LM labels; ``"none"`` returns the unshifted shape with the last '
    "``shift`` positions 0.",
    "schedule": '``"token"`` (token chunks over the whole vocabulary), ``"vocab"`` (vocabulary '
    'chunks over all tokens) or ``"auto"`` (chosen from shapes, dtypes and the budget).',
}

_F = TypeVar("_F", bound=Callable)
_PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)\{args: (?P<names>[\w ,]+)\}[ \t]*$", re.MULTILINE)


def document(func: _F) -> _F:
    """Replace a docstring line ``{args: a, b}`` by the shared descriptions of ``a`` and ``b``."""

    def expand(match: re.Match) -> str:
        indent = match["indent"]
        names = [n for n in re.split(r"[ ,]+", match["names"]) if n]
        return "\n".join(f"{indent}{name}: {ARGUMENT_DOCS[name]}" for name in names)

    if func.__doc__:
        func.__doc__ = _PLACEHOLDER.sub(expand, func.__doc__)
    return func
