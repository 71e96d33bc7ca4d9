"""The documentation runs: every docstring example of the public modules, every public name has
one, and every ``>>>`` example of README.md and docs/*.md passes (as doctests, in `make test`)."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

import crossent

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

#: The modules whose docstrings document the public API (crossent.__all__, crossent.distributed,
#: crossent.transformers); each must hold at least one example, and all of them must pass.
PUBLIC_MODULES = [
    "crossent.functional",
    "crossent.modules",
    "crossent.options",
    "crossent.loss_aux",
    "crossent.reference",
    "crossent.distributed.losses",
    "crossent.distributed.normalizer",
    "crossent.transformers",
    "crossent.integrations.hf_forward",
    "crossent.integrations.hf_patch",
    "crossent.cli.bench_suite",
    "crossent.cli.bench_report",
    "crossent.cli.bench_plots",
    "crossent.measure",
]

#: The pages every newcomer is pointed to; the first two must teach by running examples.
PAGES = ["guide.md", "math.md", "comparison.md"]
PAGES_WITH_EXAMPLES = ["guide.md", "math.md"]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_docstring_examples_pass(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=FLAGS, report=True)
    assert result.attempted > 0, f"{name} has no docstring example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed (see stdout)"


def _public_objects():
    """(qualified name, object) of every public function and class (constants have no docstring)."""
    found = []
    for module_name, module in (
        ("crossent", crossent),
        ("crossent.distributed", importlib.import_module("crossent.distributed")),
        ("crossent.transformers", importlib.import_module("crossent.transformers")),
    ):
        for name in module.__all__:
            obj = getattr(module, name)
            if callable(obj):
                found.append((f"{module_name}.{name}", obj))
    return found


@pytest.mark.parametrize(("name", "obj"), _public_objects(), ids=[name for name, _ in _public_objects()])
def test_every_public_name_has_a_runnable_example(name, obj):
    assert obj.__doc__ and ">>>" in obj.__doc__, f"{name} has no `>>>` example in its docstring"


def test_the_docs_pages_exist():
    missing = [page for page in PAGES if not (DOCS / page).is_file()]
    assert not missing, f"docs/ lacks {missing}"


MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("path", MARKDOWN, ids=[p.relative_to(ROOT).as_posix() for p in MARKDOWN])
def test_markdown_examples_pass(path):
    result = doctest.testfile(str(path), module_relative=False, optionflags=FLAGS, encoding="utf-8", report=True)
    if path.parent == DOCS and path.name in PAGES_WITH_EXAMPLES:
        assert result.attempted > 0, f"{path.name} has no `>>>` example"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {path.name} failed (see stdout)"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("path", MARKDOWN, ids=[p.relative_to(ROOT).as_posix() for p in MARKDOWN])
def test_relative_links_inside_the_repository_resolve(path):
    broken = []
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        resolved = (path.parent / target).resolve()
        if resolved.is_relative_to(ROOT) and not resolved.exists():
            broken.append(target)
    assert not broken, f"{path.name} links to missing files: {broken}"
