"""Distillation: teacher loading and freezing, student initialisation, target quantisers, views."""

import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from flexivit import FlexiViT, FlexiViTConfig
from flexivit.model.weights import CheckpointError, save_model
from flexivit.model.resize import pi_resize
from flexivit.train.config import check_config, load_recipe
from flexivit.train.distill import (Teacher, ViewSpec, beyond_reach, convert_view, distill_loss, load_teacher,
                                    quantize_targets, student_from_teacher)
from flexivit.data.transforms import build_transform

STUDENT = FlexiViTConfig(img_size=28, patch_size=7, base_patch_size=14, base_grid=7, in_chans=1, num_classes=10,
                         embed_dim=32, depth=2, num_heads=2)


def _teacher_vit() -> VisionTransformer:
    vit = VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    with torch.no_grad():
        for p in vit.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return vit.eval()


def test_student_from_teacher_reproduces_the_teacher_at_its_size():
    vit = _teacher_vit()
    student = student_from_teacher(STUDENT, vit).eval()
    assert student.config.base_patch_size == 4 and student.config.base_grid == 7  # the teacher's, unchanged
    x = torch.randn(4, 1, 28, 28)
    teacher_logits, student_logits = vit(x), student(x, 4)
    torch.testing.assert_close(student_logits, teacher_logits, rtol=1e-5, atol=1e-5)
    assert distill_loss(student_logits, teacher_logits).item() < 1e-8  # KL at step 0 is ~0
    for p in (2, 7, 14, 28):
        assert torch.isfinite(student(x, p)).all()


def test_student_base_kept_only_when_asked():
    student = student_from_teacher(STUDENT, _teacher_vit(), keep_student_base=True)
    assert student.patch_embed.weight.shape[-1] == 14


def _rank(kernel: torch.Tensor) -> int:
    s = torch.linalg.svdvals(kernel.detach().double().reshape(kernel.shape[0], -1))  # (D, C*h*w)
    return int((s > s[0] * 1e-6).sum())


def _range_projection(small: int, big: int) -> torch.Tensor:
    """Orthogonal projection onto every kernel a ``small``-sized one PI-resizes to at ``big``: (big², big²)."""
    reach = pi_resize(torch.eye(small * small, dtype=torch.float64).reshape(-1, 1, small, small), big)
    q, _ = torch.linalg.qr(reach.reshape(small * small, -1).T)
    return q @ q.T


def test_full_rank_base_adds_only_what_the_upsampled_kernel_cannot_hold():
    vit = _teacher_vit()
    torch.manual_seed(3)
    upsampled = student_from_teacher(STUDENT, vit, keep_student_base=True)
    torch.manual_seed(3)
    full = student_from_teacher(STUDENT, vit, keep_student_base=True, full_rank_base=True)
    torch.manual_seed(3)
    fresh = FlexiViT(STUDENT).patch_embed.weight.detach().double()  # the student's own initial kernel
    up, filled = upsampled.patch_embed.weight.detach(), full.patch_embed.weight.detach()
    assert _rank(up) <= 16 and _rank(filled) == 32  # (D=32, 196): the upsample caps the rank at 4x4=16
    project = _range_projection(4, 14)
    flat = lambda w: w.double().reshape(-1, 196)
    torch.testing.assert_close(flat(filled) @ project, flat(up), atol=1e-5, rtol=0)  # the teacher's part is kept
    added, fresh_outside = flat(filled) - flat(up), flat(fresh) - flat(fresh) @ project
    assert 0.8 < added.norm() / fresh_outside.norm() < 1.25  # at a fresh initialisation's scale, nothing tuned
    for name, value in full.state_dict().items():  # everything else is the teacher's, as without the option
        if name != "patch_embed.weight":
            torch.testing.assert_close(value, upsampled.state_dict()[name])


def test_beyond_reach_is_zero_when_the_resize_reaches_every_kernel():
    assert beyond_reach(torch.randn(5, 2, 4, 4), (14, 14)).abs().max() == 0  # 14 -> 4 reaches all of R^16
    assert beyond_reach(torch.randn(5, 2, 8, 8), (8, 8)).abs().max() == 0  # same size: nothing to add
    outside = beyond_reach(torch.randn(5, 2, 8, 8), (4, 4))
    torch.testing.assert_close(outside.double().reshape(-1, 64) @ _range_projection(4, 8),
                               torch.zeros(10, 64, dtype=torch.float64), atol=1e-6, rtol=0)


