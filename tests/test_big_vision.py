"""big_vision ``.npz`` checkpoints: written here in big_vision's layout, loaded, and checked against a numpy
forward pass written from big_vision's definition (models/vit.py, models/proj/flexi/vit.py), at two patch
sizes that resize both the kernel and the position grid (one each way)."""

import math

import numpy as np
import pytest
import torch

from flexivit import FlexiViT
from flexivit.model.big_vision import BigVisionError, big_vision_config
from flexivit.model.weights import CheckpointError, load_model, read_model_meta
from flexivit.cli.main import main
from flexivit.eval.export import load_export

WIDTH, HEADS, DEPTH, MLP, BASE, GRID, CHANS, CLASSES = 16, 2, 2, 32, 6, 4, 3, 5
IMAGE = 24  # patch 4: kernel 6 -> 4, grid 4 -> 6; patch 8: kernel 6 -> 8, grid 4 -> 3 (the tent filter)
SIZES = (4, 8)


# ---- checkpoints in big_vision's layout ---------------------------------------------------------------
def bv_params(seed: int = 0, *, cls: bool = True, depth: int = DEPTH) -> dict[str, np.ndarray]:
    """A flax ViT's parameter tree, flattened with '/' as big_vision's npz saver does (random values)."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    p = {"embedding/kernel": normal(BASE, BASE, CHANS, WIDTH, scale=1 / math.sqrt(BASE * BASE * CHANS)),
         "embedding/bias": normal(WIDTH, scale=0.1), "pos_embedding": normal(1, GRID * GRID, WIDTH, scale=0.5),
         "Transformer/encoder_norm/scale": 1 + normal(WIDTH, scale=0.1),
         "Transformer/encoder_norm/bias": normal(WIDTH, scale=0.1),
         "head/kernel": normal(WIDTH, CLASSES), "head/bias": normal(CLASSES)}
    if cls:
        p["cls"] = normal(1, 1, WIDTH)
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            p[f"{b}{ln}/scale"], p[f"{b}{ln}/bias"] = 1 + normal(WIDTH, scale=0.1), normal(WIDTH, scale=0.1)
        a = b + "MultiHeadDotProductAttention_0/"
        for m in ("query", "key", "value"):
            p[f"{a}{m}/kernel"] = normal(WIDTH, HEADS, WIDTH // HEADS, scale=1 / math.sqrt(WIDTH))
            p[f"{a}{m}/bias"] = normal(HEADS, WIDTH // HEADS, scale=0.1)
        p[f"{a}out/kernel"] = normal(HEADS, WIDTH // HEADS, WIDTH, scale=0.3)
        p[f"{a}out/bias"] = normal(WIDTH, scale=0.1)
        p[f"{b}MlpBlock_0/Dense_0/kernel"] = normal(WIDTH, MLP, scale=1 / math.sqrt(WIDTH))
        p[f"{b}MlpBlock_0/Dense_0/bias"] = normal(MLP, scale=0.1)
        p[f"{b}MlpBlock_0/Dense_1/kernel"] = normal(MLP, WIDTH, scale=1 / math.sqrt(MLP))
        p[f"{b}MlpBlock_0/Dense_1/bias"] = normal(WIDTH, scale=0.1)
    return p


def write_npz(path, params: dict[str, np.ndarray], prefix: str = "params/"):
    np.savez(path, **{prefix + k: v for k, v in params.items()})
    return path


# ---- the reference: big_vision's forward pass in numpy (float64) --------------------------------------
def tf_bilinear_1d(n_in: int, n_out: int) -> np.ndarray:
    """tf.image.resize(method="bilinear") along one axis (half-pixel centres, no antialias): (n_out, n_in)."""
    mat = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        lo = math.floor(x)
        frac = x - lo
        mat[i, min(max(lo, 0), n_in - 1)] += 1 - frac
        mat[i, min(max(lo + 1, 0), n_in - 1)] += frac
    return mat


def jax_linear_1d(n_in: int, n_out: int) -> np.ndarray:
    """jax.image.resize(method="linear") with its default antialias=True along one axis: a triangle over the
    input pixel centres, widened by n_in / n_out when shrinking, weights normalised to sum to 1."""
    width = max(n_in / n_out, 1.0)
    mat = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * n_in / n_out
        w = np.maximum(0.0, 1 - np.abs(np.arange(n_in) + 0.5 - centre) / width)
        mat[i] = w / w.sum()
    return mat


def pi_resize_ref(kernel: np.ndarray, new: int) -> np.ndarray:
    """big_vision's resample_patchemb: B resizes a flattened (old, old) patch to (new, new) as tf.image.resize
    does, built column by column from resized basis patches; the kernel becomes pinv(B.T) @ vec(kernel)."""
    old = kernel.shape[0]
    r = tf_bilinear_1d(old, new)
    columns = []
    for i in range(old * old):
        basis = np.zeros(old * old)
        basis[i] = 1
        columns.append((r @ basis.reshape(old, old) @ r.T).reshape(-1))
    resize_mat = np.stack(columns).T  # (new*new, old*old)
    pinv = np.linalg.pinv(resize_mat.T)  # (new*new, old*old)
    flat = kernel.reshape(old * old, -1)  # (old*old, C*D), HWIO
    return (pinv @ flat).reshape(new, new, *kernel.shape[2:])


def layer_norm(x, scale, bias, eps=1e-6):  # flax.linen.LayerNorm
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def gelu_tanh(x):  # flax.linen.gelu (approximate=True)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def reference_logits(params: dict[str, np.ndarray], images: np.ndarray, patch: int) -> np.ndarray:
    """big_vision's flexi ViT on NHWC ``images`` at ``patch`` (logits, float64)."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    x = images.astype(np.float64)
    n, h, w, c = x.shape
    kernel = p["embedding/kernel"] if patch == BASE else pi_resize_ref(p["embedding/kernel"], patch)
    gh, gw = h // patch, w // patch
    patches = x.reshape(n, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)  # (n, gh, gw, p, p, C)
    tokens = np.einsum("nijabc,abcd->nijd", patches, kernel) + p["embedding/bias"]  # VALID conv, stride patch
    tokens = tokens.reshape(n, gh * gw, -1)
    pos = p["pos_embedding"].reshape(GRID, GRID, -1)
    pos = np.einsum("ia,abd,jb->ijd", jax_linear_1d(GRID, gh), pos, jax_linear_1d(GRID, gw))
    x = tokens + pos.reshape(1, gh * gw, -1)
    if "cls" in p:
        x = np.concatenate([np.repeat(p["cls"], n, axis=0), x], axis=1)
    depth = len({k.split("/")[1] for k in p if k.startswith("Transformer/encoderblock_")})
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        a = b + "MultiHeadDotProductAttention_0/"
        y = layer_norm(x, p[b + "LayerNorm_0/scale"], p[b + "LayerNorm_0/bias"])
        q, k, v = (np.einsum("nld,dhe->nlhe", y, p[f"{a}{m}/kernel"]) + p[f"{a}{m}/bias"]  # (n, L, heads, d)
                   for m in ("query", "key", "value"))
        logits = np.einsum("nqhe,nkhe->nhqk", q / math.sqrt(q.shape[-1]), k)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = np.einsum("nhqk,nkhe->nqhe", att, v)
        x = x + np.einsum("nqhe,hed->nqd", y, p[a + "out/kernel"]) + p[a + "out/bias"]
        y = layer_norm(x, p[b + "LayerNorm_1/scale"], p[b + "LayerNorm_1/bias"])
        y = gelu_tanh(y @ p[b + "MlpBlock_0/Dense_0/kernel"] + p[b + "MlpBlock_0/Dense_0/bias"])
        x = x + y @ p[b + "MlpBlock_0/Dense_1/kernel"] + p[b + "MlpBlock_0/Dense_1/bias"]
    x = layer_norm(x, p["Transformer/encoder_norm/scale"], p["Transformer/encoder_norm/bias"])
    pooled = x[:, 0] if "cls" in p else x.mean(1)  # pool "tok" or "gap"
    return pooled @ p["head/kernel"] + p["head/bias"]


