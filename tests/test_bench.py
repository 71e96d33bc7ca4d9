"""`crossent bench`: the suite's whole code path at tiny sizes, in a temporary folder.

Only the plumbing is checked (rows, files, tables, the RESULTS.md section, the command line);
no timing is judged here — speed is measured by the benchmarks, never by tests (DESIGN.md §4).
"""

from __future__ import annotations

import contextlib
import csv
import io
import sys

import pytest

from crossent.cli import bench_suite as suite
from crossent.cli import main
from crossent.cli.bench_plots import plot_results
from crossent.cli.bench_report import default_out_dir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
OTHER_SECTION = "<!-- BEGIN other -->\nkept as it is\n<!-- END other -->\n"

#: The methods that run everywhere (TINY does not compile); the peers run only where installed.
CORE = {
    suite.CE: [suite.CROSSENT, suite.INPLACE, suite.EAGER],
    suite.LINEAR: [suite.FLOOR, suite.LINEAR_CROSSENT, suite.LINEAR_EAGER],
}
EVERY_METHOD = [*CORE[suite.CE], suite.COMPILE, suite.LIGER_CE, *CORE[suite.LINEAR], suite.CCE, suite.LIGER_LINEAR]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`crossent bench --sweep tiny --out <tmp>/benchmarks/results`, as from a checkout."""
    root = tmp_path_factory.mktemp("checkout")
    out = root / "benchmarks" / "results"
    out.mkdir(parents=True)
    (root / "benchmarks" / "RESULTS.md").write_text("# Benchmark results\n\n" + OTHER_SECTION)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert main(["bench", "--sweep", "tiny", "--out", str(out)]) == 0
    return out, stdout.getvalue(), stderr.getvalue()


def test_the_csv_has_one_row_per_method_and_point(run):
    out, _, _ = run
    with open(out / "suite_tiny.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [(r["family"], r["method"], int(r["N"]), int(r["V"])) for r in rows]
    assert len(keys) == len(set(keys)), "a (method, point) measured twice"
    for family, methods in CORE.items():
        for method in methods:
            for n, v in suite.TINY.points():
                assert (family, method, n, v) in keys, f"no row for {method} at N={n}, V={v}"
    for r in rows:
        assert float(r["fwd_bwd_ms"]) > 0 and float(r["fwd_ms"]) > 0
        assert int(r["peak_extra_bytes"]) >= 0
        assert float(r["time_vs_eager"]) > 0
    baselines = [r for r in rows if r["method"] in (suite.EAGER, suite.LINEAR_EAGER)]
    assert all(float(r["time_vs_eager"]) == 1.0 for r in baselines)


def test_the_plots_are_png_files(run):
    pytest.importorskip("matplotlib")
    out, stdout, _ = run
    for name in ("suite_tiny_memory_vs_n.png", "suite_tiny_memory_vs_v.png", "suite_tiny_time.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_MAGIC, f"{name} is not a PNG file"
        assert f"Wrote {path}" in stdout


def test_without_matplotlib_there_are_no_plots_and_no_error(run, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = suite.SuiteResult(suite.TINY, rows=[])
    assert plot_results(result, tmp_path) is None
    assert not list(tmp_path.iterdir())


def test_the_table_names_every_method_and_why_one_did_not_run(run):
    _, stdout, _ = run
    for method in EVERY_METHOD:
        assert method in stdout, f"the table lacks {method}"
    assert "not run in this sweep" in stdout  # torch.compile is off at the tiny sizes
    for peer in ("liger_kernel", "cut_cross_entropy"):
        try:
            __import__(peer)
        except ImportError:
            assert f"{peer} is not installed (pip install crossent[bench])" in stdout


def test_progress_goes_to_stderr(run):
    _, stdout, stderr = run
    total = 2 * len(suite.TINY.points())
    assert f"[1/{total}] cross_entropy N=8 V=64" in stderr
    assert f"[{total}/{total}] linear N=8 V=11 D=4" in stderr
    assert "[1/" not in stdout


def test_the_results_section_is_written_and_the_others_kept(run):
    out, _, _ = run
    text = (out.parent / "RESULTS.md").read_text()
    assert OTHER_SECTION.strip() in text
    section = text.split("<!-- BEGIN suite_tiny -->", 1)[1].split("<!-- END suite_tiny -->", 1)[0]
    assert "Machine: " in section and "torch " in section
    assert "Command: `crossent bench --sweep tiny --out " in section
    assert suite.LINEAR_CROSSENT in section
    if (out / "suite_tiny_time.png").exists():
        assert "](results/suite_tiny_memory_vs_n.png)" in section


def test_default_out_dir(tmp_path):
    assert default_out_dir(tmp_path) == tmp_path / "crossent-bench"
    (tmp_path / "benchmarks").mkdir()
    assert default_out_dir(tmp_path) == tmp_path / "benchmarks" / "results"


def test_bench_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--out DIR" in out
    assert "--sweep" not in out  # the tests' sweep is not advertised
