"""``crossent bench``: time and memory of crossent's losses beside PyTorch's, as ratios, with plots.

    crossent bench --quick      # small sweeps, one timed round: under two minutes on 2 CPU cores
    crossent bench              # the sweep `make bench` runs: larger N and V, 3 rounds

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
importable and run on the device; otherwise the table says why they are absent. Time is the
median over rounds that run the methods round-robin, given as ratios of the same round (absolute
CPU times go to the CSV only); memory is the peak extra resident memory of forward + backward
(:func:`crossent.measure.peak_extra_rss`: the inputs allocated beforehand, the gradients left
behind counted). The suite measures the CPU (the resident set is its measure of memory); GPU
figures come from ``benchmarks/gpu_check.py``.

Output, in ``--out DIR`` (default ``benchmarks/results/`` when the current directory holds a
``benchmarks/`` folder, else ``./crossent-bench/``): ``suite.csv`` (``suite_quick.csv``) and three
plots, ``<name>_memory_vs_n.png``, ``<name>_memory_vs_v.png`` and ``<name>_time.png`` (matplotlib:
``pip install crossent[plot]``). When DIR is a repository's ``benchmarks/results/``, the
``suite`` (``suite_quick``) section of ``benchmarks/RESULTS.md`` is rewritten as well.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import measure
from .functional import cross_entropy, linear_cross_entropy

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
      >>> from crossent.bench import Sweep
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


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _not_installed(module: str) -> str:
    return f"{module} is not installed (pip install crossent[bench])"


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
    if not _installed("liger_kernel"):
        skipped.append((LIGER_CE, _not_installed("liger_kernel")))
    elif device.type != "cuda":
        skipped.append((LIGER_CE, "Triton kernels: needs a CUDA device"))
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
    if _installed("cut_cross_entropy"):
        from cut_cross_entropy import linear_cross_entropy as cce

        methods[CCE] = lambda h, w, t: _first(cce(h, w, t, impl="torch_compile"))
    else:
        skipped.append((CCE, _not_installed("cut_cross_entropy")))
    if not _installed("liger_kernel"):
        skipped.append((LIGER_LINEAR, _not_installed("liger_kernel")))
    elif device.type != "cuda":
        skipped.append((LIGER_LINEAR, "Triton kernels: needs a CUDA device"))
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
      >>> from crossent.bench import TINY, run_suite
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
    # Every measurement starts with gc.collect(); with torch imported a full collection walks some
    # 10⁵ long-lived objects (0.1-0.2 s each time). Freezing them leaves it the run's own objects.
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
    rows: list[dict[str, Any]] = []
    for n, v in points:
        bar.step(f"cross_entropy N={n} V={v}")
        new, failed = _ce_point(n, v, ce_methods, sweep.repeats, bar)
        rows += new
        for name, why in failed:
            ce_methods.pop(name)
            skipped.append((CE, name, why))
        measure.collect()
    for n, v in points:
        bar.step(f"linear N={n} V={v} D={sweep.hidden}")
        new, failed = _linear_point(n, v, sweep.hidden, lin_methods, sweep.repeats, bar)
        rows += new
        for name, why in failed:
            lin_methods.pop(name)
            skipped.append((LINEAR, name, why))
        measure.collect()
    bar.done()
    return rows, skipped


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _ratio(x: Any) -> str:
    if x == "":
        return "—"
    return f"{x:.2g}×" if 0 < x < 0.1 else measure.fmt_ratio(x)  # 0.0015×, not 0.00×


def _mib(n: int) -> str:
    mib = n / 2**20
    return f"{mib:.0f} MiB" if mib >= 10 else f"{mib:.1f} MiB"


def _note(row: dict[str, Any]) -> str:
    return f"other processes took {row['other_load_cores']:.1f} cores" if row["disturbed"] else ""


def _skipped_rows(result: SuiteResult, family: str, width: int, method_col: int) -> list[list[str]]:
    """A row per method that did not run: its name in the method column, the reason in the last."""
    out = []
    for fam, name, why in result.skipped:
        if fam == family:
            row = ["—"] * width
            row[method_col], row[-1] = name, why
            out.append(row)
    return out


def ratio_tables(result: SuiteResult) -> str:
    """The suite's figures as two markdown tables, one per family, every point and method.

    Time is forward + backward over the same round's time of the baseline (below 1: faster);
    memory is the peak extra resident memory, in MiB and over the eager baseline's. Methods that
    did not run are listed with the reason.

    Args:
      result: what :func:`run_suite` returned.

    Returns:
      The markdown of both tables, each under a one-line heading.

    Example:
      >>> from crossent.bench import TINY, ratio_tables, run_suite
      >>> print(ratio_tables(run_suite(TINY, progress=None)))  # doctest: +ELLIPSIS
      cross_entropy on given logits (N tokens × V classes, float32), forward + backward:
      ...
    """
    ce = [r for r in result.rows if r["family"] == CE]
    lin = [r for r in result.rows if r["family"] == LINEAR]
    ce_table = measure.markdown_table(
        ["N", "V", "method", "time ÷ eager", "time ÷ compile", "peak extra", "memory ÷ eager", "note"],
        [
            [
                r["N"],
                r["V"],
                r["method"],
                _ratio(r["time_vs_eager"]),
                _ratio(r["time_vs_compile"]),
                _mib(r["peak_extra_bytes"]),
                _ratio(r["memory_vs_eager"]),
                _note(r),
            ]
            for r in ce
        ]
        + _skipped_rows(result, CE, 8, 2),
        align="rrlrrrrl",
    )
    lin_table = measure.markdown_table(
        ["N", "V", "D", "method", "time ÷ floor", "time ÷ eager", "peak extra", "memory ÷ eager", "note"],
        [
            [
                r["N"],
                r["V"],
                r["D"],
                r["method"],
                _ratio(r["time_vs_floor"]),
                _ratio(r["time_vs_eager"]),
                _mib(r["peak_extra_bytes"]),
                _ratio(r["memory_vs_eager"]),
                _note(r),
            ]
            for r in lin
        ]
        + _skipped_rows(result, LINEAR, 9, 3),
        align="rrrlrrrrl",
    )
    return "\n".join(
        [
            "cross_entropy on given logits (N tokens × V classes, float32), forward + backward:",
            "",
            ce_table,
            "",
            "linear_cross_entropy on hidden states (N × D) and a classifier (V × D), forward + backward:",
            "",
            lin_table,
        ]
    )


def _largest(rows: list[dict[str, Any]], family: str) -> list[dict[str, Any]]:
    mine = [r for r in rows if r["family"] == family]
    if not mine:
        return []
    n, v = max(((r["N"], r["V"]) for r in mine), key=lambda p: (p[0] * p[1], p[0]))
    return [r for r in mine if (r["N"], r["V"]) == (n, v)]


def headline_table(result: SuiteResult) -> str:
    """A compact markdown table: every method at the largest point of each family.

    Args:
      result: what :func:`run_suite` returned.

    Returns:
      One markdown table (loss, N × V, method, time ratios, peak extra memory, memory ratio).

    Example:
      >>> from crossent.bench import TINY, headline_table, run_suite
      >>> print(headline_table(run_suite(TINY, progress=None)).splitlines()[0])
      | loss | N × V | method | time ÷ eager | time ÷ compile or floor | peak extra | memory ÷ eager |
    """
    body = []
    for family in (CE, LINEAR):
        for r in _largest(result.rows, family):
            other = r["time_vs_compile"] if family == CE else r["time_vs_floor"]
            shape = f"{r['N']} × {r['V']}" + (f" (D {r['D']})" if family == LINEAR else "")
            body.append(
                [
                    f"`{family}`",
                    shape,
                    r["method"],
                    _ratio(r["time_vs_eager"]),
                    _ratio(other) + ("" if other == "" else (" compile" if family == CE else " floor")),
                    _mib(r["peak_extra_bytes"]),
                    _ratio(r["memory_vs_eager"]),
                ]
            )
    return measure.markdown_table(
        ["loss", "N × V", "method", "time ÷ eager", "time ÷ compile or floor", "peak extra", "memory ÷ eager"],
        body,
        align="lllrrrr",
    )


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, imported here only)
# --------------------------------------------------------------------------------------------

#: Line style per method: crossent solid and bold, PyTorch dashed, peers dotted.
_STYLE = {
    CROSSENT: dict(color="tab:blue", ls="-", marker="o", lw=2.2),
    INPLACE: dict(color="tab:cyan", ls="-", marker="s", lw=2.2),
    EAGER: dict(color="tab:red", ls="--", marker="v", lw=1.5),
    COMPILE: dict(color="tab:orange", ls="--", marker="^", lw=1.5),
    LIGER_CE: dict(color="tab:brown", ls=":", marker="x", lw=1.5),
    LINEAR_CROSSENT: dict(color="tab:green", ls="-", marker="D", lw=2.2),
    LINEAR_EAGER: dict(color="tab:purple", ls="--", marker="P", lw=1.5),
    FLOOR: dict(color="tab:gray", ls="-.", marker=".", lw=1.2),
    CCE: dict(color="tab:olive", ls=":", marker="*", lw=1.5),
    LIGER_LINEAR: dict(color="tab:pink", ls=":", marker="X", lw=1.5),
}

_LABEL = {
    CROSSENT: "crossent.cross_entropy",
    INPLACE: "crossent.cross_entropy(inplace_backward=True)",
    EAGER: "F.cross_entropy (eager)",
    COMPILE: "torch.compile(F.cross_entropy)",
    LINEAR_CROSSENT: "crossent.linear_cross_entropy (fused)",
    LINEAR_EAGER: "F.cross_entropy((h @ W.T).float()) (eager)",
    FLOOR: "floor: the 3 bare matmuls",
}


def _label(method: str, family: str) -> str:
    return _LABEL.get(method, method)


def _count_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _pos: f"{x:.0f}")


def _mib_formatter():
    from matplotlib.ticker import FuncFormatter

    def fmt(x: float, _pos) -> str:
        if x >= 1024:
            return f"{x / 1024:g} GiB"
        return f"{x:g} MiB"

    return FuncFormatter(fmt)


def _new_figure(figsize=(7, 4.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=120, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no global backend switch
    return fig


def _memory_plot(result: SuiteResult, axis: str, path: Path) -> Path:
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter

    sweep = result.sweep
    if axis == "N":
        key, fixed, xlabel = "N", ("V", sweep.v_fixed), "tokens N (log scale)"
        title = f"Peak extra memory of forward + backward against N (V = {sweep.v_fixed} classes)"
    else:
        key, fixed, xlabel = "V", ("N", sweep.n_fixed), "vocabulary V, classes (log scale)"
        title = f"Peak extra memory of forward + backward against V (N = {sweep.n_fixed} tokens)"
    fig = _new_figure((7, 4.8))
    ax = fig.add_subplot()
    floor_mib = 1 / 16  # a peak of (almost) nothing is drawn here rather than dropped by the log axis
    xs_all: set[int] = set()
    for family in (CE, LINEAR):
        for method in dict.fromkeys(r["method"] for r in result.rows if r["family"] == family):
            if method == FLOOR:
                continue  # the floor is a time reference; its memory is no bound
            pts = sorted(
                (r[key], r["peak_extra_bytes"])
                for r in result.rows
                if r["family"] == family and r["method"] == method and r[fixed[0]] == fixed[1]
            )
            if not pts:
                continue
            xs_all.update(x for x, _ in pts)
            ys = [max(b / 2**20, floor_mib) for _, b in pts]
            ax.plot([x for x, _ in pts], ys, label=_label(method, family), **_STYLE.get(method, {}))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(xs_all)))
    ax.xaxis.set_major_formatter(_count_formatter())
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.yaxis.set_major_locator(LogLocator(base=2, numticks=12))
    ax.yaxis.set_major_formatter(_mib_formatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("peak extra resident memory (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    fig.legend(
        loc="outside lower center",
        ncol=2,
        fontsize=7.5,
        title=f"float32; solid: crossent, dashed: PyTorch; the linear losses: D = {sweep.hidden}",
        title_fontsize=7.5,
    )
    fig.savefig(path)
    return path


def _time_plot(result: SuiteResult, path: Path) -> Path:
    from matplotlib.ticker import FuncFormatter

    points = result.sweep.points()
    labels = [f"{n}\n× {v}" for n, v in points]  # two lines: nine points still fit side by side
    fig = _new_figure((7, 5.6))
    axes = fig.subplots(2, 1)
    panels = [
        (
            axes[0],
            CE,
            "time_vs_eager",
            EAGER,
            "cross_entropy: forward + backward time relative to eager F.cross_entropy",
        ),
        (
            axes[1],
            LINEAR,
            "time_vs_floor",
            FLOOR,
            f"linear_cross_entropy (D = {result.sweep.hidden}): forward + backward time relative to the floor",
        ),
    ]
    for ax, family, key, base, title in panels:
        methods = [m for m in dict.fromkeys(r["method"] for r in result.rows if r["family"] == family) if m != base]
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            by_point = {
                (r["N"], r["V"]): r[key] for r in result.rows if r["family"] == family and r["method"] == method
            }
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(points))]
            style = _STYLE.get(method, {})
            ax.bar(
                xs,
                [by_point.get(p, float("nan")) for p in points],
                width=width,
                color=style.get("color"),
                hatch="//" if style.get("ls") == "--" else None,
                edgecolor="white",
                label=_label(method, family),
            )
        ax.axhline(1.0, color="black", lw=1.0, ls="--", label=f"1× = {_label(base, family)}")
        ax.set_ylabel("fwd + bwd time ratio")
        ax.set_title(title, fontsize=9.5)
        ax.set_xticks(range(len(points)), labels, fontsize=7.5)
        ax.set_xlim(-0.5, len(points) - 0.5)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}×"))
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.legend(fontsize=7, loc="upper left", ncol=2, framealpha=0.9)
        ax.set_ylim(0, max(1.2, ax.get_ylim()[1] * 1.25))  # room for the legend
    axes[1].set_xlabel("N tokens × V classes (float32; below 1×: faster than the baseline)")
    fig.savefig(path)
    return path


def plot_results(result: SuiteResult, out_dir: str | Path) -> list[Path] | None:
    """Draws the suite's three PNG plots into ``out_dir`` (matplotlib, Agg; 120 dpi).

    ``<name>_memory_vs_n.png`` and ``<name>_memory_vs_v.png``: peak extra memory of forward +
    backward against N (at the fixed V) and against V (at the fixed N), log-log, one line per
    method; ``<name>_time.png``: each cross_entropy method's time over eager ``F.cross_entropy``
    and each linear method's time over the floor, at every point.

    Args:
      result: what :func:`run_suite` returned.
      out_dir: the folder (created if need be).

    Returns:
      The paths written, or ``None`` when matplotlib is not installed.

    Example:
      >>> import tempfile
      >>> from crossent.bench import TINY, plot_results, run_suite
      >>> paths = plot_results(run_suite(TINY, progress=None), tempfile.mkdtemp())
      >>> [p.name for p in paths] if paths else []  # doctest: +SKIP
      ['suite_tiny_memory_vs_n.png', 'suite_tiny_memory_vs_v.png', 'suite_tiny_time.png']
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = result.sweep.name
    return [
        _memory_plot(result, "N", out / f"{name}_memory_vs_n.png"),
        _memory_plot(result, "V", out / f"{name}_memory_vs_v.png"),
        _time_plot(result, out / f"{name}_time.png"),
    ]


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def default_out_dir(cwd: str | Path | None = None) -> Path:
    """Where ``crossent bench`` writes when ``--out`` is not given.

    Args:
      cwd: the directory to decide for (default: the current one).

    Returns:
      ``cwd/benchmarks/results`` when ``cwd`` holds a ``benchmarks/`` folder (a checkout of
      crossent), else ``cwd/crossent-bench``.

    Example:
      >>> import tempfile
      >>> from crossent.bench import default_out_dir
      >>> default_out_dir(tempfile.mkdtemp()).name
      'crossent-bench'
    """
    cwd = Path.cwd() if cwd is None else Path(cwd)
    return cwd / "benchmarks" / "results" if (cwd / "benchmarks").is_dir() else cwd / "crossent-bench"