def our_logits(model: FlexiViT, images: np.ndarray, patch: int) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images).permute(0, 3, 1, 2).float(), patch).double().numpy()  # NHWC -> NCHW


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(1).uniform(-1, 1, size=(3, IMAGE, IMAGE, CHANS)).astype(np.float32)


# ---- the forward pass ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [True, False], ids=["tok", "gap"])
def test_logits_match_big_vision_at_two_patch_sizes(tmp_path, images, cls):
    params = bv_params(cls=cls)
    model = FlexiViT.from_big_vision(write_npz(tmp_path / "ckpt.npz", params), img_size=IMAGE)
    for patch in (*SIZES, BASE):
        ref = reference_logits(params, images, patch)
        assert np.abs(our_logits(model, images, patch) - ref).max() < 1e-4, patch
    assert np.abs(reference_logits(params, images, 4) - reference_logits(params, images, 8)).max() > 1e-2


def test_nothing_is_resized_at_load_and_the_config_comes_from_the_arrays(tmp_path):
    params = bv_params()
    model = FlexiViT.from_big_vision(write_npz(tmp_path / "ckpt.npz", params))
    cfg = model.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio) == (WIDTH, DEPTH, HEADS, MLP / WIDTH)
    assert (cfg.base_patch_size, cfg.base_grid, cfg.in_chans, cfg.num_classes) == (BASE, GRID, CHANS, CLASSES)
    assert (cfg.class_token, cfg.global_pool, cfg.img_size) == (True, "token", BASE * GRID)
    kernel = np.transpose(params["embedding/kernel"], (3, 2, 0, 1))  # HWIO -> OIHW, as stored
    assert np.array_equal(model.patch_embed.weight.detach().numpy(), kernel)
    assert np.array_equal(model.pos_embed.detach().numpy(), params["pos_embedding"].reshape(1, GRID, GRID, WIDTH))
    assert not model.training


