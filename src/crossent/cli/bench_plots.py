"""The plots of ``crossent bench``: memory against N and against V, time ratios at every point.

matplotlib (``pip install crossent[plot]``) is imported by the functions here only, never at
import time, so that the suite runs without it; the figures use the Agg canvas directly (no
display, no global backend switch).
"""

from __future__ import annotations

from pathlib import Path

from .bench_suite import (
    CCE,
    CE,
    COMPILE,
    CROSSENT,
    EAGER,
    FLOOR,
    INPLACE,
    LIGER_CE,
    LIGER_LINEAR,
    LINEAR,
    LINEAR_CROSSENT,
    LINEAR_EAGER,
    SuiteResult,
)

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
      >>> from crossent.cli.bench_plots import plot_results
      >>> from crossent.cli.bench_suite import TINY, run_suite
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
