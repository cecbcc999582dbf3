"""The package layout is the architecture: layers import only from layers below, and there are no cycles.

Layers, bottom to top (docs/architecture.md):
    0 utilities   hessfast.utils, hessfast._version
    1 kernels     hessfast.kernels
    2 collectives hessfast.distributed
    3 operators   hessfast.losses, hessfast.operators
    4 engine      hessfast.engine, hessfast.spectrum, hessfast.slq (the ``hessfast.lanczos`` function)
    5 analysis    variance, prediction, tuner, theory, rmt_sim, estimators, scaling_law, advice
    6 harness     hessfast.harness (models, data, recipes, CLI), hessfast.__main__

Function-level imports count: a lazy import upward is still an upward dependency.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "hessfast"
LAYERS = {
    "hessfast._version": 0, "hessfast.utils": 0,
    "hessfast.kernels": 1,
    "hessfast.distributed": 2,
    "hessfast.losses": 3, "hessfast.operators": 3,
    "hessfast.engine": 4, "hessfast.spectrum": 4, "hessfast.slq": 4,
    "hessfast.variance": 5, "hessfast.prediction": 5, "hessfast.tuner": 5, "hessfast.theory": 5,
    "hessfast.rmt_sim": 5, "hessfast.estimators": 5, "hessfast.scaling_law": 5, "hessfast.advice": 5,
    "hessfast.harness": 6, "hessfast.__main__": 6,
}
MAX_LINES = 550


def modules():
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("hessfast",) + path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = modules()


def layer_of(module):
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return LAYERS[".".join(parts[:i])]
    return None


def imports(module, path):
    """(imported module, imported name or None, line) for every import in the file, resolved to hessfast modules."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub, None, node.lineno) if sub in MODULES else (target, a.name, node.lineno))
    return [(t, n, line) for t, n, line in found if t == "hessfast" or t.startswith("hessfast.")]


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if m != "hessfast" and layer_of(m) is None]
    assert not missing, f"modules without a layer in tests/test_architecture.py LAYERS: {missing}"


def test_no_module_imports_from_a_layer_above_it():
    bad = []
    for module, path in MODULES.items():
        if module == "hessfast":
            continue
        mine = layer_of(module)
        for target, _, line in imports(module, path):
            if target == "hessfast":  # the package itself exports every layer: only the top may use it
                if mine < 6:
                    bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports hessfast (layer {mine})")
                continue
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} (layer {mine}) imports {target} (layer {theirs})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in imports(m, p) if t in MODULES and t not in (m, "hessfast")}
             for m, p in MODULES.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package's __init__ re-exporting its own submodules is not a cycle between modules
            if len(comp) > 1 and not all(c.startswith(min(comp, key=len) + ".") or c == min(comp, key=len)
                                         for c in comp):
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_name_crosses_a_package_boundary():
    bad = []
    for module, path in MODULES.items():
        pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for target, name, line in imports(module, path):
            target_pkg = target if (MODULES.get(target) and MODULES[target].name == "__init__.py") \
                else target.rpartition(".")[0]
            private = (name or "").startswith("_") or any(p.startswith("_") and p != "__main__"
                                                          for p in target.split(".")[1:])
            if private and target_pkg != pkg and not (name or "").startswith("__"):
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} imports {target}{'.' + name if name else ''}")
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_stay_short(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[module]} has {n} lines; split it (about 500 at most)"


def test_no_package_exports_a_name_that_is_also_one_of_its_modules():
    """``from .trace import trace`` in a package's __init__ would make ``pkg.trace`` the function or the
    module depending on import order (the trap of a public function named like its module)."""
    bad = []
    for module, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    name = a.asname or a.name
                    sub = f"{module}.{name}"
                    if sub in MODULES and not (node.level == 1 and node.module is None):
                        bad.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} exports {name!r}, also a module")
    assert not bad, "names that shadow a module:\n" + "\n".join(bad)