def test_full_rank_base_adds_nothing_where_the_base_is_the_teachers_size():
    vit = _teacher_vit()
    states = []
    for full_rank_base in (False, True):
        torch.manual_seed(5)
        states.append(student_from_teacher(STUDENT, vit, full_rank_base=full_rank_base).state_dict())
    assert states[0].keys() == states[1].keys()
    for name, value in states[0].items():
        torch.testing.assert_close(states[1][name], value, rtol=0, atol=0)
    # So the recipe's full-rank start stays valid whatever the student's init is set to.
    for other in ("distill.keep_student_base=false", "distill.init_from_teacher=false"):
        cfg = load_recipe("fashion_mnist_distill", [other])
        assert cfg.distill.full_rank_base and check_config(cfg) is cfg


def test_student_mismatch_lists_what_differs():
    wider = VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=3, num_heads=2)
    with pytest.raises(ValueError, match=r"(?s)blocks\.0\.attn\.qkv\.weight: teacher \(144, 48\) vs student \(96, 32\).*blocks\.2\.norm1\.weight: not in the student"):
        student_from_teacher(STUDENT, wider)


def test_teacher_is_frozen_and_gets_no_gradient():
    teacher = Teacher(_teacher_vit().train(), view=ViewSpec(28, 1, (0.5,), (0.5,)))
    teacher.train()
    assert not teacher.training and not teacher.model.training
    student = FlexiViT(STUDENT)
    x = torch.randn(2, 1, 28, 28)
    loss = distill_loss(student(x, 7), teacher(x, ViewSpec(28, 1, (0.5,), (0.5,))))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("quantize", ["none", "hard", "topk:3"])
