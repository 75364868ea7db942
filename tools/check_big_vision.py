"""Cross-check ``flexivit.model.big_vision`` against big_vision's own FlexiViT code (flax), run once by hand.

The unit tests (tests/test_big_vision.py) compare with a numpy forward pass written from big_vision's
definition; this tool runs big_vision's own ``models/proj/flexi/vit.py`` instead: it builds the flax model
at random weights, writes them as big_vision's ``.npz``, loads that with ``FlexiViT.from_big_vision`` and
compares the logits at several patch sizes (``seqhw``), for the class-token and the mean-pooled model.
Needs jax, flax and scipy (``pip install jax flax scipy``) and a big_vision checkout; not in the test suite.

big_vision's module imports TensorFlow only for ``tf.image.resize`` inside the kernel's PI-resize; without
TensorFlow here, that call is served by ``jax.image.resize(..., "linear", antialias=False)``, the same
half-pixel bilinear resize without antialiasing. Its other imports that the forward pass does not use
(``big_vision.utils``, ``models.common``, ``flax.training.checkpoints``) are left empty.

    python tools/check_big_vision.py --big-vision PATH/TO/big_vision   # writes docs/results/big_vision_check.*
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flexivit import FlexiViT
from flexivit.provenance import git_revision, write_result

ROOT = Path(__file__).resolve().parent.parent
# (name, flax model arguments, image size, patch sizes): a small model at the releases' base kernel and grid.
CASES = [
    ("tok", dict(patch_size=(32, 32), posemb_size=(7, 7), width=64, depth=2, num_heads=4, mlp_dim=128,
                 pool_type="tok"), 240, (8, 10, 16, 30, 40, 48)),
    ("gap", dict(patch_size=(32, 32), posemb_size=(7, 7), width=64, depth=2, num_heads=4, mlp_dim=128,
                 pool_type="gap"), 240, (8, 16, 48)),
]


def _import_flexi(checkout: Path) -> types.ModuleType:
    """big_vision's ``models/proj/flexi/vit.py``, imported with empty stand-ins for the modules its forward pass
    does not use and ``tf.image.resize`` served by jax (see the module docstring); the stand-ins are removed
    from ``sys.modules`` again once it is imported."""
    import jax
    import jax.numpy as jnp

    def resize(x, size, method="bilinear"):
        assert method == "bilinear"
        shape = (*x.shape[:1], *size, *x.shape[3:])  # (1, h, w, 1)
        return np.asarray(jax.image.resize(jnp.asarray(x), shape, "linear", antialias=False))

    tf = types.ModuleType("tensorflow")
    tf.constant = np.asarray
    tf.image = types.SimpleNamespace(resize=lambda x, size, method: _Numpy(resize(np.asarray(x), size, method)))
    stubs = {name: types.ModuleType(name) for name in ("big_vision.utils", "big_vision.models.common",
                                                       "flax.training.checkpoints") if name not in sys.modules}
    stubs["tensorflow"] = tf
    sys.modules.update(stubs)
    sys.path.insert(0, str(checkout.resolve()))
    try:
        from big_vision.models.proj.flexi import vit as flexi
    finally:
        sys.path.remove(str(checkout.resolve()))
        for name in stubs:
            del sys.modules[name]
    return flexi


class _Numpy(np.ndarray):
    """An array with ``.numpy()``, as TensorFlow's eager tensors have."""

    def __new__(cls, array: np.ndarray) -> "_Numpy":
        return np.asarray(array).view(cls)

    def numpy(self) -> np.ndarray:
        return np.asarray(self)


def _check(flexi: types.ModuleType, name: str, kwargs: dict[str, Any], image: int, sizes: tuple[int, ...], seed: int,
           tmp: Path) -> dict:
    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict

    model = flexi.Model(num_classes=10, head_zeroinit=False, **kwargs)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(4, image, image, 3)).astype(np.float32)  # NHWC
    shapes = flatten_dict(model.init(jax.random.PRNGKey(seed), x[:1])["params"], sep="/")  # big_vision's names
    flat = {k: (rng.normal(size=v.shape) * 0.2 + k.endswith("/scale")).astype(np.float32) for k, v in shapes.items()}
    params = unflatten_dict(flat, sep="/")
    np.savez(tmp / f"{name}.npz", **{f"params/{k}": v for k, v in flat.items()})
    ours = FlexiViT.from_big_vision(tmp / f"{name}.npz", img_size=image)
    # A plain FlexiViTConfig's defaults: exact GELU (timm's ViT), position grid resampled without the tent filter.
    plain = FlexiViT.from_big_vision(tmp / f"{name}.npz", img_size=image, act_layer="gelu", posemb_antialias=False)
    diffs, plain_diffs, scale = {}, {}, {}
    for p in sizes:
        ref = np.asarray(model.apply({"params": params}, x, seqhw=image // p)[0])
        images = torch.from_numpy(x).permute(0, 3, 1, 2)  # NHWC -> NCHW
        with torch.no_grad():
            diffs[p] = float(np.abs(ours(images, p).numpy() - ref).max())
            plain_diffs[p] = float(np.abs(plain(images, p).numpy() - ref).max())
        scale[p] = float(np.abs(ref).max())
    return {"flax_model": {**kwargs, "patch_size": list(kwargs["patch_size"]),
                           "posemb_size": list(kwargs["posemb_size"])}, "image_size": image,
            "max_abs_diff": diffs, "max_abs_diff_plain_defaults": plain_diffs, "max_abs_logit": scale}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-vision", type=Path, required=True, help="a big_vision checkout (holds big_vision/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "big_vision_check")
    args = parser.parse_args(argv)
    import flax
    import jax

    flexi = _import_flexi(args.big_vision)
    with tempfile.TemporaryDirectory() as tmp:
        cases = {name: _check(flexi, name, kw, image, sizes, args.seed, Path(tmp)) for name, kw, image, sizes in CASES}
    worst = max(d for case in cases.values() for d in case["max_abs_diff"].values())
    payload = {"seeds": [args.seed], "split": "random images (uniform in [-1, 1]) and random weights",
               "versions": {"jax": jax.__version__, "flax": flax.__version__,
                            "big_vision": git_revision(args.big_vision)["commit"]}, "cases": cases,
               "worst_max_abs_diff": worst}
    lines = ["# FlexiViT.from_big_vision against big_vision's own flax model", "",
             "Logits of big_vision's `models/proj/flexi/vit.py` (flax, float32) and of the FlexiViT loaded from its "
             "weights written as `.npz` (float32), on 4 random 240-px images; base kernel 32x32, grid 7x7 (big_vision "
             f"{payload['versions']['big_vision'] or '(revision unknown)'}, jax {jax.__version__}, flax {flax.__version__}).",
             "",
             "The last column loads the same weights with a plain FlexiViTConfig's defaults instead (exact GELU, as "
             "timm's ViT and its `flexivit_*` ports; the grid resampled without antialiasing): what those would cost.",
             "", "| pool | patch | max abs logit | max abs diff | max abs diff, plain defaults |", "|---|---|---|---|---|"]
    for name, case in cases.items():
        for p, d in case["max_abs_diff"].items():
            lines.append(f"| {name} | {p} | {case['max_abs_logit'][p]:.2f} | {d:.1e} | "
                         f"{case['max_abs_diff_plain_defaults'][p]:.1e} |")
    write_result(args.out, payload, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
