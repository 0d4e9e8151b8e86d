"""The import graph of seqkv's modules, from an AST walk over seqkv/ (top-level and function-level imports
alike): no cycles, and no module imports another module's private (underscore) names.  Tests are held to
the second rule too.

``python tests/test_architecture.py`` prints the graph's summary (modules, edges, cycles, private imports,
function-level imports) for the issue notes.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set) -> tuple[list, int]:
    """([(imported module, imported name or None)], function-level import count) of one file."""
    mod = module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local = sum(isinstance(n, (ast.Import, ast.ImportFrom))
                for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(fn))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_package else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                full = f"{source}.{alias.name}"
                out.append((full, None) if full in modules else (source, alias.name))
    return out, local


def graph(package: str = "seqkv"):
    paths = {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}
    edges = {m: set() for m in paths}
    private, local = [], 0
    for mod, path in paths.items():
        found, n_local = imports_of(path, set(paths))
        local += n_local
        for target, name in found:
            if target in paths and target != mod:
                edges[mod].add(target)
                if name and name.startswith("_") and not name.startswith("__"):
                    private.append(f"{mod} -> {target}.{name}")
    return edges, private, local


def cycles(edges: dict) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                out.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_among_seqkv_modules():
    edges, _, _ = graph()
    assert cycles(edges) == []


def test_no_module_imports_another_modules_private_names():
    _, private, _ = graph()
    assert private == []


def test_tests_import_no_private_names():
    modules = {module_name(p) for p in (ROOT / "seqkv").rglob("*.py")}
    bad = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        found, _ = imports_of(path, modules)
        bad += [f"{path.name}: {target}.{name}" for target, name in found
                if target.split(".")[0] in ("seqkv", "seqkv_ext") and name and name.startswith("_")
                and not name.startswith("__")]
    assert bad == []


def test_the_checker_sees_a_cycle_and_a_private_import():
    """The checks above can fail: a two-module cycle and a private import are found."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    found, _ = imports_of(Path(__file__), {"seqkv.codec"})
    assert ("seqkv.format", "open_container") not in found  # this file imports no seqkv module
    fake = ROOT / "tests" / "_private_import_probe.py"
    try:
        fake.write_text("from seqkv.codec import _secret\n")
        found, _ = imports_of(fake, {"seqkv.codec"})
        assert ("seqkv.codec", "_secret") in found
    finally:
        fake.unlink()


if __name__ == "__main__":
    edges, private, local = graph()
    found = cycles(edges)
    print(f"modules: {len(edges)}  import edges: {sum(map(len, edges.values()))}  function-level imports: {local}")
    print(f"cycles: {len(found)}")
    for component in found:
        print(f"  {len(component)} modules: {', '.join(component)}")
    print(f"private-name imports: {len(private)}")
    for line in private:
        print(f"  {line}")
    sys.exit(1 if found or private else 0)
