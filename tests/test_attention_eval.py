"""The attention score (dinoserve.training.attention_eval, `dinoserve eval attention`):
thresholded CLS attention against alpha masks, with a centred-box baseline."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from dinoserve.cli import cli
from dinoserve.training.attention_eval import centred_box, load_masked_set, threshold_mask


def test_threshold_keeps_the_smallest_set_holding_the_mass():
    att = np.array([[0.5, 0.2], [0.2, 0.1]])
    assert threshold_mask(att, 0.6).tolist() == [[True, True], [False, False]] or \
        threshold_mask(att, 0.6).tolist() == [[True, False], [True, False]]  # ties: either 0.2
    assert threshold_mask(att, 0.5).sum() == 1 and threshold_mask(att, 0.95).sum() == 4


def _rgba(path, size, box, opaque_bg=False):
    img = Image.new("RGBA", (size, size), (255, 255, 255, 255 if opaque_bg else 0))
    img.paste((200, 30, 30, 255), box)
    img.save(path)
    return path


def test_masks_come_from_alpha_and_unusable_images_are_listed(tmp_path):
    centred = _rgba(tmp_path / "centred.png", 64, (16, 16, 48, 48))
    opaque = _rgba(tmp_path / "opaque.png", 64, (0, 0, 10, 10), opaque_bg=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "rgb.png")
    masked = load_masked_set([centred, opaque, tmp_path / "rgb.png"], 32, crop_pct=1.0)
    assert masked.paths == [str(centred)] and masked.masks.shape == (1, 32, 32)
    assert masked.masks[0].sum() == 16 * 16 and masked.masks[0][8:24, 8:24].all()
    reasons = dict(masked.skipped)
    assert "opaque" in reasons[str(opaque)] and "no alpha" in reasons[str(tmp_path / "rgb.png")]
    assert (centred_box(32, 256) == masked.masks[0]).all()  # the centre prior fits a centred object


def test_cli_scores_a_vit_against_random_init_and_box(tmp_path):
    import torch

    from dinoserve.models import create_backbone
    from dinoserve.training.checkpoint import save_atomic

    data = tmp_path / "pngs"
    data.mkdir()
    for i in range(6):
        _rgba(data / f"obj{i}.png", 64, (4 + 6 * i, 8, 30 + 6 * i, 40))  # objects off centre
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16_224", depth=1, img_size=32, patch_size=8)
    weights = tmp_path / "vit.pth"
    save_atomic(vit.state_dict(), weights)
    r = CliRunner().invoke(cli, ["eval", "attention", "-w", str(weights), "--arch", "vit_tiny_patch16_224",
                                 "-d", str(data), "--image-size", "32", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["images"] == 6 and 0 <= out["jaccard"] <= 100 and 0 <= out["random_init"] <= 100
    assert 0 < out["centred_box"] < 100  # off-centre objects: the box overlaps only partly
    r = CliRunner().invoke(cli, ["eval", "attention", "-w", str(weights), "--arch", "resnet18", "-d", str(data)])
    assert r.exit_code == 1