def _results_md(out_dir: Path) -> Path | None:
    """``benchmarks/RESULTS.md`` when ``out_dir`` is a repository's ``benchmarks/results``."""
    out_dir = out_dir.resolve()
    md = out_dir.parent / "RESULTS.md"
    if out_dir.name == "results" and out_dir.parent.name == "benchmarks" and md.is_file():
        return md
    return None


def _section(result: SuiteResult, command: str, plots: Sequence[Path] | None) -> str:
    sweep = result.sweep
    lines = [
        f"## The `crossent bench` suite{' (quick sweeps)' if sweep.name == QUICK.name else ''}",
        "",
        f"Machine: {result.machine}.",
        f"Command: `{command}` ({result.seconds:.0f} s). At each point every method runs once to warm up, once",
        f"for memory, then {sweep.repeats} timed round{'s' * (sweep.repeats > 1)}, the methods round-robin in one"
        " process; ratios are medians of",
        'per-round ratios. float32, hard targets, `reduction="mean"`, forward + backward. A time ratio below 1×',
        "is faster than that baseline. Peak extra = resident high-water mark of forward + backward minus the",
        "resident size before it (inputs allocated, the gradients left behind counted). Absolute CPU times",
        f"are in `benchmarks/results/{sweep.name}.csv`.",
        "",
        "Headline (the largest point of each loss):",
        "",
        headline_table(result),
        "",
    ]
    if plots:
        alt = ["peak extra memory against N", "peak extra memory against V", "time against eager and the floor"]
        for a, p in zip(alt, plots, strict=True):
            lines += [f"![{a}](results/{p.name})", ""]
    lines.append(ratio_tables(result))
    return "\n".join(lines)


