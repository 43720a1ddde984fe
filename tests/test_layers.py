"""Layers point one way: utils <- config, ops, data <- model <- inference <- eval, train, app (and the `lmrc`
facade) <- cli. Every import of every module (at the top or inside a function) is parsed; a module may import
its own layer or lower ones only."""
from __future__ import annotations

import ast
from pathlib import Path

import lmrc

PACKAGE = Path(lmrc.__file__).resolve().parent

# module prefix -> layer (the longest prefix applies)
LAYERS = {
    "lmrc.utils": 0, "lmrc.errors": 0, "lmrc.fileio": 0,
    "lmrc.config": 1, "lmrc.ops": 1, "lmrc.data": 1,
    "lmrc.model": 2,
    "lmrc.inference": 3,
    "lmrc.eval": 4, "lmrc.train": 4, "lmrc.app": 4, "lmrc": 4,
    "lmrc.cli": 5, "lmrc.__main__": 5,
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(module)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every lmrc import in a module's source; `from pkg import sub` names pkg.sub when sub is a
    module."""
    tree = ast.parse(source, name)
    package = name if is_package else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or (
                    PACKAGE.parent / Path(*sub.split("."))).is_dir()
                found.append((node.lineno, sub if is_module else base))
    return [(line, module) for line, module in found if module == "lmrc" or module.startswith("lmrc.")]


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def test_no_layer_imports_a_higher_one():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        own = layer_of(name)
        for line, module in imported_modules(path.read_text(), name, path.name == "__init__.py"):
            if layer_of(module) > own:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} (layer {own}) imports "
                                  f"{module} (layer {layer_of(module)})")
    assert not violations, "\n".join(violations)


def test_the_check_sees_upward_imports_in_functions_and_relative_imports():
    source = "import torch\ndef f():\n    from lmrc.inference.segmenter import Segmenter\nfrom ..ops import local_window\n"
    found = sorted(imported_modules(source, "lmrc.model.probe"))
    assert found == [(3, "lmrc.inference.segmenter"), (4, "lmrc.ops.local_window")]
    assert layer_of("lmrc.inference.segmenter") > layer_of("lmrc.model.probe") >= layer_of("lmrc.ops.local_window")
