"""The ``crossent`` command: ``crossent explain``, ``crossent demo`` and ``crossent bench``.

crossent explain [--logits JSON|FILE] [--targets JSON|FILE]
crossent demo
crossent bench [--quick] [--out DIR]

The subcommands live in this package: :mod:`crossent.cli.demo` (the demo), and the benchmark
suite in three parts, :mod:`crossent.cli.bench_suite` (what is measured, and how),
:mod:`crossent.cli.bench_report` (tables, files, ``bench()``) and :mod:`crossent.cli.bench_plots`.
Each is imported only when its subcommand runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import torch

from ..seed import SEED_LOGITS, SEED_TARGETS


def _load_json(text: str | None, default):
    """A JSON literal, or the path of a file holding one; ``default`` when not given."""
    if text is None:
        return default
    if os.path.exists(text):
        with open(text) as f:
            return json.load(f)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"crossent: expected a JSON list or the path of a JSON file, got {text!r} ({e})")


def cmd_explain(args: argparse.Namespace) -> int:
    from ..reference import explain

    logits = torch.tensor(_load_json(args.logits, SEED_LOGITS), dtype=torch.float64)
    targets = torch.tensor(_load_json(args.targets, SEED_TARGETS), dtype=torch.long)
    try:
        print(explain(logits, targets))
    except (ValueError, IndexError) as e:
        raise SystemExit(f"crossent explain: {e}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo()


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench_report import bench
    from .bench_suite import SWEEPS

    sweep = SWEEPS[args.sweep] if args.sweep else None
    bench(quick=args.quick, out=args.out, sweep=sweep, progress=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crossent", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("explain", help="print every step of the stable cross entropy of a batch")
    p.add_argument("--logits", help="JSON list of rows, or a file holding one (default: the seed's)")
    p.add_argument("--targets", help="JSON list of class ids, or a file holding one")
    p.set_defaults(func=cmd_explain)
    p = sub.add_parser("demo", help="the walkthrough, the stability table and the memory demo")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser(
        "bench",
        help="time and memory against F.cross_entropy, torch.compile and the matmul floor: tables, CSV, plots",
        description="Run the benchmark suite on the CPU: crossent's cross_entropy and linear_cross_entropy "
        "beside F.cross_entropy (eager and torch.compile), the three bare matmuls of the fused loss, and "
        "liger_kernel / cut_cross_entropy where installed. Prints time and memory ratios; writes a CSV and "
        "PNG plots (matplotlib: pip install crossent[plot]), and the suite section of benchmarks/RESULTS.md "
        "when DIR is a checkout's benchmarks/results.",
    )
    p.add_argument("--quick", action="store_true", help="small sweeps, one timed round (under two minutes on 2 cores)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default: benchmarks/results when ./benchmarks exists, else ./crossent-bench)",
    )
    p.add_argument("--sweep", choices=("quick", "full", "tiny"), help=argparse.SUPPRESS)  # "tiny": for the tests
    p.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    return args.func(args)
