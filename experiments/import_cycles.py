"""Import cycles between autodiff_opt's top-level modules and subpackages, with and without type-only
imports (grimp), as docs/architecture.md ("Optuna's internals and errors") counts them.

    PYTHONPATH=<checkout>/src python experiments/import_cycles.py

lint-imports' acyclic_siblings contract (pyproject.toml) keeps the count at 0; this prints the cycles.
"""

from __future__ import annotations

import grimp


def _top(module: str) -> str:
    return ".".join(module.split(".")[:2])


def cycles(exclude_type_checking: bool) -> list[list[str]]:
    """Strongly connected components of more than one node of the graph folded to autodiff_opt.<child>."""
    graph = grimp.build_graph("autodiff_opt", exclude_type_checking_imports=exclude_type_checking, cache_dir=None)
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            if _top(module) != _top(imported):
                edges.setdefault(_top(module), set()).add(_top(imported))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return out


if __name__ == "__main__":
    for excluded in (True, False):
        found = cycles(excluded)
        print(f"type-only imports {'excluded' if excluded else 'included'}: {len(found)} cycle(s) {found}")
