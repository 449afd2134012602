"""The shape of the package, read from its source with `ast`: the import graph has no cycle,
every import points down the layers of docs/architecture.md, and no function is too long to
read in one sitting. Every import counts, the ones inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "localalign"

# The layers, top to bottom. A module may import modules of its own group and of any group on a
# lower layer; never one of a group beside it or above it. A group is a list of module names;
# a subpackage's name covers its modules. Every module is in one group.
LAYERS: list[dict[str, list[str]]] = [
    {"cli": ["localalign.__main__", "localalign.cli"]},
    {"align": ["localalign.align", "localalign.fit"], "doctor": ["localalign.doctor"]},
    {"export": ["localalign.export"], "evaluation": ["localalign.evaluation"]},
    {"isara": ["localalign.isara"], "train": ["localalign.train"]},
    {"models": ["localalign.models"]},
    {"checks": ["localalign.checks"]},
    {"convert": ["localalign.convert"]},
    {"engine": ["localalign.engine"]},
    {"judges": ["localalign.judges"]},
    {"utilities": ["localalign", "localalign.chat", "localalign.config", "localalign.errors", "localalign.families", "localalign.fsutil",
                   "localalign.gguf_header", "localalign.paths", "localalign.rundir", "localalign.samples"]},
]
# The engine turns token ids into tokens; it knows nothing of the method or of its scoring.
ENGINE_NEVER_IMPORTS = ("localalign.isara", "localalign.evaluation")
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The package's modules that `path` imports (at any depth of the file), with the first line."""
    me = module_name(path)
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this file is in
                package = me.split(".") if path.name == "__init__.py" else me.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target.startswith("localalign") and target != me:
                found.setdefault(target, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = package_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def group_of(module: str) -> tuple[int, str]:
    """(layer, group) of a module: the group naming the longest prefix of it."""
    best: tuple[int, int, str] | None = None
    for layer, groups in enumerate(LAYERS):
        for group, names in groups.items():
            for name in names:
                covers = module == name or ("." in name and module.startswith(name + "."))  # not the root
                if covers and (best is None or len(name) > best[0]):
                    best = (len(name), layer, group)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best[1], best[2]


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # "open" while on the DFS path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_layers_name_every_module():
    for module in package_modules():
        group_of(module)


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_point_down_the_layers():
    wrong = []
    for module, targets in import_graph().items():
        layer, group = group_of(module)
        for target, line in sorted(targets.items()):
            t_layer, t_group = group_of(target)
            if t_group != group and t_layer <= layer:
                where = "beside it" if t_layer == layer else "above it"
                wrong.append(f"{module}:{line} imports {target} ({t_group}, {where}; {module} is in {group})")
    assert wrong == [], "imports that do not point down:\n" + "\n".join(wrong)


def test_the_engine_knows_nothing_of_isara_or_evaluation():
    wrong = [
        f"{module}:{line} imports {target}"
        for module, targets in import_graph().items()
        if module.startswith("localalign.engine")
        for target, line in targets.items()
        if target.startswith(ENGINE_NEVER_IMPORTS)
    ]
    assert wrong == []


def test_no_function_is_longer_than_80_lines():
    long = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} has {node.end_lineno - node.lineno + 1} lines"
        for path in package_modules().values()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == [], "split these into named steps:\n" + "\n".join(long)


def test_the_checks_see_what_they_check():
    """The readers above find the imports that are there (a broken reader would pass everything)."""
    graph = import_graph()
    assert "localalign.engine.base" in graph["localalign.engine.llamacpp"]
    assert "localalign.evaluation.suites.safety" in graph["localalign.evaluation.run"]  # `from pkg import mod`
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None
    assert group_of("localalign.engine.base")[1] == "engine" and group_of("localalign.evaluation.suites.ifeval")[1] == "evaluation"
    assert group_of("localalign.align")[0] < group_of("localalign.engine.base")[0]
