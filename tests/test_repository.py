"""The repository's own rules: test modules share helpers through one module; benchmarks use no tests."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_MODULES = {p.stem for p in (ROOT / "tests").glob("*.py")}


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_test_modules_do_not_import_each_other():
    bad = {p.name: sorted(n for n in _imported(p) if n.startswith("test_") or n == "conftest")
           for p in (ROOT / "tests").glob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_benchmarks_import_no_tests():
    bad = {}
    for p in (ROOT / "benchmarks").glob("*.py"):
        used = sorted(n for n in _imported(p) if n in TEST_MODULES)
        if used or '/ "tests"' in p.read_text():
            bad[p.name] = used or ["tests/ on sys.path"]
    assert bad == {}


def test_docs_name_no_machine_letters_or_commits():
    """Where a figure was measured is a results row's columns; history goes in commit messages."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if path.name == "results.md":  # generated: each row names its commit, as it should
            continue
        text = path.read_text()
        assert not re.search(r"\bmachine [A-Z]\b", text), path
        assert not re.search(r"\b[Cc]ommits? [0-9a-f]{7,40}\b|\([0-9a-f]{7,12}\)|\b[0-9a-f]{7}\b(?=[;,)])", text), (
            path, re.search(r"\b[Cc]ommits? [0-9a-f]{7,40}\b|\([0-9a-f]{7,12}\)|\b[0-9a-f]{7}\b(?=[;,)])", text))


