"""Benchmark ``crossent.linear_cross_entropy`` against eager PyTorch, ``torch.compile``, Cut
Cross-Entropy's CPU path and the floor of three bare matrix products.

    python benchmarks/bench_linear_cross_entropy.py              # the shapes of issue 4 (long on a CPU)
    python benchmarks/bench_linear_cross_entropy.py --quick      # small shapes, about a minute
    python benchmarks/bench_linear_cross_entropy.py --table1-tokens 128   # a shorter Table-1 run
    python benchmarks/bench_linear_cross_entropy.py --table1-dim 32       # Table 1 with a small D (see below)
    python benchmarks/bench_linear_cross_entropy.py --only N=2048 --repeats 7 --out linear_cross_entropy_n2048

For each workload every method runs forward + backward on fresh inputs (``hidden`` (N, D) and the
classifier ``weight`` (V, D) both requiring grad, hard targets, ``reduction="mean"``):

* ``crossent token`` / ``crossent vocab``: the two schedules of DESIGN.md §4;
* ``eager``: ``F.cross_entropy((hidden @ W.T).float(), t)``, and ``torch.compile`` of it;
* ``CCE torch_compile``: ``cut_cross_entropy.linear_cross_entropy(..., impl="torch_compile")``
  when the ``bench`` extra is installed. Without it, ``CCE torch_compile (re-created)``: that path
  is ``torch.compile(fullgraph=True, dynamic=True)`` of the eager expression above
  (``cut_cross_entropy/torch_compile.py``, checked against its source in Nov 2026; the wrapper
  around it only flattens the inputs and drops ignored tokens, of which these workloads have none),
  so the same compiled expression stands in for it;
* ``floor``: the three bare products a loss cannot avoid (logits, ∂hidden, ∂W), same shapes and
  dtype, nothing else.

Time is forward+backward, medians of round-robin rounds, reported as ratios paired in one process.
Memory overhead is the resident high-water mark of forward+backward minus the resident size before
it, minus the bytes of the gradients of ``hidden`` and ``weight`` (which every method must produce):
what a method holds beyond its inputs and their gradients. Workloads: (N=2048, D=512, V=128256)
float32 at N and 2N, and the Cut Cross-Entropy paper's Table 1 (Gemma 2 2B head: D=2304, V=256000,
bfloat16) at N=1024 tokens. On a CPU without bfloat16 matrix units eager bfloat16 products run at
about 1.3 GFLOP/s (one Table-1 call takes ~45 minutes on the 2-core CI machine): ``--table1-dim``
shrinks D for such machines. Eager's overhead is the (N, V) logits, their float32 copy and softmax,
which do not depend on D; crossent's grows with D only by its float32 copies of hidden and ∂hidden.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import crossent  # noqa: E402
from crossent.cli.bench_suite import MatmulFloor  # noqa: E402  (the floor of crossent bench, the same products)

FLOOR = "floor (3 products)"
EAGER = "eager F.cross_entropy((h @ W.T).float())"
COMPILE = "torch.compile(eager)"
TOKEN = "crossent token"
VOCAB = "crossent vocab"
CCE = "CCE torch_compile"
CCE_RECREATED = "CCE torch_compile (re-created)"


def workloads(quick: bool, table1_tokens: int, table1_dim: int = 2304) -> list[tuple[str, int, int, int, torch.dtype]]:
    if quick:
        return [
            ("quick f32", 256, 256, 32000, torch.float32),
            ("quick f32 2N", 512, 256, 32000, torch.float32),
            ("quick bf16", 64, 512, 32000, torch.bfloat16),
        ]
    return [
        ("N=2048 f32", 2048, 512, 128256, torch.float32),
        ("2N=4096 f32", 4096, 512, 128256, torch.float32),
        (f"Table 1 bf16 (N={table1_tokens}, D={table1_dim})", table1_tokens, table1_dim, 256000, torch.bfloat16),
    ]


def methods(dtype: torch.dtype) -> dict:
    def eager(h, w, t):
        return F.cross_entropy((h @ w.T).float(), t)

    def floor(h, w, t):
        return MatmulFloor.apply(h, w)

    compiled = torch.compile(eager, dynamic=False)
    out = {
        FLOOR: floor,
        TOKEN: lambda h, w, t: crossent.linear_cross_entropy(h, w, t, schedule="token"),
        VOCAB: lambda h, w, t: crossent.linear_cross_entropy(h, w, t, schedule="vocab"),
        EAGER: eager,
        COMPILE: compiled,
    }
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out[CCE] = lambda h, w, t: cce(h, w, t, impl="torch_compile")
    except ImportError:  # its CPU path is this expression, compiled so (see the module docstring)
        out[CCE_RECREATED] = torch.compile(eager, fullgraph=True, dynamic=True)
    return out


def make_inputs(n: int, d: int, v: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def make():
        h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(v, d, generator=g) / d**0.5).to(dtype).requires_grad_()
        t = torch.randint(0, v, (n,), generator=g)
        return h, w, t

    return make


def run(quick: bool, repeats: int, table1_tokens: int, table1_dim: int = 2304, only: str = "") -> list[dict]:
    rows = []
    for name, n, d, v, dtype in workloads(quick, table1_tokens, table1_dim):
        if not name.startswith(only):
            continue
        make = make_inputs(n, d, v, dtype)
        fns = methods(dtype)
        trials = {m: common.fwd_bwd_trial(make, lambda x, fn=fn: fn(*x)) for m, fn in fns.items()}
        samples = common.run_paired(trials, warmup=1, repeats=repeats)
        med = common.medians(samples)
        grad_bytes = (n * d + v * d) * torch.empty((), dtype=dtype).element_size()
        eager_overhead = None
        for m, fn in fns.items():
            peak, _ = common.peak_fwd_bwd(make, lambda x, fn=fn: fn(*x), repeats=1)
            overhead = max(0, peak - grad_bytes)
            if m == EAGER:
                eager_overhead = overhead
            rows.append(
                dict(
                    workload=name,
                    N=n,
                    D=d,
                    V=v,
                    dtype=str(dtype).replace("torch.", ""),
                    method=m,
                    fwd_bwd_s=med[m]["fwd_bwd"],
                    overhead_bytes=overhead,
                    vs_floor=common.paired_ratio(samples, m, FLOOR, "fwd_bwd"),
                    speedup_vs_eager=common.paired_ratio(samples, EAGER, m, "fwd_bwd"),
                )
            )
        for row in rows:
            if row["workload"] == name:
                row["overhead_vs_eager"] = row["overhead_bytes"] / eager_overhead if eager_overhead else float("nan")
        print_rows([r for r in rows if r["workload"] == name])
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(
            f"{r['workload']:<26}{r['method']:<44}{r['fwd_bwd_s']:9.2f} s  {r['vs_floor']:6.2f}× floor  "
            f"{r['speedup_vs_eager']:6.2f}× faster than eager  overhead {r['overhead_bytes'] / 2**20:8.0f} MiB"
            f" ({r.get('overhead_vs_eager', float('nan')) * 100:5.1f}% of eager's)",
            flush=True,
        )


def table(rows: list[dict]) -> str:
    body = common.markdown_table(
        ["workload", "method", "fwd+bwd (× floor)", "speed-up vs eager", "memory overhead", "overhead vs eager's"],
        [
            (
                r["workload"],
                r["method"],
                f"{r['vs_floor']:.2f}×",
                f"{r['speedup_vs_eager']:.2f}×",
                f"{r['overhead_bytes'] / 2**20:.0f} MiB",
                f"{r['overhead_vs_eager'] * 100:.1f}%",
            )
            for r in rows
        ],
        align="llrrrr",
    )
    return body


def target_lines(rows: list[dict]) -> list[str]:
    """Issue 4's targets, met or not, for the schedule that ``schedule="auto"`` takes."""
    from crossent.core.linear import choose_schedule

    def row(workload: str, method: str) -> dict:
        return next(r for r in rows if r["workload"] == workload and r["method"] == method)

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    lines = []
    f32 = [r for r in rows if r["dtype"] == "float32" and r["method"] == FLOOR]
    bf16 = [r for r in rows if r["dtype"] == "bfloat16" and r["method"] == FLOOR]
    if f32:
        n1, n2 = sorted(f32, key=lambda r: r["N"])[0], sorted(f32, key=lambda r: r["N"])[-1]
        for method in (TOKEN, VOCAB):
            a, b = row(n1["workload"], method), row(n2["workload"], method)
            at_2n = (
                f", {a['overhead_bytes'] / 2**20:.0f} MiB at N and {b['overhead_bytes'] / 2**20:.0f} MiB at 2N "
                f"(no larger: {verdict(b['overhead_bytes'] <= a['overhead_bytes'] * 1.05)})"
                if n2 is not n1
                else ""
            )
            floor_ok, eager_ok = verdict(a["vs_floor"] <= 1.10), verdict(a["speedup_vs_eager"] >= 1.25)
            lines.append(
                f"- float32 N={a['N']}, {method}: {a['vs_floor']:.2f}× the floor (≤ 1.10×: {floor_ok}); "
                f"{a['speedup_vs_eager']:.2f}× faster than eager (≥ 1.25×: {eager_ok}); "
                f"overhead {a['overhead_vs_eager'] * 100:.1f}% of eager's "
                f"(≤ 5%: {verdict(a['overhead_vs_eager'] <= 0.05)}){at_2n}"
            )
        cce = [r for r in rows if r["workload"] == n1["workload"] and r["method"] in (CCE, CCE_RECREATED)]
        for c in cce:
            for method in (TOKEN, VOCAB):
                a = row(n1["workload"], method)
                faster = c["vs_floor"] / a["vs_floor"]
                lines.append(
                    f"- float32 N={a['N']}, {method} against {c['method']}: {faster:.2f}× as fast "
                    f"(faster: {verdict(faster > 1.0)})"
                )
    for floor in bf16:
        for method in (TOKEN, VOCAB):
            a = row(floor["workload"], method)
            autos = [  # where "auto" takes this schedule: at the run's D, and at Table 1's real D
                f"D={d}"
                for d in sorted({floor["D"], 2304})
                if choose_schedule("auto", floor["V"], d, torch.empty(0, dtype=torch.bfloat16), True)
                == method.split()[-1]
            ]
            auto = f' ("auto" takes it at {" and ".join(autos)})' if autos else ""
            time_vs_eager = 1 / a["speedup_vs_eager"]
            lines.append(
                f"- {floor['workload']}, {method}{auto}: overhead {a['overhead_vs_eager'] * 100:.1f}% of eager's "
                f"(≤ 25%: {verdict(a['overhead_vs_eager'] <= 0.25)}); time {time_vs_eager:.2f}× eager's "
                f"(≤ 1.15×: {verdict(time_vs_eager <= 1.15)})"
            )
    return lines


