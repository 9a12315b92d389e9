"""The package's imports point down its layers: tools -> train -> data, model -> the base modules on top.

Read statically (ast), so a module imported inside a function counts too. The scripts in scripts/ stand above
all of it.
"""

import ast

from helpers import ROOT

PACKAGE = ROOT / "src" / "nanogpt_lightning"
# each layer and the layers it may import (besides itself); the base is every top-level module
MAY_IMPORT = {
    "base": set(),
    "model": {"base"},
    "data": {"base"},
    "train": {"base", "model", "data"},
    "tools": {"base", "model", "data", "train"},
}


def layer_of(module: str) -> str:
    """`nanogpt_lightning.train.run` -> train; a top-level module -> base."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in MAY_IMPORT else "base"


def package_imports(path) -> set[str]:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    return {name for name in imported if name.startswith("nanogpt_lightning.")}


def test_every_import_points_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        here = layer_of(module)
        for imported in package_imports(path):
            there = layer_of(imported)
            if there != here and there not in MAY_IMPORT[here]:
                wrong.append(f"{module} ({here}) imports {imported} ({there})")
    assert not wrong, "\n".join(wrong)


def test_the_layer_map_knows_every_folder():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(MAY_IMPORT) - {"base"}
