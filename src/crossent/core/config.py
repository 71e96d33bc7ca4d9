"""The per-call state of a loss, as one object: what travels from the public function through the
custom op to a backend's kernels.

A ``torch.library`` custom op takes tensors and a few plain values, not a Python object, so
:class:`OpConfig` crosses the op boundary packed into three short arguments (a list of floats, a
list of ints and one string) by :meth:`OpConfig.pack` and is rebuilt on the other side by
:meth:`OpConfig.unpack`: the one place where that encoding is written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .rows import RowOptions


@dataclass(frozen=True)
class OpConfig:
    """Options of DESIGN.md §1, the backend that computes them and the loop settings of one call.

    ``chunk_size`` 0 means automatic (derived from the memory budget by the backend).
    ``needs`` says which of (hidden, weight, bias) want a gradient (linear losses only).
    """

    backend: str = "torch"
    ignore_index: int = -100
    reduction: str = "mean"
    rows: RowOptions = RowOptions()  # ε, c, k, s: the numbers the row math reads
    chunk_size: int = 0
    schedule: str = "token"
    want_aux: bool = False
    needs: tuple[bool, bool, bool] = (False, False, False)

    @staticmethod
    def of(options, backend: str, **changes) -> OpConfig:
        """From validated :class:`crossent.options.LossOptions` (and ``changes`` on top)."""
        config = OpConfig(
            backend=backend,
            ignore_index=options.ignore_index,
            reduction=options.reduction,
            rows=RowOptions(options.label_smoothing, options.z_loss, options.softcap, options.logit_scale),
            chunk_size=options.chunk_size or 0,
            want_aux=options.return_aux,
        )
        return replace(config, **changes)

    @property
    def grads_in_forward(self) -> bool:
        """Whether a linear forward also forms the gradients (a reduced loss that needs them)."""
        return any(self.needs) and self.reduction != "none"

    def pack(self) -> tuple[list[float], list[int], str]:
        """(floats, ints, words) for a custom op; a soft cap of None travels as 0 (never valid)."""
        r = self.rows
        floats = [r.label_smoothing, r.z_loss, r.softcap or 0.0, r.logit_scale]
        ints = [self.ignore_index, self.chunk_size, int(self.want_aux), *map(int, self.needs)]
        return floats, ints, f"{self.backend} {self.reduction} {self.schedule}"

    @staticmethod
    def unpack(floats: list[float], ints: list[int], words: str) -> OpConfig:
        eps, c, k, s = floats
        ignore_index, chunk_size, want_aux, need_h, need_w, need_b = ints
        backend, reduction, schedule = words.split()
        return OpConfig(
            backend=backend,
            ignore_index=ignore_index,
            reduction=reduction,
            rows=RowOptions(eps, c, k or None, s),
            chunk_size=chunk_size,
            schedule=schedule,
            want_aux=bool(want_aux),
            needs=(bool(need_h), bool(need_w), bool(need_b)),
        )
