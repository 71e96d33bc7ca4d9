"""What ``crossent bench`` measures, and how: the sweeps, the methods, the measuring of each point.

Two families of losses run forward + backward (float32, hard targets, ``reduction="mean"``) at
every point (N tokens, V classes) of two sweeps — N at a fixed V, then V at a fixed N:

* ``cross_entropy`` on given logits: ``crossent.cross_entropy`` (also with
  ``inplace_backward=True``) beside ``F.cross_entropy`` eager and ``torch.compile`` of it (one
  dynamic-shape graph, compiled in the warm-up, before anything is measured). The logits come
  from :class:`crossent.measure.HandOff`, a stand-in for the LM head that consumes their gradient;
* ``linear_cross_entropy`` on hidden states (N, D) and a classifier (V, D): crossent's fused loss
  beside eager ``F.cross_entropy((h @ W.T).float(), t)`` and the *floor*: the three bare matrix
  products a loss cannot avoid (logits = h·Wᵀ, ∂h = G·W, ∂W = Gᵀ·h), nothing else.

Peer libraries (``liger_kernel``, ``cut_cross_entropy``: the ``bench`` extra) join where they are
importable and run on the device; otherwise the result says why they are absent. Time is the
median over rounds that run the methods round-robin, given as ratios of the same round (absolute
CPU times go to the CSV only); memory is the peak extra resident memory of forward + backward
(:func:`crossent.measure.peak_extra_rss`: the inputs allocated beforehand, the gradients left
behind counted). The suite measures the CPU (the resident set is its measure of memory); GPU
figures come from ``benchmarks/gpu_check.py``.

:mod:`crossent.cli.bench_report` turns a :class:`SuiteResult` into tables and files,
:mod:`crossent.cli.bench_plots` into plots.
"""

from __future__ import annotations

import gc
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import measure
from ..functional import cross_entropy, linear_cross_entropy

CE = "cross_entropy"
LINEAR = "linear_cross_entropy"

# cross_entropy family
CROSSENT = "crossent cross_entropy"
INPLACE = "crossent inplace_backward"
EAGER = "F.cross_entropy eager"
COMPILE = "torch.compile(F.cross_entropy)"
LIGER_CE = "liger_kernel LigerCrossEntropyLoss"
# linear_cross_entropy family
FLOOR = "floor: 3 bare matmuls"
LINEAR_CROSSENT = "crossent linear_cross_entropy"
LINEAR_EAGER = "eager F.cross_entropy((h @ W.T).float())"
CCE = "cut_cross_entropy (torch_compile)"
LIGER_LINEAR = "liger_kernel LigerFusedLinearCrossEntropyLoss"

#: The baseline every time and memory ratio of a family is taken against.
BASELINE = {CE: EAGER, LINEAR: LINEAR_EAGER}

LossFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Sweep:
    """The points and rounds of one suite run.

    The points are ``(n, v_fixed)`` for every ``n`` in ``ns``, then ``(n_fixed, v)`` for every ``v``
    in ``vs`` (a point already met is not run twice); both families run at every point, the
    linear one with ``hidden`` features.

    Attributes:
      name: names the CSV, the plots and the RESULTS.md section (``suite``, ``suite_quick``).
      ns: token counts of the first sweep, at ``v_fixed`` classes.
      v_fixed: the vocabulary of the first sweep.
      vs: vocabularies of the second sweep, at ``n_fixed`` tokens.
      n_fixed: the token count of the second sweep.
      hidden: D, the hidden size of the linear family.
      repeats: timed rounds per point (after one untimed warm-up round).
      compile: whether ``torch.compile(F.cross_entropy)`` runs (compiling takes a while).

    Example:
      >>> from crossent.cli.bench_suite import Sweep
      >>> Sweep("mine", ns=(8, 16), v_fixed=64, vs=(11, 64), n_fixed=8, hidden=4, repeats=1).points()
      [(8, 64), (16, 64), (8, 11)]
    """

    name: str
    ns: tuple[int, ...]
    v_fixed: int
    vs: tuple[int, ...]
    n_fixed: int
    hidden: int
    repeats: int
    compile: bool = True

    def points(self) -> list[tuple[int, int]]:
        """``(N, V)`` of every point, the N sweep first, without repeats."""
        out: list[tuple[int, int]] = []
        for point in [(n, self.v_fixed) for n in self.ns] + [(self.n_fixed, v) for v in self.vs]:
            if point not in out:
                out.append(point)
        return out


