"""Three layers, arrows pointing down: a core, the passes, the front ends (README, "How it works").

The import graph is read from the source, imports inside functions
included: an import deferred into a function body still ties the modules.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CORE = {"bitfx.format", "bitfx.kernels", "bitfx.kernels.cpu_ext", "bitfx.kernels.torch_ref",
        "bitfx.kernels.triton_kernels", "bitfx.ops", "bitfx.runtime_stats", "bitfx.options", "bitfx.liveness",
        "bitfx.torch_internals", "bitfx.profiles", "bitfx.opsets"}
FRONT = {"bitfx", "bitfx.__main__", "bitfx.backend", "bitfx.planner", "bitfx.cli_plan", "bitfx.fit",
         "bitfx.measure", "bitfx.report", "bitfx.demo", "bitfx.calibrate", "bitfx.inductor_layouts", "bitfx.models"}
LAYER = {"core": 0, "passes": 1, "front end": 2}


def modules() -> dict[str, Path]:
    out = {}
    for path in [*(ROOT / "bitfx").rglob("*.py"), *(ROOT / "passes").glob("*.py")]:
        rel = path.relative_to(ROOT).with_suffix("")
        parts = ("bitfx", "passes", *rel.parts[1:]) if rel.parts[0] == "passes" else rel.parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def layer(name: str) -> str:
    if name in CORE:
        return "core"
    if name.startswith("bitfx.passes"):
        return "passes"
    assert name in FRONT, f"{name} is in no layer: add it to CORE or FRONT"
    return "front end"


def imports() -> set[tuple[str, str]]:
    mods = modules()
    edges = set()
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in mods else base)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges |= {(name, t) for t in targets if t in mods and t != name}
    return edges


def test_every_module_is_in_a_layer():
    for name in modules():
        layer(name)


def test_imports_point_down_only():
    up = sorted((a, b) for a, b in imports() if LAYER[layer(a)] < LAYER[layer(b)])
    assert not up, "\n".join(f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, b in up)


def test_the_import_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for a, b in imports():
        graph.setdefault(a, set()).add(b)
    # The package's __init__ imports its front ends for the public API; a
    # module importing "bitfx" itself would close a loop through it.
    done, on_path, cycles = set(), [], []

    def visit(node):
        if node in on_path:
            cycles.append(on_path[on_path.index(node):] + [node])
            return
        if node in done:
            return
        on_path.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        on_path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_pass_measures():
    """Passes price with the device profile they are given; measuring is a front end's (calibrate, measure)."""
    for name, path in modules().items():
        if layer(name) != "passes":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                named = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                named = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            bad = [n for n in named if n.startswith(("bitfx.calibrate", "bitfx.measure", "torch.profiler"))]
            assert not bad, f"{name} imports {bad}"


def test_tests_import_no_benchmark_script_by_name():
    """Tests import bitfx; a benchmark script is loaded by ``helpers.benchmark``, by its path.

    A bare ``import run`` resolves through ``sys.path``: with the scripts'
    folder on it, a test could load ``benchmarks/<x>.py`` where it meant a
    package module, and a benchmark's model would pass for the package's.
    """
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    bad = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                named = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                named = [(node.module or "").split(".")[0]]
            else:
                continue
            bad += [f"{path.name}:{node.lineno} imports {n}" for n in named if n in scripts]
    assert not bad, "\n".join(bad)
