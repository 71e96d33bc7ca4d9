"""Peak memory, time, machine load and result files: the measuring kit of ``crossent demo``,
``crossent bench`` and the scripts of ``benchmarks/`` (Linux: it reads ``/proc/self``).

Only the standard library and torch are imported. In outline:

* memory: :func:`peak_extra_rss` (the resident high-water mark of a call minus the resident size
  before it) and :func:`peak_fwd_bwd` (the same for a forward + backward on fresh inputs);
  :class:`HandOff` makes a loss input that looks like an LM head's output;
* time: :func:`timed`, :func:`time_call`, and the paired trials :func:`fwd_bwd_trial`,
  :func:`no_grad_trial`, :func:`run_paired`, :func:`medians`, :func:`paired_ratio`;
* the machine: :class:`OtherLoad` (cores taken by other processes meanwhile), :func:`disturbed`,
  :func:`wait_for_quiet`, :func:`machine_line`;
* results: :func:`write_csv`, :func:`markdown_table`, :func:`write_section`.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import datetime
import gc
import os
import platform
import re
import statistics
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

RESULTS_MD_TITLE = (
    "# Benchmark results\n\n"
    "Written by the scripts of `benchmarks/` (one section each, between `BEGIN`/`END` markers); the\n"
    "raw rows are in `benchmarks/results/*.csv`. Speed is given as ratios measured side by side in\n"
    "one process (DESIGN.md §4); memory as a multiple of the inputs' bytes.\n"
)


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def _status_bytes(*keys: str) -> dict[str, int]:
    with open("/proc/self/status") as f:
        text = f.read()
    out = {}
    for key in keys:
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
        if match is None:
            raise RuntimeError(f"/proc/self/status has no {key} line")
        out[key] = int(match.group(1)) * 1024
    return out


def collect() -> None:
    """Free what Python still holds (reference cycles), so that RSS counts live tensors only."""
    gc.collect()


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError, TypeError):
        return None  # not glibc: no malloc_trim


_LIBC = _load_libc()


def release_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim(0)``; elsewhere a no-op).

    glibc raises its mmap threshold (up to 32 MiB) each time it frees an mmapped block, so a
    tensor of up to 32 MiB freed by an earlier call may stay resident in the heap and be reused
    without raising RSS: a later call would then be charged nothing for it. Trimming before the
    baseline makes every page a call touches count.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def peak_extra_rss(fn: Callable[[], T]) -> tuple[T, int]:
    """``(fn(), peak extra bytes)``: the resident high-water mark during the call minus RSS before.

    Why the resident set is a faithful measure here: torch's CPU allocator has no caching pool;
    a large tensor is one ``posix_memalign`` block that glibc serves with ``mmap`` and hands back
    to the OS with ``munmap`` when the tensor dies. So RSS rises by a tensor's bytes when it is
    written (pages untouched by ``torch.empty`` cost nothing, which is right: they are never
    used) and falls when it is freed, and ``VmHWM`` - the kernel's high-water mark of RSS - is the
    peak of live tensors, between two Python lines as well. Writing "5" to
    ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS (Linux ≥ 4.0), so the peak
    belongs to this call alone. Blocks below glibc's mmap threshold come from the heap, whose
    free pages :func:`release_free_heap` returns to the OS before the baseline is read, so they
    count too (a block freed and reused within the call counts once, as it should). Call it
    after a warm-up call, so that one-time allocations (kernels, compiled code, thread pools)
    are not counted. Only this process's memory is measured; threads of the
    same process (torch's intra-op pool) are included.

    Example:
        >>> import torch
        >>> from crossent.measure import peak_extra_rss
        >>> total, held = peak_extra_rss(lambda: torch.ones(4 * 2**20).sum())  # a 16 MiB temporary
        >>> float(total), 15 * 2**20 < held < 64 * 2**20
        (4194304.0, True)
    """
    collect()
    release_free_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")["VmRSS"]
    result = fn()
    peak = _status_bytes("VmHWM")["VmHWM"]
    return result, max(0, peak - before)


# --------------------------------------------------------------------------------------------
# Load from other processes (the machine is shared: timings taken under load are flagged)
# --------------------------------------------------------------------------------------------


def _cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process) from /proc."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    with open("/proc/self/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()
    own = sum(int(v) for v in stat[11:15])  # utime, stime, cutime, cstime
    return sum(fields[:8]) - idle, own


class OtherLoad:
    """Cores kept busy by *other* processes while the ``with`` block ran (``.cores``).

    Measured from /proc/stat (the whole machine) minus this process's own CPU time: a figure
    near 0 means the timings had the machine to themselves. When other processes take cores that
    the torch threads need (:func:`disturbed`), many short multi-threaded kernels (a chunked loop)
    slow down far more than a few long ones - every kernel's threads wait at its barrier for a
    descheduled peer - so such timings understate the chunked methods.
    """

    def __init__(self) -> None:
        self.cores = float("nan")

    def __enter__(self) -> OtherLoad:
        self._t0 = time.perf_counter()
        self._busy0, self._own0 = _cpu_ticks()
        return self

    def __exit__(self, *exc) -> None:
        busy, own = _cpu_ticks()
        seconds = time.perf_counter() - self._t0
        hz = os.sysconf("SC_CLK_TCK")
        self.cores = max(0.0, ((busy - self._busy0) - (own - self._own0)) / hz / max(seconds, 1e-9))


def cpu_count() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def disturbed(other_cores: float, threads: int | None = None, slack: float = 0.25) -> bool:
    """Whether other processes took cores that ``threads`` torch threads needed (more than
    ``slack`` beyond the cores those threads leave free)."""
    threads = threads or torch.get_num_threads()
    return other_cores > max(0, cpu_count() - threads) + slack


def wait_for_quiet(timeout: float = 0.0, sample: float = 2.0, threads: int | None = None) -> float:
    """Wait (at most ``timeout`` seconds) until other processes leave ``threads`` torch threads
    their cores (see :func:`disturbed`); returns the last load measured over ``sample`` seconds."""
    deadline = time.perf_counter() + timeout
    while True:
        with OtherLoad() as load:
            time.sleep(sample)
        if not disturbed(load.cores, threads) or time.perf_counter() >= deadline:
            return load.cores


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


class _HandOffFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor: Tensor, make: Callable[[], Tensor], holder: HandOff) -> Tensor:
        # A weak reference: the gradient may be the output tensor itself (inplace_backward), whose
        # grad_fn holds this ctx; a strong one would close a cycle that gc cannot see through
        # the autograd graph, and every such tensor would leak.
        ctx.holder = weakref.ref(holder)
        return make()

    @staticmethod
    def backward(ctx, grad: Tensor):
        holder = ctx.holder()
        if holder is not None:
            holder.grad = grad  # by reference: no copy, as a consumer (matmul backward) reads it
        return None, None, None


class HandOff:
    """A tensor that requires grad, made by a stand-in for the layer that produced it.

    ``x = HandOff()(make)`` returns ``make()`` (a fresh tensor) as a non-leaf output of an
    autograd node that saves nothing; its backward keeps the incoming gradient in
    ``self.grad`` by reference. This is how a loss's input looks in training (the output of
    the LM head, whose backward consumes the gradient) and it makes the memory figure honest:

    * the gradient is counted once, where the loss allocates it, and never copied: with a
      leaf, ``AccumulateGrad`` would store it as ``.grad`` - stealing a fresh tensor, but
      *copying* one that aliases the leaf's own storage, which is what ``inplace_backward=True``
      returns, so a leaf would charge a full (N, V) copy to a loss that allocates nothing;
    * no cheap op such as ``leaf * 1`` sits in between: its backward would add its own
      tensors and time to every method.

    ``make`` runs inside the node's forward, so call this outside any measurement.
    """

    def __init__(self) -> None:
        self.grad: Tensor | None = None
        self._anchor = torch.zeros((), requires_grad=True)

    def __call__(self, make: Callable[[], Tensor]) -> Tensor:
        self.grad = None
        return _HandOffFn.apply(self._anchor, make, self)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``(fn(), seconds)`` by ``time.perf_counter``."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def synchronize() -> None:
    """Wait for queued device work (a no-op on the CPU), so that a timer reads finished work."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median(values: Iterable[float]) -> float:
    """The median of ``values`` (any iterable of numbers)."""
    return statistics.median(list(values))