#: ``crossent bench --quick``: under two minutes on two CPU cores.
QUICK = Sweep(
    "suite_quick",
    ns=(256, 512, 1024, 2048),
    v_fixed=32000,
    vs=(8000, 32000, 128256),
    n_fixed=512,
    hidden=256,
    repeats=1,
)
#: ``crossent bench`` (and ``make bench``): larger N and V, 3 rounds.
FULL = Sweep(
    "suite",
    ns=(512, 1024, 2048, 4096, 8192),
    v_fixed=32000,
    vs=(8000, 32000, 65536, 128256, 256000),
    n_fixed=1024,
    hidden=256,
    repeats=3,
)
#: For the tests: tiny shapes, no compiling; a few seconds.
TINY = Sweep("suite_tiny", ns=(8, 16), v_fixed=64, vs=(11, 64), n_fixed=8, hidden=4, repeats=1, compile=False)

SWEEPS = {"quick": QUICK, "full": FULL, "tiny": TINY}


@dataclass
class SuiteResult:
    """What :func:`run_suite` measured.

    Attributes:
      sweep: the :class:`Sweep` that ran.
      rows: one dict per (family, point, method): the CSV's rows.
      skipped: ``(family, method, reason)`` of each method that did not run (a peer library not
        installed, or one that failed on this device).
      machine: the line of :func:`crossent.measure.machine_line` for the run.
      seconds: wall time of the whole run.
    """

    sweep: Sweep
    rows: list[dict[str, Any]]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    machine: str = ""
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------