def test_distill_loss_is_the_standard_kl_at_a_temperature(temperature, quantize):
    """KL(teacher ‖ student) of the tempered softmaxes, summed over classes, averaged over the batch, × T²
    (the teacher's distribution quantised first when asked); a swapped KL or a missing T² fails here."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    student = (torch.randn(16, 10, generator=gen) * 3).requires_grad_()
    teacher = torch.randn(16, 10, generator=gen) * 3
    targets = quantize_targets(F.softmax(teacher / temperature, dim=1), quantize)
    reference = F.kl_div(F.log_softmax(student / temperature, dim=1), targets, reduction="batchmean") * temperature**2
    loss = distill_loss(student, teacher, temperature=temperature, quantize=quantize)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, student)
    (expected,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)
    swapped = F.kl_div(F.log_softmax(teacher / temperature, dim=1), F.softmax(student / temperature, dim=1),
                       reduction="batchmean") * temperature**2
    assert not torch.isclose(loss, swapped, rtol=1e-3)  # the logits are far enough apart to tell the two


def test_quantisers():
    probs = torch.softmax(torch.randn(64, 10) * 2, dim=1)
    hard = quantize_targets(probs, "hard")
    assert torch.equal(hard, torch.nn.functional.one_hot(probs.argmax(1), 10).float())
    top3 = quantize_targets(probs, "topk:3")
    assert ((top3 > 0).sum(dim=1) == 3).all()
    torch.testing.assert_close(top3.sum(dim=1), torch.ones(64))
    assert torch.equal(top3.argmax(1), probs.argmax(1))
    for bits in (1, 2, 4):
        levels = 2**bits - 1
        q = quantize_targets(probs, f"bits:{bits}")
        torch.testing.assert_close(q * levels, (q * levels).round(), rtol=0, atol=1e-6)  # on the grid
        torch.testing.assert_close(q.sum(dim=1), torch.ones(64), rtol=0, atol=1e-6)
        top = q.gather(1, probs.argmax(1, keepdim=True)).squeeze(1)
        assert torch.equal(top, q.max(dim=1).values)  # the teacher's class keeps a largest target
    with pytest.raises(ValueError, match="none, hard, topk:K or bits:B"):
        quantize_targets(probs, "bits:x")


def test_teacher_sees_the_same_augmented_crop():
    """Function matching: the teacher's view is the student's augmented view, re-expressed."""
    from PIL import Image
    import numpy as np

    pixels = np.zeros((64, 64), dtype=np.uint8)
    pixels[:32, :32], pixels[:32, 32:], pixels[32:, :32], pixels[32:, 32:] = 0, 85, 170, 255  # four quadrants
    augment = build_transform(image_size=28, channels=1, train=True, scale=(0.2, 0.5))
    torch.manual_seed(3)
    student_view = augment(Image.fromarray(pixels))[None]
    torch.manual_seed(4)
    other_crop = augment(Image.fromarray(pixels))[None]
    source = ViewSpec(28, 1, (0.5,), (0.5,))
    target = ViewSpec(56, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    teacher_view = convert_view(student_view, source, target)
    assert teacher_view.shape == (1, 3, 56, 56)
    back = convert_view(teacher_view, target, ViewSpec(28, 3, (0.5,) * 3, (0.5,) * 3))[:, :1]
    same = (back - student_view).abs().mean()
    assert same < 0.05  # the same crop (up to resampling at the quadrant edges)
    assert (back - other_crop).abs().mean() > 5 * same  # a new crop would look different


def test_load_teacher_from_flexivit_and_timm_files(tmp_path):
    flexi = FlexiViT(STUDENT)
    save_model(flexi, tmp_path / "run", class_names=[str(i) for i in range(10)],
               preprocess={"image_size": 28, "channels": 1, "mean": [0.5], "std": [0.5]})
    teacher = load_teacher(str(tmp_path / "run"), patch_size=4)
    assert teacher.patch_size == 4 and isinstance(teacher.model, FlexiViT)
    with pytest.raises(ValueError, match="valid patch sizes"):
        load_teacher(str(tmp_path / "run"), patch_size=5)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, in_chans=1).eval()
    save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    x = torch.randn(2, 1, 28, 28)
    view = ViewSpec(28, 1, (0.5,), (0.5,))
    with torch.no_grad():
        expected = vit(convert_view(x, view, ViewSpec(224, 1, (0.5,), (0.5,))))
    for file in ("vit.safetensors", "vit.pth"):
        teacher = load_teacher(f"timm:vit_tiny_patch16_224={tmp_path / file}")
        assert teacher.view.image_size == 224 and teacher.view.channels == 1
        torch.testing.assert_close(teacher(x, view), expected)


def test_bad_teacher_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_teacher(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="do not exist"):
        load_teacher(f"timm:vit_tiny_patch16_224={tmp_path / 'missing.safetensors'}")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="unsupported format"):
        load_teacher(f"timm:vit_tiny_patch16_224={tmp_path / 'notes.txt'}")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_teacher(f"timm:vit_tiny_patch16_224={tmp_path / 'junk.safetensors'}")
    with pytest.raises(CheckpointError, match="not a readable safetensors model file"):
        load_teacher(str(tmp_path / "junk.safetensors"))
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(_Payload(str(tmp_path / "pwned"))))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_teacher(f"timm:vit_tiny_patch16_224={tmp_path / 'evil.pth'}")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError, match="timm:MODEL_NAME=WEIGHTS_FILE"):
        load_teacher("timm:vit_tiny_patch16_224")


class _Payload:
    """Unpickling this would run code (it must never happen)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_only_the_student_is_prepared_and_saved(tmp_path):
    """The trainer hands Accelerate the student alone: DDP/FSDP never wrap the teacher, save_state never
    sees it."""
    from accelerate import Accelerator

    from flexivit.train.config import load_recipe
    from flexivit.train.distill import Teacher
    from flexivit.train.loop import train

    teacher_model = FlexiViT(FlexiViTConfig(img_size=28, patch_size=4, base_patch_size=4, base_grid=7, in_chans=1,
                                            num_classes=10, embed_dim=32, depth=1, num_heads=2, class_token=False,
                                            global_pool="avg"))
    save_model(teacher_model, tmp_path / "teacher", class_names=[str(i) for i in range(10)],
               preprocess={"image_size": 28, "channels": 1, "mean": [0.5], "std": [0.5]})
    prepared = []

    class Recording(Accelerator):
        def prepare(self, *objects, **kw):
            prepared.extend(objects)
            return super().prepare(*objects, **kw)

    cfg = load_recipe("fashion_mnist_distill:smoke", [
        f"distill.teacher={tmp_path / 'teacher'}", "model.embed_dim=32", "model.depth=1", "train.steps=2",
        "train.checkpoint_every=2", "data.batch_size=8", "data.eval_limit=16", "patch.sizes=4,7",
        "patch.distribution=uniform", "patch.weights=none"])
    train(cfg, out_dir=tmp_path / "run", accelerator=Recording(cpu=True))
    models = [o for o in prepared if isinstance(o, torch.nn.Module)]
    assert len(models) == 1 and isinstance(models[0], FlexiViT) and not any(isinstance(o, Teacher) for o in prepared)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "state" / "step_2" / "model.safetensors"))
    assert set(saved) == set(models[0].state_dict())


def test_fixed_size_finetuning_draws_one_size_whatever_the_recipe_weights():
    """`flexivit finetune --patch-size P` on a recipe that weights its sizes: one size, no stale weights."""
    from flexivit.train.builders import build_sampler
    from flexivit.train.config import load_recipe
    from flexivit.train.finetune import fixed_size

    cfg = load_recipe("fashion_mnist_finetune")
    assert cfg.patch.distribution == "weighted" and len(cfg.patch.weights) == 4
    lr = cfg.optim.lr
    fixed = fixed_size(cfg, 7)
    assert [s.patch for s in build_sampler(fixed).schemes] == [7]
    assert fixed.patch.eval_sizes == [2, 4, 7, 14] and fixed.patch.weights is None
    assert fixed.optim.lr == pytest.approx(lr * fixed.finetune.fixed_lr_scale)
    with pytest.raises(ValueError, match="valid patch sizes"):
        fixed_size(load_recipe("fashion_mnist_finetune"), 5)