def time_call(
    fn: Callable[[Any], Any],
    setup: Callable[[], Any] | None = None,
    *,
    warmup: int = 1,
    repeats: int = 5,
) -> float:
    """Median seconds (``time.perf_counter``) of ``fn(setup())`` over ``repeats`` calls.

    ``setup`` (untimed) makes fresh arguments for each call; ``warmup`` calls run first, untimed.
    """
    samples = []
    for i in range(warmup + repeats):
        arg = setup() if setup is not None else None
        collect()
        synchronize()
        t0 = time.perf_counter()
        fn(arg)
        synchronize()
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
        del arg
    collect()
    return median(samples)


Trial = Callable[[], dict[str, float]]


def fwd_bwd_trial(make_inputs: Callable[[], Any], loss_fn: Callable[[Any], Tensor]) -> Trial:
    """One timed forward + backward on fresh inputs: ``{"fwd", "bwd", "fwd_bwd"}`` in seconds.

    ``fwd_bwd`` is timed as one span (not the sum of two medians). ``loss.backward()`` uses the
    default upstream gradient (1 for a scalar loss).
    """

    def trial() -> dict[str, float]:
        inputs = make_inputs()
        collect()
        synchronize()
        t0 = time.perf_counter()
        loss = loss_fn(inputs)
        synchronize()
        t1 = time.perf_counter()
        loss.backward()
        synchronize()
        t2 = time.perf_counter()
        del loss, inputs
        collect()
        return {"fwd": t1 - t0, "bwd": t2 - t1, "fwd_bwd": t2 - t0}

    return trial


