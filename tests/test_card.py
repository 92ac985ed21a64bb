"""The model card: one description of a model, the same through every shape it travels in
(Triton parameters, checkpoint meta, the client's ModelInfo), old configs included."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from dinoserve.card import ModelCard, family_of
from dinoserve.errors import ModelError, ModelNotFoundError
from dinoserve.model_info import from_repository_config, from_triton_json
from dinoserve.registry import family_of_name
from dinoserve.pbtxt import parse_pbtxt
from dinoserve.repository import choose_model, config_from_dict, model_choice_error, read_model_config, render_config

VIT = ModelCard(arch="vit_small_patch16_224", image_size=224, patch_size=16, num_heads=6, embed_dim=384,
                weights_sha256="ab" * 32, model_kwargs={"depth": 2, "img_size": 224})
RESNET = ModelCard(arch="resnet18", image_size=64, embed_dim=512, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                   crop_pct=1.0, fit="pad", precision="fp16")

#: config.pbtxt as `dinoserve export` wrote it before the card existed (no interpolation).
OLD_CONFIG = """name: "old"
backend: "onnxruntime"
max_batch_size: 64
input [
  { name: "images", data_type: TYPE_UINT8, dims: [ 3, -1, -1 ] }
]
output [
  { name: "embedding", data_type: TYPE_FP32, dims: [ 192 ] },
  { name: "attention", data_type: TYPE_FP32, dims: [ 3, -1, -1 ] }
]
dynamic_batching { max_queue_delay_microseconds: 500 }
instance_group [ { kind: KIND_CPU, count: 1 } ]
parameters { key: "arch" value: { string_value: "vit_tiny_patch16_224" } }
parameters { key: "family" value: { string_value: "vit" } }
parameters { key: "image_size" value: { string_value: "32" } }
parameters { key: "crop_pct" value: { string_value: "0.875" } }
parameters { key: "patch_size" value: { string_value: "16" } }
parameters { key: "embed_dim" value: { string_value: "192" } }
parameters { key: "num_heads" value: { string_value: "3" } }
parameters { key: "weights_sha256" value: { string_value: "0123abcd" } }
parameters { key: "mean" value: { string_value: "0.485,0.456,0.406" } }
parameters { key: "std" value: { string_value: "0.229,0.224,0.225" } }
parameters { key: "precision" value: { string_value: "fp32" } }
"""


@pytest.mark.parametrize("card", [VIT, RESNET], ids=["vit", "resnet"])
def test_card_round_trips_through_params_and_dict(card):
    params = card.to_params()
    assert all(isinstance(v, str) for v in params.values())  # Triton keeps strings only
    assert "model_kwargs" not in params  # a PyTorch build detail, not for serving
    assert ModelCard.from_params(params) == card.replace(model_kwargs={})
    assert ModelCard.from_dict(card.to_dict()) == card
    assert ModelCard.from_dict(card.to_dict()).model_kwargs == card.model_kwargs
    hash(card)  # frozen and hashable
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.image_size = 1  # type: ignore[misc]


def test_card_round_trips_through_config_pbtxt():
    text = render_config("m", VIT, max_batch=4)
    config = config_from_dict(parse_pbtxt(text))
    assert config.card == VIT.replace(model_kwargs={})
    assert from_repository_config(config).card == config.card


def test_every_field_reaches_config_pbtxt():
    """A field added to the card is written and read back without touching another file."""
    params = parse_pbtxt(render_config("m", VIT, max_batch=4))["parameters"]
    written = {p["key"] for p in params}
    fields = {f.name for f in dataclasses.fields(ModelCard)} - {"model_kwargs"}
    assert written == fields


def test_old_config_pbtxt_still_loads(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.pbtxt").write_text(OLD_CONFIG)
    config = read_model_config(tmp_path / "old")
    card = config.card
    assert (card.arch, card.family, card.image_size, card.patch_size, card.num_heads, card.embed_dim) == (
        "vit_tiny_patch16_224", "vit", 32, 16, 3, 192)
    assert card.interpolation == "bicubic"  # not written back then: the default
    assert card.weights_sha256 == "0123abcd" and card.mean == (0.485, 0.456, 0.406)
    info = from_repository_config(config, version="1")
    assert info.image_size == 32 and info.crop_pct == 0.875 and info.has_attention  # card fields read through
    assert info.preprocessing() == card.preprocessing()


def test_an_unknown_fit_is_a_clear_error():
    params = {**RESNET.to_params(), "fit": "stretch"}
    with pytest.raises(ModelError, match="my config.*fit must be one of crop, pad, got 'stretch'"):
        ModelCard.from_params(params, source="my config")


def test_hand_written_config_gives_what_it_can_or_a_clear_error():
    # No dinoserve parameters but the two a client needs: image size, and the dim from the output.
    config = config_from_dict(parse_pbtxt("""
        name: "m" platform: "onnxruntime_onnx"
        output { name: "embedding" data_type: TYPE_FP32 dims: [ 384 ] }
        parameters { key: "image_size" value { string_value: "224" } }
        parameters { key: "mean" value { string_value: "[0.5, 0.5, 0.5]" } }"""))
    assert config.card.embed_dim == 384 and config.card.image_size == 224 and config.card.mean == (0.5,) * 3
    assert config.card.arch == "" and config.card.family == ""
    bare = config_from_dict(parse_pbtxt('name: "bare" output { name: "embedding" dims: [ -1 ] }'))
    with pytest.raises(ModelError, match=r"model 'bare'.*'image_size' or 'embed_dim'.*re-export"):
        bare.card
    broken = config_from_dict(parse_pbtxt('name: "b" parameters { key: "image_size" value { string_value: "big" } }'))
    with pytest.raises(ModelError, match=r"model 'b'.*malformed parameter image_size='big'"):
        broken.card


@pytest.mark.parametrize("grpc", [False, True], ids=["http", "grpc"])
def test_triton_json_gives_the_same_card(grpc):
    params = {k: {"string_value": v} for k, v in VIT.to_params().items()}
    dims = ["384"] if grpc else [384]  # gRPC's JSON writes int64 as strings
    config = {"name": "m", "max_batch_size": 8, "parameters": params,
              "output": [{"name": "embedding", "dims": dims}, {"name": "attention", "dims": [6, -1, -1]}]}
    info = from_triton_json({"config": config} if grpc else config, version="3")
    assert info.card == VIT.replace(model_kwargs={})
    assert (info.name, info.max_batch_size, info.version, info.has_attention) == ("m", 8, "3", True)
    assert info.identity() == {"name": "m", "arch": VIT.arch, "family": "vit", "weights_sha256": VIT.weights_sha256,
                               "dim": 384}
    with pytest.raises(AttributeError):
        info.not_a_field  # noqa: B018


def test_family_and_preprocessing_come_from_the_card():
    assert family_of("vit_base_patch8_224") == "vit" and family_of("resnet50") == "resnet"
    assert family_of("efficientnet_b0") == ""
    # by name: an alias has its architecture's family (the one rule config and training use)
    assert family_of_name("dino_vits8") == "vit" and family_of_name("dino_resnet50") == "resnet"
    assert family_of_name("vit_tiny_patch16_224") == "vit" and family_of_name("efficientnet_b0") == ""
    assert ModelCard(arch="resnet50", image_size=224, embed_dim=2048).family == "resnet"
    assert RESNET.preprocessing() == {"image_size": 64, "crop_pct": 1.0, "fit": "pad", "interpolation": "bicubic",
                                      "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.mark.parametrize("asked, available, message", [
    (["vit_huge"], ["vit_tiny", "resnet_tiny"],
     "repo R has no model 'vit_huge'; available: resnet_tiny, vit_tiny; pass one of them with --model"),
    (["a", "b"], ["vit_tiny"], "repo R has no model 'a', 'b'; available: vit_tiny; pass one of them with --model"),
    ([], ["vit_tiny", "resnet_tiny"],
     "repo R has several models and none was chosen; available: resnet_tiny, vit_tiny; pass one of them with --model"),
    (["vit_tiny"], [], "repo R has no model 'vit_tiny'; available: none; export one with `dinoserve export"),
    ([], [], "repo R has no models; export one with `dinoserve export"),
])
def test_model_choice_error_names_what_was_asked_what_exists_and_what_to_pass(asked, available, message):
    """One message shape for the client, the repository and serve."""
    assert str(model_choice_error(asked, available, "repo R")).startswith(message)
    if len(asked) <= 1 and not (available and not asked):
        with pytest.raises(ModelNotFoundError, match=re.escape(message)):
            choose_model(asked[0] if asked else None, available, "repo R")


def test_choose_model_takes_the_one_asked_for_or_the_only_one():
    assert choose_model("b", ["a", "b"], "repo R") == "b" and choose_model(None, ["a"], "repo R") == "a"
    with pytest.raises(ModelNotFoundError, match="several models .*a, b; pass one of them with --model \\(repeat"):
        choose_model(None, ["b", "a"], "repo R", option="--model (repeatable)")


def test_card_readers_import_no_torch():
    code = ("import sys, dinoserve.card, dinoserve.repository, dinoserve.model_info; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
