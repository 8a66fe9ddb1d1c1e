"""The house's layout holds: product code (compile/, plugin/, daemon/) imports downwards only,
plugin <- compile <- daemon, never tests/ or bench/ (not even by path), with no import cycle;
and no file name means two things."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("plugin", "compile", "daemon")  # each may import only those before it
# Loading code by file path, or putting a folder on the import path.
BY_PATH = re.compile(r"\b(runpy|run_path|spec_from_file_location|SourceFileLoader|sys\.path)\b")


def modules() -> dict[str, Path]:
    """`compile.engines.manifest` -> its file, for every product module."""
    found = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def _resolve(name: str) -> str | None:
    """The product module a dotted name refers to (its longest known prefix)."""
    parts = name.removeprefix("codetr_stream.").split(".")
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) or None


def imports(module: str) -> tuple[set[str], set[str]]:
    """(product modules `module` imports, other top-level names it imports)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    local, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from pkg import sub` imports pkg.sub; `from pkg import name` imports pkg.
            names = [f"{base}.{a.name}" if _resolve(f"{base}.{a.name}") == (
                f"{base}.{a.name}".removeprefix("codetr_stream.")) else base for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name) if name.startswith(("codetr_stream.", *LAYERS)) else None
            if target is not None and target != module:
                local.add(target)
            elif target is None:
                other.add(name.split(".")[0])
    return local, other


GRAPH = {module: imports(module) for module in MODULES}


def test_layers_import_downwards_only() -> None:
    upward = [f"{m} -> {t}" for m, (local, _) in GRAPH.items() for t in local
              if LAYERS.index(t.split(".")[0]) > LAYERS.index(m.split(".")[0])]
    assert not upward, upward


def test_no_product_module_imports_tests_or_bench() -> None:
    by_name = [f"{m} imports {n}" for m, (_, other) in GRAPH.items() for n in other
               if n in ("tests", "bench", "conftest") or (ROOT / "tests" / f"{n}.py").exists()
               or (ROOT / "bench" / f"{n}.py").exists()]
    by_path = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
               for path in MODULES.values()
               for i, line in enumerate(path.read_text().splitlines(), 1)
               if BY_PATH.search(line.split("#")[0])]
    assert not by_name and not by_path, by_name + by_path


def test_no_import_cycles() -> None:
    cycles, done = [], set()

    def visit(module: str, stack: list[str]) -> None:
        if module in stack:
            cycles.append([*stack[stack.index(module):], module])
            return
        if module in done:
            return
        for target in sorted(GRAPH[module][0]):
            visit(target, [*stack, module])
        done.add(module)

    for module in MODULES:
        visit(module, [])
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_every_file_name_means_one_thing() -> None:
    """A module name is used once across the product and the benchmarks (`__init__` and
    `__main__` aside): `preprocess` is the daemon's stage, `model_inputs` the model's reference."""
    names = Counter(path.stem for folder in (*LAYERS, "bench")
                    for path in (ROOT / folder).rglob("*.py")
                    if path.stem not in ("__init__", "__main__"))
    packages = Counter(path.parent.name for layer in LAYERS
                       for path in (ROOT / layer).rglob("__init__.py"))
    assert [n for n, count in (names + packages).items() if count > 1] == []