def bench(
    quick: bool = False,
    out: str | Path | None = None,
    *,
    sweep: Sweep | None = None,
    progress: IO[str] | None = None,
    stdout: IO[str] | None = None,
) -> SuiteResult:
    """Runs the suite and writes everything: what ``crossent bench`` does.

    Prints the headline and the full tables to ``stdout``, writes ``<name>.csv`` and the plots to
    the output folder, and, when that folder is a repository's ``benchmarks/results/``, the
    ``<name>`` section of ``benchmarks/RESULTS.md``.

    Args:
      quick: the quick sweeps (:data:`QUICK`) instead of the full ones (:data:`FULL`).
      out: the output folder (default: :func:`default_out_dir`).
      sweep: a sweep of your own; overrides ``quick``.
      progress: a text stream for the progress lines (``crossent bench`` gives ``sys.stderr``;
        ``None``: none).
      stdout: where the tables go (default ``sys.stdout``).

    Returns:
      The :class:`SuiteResult`.

    Example:
      >>> import io, tempfile
      >>> from crossent.bench import TINY, bench
      >>> result = bench(out=tempfile.mkdtemp(), sweep=TINY, progress=None, stdout=io.StringIO())
      >>> len(result.rows) > 0
      True
    """
    stdout = stdout if stdout is not None else sys.stdout
    sweep = sweep or (QUICK if quick else FULL)
    out_dir = Path(out) if out is not None else default_out_dir()
    result = run_suite(sweep, progress=progress)
    for row in result.rows:
        row["machine"] = result.machine
        row["sweep"] = sweep.name
    csv_path = measure.write_csv(out_dir / f"{sweep.name}.csv", result.rows)
    plots = plot_results(result, out_dir)
    key = next((k for k, s in SWEEPS.items() if s == sweep), sweep.name)
    flag = {"quick": " --quick", "full": ""}.get(key, f" --sweep {key}")
    command = "crossent bench" + flag + (f" --out {out}" if out is not None else "")
    print(f"Machine: {result.machine}\n", file=stdout)
    print("Headline (the largest point of each loss):\n", file=stdout)
    print(headline_table(result) + "\n", file=stdout)
    print(ratio_tables(result) + "\n", file=stdout)
    print(f"Wrote {csv_path}", file=stdout)
    if plots is None:
        print("matplotlib is not installed: pip install crossent[plot] for the plots", file=stdout)
    else:
        for p in plots:
            print(f"Wrote {p}", file=stdout)
    md = _results_md(out_dir)
    if md is not None:
        measure.write_section(sweep.name, _section(result, command, plots), md)
        print(f"Wrote the {sweep.name} section of {md}", file=stdout)
    return result
