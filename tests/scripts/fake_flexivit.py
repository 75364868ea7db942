"""A stand-in for ``python -m flexivit`` in the runner's tests: it trains nothing, and does to its ``--out``
folder what the environment asks, by the folder's name (comma lists):

- ``FAKE_FAIL``: print an error and exit 3;
- ``FAKE_INTERRUPT``: leave a checkpoint (``state/step_2``) and exit 1, as a run killed after it;
- ``FAKE_EMPTY``: exit 0 without writing anything;
- otherwise: write a model file and an ``eval.json`` (top-1 0.5 at patch 4 and 7), as a finished run.

Every call appends its arguments to the JSON-lines file ``FAKE_CALLS`` when that is set.
"""

import json
import os
import sys
from pathlib import Path

argv = sys.argv[1:]
out = Path(argv[argv.index("--out") + 1])
if os.environ.get("FAKE_CALLS"):
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps(argv) + "\n")


def named(var: str) -> bool:
    return out.name in os.environ.get(var, "").split(",")


print(f"fake {argv[0]} into {out}{' (resumed)' if '--resume' in argv else ''}")
if named("FAKE_FAIL"):
    print("error: the fake was told to fail", file=sys.stderr)
    sys.exit(3)
out.mkdir(parents=True, exist_ok=True)
if named("FAKE_INTERRUPT"):
    (out / "state" / "step_2").mkdir(parents=True, exist_ok=True)
    sys.exit(1)
if named("FAKE_EMPTY"):
    sys.exit(0)
rows = [{"patch_size": p, "top1": 0.5, "n": 10} for p in (4, 7)]
(out / "model.safetensors").write_bytes(b"fake")
(out / "eval.json").write_text(json.dumps({"split": "test", "results": rows, "val": rows, "images_seen": 40,
                                           "train_seconds": 1.0, "step": 2}))
