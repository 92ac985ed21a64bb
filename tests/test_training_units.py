"""Unit tests of the DINO training parts: loss, schedules, teacher, optimiser, head, config, data."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from dinoserve.errors import ConfigError
from dinoserve.training.augment import MultiCropAugment
from dinoserve.training.checkpoint import save_atomic
from dinoserve.training.config import PRESETS, TrainConfig, make_config
from dinoserve.filelist import find_images
from dinoserve.training.data import ResumableSampler, StoreCrops, collate_crops
from dinoserve.training.head import DINOHead, MultiCropWrapper
from dinoserve.training.loss import DINOLoss, teacher_entropy
from dinoserve.training.optim import cancel_last_layer_grads, clip_gradients, param_groups
from dinoserve.training.precision import cpu_has_amx, cpu_supports_bf16, resolve_precision
from dinoserve.training.schedules import cosine_schedule
from dinoserve.training.teacher import ema_update, update_after_step, update_at_epoch_start


# --- loss -------------------------------------------------------------------------------


def _hand_loss(student: np.ndarray, teacher: np.ndarray, center: np.ndarray, ncrops: int, tt: float, ts: float) -> float:
    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    s_chunks = np.split(student / ts, ncrops)
    t_chunks = np.split(softmax((teacher - center) / tt), 2)
    terms = []
    for i, q in enumerate(t_chunks):
        for v, s in enumerate(s_chunks):
            if v == i:
                continue
            log_p = np.log(softmax(s))
            terms.append(np.mean(np.sum(-q * log_p, axis=-1)))
    assert len(terms) == 2 * ncrops - 2
    return float(np.mean(terms))


def test_loss_matches_hand_computation_and_updates_center_after():
    torch.manual_seed(0)
    B, K, ncrops = 3, 5, 4
    student = torch.randn(ncrops * B, K, dtype=torch.float64)
    teacher = torch.randn(2 * B, K, dtype=torch.float64)
    loss_fn = DINOLoss(K, ncrops, teacher_temp=0.07, warmup_teacher_temp=0.07, epochs=1,
                       student_temp=0.1, center_momentum=0.9)
    old_center = torch.randn(1, K) * 0.1
    loss_fn.center.copy_(old_center)

    got = loss_fn(student.float(), teacher.float(), epoch=0).item()
    want = _hand_loss(student.numpy(), teacher.numpy(), old_center.double().numpy(), ncrops, 0.07, 0.1)
    assert got == pytest.approx(want, rel=1e-5)
    assert torch.equal(loss_fn.center, old_center)  # the loss itself leaves the center alone

    loss_fn.update_center(teacher.float())
    expected = 0.9 * old_center + 0.1 * teacher.float().mean(dim=0, keepdim=True)
    torch.testing.assert_close(loss_fn.center, expected)


def test_loss_same_view_pairs_are_skipped():
    # With only the two global crops, each teacher crop is compared with the *other* one:
    # identical student and teacher views therefore give the cross term, not the self term.
    K = 4
    a, b = torch.tensor([[4.0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 4.0]])
    loss_fn = DINOLoss(K, 2, teacher_temp=1.0, warmup_teacher_temp=1.0, epochs=1, student_temp=1.0)
    loss = loss_fn(torch.cat([a, b]), torch.cat([a, b]), 0).item()
    q_a, log_p_b = torch.softmax(a, -1), torch.log_softmax(b, -1)
    cross = float(-(q_a * log_p_b).sum())
    assert loss == pytest.approx(cross, rel=1e-6)


def test_teacher_temperature_warmup():
    loss_fn = DINOLoss(8, 2, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=4, epochs=10)
    assert loss_fn.teacher_temp(0) == pytest.approx(0.04)
    assert loss_fn.teacher_temp(3) == pytest.approx(0.07)
    assert loss_fn.teacher_temp(9) == pytest.approx(0.07)
    assert "center" in loss_fn.state_dict()


def test_teacher_entropy_extremes():
    K = 16
    uniform = torch.full((4, K), 1.0 / K)
    h, h_mean = teacher_entropy(uniform)
    assert h == pytest.approx(math.log(K), rel=1e-5) and h_mean == pytest.approx(math.log(K), rel=1e-5)
    one_hot = torch.zeros(4, K)
    one_hot[:, 3] = 1
    h, h_mean = teacher_entropy(one_hot)
    assert h < 1e-6 and h_mean < 1e-6


# --- schedules ----------------------------------------------------------------------------


def _reference_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """facebookresearch/dino utils.cosine_scheduler, written out from its formula."""
    warmup_iters = warmup_epochs * niter_per_ep
    warm = np.linspace(start_warmup_value, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    return np.concatenate((warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))))


@pytest.mark.parametrize("args", [(5e-4, 1e-6, 10, 7, 2, 0.0), (1.0, 0.1, 3, 4, 1, 0.0), (0.04, 0.4, 5, 3, 0, 0.0),
                                  (0.996, 1.0, 2, 5, 0, 0.0), (2.0, 0.0, 4, 6, 1, 0.5)])
def test_cosine_schedule_equals_the_reference_formula(args):
    base, final, epochs, steps, warm, start = args
    ours = cosine_schedule(base, final, epochs, steps, warmup_epochs=warm, warmup_start=start)
    np.testing.assert_allclose(ours, _reference_cosine_scheduler(base, final, epochs, steps, warm, start), rtol=0, atol=1e-12)
    if warm:
        assert ours[warm * steps - 1] == base  # the warmup endpoint is included
    assert ours[-1] != final  # i / len(iters) never reaches 1


# --- teacher -----------------------------------------------------------------------------


def test_ema_update_parameters_only():
    student, teacher = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        student.weight.fill_(1.0)
        student.bias.fill_(2.0)
        teacher.weight.zero_()
        teacher.bias.zero_()
        student.running_mean.fill_(5.0)
    ema_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher.weight, torch.full((3,), 0.1))
    torch.testing.assert_close(teacher.bias, torch.full((3,), 0.2))
    assert torch.equal(teacher.running_mean, torch.zeros(3))  # buffers stay the teacher's own


def test_teacher_update_modes():
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        teacher.weight.zero_()
    update_after_step("epoch", teacher, student, 0.9)
    assert torch.equal(teacher.weight, torch.zeros(2, 2))  # frozen within the epoch
    update_at_epoch_start("epoch", teacher, student)
    assert torch.equal(teacher.weight, student.weight)
    with torch.no_grad():
        teacher.weight.zero_()
    update_after_step("copy", teacher, student, 0.9)
    assert torch.equal(teacher.weight, student.weight)


# --- optimiser parts ------------------------------------------------------------------------


def test_per_parameter_clipping():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([6.0, 0.0])  # norm 6: clipped to 3
    b.grad = torch.tensor([1.0, 0.0, 0.0])  # norm 1: left alone
    model = nn.Module()
    model.a, model.b = a, b
    norms = clip_gradients(model, 3.0)
    torch.testing.assert_close(norms, torch.tensor([6.0, 1.0]))
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    assert torch.equal(b.grad, torch.tensor([1.0, 0.0, 0.0]))


def _tiny_wrapper(norm_last_layer: bool = True) -> MultiCropWrapper:
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return MultiCropWrapper(backbone, DINOHead(4, 10, hidden_dim=8, bottleneck_dim=6, norm_last_layer=norm_last_layer))


def test_param_groups_decay_only_matrices():
    model = _tiny_wrapper(norm_last_layer=True)
    decayed, plain = param_groups(model)
    assert plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decayed["params"]} == {
        "backbone.0.weight", "head.mlp.0.weight", "head.mlp.2.weight", "head.mlp.4.weight", "head.last_layer.weight_v"}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert "backbone.0.bias" in plain_names and "backbone.1.weight" in plain_names
    assert "head.last_layer.weight_g" not in plain_names  # fixed at 1: no gradient, not optimised


def test_frozen_last_layer_and_fixed_norm():
    torch.manual_seed(0)
    model = _tiny_wrapper(norm_last_layer=True)
    opt = torch.optim.AdamW(param_groups(model), lr=0.1)
    v0 = model.head.last_layer.weight_v.detach().clone()
    w0 = model.head.mlp[0].weight.detach().clone()
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    cancel_last_layer_grads(model, epoch=0, freeze_epochs=1)
    assert model.head.last_layer.weight_v.grad is None
    opt.step()
    assert torch.equal(model.head.last_layer.weight_v, v0)
    assert not torch.equal(model.head.mlp[0].weight, w0)
    assert torch.equal(model.head.last_layer.weight_g, torch.ones(10, 1))
    # after the frozen epochs the last layer learns
    opt.zero_grad()
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    cancel_last_layer_grads(model, epoch=1, freeze_epochs=1)
    opt.step()
    assert not torch.equal(model.head.last_layer.weight_v, v0)


def test_head_keys_follow_reference_layout():
    keys = set(DINOHead(8, 16, hidden_dim=8, bottleneck_dim=4).state_dict())
    assert {"last_layer.weight_g", "last_layer.weight_v", "mlp.0.weight", "mlp.4.bias"} <= keys


def test_multicrop_wrapper_runs_backbone_once_per_resolution():
    calls = []

    class Recorder(nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))

    wrapper = MultiCropWrapper(Recorder(), nn.Identity())
    crops = [torch.randn(2, 3, 16, 16)] * 2 + [torch.randn(2, 3, 8, 8)] * 3
    out = wrapper(crops)
    assert calls == [(4, 3, 16, 16), (6, 3, 8, 8)]
    assert out.shape == (10, 3)
    torch.testing.assert_close(out[4:6], crops[2].mean(dim=(2, 3)))  # order preserved


# --- precision -------------------------------------------------------------------------------


def test_precision_resolution_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_has_amx() else "fp32")
    if cpu_supports_bf16():
        assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        resolve_precision("fp16", cpu)


# --- config ---------------------------------------------------------------------------------


def test_config_presets_and_checked_overrides():
    cfg = make_config("cpu_small", epochs=3, split="knn_train, pool")
    assert cfg.arch == "resnet18" and cfg.epochs == 3 and cfg.split == ("knn_train", "pool")
    r50 = make_config("resnet50")
    assert (r50.optimizer, r50.lr, r50.weight_decay, r50.weight_decay_end) == ("sgd", 0.03, 1e-4, 1e-4)
    assert r50.global_crop_scale == (0.14, 1.0) and r50.local_crop_scale == (0.05, 0.14)
    vit = make_config("vit_s16")
    assert (vit.out_dim, vit.local_crops, vit.teacher_temp, vit.momentum_teacher) == (65536, 8, 0.04, 0.996)
    assert make_config(lr=1).lr == 1.0  # int -> float is lossless
    with pytest.raises(ConfigError, match="Did you mean: epochs"):
        make_config(epoch=3)
    with pytest.raises(ConfigError, match="'batch_size': expected int"):
        make_config(batch_size="64")
    with pytest.raises(ConfigError, match="not one of adamw, sgd, lars"):
        make_config(optimizer="adam")
    with pytest.raises(ConfigError, match="global_crop_scale"):
        make_config(global_crop_scale=(0.5, 0.2))
    with pytest.raises(ConfigError, match="unknown preset"):
        make_config("cpu_large")
    assert make_config(arch="dino_vits16", patch_size=8).patch_size == 8  # an alias of a ViT is a ViT
    for arch in ("resnet18", "dino_resnet50"):
        with pytest.raises(ConfigError, match=f"--patch-size: ViT options, but --arch {arch} is not a ViT"):
            make_config(arch=arch, patch_size=8)
    assert set(PRESETS) == {"vit_s16", "resnet50", "cpu_small", "finetune"}
    assert TrainConfig().to_dict()["global_crop_scale"] == [0.4, 1.0]


# --- augmentation and data ---------------------------------------------------------------------


def test_multicrop_augment_shapes_and_determinism(image_folder):
    from dinoserve.images import load_image

    img = load_image(sorted(image_folder.rglob("*.png"))[0])
    aug = MultiCropAugment(global_size=32, local_crops=3, local_size=16)
    a = aug(img, random.Random(7))
    b = aug(img, random.Random(7))
    c = aug(img, random.Random(8))
    assert [t.shape for t in a] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_store_crops_batch_by_position():
    pixels = np.random.default_rng(0).integers(0, 256, (3, 3, 24, 24), dtype=np.uint8)
    ds = StoreCrops(pixels, MultiCropAugment(global_size=16, local_crops=1, local_size=8))
    batch = collate_crops([ds[2], ds[0]])
    assert len(batch) == 2 and batch.indices.tolist() == [2, 0]
    assert [c.shape for c in batch.crops] == [(2, 3, 16, 16)] * 2 + [(2, 3, 8, 8)]
    assert torch.equal(batch.crops[0][1], ds[0][0][0])  # same (seed, epoch, index): same crop


def test_find_images_recursive_and_errors(tmp_path, image_folder):
    found = find_images(image_folder)
    assert len(found) == 24 and found == sorted(found)
    (tmp_path / "notes.txt").write_text("x")
    from dinoserve.errors import DataError

    with pytest.raises(DataError, match="no images found"):
        find_images(tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        find_images(tmp_path / "missing")


def test_sampler_skips_already_done_samples():
    s = ResumableSampler(list(range(10)), num_replicas=2, rank=1, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_start(2)
    assert list(s) == full[2:] and len(s) == 3
    s.set_epoch(3)
    assert len(list(s)) == 5


def test_save_atomic_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "checkpoint.pth"
    save_atomic({"a": torch.ones(2)}, target)
    save_atomic({"a": torch.zeros(2)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_collapse_monitor_warns_once_per_kind():
    from dinoserve.training.monitor import CollapseMonitor

    mon = CollapseMonitor(out_dim=4096, patience=3)
    ln_k = math.log(4096)
    assert [mon.check(ln_k, 5.0) for _ in range(2)] == [None, None]
    assert "ln K" in mon.check(ln_k + 0.01, 5.0)
    assert mon.check(ln_k, 5.0) is None  # warned already
    assert mon.check(2.0, 5.0) is None
    assert "same prototype" in mon.check(2.0, 0.1)


def test_lars_scales_matrix_steps_by_trust_ratio():
    from dinoserve.training.optim import LARS

    w = nn.Parameter(torch.full((2, 2), 2.0))  # ||w|| = 4
    b = nn.Parameter(torch.zeros(2))
    w.grad, b.grad = torch.full((2, 2), 0.5), torch.ones(2)  # ||g|| = 1
    LARS([w, b], lr=1.0, momentum=0.0, eta=0.01).step()
    torch.testing.assert_close(w, torch.full((2, 2), 2.0 - 0.01 * 4 / 1 * 0.5))
    torch.testing.assert_close(b, torch.full((2,), -1.0))  # plain SGD for 1-D parameters


def test_find_images_from_csv_with_split_filter(tmp_path, image_folder):
    rows = ["path,category,split"]
    for i, p in enumerate(sorted(image_folder.rglob("*.png"))):
        rows.append(f"{p.relative_to(image_folder)},{p.parent.name},{['pool', 'knn_train', 'knn_val'][i % 3]}")
    csv = tmp_path / "list.csv"
    csv.write_text("\n".join(rows) + "\n")
    got = find_images(csv, ["knn_train", "pool"], root=image_folder)
    assert len(got) == 16 and all(p.is_file() for p in got)
    assert len(find_images(csv, None, root=image_folder)) == 24