def no_grad_trial(make_inputs: Callable[[], Any], loss_fn: Callable[[Any], Tensor]) -> Trial:
    """One timed forward under ``torch.no_grad()`` (inference): ``{"fwd_nograd"}`` in seconds."""

    def trial() -> dict[str, float]:
        inputs = make_inputs()
        collect()
        synchronize()
        with torch.no_grad():
            t0 = time.perf_counter()
            loss = loss_fn(inputs)
            synchronize()
            t1 = time.perf_counter()
        del loss, inputs
        collect()
        return {"fwd_nograd": t1 - t0}

    return trial


Samples = dict[str, dict[str, list[float]]]


def run_paired(
    trials: Mapping[str, Trial],
    *,
    warmup: int = 1,
    repeats: int = 5,
) -> Samples:
    """Every figure of every trial, ``repeats`` times, the trials run round-robin in one process.

    Returns ``samples[trial][figure]``: one value per round, in round order. Round-robin (A, B,
    C, A, B, C, ...) rather than A×5 then B×5: a load that comes and goes on a shared machine then
    falls on every method alike, and :func:`paired_ratio` can pair the rounds. Each call of a
    trial allocates its own inputs and frees them before the next one.
    """
    for _ in range(warmup):
        for trial in trials.values():
            trial()
    samples: Samples = {name: {} for name in trials}
    for _ in range(repeats):
        for name, trial in trials.items():
            for key, value in trial().items():
                samples[name].setdefault(key, []).append(value)
    return samples


def medians(samples: Samples) -> dict[str, dict[str, float]]:
    """``samples[trial][figure]`` → median."""
    return {name: {key: median(values) for key, values in figures.items()} for name, figures in samples.items()}


def paired_ratio(samples: Samples, numerator: str, denominator: str, key: str) -> float:
    """Median over rounds of ``numerator``'s figure / ``denominator``'s (e.g. a speed-up over
    eager: ``paired_ratio(s, "eager", "mine", "fwd_bwd")``), each round's pair measured back to back."""
    pairs = zip(samples[numerator][key], samples[denominator][key], strict=True)
    return median(a / b for a, b in pairs)


def peak_fwd_bwd(
    make_inputs: Callable[[], Any],
    loss_fn: Callable[[Any], Tensor],
    *,
    repeats: int = 2,
    inspect: Callable[[Any, Tensor], Any] | None = None,
) -> tuple[int, Any]:
    """Peak extra bytes of ``loss_fn(inputs).backward()`` on fresh inputs (the largest of ``repeats``).

    The inputs are allocated before the measurement starts, so they are not counted; what the
    backward leaves behind (the gradients) is. ``inspect(inputs, loss)``, if given, runs after
    the last measured call, outside the measurement (e.g. to check the gradient); its result is
    returned with the peak.
    """
    peaks = []
    checked = None
    for i in range(repeats):
        inputs = make_inputs()

        def call(inputs=inputs):
            loss = loss_fn(inputs)
            loss.backward()
            return loss.detach()

        loss, peak = peak_extra_rss(call)
        peaks.append(peak)
        if inspect is not None and i == repeats - 1:
            checked = inspect(inputs, loss)
        del inputs, loss, call
        collect()
    return max(peaks), checked


# --------------------------------------------------------------------------------------------
# The machine and result files
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo; else what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    """One line naming the machine and software the figures come from."""
    cores = cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        mem_text = f", {mem:.0f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        mem_text = ""
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"{cpu_model()}, {cores} cores ({torch.get_num_threads()} torch threads){mem_text}; "
        f"torch {torch.__version__}, Python {platform.python_version()}; {date}"
    )


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], *, append: bool = False) -> Path:
    """Write ``rows`` to the CSV file ``path`` with a header; ``append`` keeps the rows already there.

    The header is the union of the columns in order of first appearance (old rows first); the
    folder is created if need be.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    all_rows: list[Mapping[str, Any]] = []
    if append and path.exists():
        with open(path, newline="") as f:
            all_rows.extend(csv.DictReader(f))
    all_rows.extend(rows)
    columns: list[str] = []
    for row in all_rows:
        columns.extend(k for k in row if k not in columns)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(all_rows)
    return path


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one letter per column: l(eft) or r(ight)."""
    align = align or "l" * len(headers)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, body: str, path: str | Path, *, title: str = RESULTS_MD_TITLE) -> Path:
    """(Re)write the section ``name`` of the markdown file ``path``, between ``<!-- BEGIN name -->``
    and ``<!-- END name -->``; other sections stay as they are, a new one goes at the end (a new
    file starts with ``title``)."""
    path = Path(path)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else title
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds with one decimal: ``"12.3"``."""
    return f"{seconds * 1e3:.1f}"


def fmt_ratio(x: float) -> str:
    """A ratio with two decimals: ``"1.25×"``."""
    return f"{x:.2f}×"


def fmt_mib(n: float) -> str:
    """Bytes in whole MiB: ``"128 MiB"``."""
    return f"{n / 2**20:.0f} MiB"
