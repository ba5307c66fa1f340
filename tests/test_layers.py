"""The layer direction of docs/architecture.md: no module imports a higher layer (lazy imports
inside functions and ``TYPE_CHECKING`` blocks count too)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hetpfl"

# Lower numbers are lower layers; a module may import its own layer and those below.
LAYERS = {
    "rng": 0, "configuration": 0, "numerics": 0, "kernels": 0, "workerpool": 0,
    "data": 1,
    "models": 2, "messages": 2, "plots": 2,
    "learn": 3, "state": 3, "backbones": 3,
    "algorithms": 4, "adversaries": 4, "privacy": 4,
    "clienthost": 5, "engine": 5,
    "simulator": 6, "executors": 6,
    "runtimes": 7,
    "config": 8,
    "prepare": 9,
    "experiment": 10, "runfolder": 10, "flwr_run": 10,
    "cli": 11, "report": 11, "flower_app": 11,
}


def _imports(path: Path) -> list[tuple[int, str]]:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(parts[:-1])[: len(parts) - node.level] if node.level > 1 else list(parts[:-1])
                target = (base + (node.module.split(".") if node.module else []))
                if not node.module:  # "from . import x": x is a module of the package
                    target = base + [node.names[0].name]
                found.append((node.lineno, target[0] if target else ""))
            elif node.module and node.module.startswith("hetpfl."):
                found.append((node.lineno, node.module.split(".")[1]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[1]) for a in node.names if a.name.startswith("hetpfl.")]
    return found


def test_every_module_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert tops <= set(LAYERS), f"add these to LAYERS (and docs/architecture.md): {sorted(tops - set(LAYERS))}"


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if here == "__init__":
            continue
        for line, there in _imports(path):
            if there in LAYERS and LAYERS[there] > LAYERS[here]:
                bad.append(f"{path.relative_to(PACKAGE)}:{line}: '{here}' (layer {LAYERS[here]}) imports "
                           f"'{there}' (layer {LAYERS[there]})")
    assert not bad, "\n".join(bad)
