"""The repository's own rules: test modules share helpers through one module; benchmarks use no tests."""

import ast
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
