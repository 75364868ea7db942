"""One runner for the runs of a study: ``flexivit search``/``evolve`` trials and every tool under tools/.

A run is one ``flexivit`` command (``train``, ``finetune``, ``compress``, ``evolve``, ``fewshot``, ...) into
its own folder under the study folder, described by a ``RunSpec``. ``Study`` runs them, ``jobs`` at a
time, and treats every run the same way:

- **finished → skipped.** A run is finished when the files its command leaves at the end are there
  (``done``: the model and ``eval.json`` of a training run) and the settings it recorded equal the ones it
  would be run with now. The runner records them in ``study_run.json`` in the run folder when it starts
  the command: the command, its checkpoint inputs, its other arguments and the run config the recipe and
  ``--set`` values resolve to (so a recipe whose defaults moved since counts as a change too), and the code
  revision of every attempt that trained the folder (``code``; ``Study.trained_at`` reads them back, so a
  result written later names the code its runs were trained with).
- **interrupted → resumed.** A run folder with checkpoints (``state/step_N``) is continued with ``--resume``.
- **made with other settings → refused**, before anything runs, in one line naming every changed field
  (``train.steps: 5 there, 6 now``). Fields that change how a run logs or checkpoints, not what it
  computes (``CADENCE``), may differ. A folder without ``study_run.json`` (made before this runner) is not
  checked: finished, it is skipped; interrupted, resumed.
- **logged.** Every attempt (and every skip) is one line of ``runs.jsonl`` in the study folder: the run,
  its command, its outcome, exit code, log file, wall and CPU seconds (the command's and its children's).
  The command's own output goes to ``<study>/<run>.log``.
- **failing the same way.** A failed run is one line naming it, its exit code and its log file; the other
  runs still run (a run that ``needs`` a failed one does not), and ``run_all`` raises ``RunError`` once
  they are done, listing every failure.

Runs are subprocesses rather than calls in this process: concurrent runs (``jobs``) each need their own
torch threads, global RNG, ``Accelerator`` state and memory, a crash or a kill takes one run rather than
the study, its output lands whole in its log, and ``wait4`` measures its CPU time. The subprocess imports
the same ``flexivit`` as this process (its folder leads ``PYTHONPATH``), so a study runs the code it was
started with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import flexivit
from flexivit.experiments.results import read_jsonl
from flexivit.files import atomic_write_text
from flexivit.provenance import git_revision
from flexivit.train.config import Config, ConfigError, config_from_dict, flat_keys, load_recipe
from flexivit.train.state import find_states

__all__ = ["RunSpec", "Outcome", "Study", "RunError", "raise_failures", "FLEXIVIT", "RECORD", "RUNS_LOG",
           "TRAINED", "CADENCE"]

FLEXIVIT = (sys.executable, "-m", "flexivit")  # the program whose commands the runs are
RECORD = "study_run.json"  # in a run folder: the settings the runner started it with
RUNS_LOG = "runs.jsonl"  # in the study folder: one line per attempt or skip
TRAINED = ("model.safetensors", "eval.json")  # what a finished train / finetune / compress run leaves
# Fields that change how a run logs, checkpoints or loads data, not what it computes.
CADENCE = frozenset({"train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "data.num_workers",
                     "data.eval_batch_size"})
_RESERVED = ("--out", "--set", "--resume")  # flags the runner writes itself


class RunError(ValueError):
    """A run that failed, or a run folder made with other settings; the message is one line."""


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One run: ``flexivit COMMAND *inputs [recipe] --out <study>/<name> --set ... *args [--resume]``."""

    name: str  # the run folder under the study folder ("bgn-b16", "trials/lr=1e-3__seed=0"); also its log
    command: str = "train"
    recipe: str | None = None  # a recipe name or file, "[:ARG]" included
    inputs: tuple[str, ...] = ()  # checkpoints before the recipe: finetune's init, compress's base, fewshot's backbone
    sets: tuple[str, ...] = ()  # --set KEY=VALUE overrides of the recipe
    args: tuple[str, ...] = ()  # other arguments (``--patch-size 7``, evolve's ``--population 6``)
    needs: tuple[str, ...] = ()  # runs (earlier in the same ``run_all``) that must finish first
    done: tuple[str, ...] = TRAINED  # files (relative to the run folder) a finished run has left

    def __post_init__(self) -> None:
        for key in ("inputs", "sets", "args", "needs", "done"):
            object.__setattr__(self, key, tuple(str(v) for v in getattr(self, key)))
        path = PurePosixPath(self.name)
        if not self.name or path.is_absolute() or ".." in path.parts:
            raise ValueError(f"a run's name is a folder under the study folder, got {self.name!r}")
        # With a recipe, the data is a --set too (data.source=...), so that the recorded config holds it.
        flags = (*_RESERVED, "--data") if self.recipe else _RESERVED
        reserved = [a for a in self.args if a.split("=", 1)[0] in flags]
        if reserved:
            raise ValueError(f"run {self.name}: {reserved} are the runner's to write; give recipe overrides as "
                             "sets (data.source=... for --data)")


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """How a run ended: ``skipped`` (finished already), ``finished``, ``failed`` or ``blocked`` (a run it
    needs failed). ``error`` is the one-line message of the last two."""

    name: str
    status: str
    log: Path
    exit_code: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("skipped", "finished")