def main(
    quick: bool = False,
    repeats: int = 3,
    table1_tokens: int = 1024,
    table1_dim: int = 2304,
    only: str = "",
    out: str | None = None,
) -> list[dict]:
    torch.manual_seed(0)
    rows = run(quick, repeats, table1_tokens, table1_dim, only)
    if not rows:
        raise SystemExit(f"no workload's name starts with {only!r}: see workloads()")
    name = out or ("linear_cross_entropy_quick" if quick else "linear_cross_entropy")
    common.write_csv(name, rows)
    title = "## `crossent.linear_cross_entropy` against eager PyTorch and the floor"
    flags = (" --quick" if quick else "") + (f" --repeats {repeats}" if repeats != 3 else "")
    flags += f" --table1-tokens {table1_tokens}" if table1_tokens != 1024 and not quick else ""
    flags += f" --table1-dim {table1_dim}" if table1_dim != 2304 and not quick else ""
    flags += (f" --only {only}" if only else "") + (f" --out {out}" if out else "")
    targets = target_lines(rows)
    intro = (
        f"{title}{' (quick shapes)' if quick else ''}\n\n"
        f"Machine: {common.machine_line()}.\n"
        f"Command: `python benchmarks/bench_linear_cross_entropy.py{flags}`; "
        f"medians of {repeats} round-robin rounds. Time of forward+backward as a multiple of the three bare "
        "products (floor) and as a speed-up over eager `F.cross_entropy((h @ W.T).float(), t)`; memory "
        "overhead = peak extra resident memory of forward+backward minus the gradients of hidden and weight. "
        "Absolute CPU times are in the CSV only.\n"
    )
    if table1_dim != 2304 and any(r["workload"].startswith("Table 1") for r in rows):
        intro += (
            f"\nTable 1 ran with D={table1_dim} instead of 2304: eager bfloat16 products run at about 1.3 GFLOP/s "
            "on this CPU (one eager call at D=2304 takes ~45 minutes). Eager's overhead is the (N, V) logits, "
            "their float32 copy and softmax, which do not depend on D.\n"
        )
    body = intro + "\n" + table(rows)
    if targets:
        body += "\n\nTargets of issue 4:\n\n" + "\n".join(targets)
    common.write_section(name, body)
    print("\n".join(targets))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--table1-tokens", type=int, default=1024)
    parser.add_argument(
        "--table1-dim",
        type=int,
        default=2304,
        help="hidden size of the Table-1 workload (2304; a smaller one when eager bfloat16 products are too slow)",
    )
    parser.add_argument("--only", default="", help="run only the workloads whose name starts with this (e.g. N=2048)")
    parser.add_argument("--out", help="CSV and RESULTS.md section name (default: linear_cross_entropy[_quick])")
    args = parser.parse_args()
    main(args.quick, args.repeats, args.table1_tokens, args.table1_dim, args.only, args.out)
