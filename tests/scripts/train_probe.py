"""Run flexivit's trainer with probes for tests: record the scheme of every step per rank, which samples
the last block's drop-path dropped at every step, and a post-step hook whose state follows the weights;
write them and a parameter digest per rank at the end; optionally SIGKILL the process right after a step.

    python train_probe.py OUT [--kill-after STEP] [--resume] [--set k=v ...]
"""

import argparse
import hashlib
import json
import os
import signal
from pathlib import Path

import torch
from accelerate import Accelerator, DataLoaderConfiguration

from flexivit.train.config import load_recipe
from flexivit.train.loop import StepInfo, train

parser = argparse.ArgumentParser()
parser.add_argument("out", type=Path)
parser.add_argument("--kill-after", type=int)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--set", dest="overrides", action="append", default=[])
args = parser.parse_args()
cfg = load_recipe("fashion_mnist:smoke", args.overrides)
accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.train.seed))
rank = accelerator.process_index
schemes, masks, forward_masks = [], {}, []
last = {}


class NormTrace:
    """A post-step hook whose state depends on the whole trajectory: the running sum of the head's norm."""

    name = "norm_trace"

    def __init__(self) -> None:
        self.total = torch.zeros((), dtype=torch.float64)

    def after_step(self, model, step: int) -> None:
        self.total += model.head.weight.detach().double().norm()

    def state_dict(self):
        return {"total": self.total}

    def load_state_dict(self, state) -> None:
        self.total = state["total"].clone()


def record_drop_path(model):
    """Which samples the last block's drop-path zeroed, per training forward."""
    def hook(module, inputs, output):
        if module.training:
            forward_masks.append((output.flatten(1).abs().sum(1) == 0).int().tolist())
    model.blocks[-1].drop_path1.register_forward_hook(hook)  # the last block drops at the full rate
    return model


def probe(info: StepInfo) -> None:
    schemes.append([info.step, info.scheme.patch if info.scheme is not None else None])  # None: per image
    masks[info.step] = forward_masks[:]
    forward_masks.clear()
    last["model"] = info.model
    if info.step == args.kill_after:
        os.kill(os.getpid(), signal.SIGKILL)


trace = NormTrace()
train(cfg, out_dir=args.out, resume=args.resume, accelerator=accelerator, on_step=probe, hooks=[trace],
      init=record_drop_path)
digest = hashlib.sha256()
for name, tensor in sorted(accelerator.unwrap_model(last["model"]).state_dict().items()):
    digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
(args.out / f"probe_rank{rank}.json").write_text(json.dumps(
    {"schemes": schemes, "digest": digest.hexdigest(), "masks": masks, "trace": trace.total.item()}))
