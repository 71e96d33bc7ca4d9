"""Helpers shared by the benchmarks of this folder: memory, timing, inputs and result files.

The benchmarks are scripts (``python benchmarks/bench_<name>.py``); each puts this folder on
``sys.path`` and imports this module as ``common``. Timings never go into tests.

The measuring kit itself lives in the package, in ``crossent.measure`` (``crossent bench`` uses it
too, from an installed crossent, where this folder does not exist); this module re-exports it
and adds what belongs to this folder: the paths of ``results/`` and ``RESULTS.md``, and
:func:`write_csv` / :func:`write_section` bound to them.

How a benchmark uses it (see ``bench_cross_entropy.py``):

* ``make_inputs()`` allocates fresh inputs for one call (outside every measurement) and
  ``loss_fn(inputs)`` returns the scalar loss. :func:`fwd_bwd_trial` and :func:`no_grad_trial`
  turn the pair into a trial that times one call; :func:`run_paired` runs the trials of several
  methods round-robin (warm-up first, then ``repeats`` rounds), so that the methods share
  whatever load the machine carries; :func:`medians` and :func:`paired_ratio` (the median of
  per-round ratios) sum the rounds up. :class:`OtherLoad` records the load other processes put
  on the machine meanwhile, :func:`disturbed` says whether it took cores the timing needed.
* :func:`peak_fwd_bwd` measures the peak extra resident memory of forward + backward with
  :func:`peak_extra_rss`.
* :class:`HandOff` makes a tensor that requires grad without being a leaf, and whose gradient is
  kept by reference, as the layer that produced it (an LM head) would consume it.
* :func:`write_csv`, :func:`markdown_table`, :func:`write_section` and :func:`machine_line` write
  ``results/<name>.csv`` and a named section of ``RESULTS.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from crossent import measure
from crossent.measure import (  # noqa: F401  (re-exported for the benchmark scripts)
    RESULTS_MD_TITLE,
    HandOff,
    OtherLoad,
    Samples,
    Trial,
    collect,
    cpu_count,
    cpu_model,
    disturbed,
    fmt_mib,
    fmt_ms,
    fmt_ratio,
    fwd_bwd_trial,
    machine_line,
    markdown_table,
    median,
    medians,
    no_grad_trial,
    paired_ratio,
    peak_extra_rss,
    peak_fwd_bwd,
    release_free_heap,
    run_paired,
    synchronize,
    time_call,
    wait_for_quiet,
)

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"


def write_csv(name: str, rows: Sequence[Mapping[str, Any]], *, append: bool = False) -> Path:
    """Write ``rows`` to ``results/<name>.csv`` with a header; ``append`` keeps the rows already there.

    The header is the union of the columns in order of first appearance (old rows first).
    """
    return measure.write_csv(RESULTS_DIR / f"{name}.csv", rows, append=append)


def write_section(name: str, body: str, path: Path = RESULTS_MD) -> Path:
    """(Re)write the section ``name`` of ``RESULTS.md``, between ``<!-- BEGIN name -->`` and
    ``<!-- END name -->``; other sections stay as they are, a new one goes at the end."""
    return measure.write_section(name, body, path, title=RESULTS_MD_TITLE)
