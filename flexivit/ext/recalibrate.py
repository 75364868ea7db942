"""``flexivit recalibrate``: estimate batch-statistics norms' running statistics for new patch sizes on a
saved model (the command's driver; the norms and ``recalibrate`` itself live in ``flexivit.ext.bgn``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from flexivit.data.sources import TransformedDataset, make_loader
from flexivit.data.transforms import eval_transform
from flexivit.eval.evaluate import default_device, load_eval_splits
from flexivit.eval.export import default_preprocess
from flexivit.eval.subjects import run_config_of
from flexivit.ext.bgn import CALIBRATION_BATCH, norms_of, recalibrate
from flexivit.model.weights import load_model, save_model
from flexivit.outdir import check_folder_target

__all__ = ["recalibrate_checkpoint"]


class _Images:
    """The image tensors of a loader's batches, re-iterable."""

    def __init__(self, loader: Iterable[dict[str, torch.Tensor]]) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (batch["image"] for batch in self.loader)


def recalibrate_checkpoint(checkpoint: str | Path, patch_sizes: Sequence[int], *, data: str | None = None,
                           images: int = 512, out: str | Path | None = None,
                           device: torch.device | None = None) -> tuple[Path, list[int], int]:
    """``recalibrate`` a saved model on the first ``images`` training images of ``data`` (default: the run's
    dataset) preprocessed as the model stores it, in batches of up to 64 (a last partial batch is left
    out); saves to ``out`` (default: over ``checkpoint``'s model file). Returns (file, new sizes, images used)."""
    model, meta = load_model(checkpoint)
    norms_of(model)  # fails before the data is read
    target = Path(out) if out is not None else Path(checkpoint)
    check_folder_target(target.parent if target.suffix == ".safetensors" else target)
    if images < 2:
        raise ValueError(f"--images must be at least 2 (batch statistics need two images), got {images}")
    run_config = run_config_of(checkpoint)
    _, splits = load_eval_splits(data, run_config)
    preprocess = meta.get("preprocess") or default_preprocess(model)
    train = splits.train.select(range(min(images, len(splits.train))))
    on_corrupt = ((run_config or {}).get("data") or {}).get("on_corrupt", "error")
    if len(train) < 2:
        raise ValueError(f"the training split of the data has {len(train)} image(s); recalibration needs at least 2")
    loader = make_loader(TransformedDataset(train, eval_transform(preprocess), on_corrupt=on_corrupt),
                         batch_size=min(CALIBRATION_BATCH, len(train)), shuffle=False, seed=0, drop_last=True)
    model.to(device or default_device())
    new = recalibrate(model, _Images(loader), patch_sizes)
    file = save_model(model.to("cpu"), target, class_names=meta.get("class_names") or [], preprocess=preprocess)
    return file, new, len(loader) * loader.batch_size


# ---- the `flexivit recalibrate` command (flexivit.ext.COMMANDS) ----------------------------------------
def add_arguments(p: Any, cli: Any) -> None:
    """``flexivit recalibrate CHECKPOINT --patch-sizes 3,5 ...``."""
    p.add_argument("checkpoint", help="a run directory or a model .safetensors file")
    p.add_argument("--patch-sizes", required=True, help="comma-separated new sizes, e.g. 3,5")
    p.add_argument("--data", help="where the training images come from (default: the run's dataset, else fashion-mnist)")
    p.add_argument("--images", type=int, default=512, help="training images to estimate on (default 512)")
    p.add_argument("--out", type=Path, help="model file or folder to write (default: over the checkpoint's model)")


def run(args: Any, cli: Any) -> None:
    try:
        sizes = [int(s) for s in args.patch_sizes.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--patch-sizes takes comma-separated integers such as 3,5, got {args.patch_sizes!r}") from None
    file, new, images = recalibrate_checkpoint(args.checkpoint, sizes, data=args.data, images=args.images, out=args.out)
    print(f"running statistics for patch size(s) {', '.join(map(str, new))} from {images} training images; wrote {file}")