def test_other_conventions_give_other_logits(tmp_path, images):
    """The defaults matter: timm's exact GELU or a grid shrunk without the tent filter would not match."""
    path = write_npz(tmp_path / "ckpt.npz", bv_params())
    ref = reference_logits(bv_params(), images, 8)
    for override in ({"act_layer": "gelu"}, {"posemb_antialias": False}):
        model = FlexiViT.from_big_vision(path, img_size=IMAGE, **override)
        assert np.abs(our_logits(model, images, 8) - ref).max() > 1e-4, override


def _to_old_layout(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The original ViT checkpoints' names: pre-linen module numbers, the position embedding under
    Transformer/posembed_input with the class token's entry first."""
    renames = {"LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3",
               "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1"}
    old = {}
    for name, value in params.items():
        parts = name.split("/")
        old["/".join(renames.get(part, part) for part in parts)] = value
    cls_pos = np.full((1, 1, WIDTH), 0.25, np.float32)
    old["Transformer/posembed_input/pos_embedding"] = np.concatenate([cls_pos, old.pop("pos_embedding")], axis=1)
    old["cls"] = params["cls"] - cls_pos  # the model adds the entry back to the class token
    return old


def _to_scan(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A scanned encoder: one encoderblock whose arrays stack the blocks on a leading axis."""
    out = {k: v for k, v in params.items() if not k.startswith("Transformer/encoderblock_")}
    leaves = {k.split("/", 2)[2] for k in params if k.startswith("Transformer/encoderblock_0/")}
    for leaf in leaves:
        out[f"Transformer/encoderblock/{leaf}"] = np.stack([params[f"Transformer/encoderblock_{i}/{leaf}"]
                                                            for i in range(DEPTH)])
    return out


def _to_bfloat16(params: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The arrays as numpy saves bfloat16 (2-byte void), and their float32 values."""
    stored, values = {}, {}
    for name, value in params.items():
        bf16 = torch.from_numpy(value).to(torch.bfloat16)
        stored[name] = bf16.view(torch.int16).numpy().view("V2")
        values[name] = bf16.float().numpy()
    return stored, values


@pytest.mark.parametrize("layout", ["old_names", "scan", "opt_target", "top", "bfloat16"])
def test_other_layouts_load_to_the_same_model(tmp_path, images, layout):
    params = bv_params()
    stored, expected, prefix = params, params, "params/"
    if layout == "old_names":
        stored = _to_old_layout(params)
    elif layout == "scan":
        stored = _to_scan(params)
    elif layout == "bfloat16":
        stored, expected = _to_bfloat16(params)
    else:
        prefix = {"opt_target": "opt/target/", "top": ""}[layout]
    arrays = {prefix + k: v for k, v in stored.items()}
    if layout == "opt_target":  # a flax optimizer checkpoint: its state beside the parameters is not read
        arrays["opt/state/step"] = np.zeros(())
    np.savez(tmp_path / "ckpt.npz", **arrays)
    model = FlexiViT.from_big_vision(tmp_path / "ckpt.npz", img_size=IMAGE)
    assert np.abs(our_logits(model, images, 4) - reference_logits(expected, images, 4)).max() < 1e-4


def test_overrides_free_and_fixed(tmp_path):
    path = write_npz(tmp_path / "ckpt.npz", bv_params())
    model = FlexiViT.from_big_vision(path, img_size=30, patch_size=5, embed_dim=WIDTH, depth=DEPTH)
    assert (model.config.img_size, model.config.patch_size, model.config.base_patch_size) == (30, 5, BASE)
    assert big_vision_config(path, img_size=28).patch_size == 7  # 6 does not tile 28: the valid size nearest it
    for asked, named in (({"depth": 3}, "depth=2, not depth=3"), ({"embed_dim": 32}, "embed_dim=16, not embed_dim=32"),
                         ({"num_heads": 4}, "num_heads=2"), ({"base_patch_size": 32}, "base_patch_size=6")):
        with pytest.raises(BigVisionError, match=named) as err:
            FlexiViT.from_big_vision(path, **asked)
        assert "\n" not in str(err.value)


def _without(params: dict[str, np.ndarray], *names: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in params.items() if k not in names}


@pytest.mark.parametrize("arrays, message", [
    ({"params/conv1/kernel": np.zeros((3, 3, 3, 8), np.float32), "params/fc/bias": np.zeros(8, np.float32)},
     "not a ViT/FlexiViT checkpoint: no embedding/kernel"),
    ({f"params/{k}": v for k, v in bv_params().items()} | {"params/MAPHead_0/probe": np.zeros((1, 1, WIDTH))},
     r"attention-pooling \(MAP\) head"),
    ({f"params/{k}": v for k, v in _without(bv_params(), "pos_embedding").items()},
     "no learned position embedding"),
    ({f"params/{k}": v for k, v in _without(bv_params(), "Transformer/encoderblock_1/LayerNorm_1/bias").items()},
     "lacks Transformer/encoderblock_1/LayerNorm_1/bias"),
    ({f"params/{k}": v for k, v in bv_params().items()} | {"params/Transformer/extra/scale": np.zeros(WIDTH)},
     "has arrays FlexiViT has no place for: Transformer/extra/scale"),
    ({f"params/{k}": v for k, v in bv_params().items()} | {f"img/{k}": v for k, v in bv_params().items()},
     "holds several ViTs"),
])
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BigVisionError, match=message) as err:
        FlexiViT.from_big_vision(tmp_path / "bad.npz")
    assert "\n" not in str(err.value)
    assert isinstance(err.value, (ValueError, CheckpointError))


def test_not_an_npz_is_refused_in_one_line(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip\n")
    for path, message in ((tmp_path / "text.npz", "not a readable .npz"), (tmp_path / "none.npz", "does not exist")):
        with pytest.raises(BigVisionError, match=message) as err:
            FlexiViT.from_big_vision(path)
        assert "\n" not in str(err.value)


def test_prefix_chooses_one_of_several(tmp_path, images):
    params = bv_params()
    np.savez(tmp_path / "two.npz", **{f"params/img/{k}": v for k, v in params.items()},
             **{f"params/other/{k}": v for k, v in bv_params(seed=5).items()})
    model = FlexiViT.from_big_vision(tmp_path / "two.npz", prefix="params/img", img_size=IMAGE)
    assert np.abs(our_logits(model, images, 8) - reference_logits(params, images, 8)).max() < 1e-4


def test_load_model_and_the_cli_take_an_npz(tmp_path, images):
    params = bv_params()
    path = write_npz(tmp_path / "ckpt.npz", params)
    model, meta = load_model(path)
    assert meta == read_model_meta(path) and meta["config"] == model.config.to_dict()
    assert meta["config"]["act_layer"] == "gelu_tanh" and meta["preprocess"]["mean"] == [0.5] * 3
    assert main(["export", str(path), "--patch-size", "8", "--out", str(tmp_path / "export")]) == 0
    vit, config = load_export(tmp_path / "export")  # a plain timm ViT at patch 8 (tanh GELU in its model_args)
    with torch.no_grad():
        got = vit(torch.from_numpy(images).permute(0, 3, 1, 2)).double().numpy()
    assert np.abs(got - reference_logits(params, images, 8)).max() < 1e-4
