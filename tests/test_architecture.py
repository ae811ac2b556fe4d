"""The shape of the house, read off the source (no imports run): folders by concept, imports one way with no
cycles (imports inside functions included), absolute across folders, no private names across modules, no file
name twice, and few cache-mode branches outside graphs/."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"export": "kvgraph.export", "graphs": "kvgraph.graphs", "runtime": "kvgraph.runtime"}
# Within runtime/, imports run one way: commands -> serving | tools -> generator -> decoding -> core -> graphs.
RANKS = {"kvgraph.graphs": 0, "kvgraph.runtime.core": 1, "kvgraph.runtime.decoding": 2, "kvgraph.runtime.generator": 3,
         "kvgraph.runtime": 3, "kvgraph.runtime.serving": 4, "kvgraph.runtime.tools": 4, "kvgraph.runtime.commands": 5}
# What export/ may use of the runtime: its public API, never a command module.
EXPORT_MAY_USE = ("kvgraph.runtime", "kvgraph.runtime.generator", "kvgraph.runtime.tools.quantize_export", "kvgraph.runtime.tools.quality")
TORCH_SIDE = ("torch", "transformers", "optimum", "kvgraph.export")


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str], int, int]]:
    """Every import in the file, inside functions too: (module, names imported from it, relative level, line)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], 0, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", [alias.name for alias in node.names], node.level, node.lineno))
    return out


def _targets(module: str, names: list[str]) -> list[str]:
    """The kvgraph modules an import reaches: `from pkg import mod` reaches pkg.mod when that is a module."""
    if module not in MODULES:
        return []
    return [f"{module}.{n}" if f"{module}.{n}" in MODULES else module for n in names] or [module]


def _edges() -> dict[str, set[str]]:
    return {name: {t for module, names, _, _ in _imports(path) for t in _targets(module, names) if t != name}
            for name, path in MODULES.items()}


def _rank(module: str) -> int | None:
    owner = max((prefix for prefix in RANKS if module == prefix or module.startswith(prefix + ".")), key=len, default=None)
    return None if owner is None else RANKS[owner]


def _folder(module: str) -> str:
    path = MODULES[module]
    return str(path.parent if path.name != "__init__.py" else path.parent)


def test_the_concept_folders_are_there():
    for folder in ("runtime/core", "runtime/decoding", "runtime/serving", "runtime/commands", "runtime/tools", "graphs/rewrites"):
        assert (ROOT / folder / "__init__.py").is_file(), folder
    assert not sorted(p.name for p in (ROOT / "runtime").glob("*.py") if p.name not in ("__init__.py", "generator.py"))


def test_no_python_file_name_repeats_across_folders():
    names = [p.name for folder in ("export", "graphs", "runtime", "tests", "benchmarks", "examples")
             for p in (ROOT / folder).rglob("*.py") if "node_modules" not in p.parts and p.name not in ("__init__.py", "conftest.py")]
    assert not [name for name, count in Counter(names).items() if count > 1]


def test_imports_are_absolute():
    relative = [f"{path.relative_to(ROOT)}:{line}" for path in MODULES.values() for _, _, level, line in _imports(path) if level]
    assert not relative, relative


def test_there_are_no_import_cycles():
    edges, state, cycles = _edges(), {}, []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [module, target] if target in stack else [module, target])
            elif target not in state:
                visit(target, stack + [module])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [])
    assert not cycles, cycles


def test_runtime_imports_run_one_way():
    """A module imports lower layers, or modules of its own folder (which the cycle test keeps acyclic)."""
    upward = []
    for module, targets in _edges().items():
        rank = _rank(module)
        for target in targets:
            if rank is None or _rank(target) is None or _folder(module) == _folder(target):
                continue
            if _rank(target) > rank or (_rank(target) == rank and rank > 0):
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_graphs_and_runtime_never_import_torch_or_export():
    found = [f"{name} imports {module}" for name, path in MODULES.items() if not name.startswith("kvgraph.export")
             for module, _, _, _ in _imports(path) if module.split(".")[0] in ("torch", "transformers", "optimum")
             or module.startswith("kvgraph.export")]
    assert not found, found


def test_export_uses_only_the_runtime_public_api():
    found = [f"{name} imports {target}" for name, targets in _edges().items() if name.startswith("kvgraph.export")
             for target in targets if target.startswith("kvgraph.runtime") and target not in EXPORT_MAY_USE]
    assert not found, found


def test_no_private_name_is_imported_across_modules():
    files = [*MODULES.values(), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "examples").glob("*.py")]
    private = [f"{path.relative_to(ROOT)}:{line}: {name} from {module}" for path in files
               for module, names, _, line in _imports(path) if module.startswith("kvgraph")
               for name in names if name.startswith("_")]
    assert not private, private


MODE_BRANCH = re.compile(r"if .*(\.static|\.seq2seq|static\b|seq2seq\b)|(static|seq2seq) (if|else)")


MAX_MODE_BRANCHES = 10


def test_few_cache_mode_branches_outside_graphs():
    """What a cache mode or graph kind can do is asked of its adapter (graphs/modes.py); branches elsewhere stay few."""
    lines = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for folder in ("export", "runtime", "benchmarks")
             for path in sorted((ROOT / folder).rglob("*.py")) for n, line in enumerate(path.read_text().splitlines(), 1)
             if MODE_BRANCH.search(line)]
    assert len(lines) <= MAX_MODE_BRANCHES, "\n".join(lines)
