"""The package's layers: every import inside sputnik/ (function-level ones too) points to its own layer or a lower one,
and the top-level units of a layer never import each other both ways. README's "Layout" section shows the same list.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sputnik"

# Lowest first. A unit is a top-level module or package of sputnik; everything inside a package shares its layer.
LAYERS = [
    # no sputnik imports (kernels: block-format linear layers, a C++ extension)
    ["sputnik.device", "sputnik.config", "sputnik.machine", "sputnik.r1", "sputnik.seeds", "sputnik.settings",
     "sputnik.kernels"],
    # text: tokens, problems, verifiable rewards; tools (tool-call parsers and prompts, calculator, sandbox)
    ["sputnik.tokenizer", "sputnik.tasks", "sputnik.rewards", "sputnik.tools"],
    ["sputnik.model"],  # the transformer and its cache interface
    ["sputnik.checkpoint", "sputnik.engine"],  # weights in and out; batched generation
    ["sputnik.eval", "sputnik.train"],  # evaluation; pretrain, SFT, GRPO, distillation
    ["sputnik.serve"],  # the OpenAI-compatible API
    ["sputnik.web"],  # the chat web app, on top of serve
    ["sputnik.cli", "sputnik.__main__"],  # the `sputnik` command
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(node: ast.AST, module: str, is_package: bool, package: Path) -> list[str]:
    """The sputnik modules an import statement names (relative imports resolved against `module`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "sputnik"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "sputnik":
        return []
    # `from sputnik.engine import cache` names the submodule; `from sputnik.engine import Engine` the package.
    return [f"{target}.{a.name}" if module_exists(f"{target}.{a.name}", package) else target for a in node.names]


def module_exists(name: str, package: Path) -> bool:
    path = package.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def edges(package: Path = PACKAGE) -> list[tuple[str, str, str]]:
    """(importer, imported, where) for every import of a sputnik module inside the package."""
    found = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, package)
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            for target in imported(node, module, path.name == "__init__.py", package):
                edge = (module, target, f"{path.relative_to(package.parent)}:{node.lineno}")
                if edge not in found:  # `from x import a, b` names x once
                    found.append(edge)
    return found


def unit(module: str) -> str | None:
    """The top-level unit a module belongs to (the package root `sputnik` itself sits below every layer)."""
    if module == "sputnik":
        return "sputnik"
    top = ".".join(module.split(".")[:2])
    return top if top in LAYER else None


def violations(found: list[tuple[str, str, str]], modules: list[str] = ()) -> list[str]:
    """Unplaced units (of the modules given or imported), imports of a higher layer, and cycles among the units of one
    layer."""
    problems = []
    layer = {**LAYER, "sputnik": -1}
    named = list(modules) + [m for a, b, _ in found for m in (a, b)]
    for name in sorted({".".join(m.split(".")[:2]) for m in named if unit(m) is None}):
        problems.append(f"{name} is in no layer: place it in LAYERS (tests/test_layout.py) and in README's Layout")
    same_layer: dict[tuple[str, str], str] = {}  # (importer unit, imported unit) -> the first place it happens
    for a, b, where in found:
        ua, ub = unit(a), unit(b)
        if ua is None or ub is None or ua == ub:
            continue
        if layer[ub] > layer[ua]:
            problems.append(f"{where}: {a} (layer {layer[ua]}) imports {b} (layer {layer[ub]})")
        elif layer[ub] == layer[ua]:
            same_layer.setdefault((ua, ub), where)
    reach = {u: {b for a, b in same_layer if a == u} for u, _ in same_layer}
    changed = True
    while changed:  # transitive closure: a handful of units per layer
        changed = False
        for u, targets in reach.items():
            more = set().union(*(reach.get(t, set()) for t in targets)) - targets
            if more:
                targets |= more
                changed = True
    cycles = {tuple(sorted({u} | {v for v in reach[u] if u in reach.get(v, set())})) for u in reach if u in reach[u]}
    for cycle in sorted(cycles):
        places = ", ".join(f"{a} -> {b} at {w}" for (a, b), w in sorted(same_layer.items())
                           if a in cycle and b in cycle)
        problems.append(f"{' and '.join(cycle)} (layer {layer[cycle[0]]}) import each other: {places}")
    return problems


def test_imports_follow_the_layers():
    found = edges()
    assert len(found) > 50  # the walk sees the package
    problems = violations(found, [module_name(path, PACKAGE) for path in PACKAGE.rglob("*.py")])
    if problems:
        pytest.fail("layer violations:\n" + "\n".join(problems), pytrace=False)


def test_the_check_catches_upward_imports_cycles_and_unplaced_units():
    assert violations([("sputnik.engine.generate", "sputnik.model", "x:1")]) == []
    up = violations([("sputnik.model", "sputnik.engine.cache", "sputnik/model.py:3")])
    assert up == ["sputnik/model.py:3: sputnik.model (layer 2) imports sputnik.engine.cache (layer 3)"]
    both = violations([("sputnik.eval.run", "sputnik.train.loop", "a:1"),
                       ("sputnik.train.grpo", "sputnik.eval", "b:2")])
    assert both == ["sputnik.eval and sputnik.train (layer 4) import each other: sputnik.eval -> sputnik.train at "
                    "a:1, sputnik.train -> sputnik.eval at b:2"]
    ring = violations([("sputnik.config", "sputnik.r1", "a:1"), ("sputnik.r1", "sputnik.seeds", "b:2"),
                       ("sputnik.seeds", "sputnik.config", "c:3"), ("sputnik.config", "sputnik.device", "d:4")])
    assert len(ring) == 1 and ring[0].startswith("sputnik.config and sputnik.r1 and sputnik.seeds (layer 0)")
    assert "sputnik.extras is in no layer" in violations([("sputnik.cli", "sputnik.extras.x", "c:1")])[0]
    assert "sputnik.extras is in no layer" in violations([], ["sputnik.extras.tool"])[0]


def test_relative_and_function_level_imports_are_seen(tmp_path):
    pkg = tmp_path / "sputnik"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("from .cache import KVCache\n")
    (pkg / "engine" / "cache.py").write_text("def f():\n    from ..model import build_mask\n")
    (pkg / "model.py").write_text("")
    found = {(a, b) for a, b, _ in edges(pkg)}
    assert found == {("sputnik.engine", "sputnik.engine.cache"), ("sputnik.engine.cache", "sputnik.model")}
