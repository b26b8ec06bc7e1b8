"""Materialize symbolic sizes as FX nodes.

``bitfx::decompress`` takes the dense tensor's size and stride.  Under
``dynamic=True`` these are SymInt expressions such as ``64*s0``; the backward
graph must compute them from values it already has: a SymInt placeholder
(the partitioner saves them) or a dimension of a tensor placeholder.
"""

from __future__ import annotations

import operator

import sympy
import torch
import torch.fx as fx

from bitfx import torch_internals


class UnsupportedSymbolicExpr(Exception):
    pass


def symbol_sources(graph: fx.Graph, exclude=frozenset()) -> dict[sympy.Symbol, tuple]:
    """Where each plain symbol can be read: ``(placeholder, dim or None, value)``.

    SymInt placeholders come first: reading them costs nothing.
    """
    sources: dict[sympy.Symbol, tuple] = {}
    phs = [p for p in graph.find_nodes(op="placeholder") if p not in exclude]
    for ph in phs:
        val = ph.meta.get("val")
        if isinstance(val, torch.SymInt) and isinstance(val.node.expr, sympy.Symbol):
            sources[val.node.expr] = (ph, None, val)
    for ph in phs:
        val = ph.meta.get("val")
        if isinstance(val, torch.Tensor):
            for d, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                    sources.setdefault(s.node.expr, (ph, d, s))
    return sources


def missing_symbols(values, sources) -> set[str]:
    """Symbols in ``values`` (ints / SymInts) that ``sources`` cannot provide."""
    missing: set[str] = set()
    for v in values:
        if isinstance(v, torch.SymInt):
            missing |= {str(s) for s in v.node.expr.free_symbols if s not in sources}
    return missing


class SymIntEmitter:
    """Emits nodes computing SymInt expressions at the top of ``graph``."""

    def __init__(self, graph: fx.Graph, exclude=frozenset()):
        self.graph = graph
        self.sources = symbol_sources(graph, exclude)
        self.cache: dict[sympy.Expr, fx.Node] = {}
        # Everything is inserted before this fixed node, so emitted nodes come
        # after all placeholders and in the order they were made.
        self.anchor = next(n for n in graph.nodes if n.op != "placeholder")

    def arg(self, value):
        """A graph argument for an int or SymInt value."""
        if isinstance(value, int):
            return value
        expr = value.node.expr
        if expr.is_Integer:
            return int(expr)
        return self._emit(expr)

    def arg_from_expr(self, value) -> fx.Node | int:
        """A graph argument for an int or a sympy expression over known symbols."""
        if isinstance(value, int):
            return value
        return self._emit(sympy.sympify(value))

    def _emit(self, expr: sympy.Expr) -> fx.Node | int:
        if expr.is_Integer:
            return int(expr)
        if expr in self.cache:
            return self.cache[expr]
        with self.graph.inserting_before(self.anchor):
            if isinstance(expr, sympy.Symbol):
                if expr not in self.sources:
                    raise UnsupportedSymbolicExpr(f"no value in the graph for symbol {expr}")
                ph, dim, val = self.sources[expr]
                if dim is None:
                    return ph
                node = self.graph.call_function(torch.ops.aten.sym_size.int, (ph, dim))
                node.meta["val"] = val
            elif type(expr) in _FOLDS:
                op = _FOLDS[type(expr)]
                terms = [self._emit(a) for a in expr.args]
                node = terms[0]
                for term in terms[1:]:
                    node = self._call(op, node, term)
            elif isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp > 0:
                base = self._emit(expr.base)
                node = base
                for _ in range(int(expr.exp) - 1):
                    node = self._call(operator.mul, node, base)
            else:
                raise UnsupportedSymbolicExpr(f"cannot build {expr} ({type(expr).__name__})")
        self.cache[expr] = node
        return node


    def _call(self, op, a, b) -> fx.Node:
        node = self.graph.call_function(op, (a, b))
        node.meta["val"] = op(_val(a), _val(b))
        return node


_SYM = torch_internals.sympy_functions  # torch's sympy functions in SymInt expressions
_FOLDS = {
    sympy.Mul: operator.mul,
    sympy.Add: operator.add,
    _SYM.FloorDiv: operator.floordiv,
    _SYM.Mod: operator.mod,
    _SYM.Max: torch.sym_max,
    _SYM.Min: torch.sym_min,
    sympy.Max: torch.sym_max,
    sympy.Min: torch.sym_min,
}


def _val(x):
    return x.meta["val"] if isinstance(x, fx.Node) else x
