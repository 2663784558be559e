"""Check lorakit's import graph: no cycles, and no module importing a layer above its own.

Reads the sources with ``ast`` (nothing is imported), so it runs in a second and needs no dependencies.
Every import counts, including ones inside functions: a lazy import still ties the two modules together.
Imports under ``if TYPE_CHECKING:`` are skipped (they never run).

Layers, lowest first (a module may import its own layer and the ones below). Every module must lie in one:
a module no prefix covers is reported, so a new package is placed on purpose.

    base         lorakit.errors, lorakit.version (leaves)
    lora         lorakit.lora: architecture facts, layer kinds, config, targets, layers, adapters, kernels
    io           lorakit.io: adapter files, atomic writes, built-in models
    quant        lorakit.quant: quantized frozen bases and their loader (which reads models through io)
    arith        lorakit.arith: adapter arithmetic (combine, hot swap)
    data         lorakit.data, lorakit.metrics, lorakit.generation, lorakit.analysis
    methods      lorakit.methods (the method registry and the non-LoRA methods)
    export       lorakit.export: adapters and merged models for other runtimes (GGUF, Ollama, transformers)
    training     lorakit.training and lorakit.tasks
    experiments  lorakit.experiments and lorakit.bench (comparisons, latency, benchmarks)
    apps         lorakit.serve, lorakit.cli, lorakit.demo, lorakit.classify, lorakit.__main__ and the package face

Usage: ``python scripts/check_imports.py [SRC_DIR]`` (default: ``src`` next to this script). Exit status 1
when a cycle or an upward import exists; each is printed with the file and line of every import in it.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "lorakit"
# Sub-packages / modules → layer; the first matching prefix wins.
LAYERS: tuple[tuple[str, str], ...] = (
    ("lorakit.errors", "base"),
    ("lorakit.version", "base"),
    ("lorakit.lora", "lora"),
    ("lorakit.io", "io"),
    ("lorakit.quant", "quant"),
    ("lorakit.arith", "arith"),
    ("lorakit.data", "data"),
    ("lorakit.metrics", "data"),
    ("lorakit.generation", "data"),
    ("lorakit.analysis", "data"),
    ("lorakit.methods", "methods"),
    ("lorakit.export", "export"),
    ("lorakit.training", "training"),
    ("lorakit.tasks", "training"),
    ("lorakit.experiments", "experiments"),
    ("lorakit.bench", "experiments"),
    ("lorakit.serve", "apps"),
    ("lorakit.cli", "apps"),
    ("lorakit.demo", "apps"),
    ("lorakit.classify", "apps"),
    ("lorakit.__main__", "apps"),
)
ORDER = ("base", "lora", "io", "quant", "arith", "data", "methods", "export", "training", "experiments", "apps")


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``line``."""

    source: str
    target: str
    line: int


UNPLACED = "unplaced"


def layer_of(module: str) -> str:
    """The layer of a dotted module name (the package face is an app: it re-exports every layer)."""
    if module == PACKAGE:
        return "apps"
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return UNPLACED


def module_names(src: Path) -> dict[str, Path]:
    """{dotted module name: file} for every module of the package under ``src``."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of statements under ``if TYPE_CHECKING:``."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines |= {n.lineno for n in ast.walk(child) if hasattr(n, "lineno")}
    return lines


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``lorakit.io.files.read_adapter`` → files)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Dotted names an import statement brings in (relative imports resolved against ``module``)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parent = module.split(".") if is_package else module.split(".")[:-1]
            parent = parent[: len(parent) - (node.level - 1)]
            base = ".".join(parent + ([base] if base else []))
        for alias in node.names:
            yield f"{base}.{alias.name}"  # a submodule, or a name in ``base`` (resolved to base)


def edges(src: Path) -> list[Edge]:
    """Every import between two lorakit modules (self-imports and a package's own parent excluded)."""
    known = module_names(src)
    out = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skip = _type_checking_lines(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom) or node.lineno in skip:
                continue
            for name in _imported(node, module, path.name == "__init__.py"):
                target = _resolve(name, known)
                # A package importing from its own submodule, or a module from its package __init__ for a
                # name it defines itself, is not a dependency between two units.
                if target and target != module and not module.startswith(target + "."):
                    out.append(Edge(module, target, node.lineno))
    return sorted(set(out), key=lambda e: (e.source, e.line, e.target))


def cycles(all_edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components with more than one module (each holds at least one cycle)."""
    graph: dict[str, set[str]] = {}
    for e in all_edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the graph has ~100 nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def upward(all_edges: list[Edge]) -> list[Edge]:
    """Imports from a lower layer into a higher one."""
    rank = {layer: i for i, layer in enumerate(ORDER)}
    placed = [e for e in all_edges if UNPLACED not in (layer_of(e.source), layer_of(e.target))]
    return [e for e in placed if rank[layer_of(e.target)] > rank[layer_of(e.source)]]


def unplaced(src: Path) -> list[str]:
    """Modules that no prefix in ``LAYERS`` covers."""
    return [m for m in module_names(src) if layer_of(m) == UNPLACED]


def report(src: Path) -> list[str]:
    """Lines describing every problem found (empty: the graph is clean).

    Args:
        src: the folder holding the ``lorakit`` package.
    """
    all_edges = edges(src)
    lines = []
    for component in cycles(all_edges):
        members = set(component)
        lines.append(f"cycle among {len(component)} modules: {', '.join(component)}")
        for e in sorted(all_edges, key=lambda e: (e.source, e.line)):
            if e.source in members and e.target in members:
                lines.append(f"    {e.source} (line {e.line}) imports {e.target}")
    for e in sorted(upward(all_edges), key=lambda e: (e.source, e.line)):
        lines.append(
            f"upward import: {e.source} [{layer_of(e.source)}] (line {e.line}) imports "
            f"{e.target} [{layer_of(e.target)}]"
        )
    lines += [f"unplaced module: {m} (add its prefix to LAYERS)" for m in unplaced(src)]
    return lines


def main(argv: list[str]) -> int:
    """Print the problems and return the exit status."""
    src = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "src"
    problems = report(src)
    for line in problems:
        print(line)
    n_edges = len(edges(src))
    print(f"check_imports: {len(module_names(src))} modules, {n_edges} imports, layers {' < '.join(ORDER)}: "
          + ("clean" if not problems else f"{sum(not p.startswith(' ') for p in problems)} problem(s)"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
