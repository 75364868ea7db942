"""tools/ is a set of scripts on the installed package, not a library of its own: no tool edits sys.path,
starts processes of its own (runs go through flexivit.experiments.runner), imports another tool, or reads a
run's eval.json itself (flexivit.experiments.results does); the package's experiments read it one way too."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = sorted((ROOT / "tools").glob("*.py"))
EXPERIMENTS = sorted(p for p in (ROOT / "flexivit" / "experiments").glob("*.py") if p.name != "results.py")
# bench_revisions trains another git revision's code in a worktree of its own: the runner runs this checkout's
# flexivit, so that comparison cannot go through it. It never starts this checkout's CLI.
# gpu_check launches the trainer under `accelerate launch` with torch's rendezvous variables set (DDP on one
# GPU), a launch the runner does not make.
OWN_PROCESSES = {"bench_revisions.py", "gpu_check.py"}
# check_big_vision imports big_vision's own flax model from a checkout given on its command line (run once by
# hand, docs/weights.md): the one sys.path edit that points at foreign code, not at a library of tools.
FOREIGN_CODE = {"check_big_vision.py"}
PROCESS_CALLS = {"run", "Popen", "call", "check_call", "check_output", "system", "spawnv", "spawnl", "execv",
                 "create_subprocess_exec"}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def sys_path_or_tool_imports(path: Path, tools: set[str]) -> list[str]:
    """What makes ``path`` a script on a private library: sys.path edits and imports of other tools."""
    found = ["edits sys.path: import the installed flexivit instead"] if "sys.path" in path.read_text() else []
    return found + [f"imports the tool {name}: move the shared piece into flexivit/experiments/"
                    for name in sorted(_imported(_tree(path)) & (tools - {path.stem}))]


def own_processes(path: Path) -> list[str]:
    """Processes ``path`` starts itself rather than through the runner."""
    tree = _tree(path)
    found = [f"imports {name}: start runs with flexivit.experiments.runner"
             for name in sorted(_imported(tree) & {"subprocess", "multiprocessing"})]
    return found + [f"line {n.lineno} starts a process: use flexivit.experiments.runner" for n in ast.walk(tree)
                    if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                    and isinstance(n.func.value, ast.Name) and n.func.value.id in ("os", "asyncio")
                    and n.func.attr in PROCESS_CALLS]


def eval_json_reads(path: Path) -> list[str]:
    """Calls that read a run's eval.json directly."""
    source = path.read_text()
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("read_text", "loads", "load", "open", "read_bytes") and \
                    "eval.json" in (ast.get_source_segment(source, node) or ""):
                found.append(f"line {node.lineno} reads eval.json itself: use flexivit.experiments.results")
    return found


def test_the_tools_are_found():
    assert {"bgn_study.py", "reproduce_flexibility.py", "finetune_study.py"} <= {p.name for p in TOOLS}


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.name)
def test_no_tool_edits_sys_path_or_imports_another_tool(path):
    expected = ["edits sys.path: import the installed flexivit instead"] if path.name in FOREIGN_CODE else []
    assert sys_path_or_tool_imports(path, {p.stem for p in TOOLS}) == expected


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.name)
def test_no_tool_starts_processes_of_its_own(path):
    if path.name in OWN_PROCESSES:  # bench_revisions starts another revision's CLI, gpu_check the launcher's
        assert path.name == "gpu_check.py" or '"-m", "flexivit"' not in path.read_text()
    else:
        assert own_processes(path) == []


@pytest.mark.parametrize("path", [*TOOLS, *EXPERIMENTS], ids=lambda p: p.name)
def test_nothing_reads_eval_json_but_the_results_reader(path):
    assert eval_json_reads(path) == []


def test_the_checks_catch_a_tool_written_the_old_way(tmp_path):
    old = tmp_path / "old_tool.py"
    old.write_text("import json, os, subprocess, sys\nsys.path.insert(0, '..')\nfrom compare_runs import summarise\n"
                   "r = json.loads((run / 'eval.json').read_text())\nos.system('python -m flexivit train x')\n")
    assert sys_path_or_tool_imports(old, {"old_tool", "compare_runs"}) == [
        "edits sys.path: import the installed flexivit instead",
        "imports the tool compare_runs: move the shared piece into flexivit/experiments/"]
    assert own_processes(old) == ["imports subprocess: start runs with flexivit.experiments.runner",
                                  "line 5 starts a process: use flexivit.experiments.runner"]
    assert eval_json_reads(old) == ["line 4 reads eval.json itself: use flexivit.experiments.results"] * 2
