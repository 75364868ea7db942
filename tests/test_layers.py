"""The package's layers, enforced: imports point down, and the core names no option.

Layers, bottom to top (a module may import its own layer and any layer below it):

    base         flexivit.rng, flexivit.files, flexivit.provenance
    core         flexivit.model | flexivit.data (independent of each other), and the flexivit package itself
    options      flexivit.ext (the option families' layer files)
    eval         flexivit.eval
    train        flexivit.train, flexivit.recipes
    experiments  flexivit.experiments
    commands     the option families' command drivers (flexivit.ext.compress, .evolve, .fewshot, .recalibrate)
    cli          flexivit.cli, python -m flexivit

Every import counts, function-level ones included. ``PENDING`` lists the edges that still break the rule
until the option seam (docs/ARCHITECTURE.md, "Options") moves each option's core hooks into ``ext/``: the
test fails on a new violation and on a listed one that is gone, so the list can only shrink.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "flexivit"
DRIVERS = ("flexivit.ext.compress", "flexivit.ext.evolve", "flexivit.ext.fewshot", "flexivit.ext.recalibrate")
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("flexivit.rng", "flexivit.files", "flexivit.provenance")),
    ("core", ("flexivit.model", "flexivit.data", "flexivit")),
    ("options", ("flexivit.ext",)),
    ("eval", ("flexivit.eval",)),
    ("train", ("flexivit.train", "flexivit.recipes")),
    ("experiments", ("flexivit.experiments",)),
    ("commands", DRIVERS),
    ("cli", ("flexivit.cli", "flexivit.__main__")),
]

# Edges that break the layering today (importer -> imported), each removed as its option moves behind the seam.
PENDING = {
    ("flexivit.model.config", "flexivit.ext.bridge"),
    ("flexivit.model.config", "flexivit.ext.graph"),
    ("flexivit.model.config", "flexivit.ext.lutq"),
    ("flexivit.model.config", "flexivit.ext.proxies"),
    ("flexivit.model.vit", "flexivit.ext.bgn"),
    ("flexivit.model.vit", "flexivit.ext.bridge"),
    ("flexivit.model.vit", "flexivit.ext.graph"),
    ("flexivit.model.vit", "flexivit.ext.lutq"),
    ("flexivit.model.vit", "flexivit.ext.proxies"),
    ("flexivit.model.vit", "flexivit.ext.scale_invariant"),
    ("flexivit.model.weights", "flexivit.ext.lutq"),
    ("flexivit.ext.scale_invariant", "flexivit.train.config"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    """The index in LAYERS of the most specific prefix naming ``module``."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} belongs to no layer; add it to LAYERS"
    return rank


def imports_of(path: Path) -> set[str]:
    """Every flexivit module ``path`` imports (absolute or relative, at any depth of the file)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if (PACKAGE.parent / f"{base}.{a.name}".replace(".", "/")).exists()
                      or (PACKAGE.parent / (f"{base}.{a.name}".replace(".", "/") + ".py")).exists()}
    return {m for m in found if m == "flexivit" or m.startswith("flexivit.")}


def edges() -> set[tuple[str, str]]:
    return {(module_name(p), m) for p in PACKAGE.rglob("*.py") for m in imports_of(p) if m != module_name(p)}


def violations() -> set[tuple[str, str]]:
    bad = set()
    for importer, imported in edges():
        if imported == "flexivit":
            continue  # the package's own __init__ (the public API) is importable from anywhere
        a, b = layer_of(importer), layer_of(imported)
        core_cross = {f"{importer}.".split(".")[1], f"{imported}.".split(".")[1]} == {"model", "data"}
        if b > a or core_cross:
            bad.add((importer, imported))
    return bad


def test_imports_point_down_the_layers():
    found = violations()
    new = sorted(found - PENDING)
    assert not new, f"imports that point up the layers (or between model and data): {new}"
    gone = sorted(PENDING - found)
    assert not gone, f"fixed, so remove from PENDING: {gone}"


def test_the_checker_sees_a_violation(tmp_path):
    """The contract would catch a model module importing the trainer, at any depth of the file."""
    source = "def f():\n    from flexivit.train.loop import train\n"
    path = PACKAGE / "model" / "_probe_layers.py"
    path.write_text(source)
    try:
        assert ("flexivit.model._probe_layers", "flexivit.train.loop") in violations()
    finally:
        path.unlink()


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return [m for m in out.split() if m.startswith("flexivit.")]


def test_import_flexivit_loads_no_trainer_evaluator_or_cli():
    loaded = _loaded_after("import flexivit")
    upper = [m for m in loaded if layer_of(m) >= layer_of("flexivit.eval")]
    assert not upper, f"import flexivit loads {upper}"


@pytest.mark.xfail(strict=True, reason="until the option seam lands, model/ imports the option layers (PENDING)")
def test_import_flexivit_loads_no_option_module():
    loaded = _loaded_after("import flexivit")
    assert not [m for m in loaded if m.startswith("flexivit.ext")]
