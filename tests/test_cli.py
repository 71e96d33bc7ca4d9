"""The command line: `crossent explain` prints the seed's figures; `crossent demo` runs."""

import subprocess
import sys

import pytest

from crossent.cli import main


def test_explain_prints_the_seed_walkthrough(capsys):
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    assert "M = 3.1000, 2.9000, 4.2000" in out
    assert "S = 1.8477, 1.6632, 1.9228" in out
    assert "losses = 0.6139, 0.5087, 0.6538" in out
    assert "mean = 0.5922" in out
    assert "F.cross_entropy on the same input: 0.5922" in out


def test_explain_reads_json_and_files(tmp_path, capsys):
    path = tmp_path / "logits.json"
    path.write_text("[[0.0, 0.0]]")
    assert main(["explain", "--logits", str(path), "--targets", "[1]"]) == 0
    assert "mean = 0.6931" in capsys.readouterr().out  # uniform over 2 classes: log 2


def test_explain_rejects_bad_input():
    with pytest.raises(SystemExit, match="outside|in \\[0, 2\\)"):
        main(["explain", "--logits", "[[0.0, 1.0]]", "--targets", "[5]"])
    with pytest.raises(SystemExit, match="JSON"):
        main(["explain", "--logits", "[[0.0, 1.0"])


def test_demo_runs_as_a_console_script():
    result = subprocess.run([sys.executable, "-m", "crossent.cli", "demo"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "mean = 0.5922" in result.stdout
    # the stability table: the textbook formula fails where crossent matches float64
    row = next(line for line in result.stdout.splitlines() if line.startswith("-1e30 + noise"))
    textbook, lse_minus, ours, truth = row.split()[-4:]
    assert textbook == "nan" and float(lse_minus) == 0.0
    assert ours == truth == "2.0794"  # log 8: the row is uniform in float32