def _say(line: str) -> None:
    """One whole line per write, so that concurrent runs' messages do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _config(recipe: str, sets: Sequence[str]) -> dict[str, Any]:
    return json.loads(json.dumps(load_recipe(recipe, list(sets)).to_dict()))  # tuples as lists, as saved


def _changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """What differs between a run folder's record and the planned one: the command, its inputs and
    arguments, and every run-config field outside ``CADENCE`` (read through today's config classes, so a
    field added since takes its default there)."""
    changed = {k: (saved.get(k), now[k]) for k in ("command", "inputs", "args") if saved.get(k) != now[k]}
    if (saved.get("config") is None) != (now["config"] is None):
        changed["recipe"] = (saved.get("recipe"), now["recipe"])
    elif now["config"] is not None:
        try:
            there = json.loads(json.dumps(config_from_dict(Config, saved["config"]).to_dict()))
        except ConfigError as err:
            return {**changed, "config": (f"unreadable today ({err})", "the planned one")}
        a, b = flat_keys(there), flat_keys(now["config"])
        changed.update({k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
                        if a.get(k) != b.get(k) and k not in CADENCE})
    return changed


class Study:
    """The runs of one study folder. ``program`` is the command line a run's arguments follow (default
    ``python -m flexivit``); ``say`` gets one line per event."""

    def __init__(self, folder: str | Path, *, jobs: int = 1, say: Callable[[str], None] = _say,
                 program: Sequence[str] | None = None) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be at least 1, got {jobs}")
        self.folder, self.jobs, self.say = Path(folder), jobs, say
        self.program = tuple(program or FLEXIVIT)
        self._log_lock, self._done_lock = threading.Lock(), threading.Lock()

    # ---- where and what --------------------------------------------------------------------------------
    def run_dir(self, spec: RunSpec) -> Path:
        return self.folder / spec.name

    def log_file(self, spec: RunSpec) -> Path:
        return self.folder / f"{spec.name}.log"

    def command(self, spec: RunSpec, *, resume: bool = False) -> list[str]:
        sets = [a for s in spec.sets for a in ("--set", s)]
        return [*self.program, spec.command, *spec.inputs, *([spec.recipe] if spec.recipe else []),
                "--out", str(self.run_dir(spec)), *sets, *spec.args, *(["--resume"] if resume else [])]

    def record(self, spec: RunSpec) -> dict[str, Any]:
        """The settings a run is started with, as ``study_run.json`` keeps them."""
        return {"command": spec.command, "inputs": list(spec.inputs), "recipe": spec.recipe, "sets": list(spec.sets),
                "args": list(spec.args), "config": _config(spec.recipe, spec.sets) if spec.recipe else None}

    def status(self, spec: RunSpec) -> str:
        """``finished``, ``resume`` (an interrupted run with checkpoints) or ``fresh``; raises ``RunError`` for
        a run folder made with other settings."""
        run = self.run_dir(spec)
        if (run / RECORD).is_file():
            changed = _changes(json.loads((run / RECORD).read_text()), self.record(spec))
            if changed:
                listed = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in changed.items())
                raise RunError(f"{run} was made with other settings ({listed}); use another study folder, or "
                               f"delete {run} to run it again")
        if all((run / f).exists() for f in spec.done):
            return "finished"
        return "resume" if find_states(run / "state") else "fresh"

    def check(self, specs: Sequence[RunSpec]) -> dict[str, str]:
        """Every run's ``status``, refusing (``RunError``) a folder made with other settings before any runs."""
        return {spec.name: self.status(spec) for spec in specs}

    def trained_at(self, specs: Sequence[RunSpec]) -> dict[str, list[str]]:
        """The code revisions that trained the runs of ``specs``, each with the runs it trained: ``"abc1234"``,
        ``"abc1234+uncommitted"`` (a tree with uncommitted changes) or ``"not recorded"`` (a folder made before
        the runner recorded revisions, or outside a git checkout). A run resumed at another revision is
        listed under both; a run without a folder (never started) under none."""
        found: dict[str, list[str]] = {}
        for spec in specs:
            if not self.run_dir(spec).is_dir():
                continue
            record = self.run_dir(spec) / RECORD
            codes = json.loads(record.read_text()).get("code") if record.is_file() else None
            for label in [_label(c) for c in codes] if codes else ["not recorded"]:
                found.setdefault(label, []).append(spec.name)
        return found

    def attempts(self, name: str) -> list[dict[str, Any]]:
        """The lines of ``runs.jsonl`` about run ``name``, oldest first."""
        return [r for r in read_jsonl(self.folder / RUNS_LOG) if r["run"] == name]

    # ---- running -------------------------------------------------------------------------------------
    def run(self, spec: RunSpec) -> Outcome:
        """Run ``spec`` now in this thread, unless it has finished."""
        status = self.status(spec)
        if status == "finished":
            unchecked = "" if (self.run_dir(spec) / RECORD).is_file() else " (made before the runner kept records: " \
                                                                             "settings not checked)"
            self.say(f"{spec.name}: finished already, skipped{unchecked}")
            outcome = Outcome(name=spec.name, status="skipped", log=self.log_file(spec))
            self._log(outcome, None)
            return outcome
        return self._launch(spec, resume=status == "resume")

    def run_all(self, specs: Sequence[RunSpec], *, on_done: Callable[[Outcome], None] | None = None,
                strict: bool = True) -> list[Outcome]:
        """Run every spec, ``jobs`` at a time, a run after those it ``needs``; ``on_done`` gets each outcome as
        it comes (one at a time). With ``strict``, raises ``RunError`` once all are done if any failed."""
        names = [s.name for s in specs]
        for i, spec in enumerate(specs):
            if names.count(spec.name) > 1:
                raise ValueError(f"two runs are named {spec.name}")
            late = [n for n in spec.needs if n not in names[:i]]
            if late:
                raise ValueError(f"run {spec.name} needs {late}, which must come before it")
        statuses = self.check(specs)
        done = sum(s == "finished" for s in statuses.values())
        self.say(f"{len(specs)} runs, {done} finished already (skipped), {len(specs) - done} to run")
        futures: dict[str, Future] = {}
        by_name = {s.name: s for s in specs}

        def job(spec: RunSpec) -> Outcome:
            failed = [n for n in spec.needs if not futures[n].result().ok]
            if failed:
                need = by_name[failed[0]]
                outcome = Outcome(name=spec.name, status="blocked", log=self.log_file(need),
                                  error=f"{spec.name} did not run: it needs {need.name}, which failed; see "
                                        f"{self.log_file(need)}")
                self._log(outcome, None)
            else:
                outcome = self.run(spec)
            if on_done is not None:
                with self._done_lock:
                    on_done(outcome)
            return outcome

        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            for spec in specs:  # in order: a run's needs are submitted, so started, before it
                futures[spec.name] = pool.submit(job, spec)
            outcomes = [futures[n].result() for n in names]
        if strict:
            raise_failures(outcomes)
        return outcomes

    def _launch(self, spec: RunSpec, *, resume: bool) -> Outcome:
        run, log = self.run_dir(spec), self.log_file(spec)
        run.mkdir(parents=True, exist_ok=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        revision = git_revision(self._root())
        atomic_write_text(run / RECORD, json.dumps({**self.record(spec), "code": self._codes(run, resume, revision)},
                                                   indent=2) + "\n")
        command = self.command(spec, resume=resume)
        self.say(f"{spec.name}: {'resuming' if resume else 'started'}, log {log}")
        try:
            code, wall, cpu = _call(command, log, self._env())
        except OSError as err:  # the program itself could not start
            code, wall, cpu = -1, 0.0, 0.0
            log.write_text(f"could not start {command[0]}: {err}\n")
        missing = [f for f in spec.done if not (run / f).exists()]
        if code:
            error = (f"{spec.name} failed (exit {code}); see {log}; fix the cause and rerun the same command to "
                     "resume it")
        elif missing:
            error = f"{spec.name} exited 0 but left no {', '.join(missing)} in {run}; see {log}"
        else:
            error = None
        outcome = Outcome(name=spec.name, status="failed" if error else "finished", log=log, exit_code=code,
                          wall_s=wall, cpu_s=cpu, error=error)
        self.say(error or f"{spec.name}: finished in {wall / 60:.1f} min")
        self._log(outcome, command, revision)
        return outcome

    @staticmethod
    def _root() -> Path:
        """The folder holding the ``flexivit`` this process imports, which the runs import too."""
        return Path(flexivit.__file__).resolve().parent.parent

    @staticmethod
    def _codes(run: Path, resume: bool, revision: dict[str, Any]) -> list[dict[str, Any]]:
        """The revisions that trained ``run`` so far, with ``revision`` added: a resume adds to the folder's
        list; a fresh start begins a new one."""
        before = json.loads((run / RECORD).read_text()).get("code", []) if resume and (run / RECORD).is_file() else []
        return before if revision in before else [*before, revision]

    def _env(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(self._root()), os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}

    def _log(self, outcome: Outcome, command: list[str] | None, revision: dict[str, Any] | None = None) -> None:
        line = {"time": datetime.now().isoformat(timespec="seconds"), "run": outcome.name, "status": outcome.status,
                "command": command, "exit": outcome.exit_code, "log": str(outcome.log), "wall_s": outcome.wall_s,
                "cpu_s": outcome.cpu_s, **({"code": revision} if revision else {}),
                **({"error": outcome.error} if outcome.error else {})}
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._log_lock, open(self.folder / RUNS_LOG, "a") as f:
            f.write(json.dumps(line) + "\n")  # one whole line per write


def _label(code: dict[str, Any]) -> str:
    """``abc1234``, ``abc1234+uncommitted`` or ``not recorded`` for a ``git_revision`` record."""
    if not code.get("commit"):
        return "not recorded"
    return code["commit"][:7] + ("+uncommitted" if code.get("clean") is False else "")


def _call(command: list[str], log: Path, env: dict[str, str]) -> tuple[int, float, float]:
    """Run ``command`` with its output in ``log``: its exit code, wall seconds, and the CPU seconds of it and
    of every process it waited for (``wait4``'s usage: an evolve's candidates included)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = code = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return code, time.perf_counter() - start, usage.ru_utime + usage.ru_stime


def raise_failures(outcomes: Sequence[Outcome]) -> None:
    """Raise ``RunError`` (one line) if any run failed or did not run because one it needs failed."""
    bad = [o for o in outcomes if not o.ok]
    if len(bad) == 1:
        raise RunError(bad[0].error)
    if bad:
        listed = ", ".join(f"{o.name} ({o.status}{f', exit {o.exit_code}' if o.exit_code else ''}, see {o.log})"
                           for o in bad)
        raise RunError(f"{len(bad)} runs did not finish: {listed}; fix the cause and rerun the same command to "
                       "resume them")
