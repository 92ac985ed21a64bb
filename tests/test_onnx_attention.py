"""ViT attention exported as one ONNX Attention operator: same numbers as timm's attention,
one operator per block except the tapped last one, and attention variants it does not
cover keep timm's forward."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import torch

from dinoserve.export import export_onnx
from dinoserve.models import create_backbone
from dinoserve.onnx_attention import use_onnx_attention
from dinoserve.ort_session import open_session


def tiny_vit(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", depth=3, img_size=32, **kwargs).eval()


def attention_nodes(path) -> int:
    """Attention operators on [batch, tokens, width] inputs (3-D: the heads are an attribute),
    the form that needs no transposes; timm's own path exports as 4-D attention."""
    return sum(n.op_type == "Attention" and any(a.name == "q_num_heads" for a in n.attribute)
               for n in onnx.load(str(path)).graph.node)


def test_rewritten_attention_computes_what_timm_does():
    vit = tiny_vit()
    rewritten = copy.deepcopy(vit)
    assert use_onnx_attention(rewritten) == 3
    x = torch.randn(2, 3, 48, 32)  # not square, not the size the model was built for
    with torch.no_grad():
        np.testing.assert_allclose(rewritten(x).numpy(), vit(x).numpy(), atol=2e-5, rtol=1e-4)


def test_export_has_one_attention_operator_per_untapped_block(tmp_path):
    vit = tiny_vit()
    res = export_onnx(model=vit, name="vit", repo=tmp_path / "repo", image_size=32)
    assert attention_nodes(res.onnx_path) == 2  # blocks 0 and 1; the tapped block 2 stays open
    assert res.max_abs_diff < 1e-4
    # The exported model still equals the unchanged PyTorch model, attention maps included.
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 48, 64), dtype=np.uint8)
    embedding, maps = open_session(res.onnx_path, device="cpu").run(["embedding", "attention"], {"images": images})
    from dinoserve.images import normalize
    from dinoserve.models import forward_with_attention

    with torch.no_grad():
        ref, ref_maps = forward_with_attention(vit, torch.from_numpy(normalize(images)))
    np.testing.assert_allclose(embedding, ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(maps, ref_maps.numpy(), atol=1e-5)


def test_attention_with_query_key_norm_keeps_timms_forward(tmp_path):
    vit = tiny_vit(qk_norm=True)
    assert use_onnx_attention(copy.deepcopy(vit)) == 0
    res = export_onnx(model=vit, name="qk", repo=tmp_path / "repo", image_size=32)
    assert res.max_abs_diff < 1e-4 and attention_nodes(res.onnx_path) == 0  # verified at two sizes
    layer_norms = sum(n.op_type == "LayerNormalization" for n in onnx.load(str(res.onnx_path)).graph.node)
    assert layer_norms == 3 * 2 + 1 + 3 * 2  # block norms, the final norm, and every query/key norm
