"""``crossent bench``: time and memory of crossent's losses beside PyTorch's, as ratios, with plots.

    crossent bench --quick      # small sweeps, one timed round: under two minutes on 2 CPU cores
    crossent bench              # the sweep `make bench` runs: larger N and V, 3 rounds

:func:`bench` runs the suite (:func:`crossent.cli.bench_suite.run_suite`, where what is measured
and how is told) and reports it: the ratio tables and the headline table on stdout, methods that
did not run listed with the reason.

Output, in ``--out DIR`` (default ``benchmarks/results/`` when the current directory holds a
``benchmarks/`` folder, else ``./crossent-bench/``): ``suite.csv`` (``suite_quick.csv``) and three
plots, ``<name>_memory_vs_n.png``, ``<name>_memory_vs_v.png`` and ``<name>_time.png`` (matplotlib:
``pip install crossent[plot]``; :mod:`crossent.cli.bench_plots`). When DIR is a repository's
``benchmarks/results/``, the ``suite`` (``suite_quick``) section of ``benchmarks/RESULTS.md`` is
rewritten as well.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from .. import measure
from .bench_plots import plot_results
from .bench_suite import CE, FULL, LINEAR, QUICK, SWEEPS, SuiteResult, Sweep, run_suite

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


def _family_table(
    result: SuiteResult, family: str, point: list[str], times: list[tuple[str, str]]
) -> str:
    """One family's markdown table: a row per measured (point, method), then one per method skipped.

    ``point`` names the columns that say where (``N``, ``V``, maybe ``D``); ``times`` gives the
    (heading, row key) of each time ratio.
    """
    headers = [*point, "method", *(heading for heading, _ in times), "peak extra", "memory ÷ eager", "note"]
    body = [
        [
            *(r[key] for key in point),
            r["method"],
            *(_ratio(r[key]) for _, key in times),
            _mib(r["peak_extra_bytes"]),
            _ratio(r["memory_vs_eager"]),
            _note(r),
        ]
        for r in result.rows
        if r["family"] == family
    ]
    body += _skipped_rows(result, family, len(headers), len(point))
    align = "r" * len(point) + "l" + "r" * (len(times) + 2) + "l"
    return measure.markdown_table(headers, body, align=align)


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
      >>> from crossent.cli.bench_report import ratio_tables
      >>> from crossent.cli.bench_suite import TINY, run_suite
      >>> print(ratio_tables(run_suite(TINY, progress=None)))  # doctest: +ELLIPSIS
      cross_entropy on given logits (N tokens × V classes, float32), forward + backward:
      ...
    """
    ce_table = _family_table(
        result, CE, ["N", "V"], [("time ÷ eager", "time_vs_eager"), ("time ÷ compile", "time_vs_compile")]
    )
    lin_table = _family_table(
        result, LINEAR, ["N", "V", "D"], [("time ÷ floor", "time_vs_floor"), ("time ÷ eager", "time_vs_eager")]
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
      >>> from crossent.cli.bench_report import headline_table
      >>> from crossent.cli.bench_suite import TINY, run_suite
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
      >>> from crossent.cli.bench_report import default_out_dir
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
      >>> from crossent.cli.bench_report import bench
      >>> from crossent.cli.bench_suite import TINY
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