class MatmulFloor(torch.autograd.Function):
    """Exactly the three products of a fused loss: logits = h·Wᵀ in the forward; ∂h = G·W and
    ∂W = Gᵀ·h in the backward, with G the logits themselves (so no softmax work is counted)."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor) -> Tensor:
        z = h @ w.T
        ctx.save_for_backward(h, w, z)
        return z.sum() * 0

    @staticmethod
    def backward(ctx, grad: Tensor):
        h, w, z = ctx.saved_tensors
        return z @ w, z.T @ h


def _why_absent(module: str, device: torch.device | None = None) -> str | None:
    """Why the peer ``module`` cannot run: not installed, or Triton kernels (when ``device`` is
    given) and no CUDA device; ``None`` when it can."""
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install crossent[bench])"
    if device is not None and device.type != "cuda":
        return "Triton kernels: needs a CUDA device"
    return None


def _first(out):
    """A peer may return ``(loss, extra)``; the loss is what is measured."""
    return out[0] if isinstance(out, tuple) else out


def _ce_methods(sweep: Sweep, device: torch.device) -> tuple[dict[str, LossFn], list[tuple[str, str]]]:
    methods: dict[str, LossFn] = {
        CROSSENT: lambda x, t: cross_entropy(x, t),
        INPLACE: lambda x, t: cross_entropy(x, t, inplace_backward=True),
        EAGER: lambda x, t: F.cross_entropy(x, t),
    }
    skipped = []
    if sweep.compile:
        compiled = torch.compile(F.cross_entropy, dynamic=True)  # one graph for every N and V
        methods[COMPILE] = lambda x, t: compiled(x, t)
    else:
        skipped.append((COMPILE, "not run in this sweep"))
    why = _why_absent("liger_kernel", device)
    if why is not None:
        skipped.append((LIGER_CE, why))
    else:
        from liger_kernel.transformers import LigerCrossEntropyLoss

        liger = LigerCrossEntropyLoss()
        methods[LIGER_CE] = lambda x, t: _first(liger(x, t))
    return methods, skipped


def _linear_methods(device: torch.device) -> tuple[dict[str, LossFn], list[tuple[str, str]]]:
    methods: dict[str, LossFn] = {
        FLOOR: lambda h, w, t: MatmulFloor.apply(h, w),
        LINEAR_CROSSENT: lambda h, w, t: linear_cross_entropy(h, w, t),
        LINEAR_EAGER: lambda h, w, t: F.cross_entropy((h @ w.T).float(), t),
    }
    skipped = []
    why = _why_absent("cut_cross_entropy")
    if why is not None:
        skipped.append((CCE, why))
    else:
        from cut_cross_entropy import linear_cross_entropy as cce

        methods[CCE] = lambda h, w, t: _first(cce(h, w, t, impl="torch_compile"))
    why = _why_absent("liger_kernel", device)
    if why is not None:
        skipped.append((LIGER_LINEAR, why))
    else:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        methods[LIGER_LINEAR] = lambda h, w, t: _first(liger(w, h, t))
    return methods, skipped


# --------------------------------------------------------------------------------------------
# Measuring one point
# --------------------------------------------------------------------------------------------


class _Progress:
    """``[i/total] what`` lines on a stream (rewritten in place on a terminal)."""

    def __init__(self, total: int, stream: IO[str] | None) -> None:
        self.total, self.stream, self.i, self.t0 = total, stream, 0, time.perf_counter()
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.head = ""

    def step(self, text: str) -> None:
        self.i += 1
        self.head = f"[{self.i}/{self.total}] {text}"
        if self.stream is None:
            return
        if self.tty:
            self._show(self.head)
        else:
            print(self.head, file=self.stream, flush=True)

    def method(self, name: str) -> None:
        if self.tty:
            self._show(f"{self.head}  {name} ...")

    def _show(self, line: str) -> None:
        self.stream.write("\r\033[K" + line)
        self.stream.flush()

    def done(self) -> None:
        if self.stream is None:
            return
        line = f"done: {self.total} points in {time.perf_counter() - self.t0:.0f} s"
        if self.tty:
            self._show(line + "\n")
        else:
            print(line, file=self.stream, flush=True)


def _measure(
    family: str,
    point: dict[str, Any],
    methods: dict[str, LossFn],
    make_inputs: Callable[[], Any],
    call: Callable[[LossFn, Any], Tensor],
    repeats: int,
    progress: _Progress,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Warm up, measure memory, then time round-robin; one row per method that ran."""
    failed: list[tuple[str, str]] = []
    first_call: dict[str, float] = {}
    live = {}
    for name, fn in methods.items():  # warm-up: compiles, thread pools, one-time allocations
        progress.method(name)
        trial = measure.fwd_bwd_trial(make_inputs, lambda x, fn=fn: call(fn, x))
        t0 = time.perf_counter()
        try:
            trial()
        except Exception as error:  # a peer that cannot run here; crossent's own must not fail
            if name in (CCE, LIGER_CE, LIGER_LINEAR):
                failed.append((name, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"))
                continue
            raise
        first_call[name] = time.perf_counter() - t0
        live[name] = fn
    measure.collect()
    gc.freeze()  # what the warm-up made to last (compiled code): out of every later collection
    peaks = {}
    for name, fn in live.items():
        progress.method(f"{name} (memory)")
        peaks[name], _ = measure.peak_fwd_bwd(make_inputs, lambda x, fn=fn: call(fn, x), repeats=1)
    progress.method("timing")
    with measure.OtherLoad() as load:
        samples = measure.run_paired(
            {name: measure.fwd_bwd_trial(make_inputs, lambda x, fn=fn: call(fn, x)) for name, fn in live.items()},
            warmup=0,
            repeats=repeats,
        )
    med = measure.medians(samples)
    base = BASELINE[family]
    rows = []
    for name in live:
        row = {
            "family": family,
            **point,
            "dtype": "float32",
            "method": name,
            "fwd_ms": round(med[name]["fwd"] * 1e3, 3),
            "bwd_ms": round(med[name]["bwd"] * 1e3, 3),
            "fwd_bwd_ms": round(med[name]["fwd_bwd"] * 1e3, 3),
            "first_call_s": round(first_call[name], 3),
            "time_vs_eager": round(measure.paired_ratio(samples, name, base, "fwd_bwd"), 4),
            "time_vs_compile": "",
            "time_vs_floor": "",
            "peak_extra_bytes": peaks[name],
            "peak_extra_mib": round(peaks[name] / 2**20, 3),
            "memory_vs_eager": round(peaks[name] / peaks[base], 4) if peaks[base] else "",
            "repeats": repeats,
            "other_load_cores": round(load.cores, 2),
            "disturbed": measure.disturbed(load.cores),
            "threads": torch.get_num_threads(),
        }
        if COMPILE in live:
            row["time_vs_compile"] = round(measure.paired_ratio(samples, name, COMPILE, "fwd_bwd"), 4)
        if FLOOR in live:
            row["time_vs_floor"] = round(measure.paired_ratio(samples, name, FLOOR, "fwd_bwd"), 4)
        rows.append(row)
    return rows, failed


def _ce_point(n: int, v: int, methods, repeats: int, progress: _Progress, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(n, v, generator=gen)  # copied into fresh logits for every call
    target = torch.randint(0, v, (n,), generator=gen)

    def make_inputs():
        head = measure.HandOff()  # kept with the logits: its backward receives their gradient
        return head(src.clone), head

    point = {"N": n, "V": v, "D": "", "inputs_bytes": src.numel() * src.element_size()}
    return _measure(CE, point, methods, make_inputs, lambda fn, x: fn(x[0], target), repeats, progress)


def _linear_point(n: int, v: int, d: int, methods, repeats: int, progress: _Progress, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h0 = torch.randn(n, d, generator=gen)
    w0 = torch.randn(v, d, generator=gen) / d**0.5
    target = torch.randint(0, v, (n,), generator=gen)

    def make_inputs():
        return h0.clone().requires_grad_(), w0.clone().requires_grad_()

    point = {"N": n, "V": v, "D": d, "inputs_bytes": (h0.numel() + w0.numel()) * 4}
    return _measure(LINEAR, point, methods, make_inputs, lambda fn, x: fn(x[0], x[1], target), repeats, progress)


def run_suite(sweep: Sweep = QUICK, *, progress: IO[str] | None = None) -> SuiteResult:
    """Measures both families at every point of ``sweep``, on the CPU.

    Every method runs forward + backward at every point: one untimed warm-up call (this is where
    ``torch.compile`` compiles), one call whose peak extra resident memory is measured, then
    ``sweep.repeats`` timed rounds that run the methods round-robin. Peer libraries run only where
    importable; a peer that fails is skipped with the reason, crossent's own methods never are.

    Args:
      sweep: the points and rounds (:data:`QUICK`, :data:`FULL`, :data:`TINY` or your own).
      progress: a text stream for the ``[i/total] ...`` progress lines (``crossent bench`` gives
        ``sys.stderr``; ``None``: none).

    Returns:
      A :class:`SuiteResult`: one row per (family, point, method) and the methods skipped.

    Example:
      >>> from crossent.cli.bench_suite import TINY, run_suite
      >>> result = run_suite(TINY, progress=None)
      >>> sorted({row["method"] for row in result.rows if row["family"] == "cross_entropy"})
      ['F.cross_entropy eager', 'crossent cross_entropy', 'crossent inplace_backward']
    """
    if sweep.compile:
        import torch._dynamo as dynamo

        dynamo.config.recompile_limit = max(64, dynamo.config.recompile_limit)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    ce_methods, ce_skipped = _ce_methods(sweep, device)
    lin_methods, lin_skipped = _linear_methods(device)
    # Every measurement starts with gc.collect(), and with torch imported a full collection would
    # walk all of torch's long-lived objects each time; freezing them leaves it the run's own.
    gc.freeze()
    try:
        skipped = [(CE, m, why) for m, why in ce_skipped] + [(LINEAR, m, why) for m, why in lin_skipped]
        rows, skipped = _run_points(sweep, ce_methods, lin_methods, skipped, progress)
    finally:
        gc.unfreeze()
    return SuiteResult(sweep, rows, skipped, measure.machine_line(), time.perf_counter() - t0)


def _run_points(sweep: Sweep, ce_methods: dict, lin_methods: dict, skipped: list, progress: IO[str] | None):
    """Both families at every point; a peer that fails at one point is dropped from the rest."""
    points = sweep.points()
    bar = _Progress(2 * len(points), progress)
    families = [
        (CE, ce_methods, "cross_entropy N={} V={}", lambda n, v: _ce_point(n, v, ce_methods, sweep.repeats, bar)),
        (
            LINEAR,
            lin_methods,
            f"linear N={{}} V={{}} D={sweep.hidden}",
            lambda n, v: _linear_point(n, v, sweep.hidden, lin_methods, sweep.repeats, bar),
        ),
    ]
    rows: list[dict[str, Any]] = []
    for family, methods, label, run_point in families:
        for n, v in points:
            bar.step(label.format(n, v))
            new, failed = run_point(n, v)
            rows += new
            for name, why in failed:
                methods.pop(name)
                skipped.append((family, name, why))
            measure.collect()
    bar.done()
    return rows, skipped
