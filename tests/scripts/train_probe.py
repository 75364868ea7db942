"""Run flexivit's trainer with probes for tests: record the scheme of every step per rank, write a
parameter digest per rank at the end, and optionally SIGKILL the process right after a given step.

    python train_probe.py OUT [--kill-after STEP] [--resume] [--set k=v ...]
"""

import argparse
import hashlib
import json
import os
import signal
from pathlib import Path

from accelerate import Accelerator, DataLoaderConfiguration

from flexivit.config import load_recipe
from flexivit.train import StepInfo, train

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--kill-after", type=int)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--set", dest="overrides", action="append", default=[])
args = parser.parse_args()
cfg = load_recipe("fashion_mnist:smoke", args.overrides)
accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed))
rank = accelerator.process_index
schemes = []
last = {}


def probe(info: StepInfo) -> None:
    schemes.append([info.step, info.scheme.patch])
    last["model"] = info.model
    if info.step == args.kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


train(cfg, out_dir=args.out, resume=args.resume, accelerator=accelerator, on_step=probe)
digest = hashlib.sha256()
for name, tensor in sorted(accelerator.unwrap_model(last["model"]).state_dict().items()):
    digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
(args.out / f"probe_rank{rank}.json").write_text(json.dumps({"schemes": schemes, "digest": digest.hexdigest()}))
