"""The package's layers, enforced: imports point down, and the core names no option.

Layers, bottom to top (a module may import its own layer and any layer below it):

    base         flexivit.rng, flexivit.files, flexivit.provenance, flexivit.outdir, flexivit.jsonl
    core         flexivit.model, flexivit.data (data never imports model; a model file carries its preprocessing,
                 so model may read data's transforms), and the flexivit package itself
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

PACKAGE = Path(__file__).resolve().parent.parent / "flexivit"
DRIVERS = ("flexivit.ext.compress", "flexivit.ext.evolve", "flexivit.ext.fewshot", "flexivit.ext.recalibrate")
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("flexivit.rng", "flexivit.files", "flexivit.provenance", "flexivit.outdir", "flexivit.jsonl")),
    ("core", ("flexivit.model", "flexivit.data", "flexivit")),
    ("options", ("flexivit.ext",)),
    ("eval", ("flexivit.eval",)),
    ("train", ("flexivit.train", "flexivit.recipes")),
    ("experiments", ("flexivit.experiments",)),
    ("commands", DRIVERS),
    ("cli", ("flexivit.cli", "flexivit.__main__")),
]

# Edges that break the layering today (importer -> imported), each removed as it is fixed.
PENDING: set[tuple[str, str]] = set()

# Option identifiers that must not appear in code or strings outside flexivit/ext (and the recipes, which are
# run cards): option and field names, their values, layer classes and commands. Generic words that core
# modules use for their own things (graph, norm, head) are left out.
OPTION_WORDS = (
    "scale_invariant", "si_norm", "si_head_scale", "lutq", "lutq_k", "lutq_scope", "lutq_pow2", "LUT-Q", "bridges",
    "bridge", "bridge_sizes", "norm_groups", "norm_regions", "norm_sizes", "pow2_scale", "proxies", "proxy",
    "proxy_local", "proxy_mix", "proxy_scale", "bgn", "batchnorm", "fixed_norm", "elr", "graph_lr_scale",
    "GraphBlocks", "ProxyHead", "LutqLinear", "BatchGroupNorm", "compress", "evolve", "fewshot", "recalibrate",
)
# Where the core still names options; empty now, kept so a name that has to stay for a while is listed here,
# shrink-only like PENDING.
PENDING_NAMES: dict[str, set[str]] = {}


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
        data_on_model = f"{importer}.".split(".")[1] == "data" and f"{imported}.".split(".")[1] == "model"
        if b > a or data_on_model:
            bad.add((importer, imported))
    return bad


def test_imports_point_down_the_layers():
    found = violations()
    new = sorted(found - PENDING)
    assert not new, f"imports that point up the layers (or from data to model): {new}"
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


def test_import_flexivit_loads_no_option_module():
    loaded = _loaded_after("import flexivit; flexivit.FlexiViT(flexivit.FlexiViTConfig(depth=1, embed_dim=64, "
                           "num_heads=1))")
    assert not [m for m in loaded if m.startswith("flexivit.ext")]
    assert "flexivit.ext.bgn" in _loaded_after("import flexivit; flexivit.FlexiViTConfig(norm='bgn', norm_sizes=[16])")


_WORDS = re.compile(r"(?<![\w-])(" + "|".join(map(re.escape, OPTION_WORDS)) + r")(?![\w-])")


def option_names(source: str) -> set[str]:
    """The option words in ``source``'s identifiers and string literals; docstrings and comments, which
    explain, are free to name anything."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
                  and isinstance(node.body[0].value.value, str)}
    texts = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            texts.append(node.value)
        elif isinstance(node, ast.Name):
            texts.append(node.id)
        elif isinstance(node, ast.Attribute):
            texts.append(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            texts.append(node.name)
        elif isinstance(node, (ast.arg, ast.keyword)) and (name := node.arg):
            texts.append(name)
        elif isinstance(node, ast.alias):
            texts.extend(filter(None, (node.name, node.asname)))
        elif isinstance(node, ast.ImportFrom) and node.module:
            texts.append(node.module)
    return {w for text in texts for w in _WORDS.findall(text)}


def test_no_option_is_named_outside_ext():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        if not rel.startswith(("flexivit/ext/", "flexivit/recipes/")) and (words := option_names(path.read_text())):
            found[rel] = words
    assert found == PENDING_NAMES


def test_the_name_check_sees_an_option_in_code_and_strings_but_not_comments_or_docstrings():
    assert option_names("x = cfg.lutq_k  # bgn\ny = 'model.norm=bgn'\n") == {"lutq_k", "bgn"}
    assert option_names('def f(proxy_mix=1):\n    """Like compress."""\n    return f"{x} fewshot"\n') == {"proxy_mix", "fewshot"}
    assert option_names("graph_count = 1  # norm, head and graph are core words\n") == set()
