"""`dinoserve export --onnx`: a backbone into a Triton model repository, verified."""

from __future__ import annotations

import json

import click


@click.command("export")
@click.option("--onnx", "onnx_", is_flag=True, help="Export to ONNX into a Triton model repository (the only format).")
@click.option("--weights", "-w", required=True,
              help="Weight source: a checkpoint/.pth/.safetensors path, timm:<arch>.<tag> or an alias (dino_vits16 ...).")
@click.option("--arch", default=None, help="timm architecture, when it cannot be read from the weights.")
@click.option("--name", "-n", required=True, help="Model name in the repository (folder name).")
@click.option("--repo", envvar="DINOSERVE_REPO", default="model_repository", show_default=True,
              type=click.Path(file_okay=False), help="Triton model repository [env DINOSERVE_REPO].")
@click.option("--image-size", default=None, type=click.IntRange(1),
              help="Input size clients send [default: the backbone's own, e.g. 224].")
@click.option("--max-batch", default=64, show_default=True, type=click.IntRange(1), help="Triton max_batch_size.")
@click.option("--fp16", is_flag=True, help="Half-precision weights and compute (uint8 in, float32 out).")
@click.option("--int8", is_flag=True,
              help="Static int8 (QDQ) for CPU serving, calibrated on --calibration and refused unless it matches fp32.")
@click.option("--calibration", default=None, type=click.Path(exists=False),
              help="int8 calibration images: a folder, a CSV file list or a dinoserve index (a few hundred images) "
                   "[default: the training data a dinoserve checkpoint names].")
@click.option("--int8-scheme", type=click.Choice(["u8s7", "u8u8", "u8s8"]), default=None,
              help="int8 weights: u8s7 (7-bit, right on every CPU), u8u8, or u8s8 (full range: only for CPUs with "
                   "VNNI or AMX-INT8, refused elsewhere when served) [default: u8s7].")
@click.option("--min-cosine", default=None, type=click.FloatRange(-1, 1),
              help="int8 gate: mean cosine to the fp32 embeddings [default: 0.99].")
@click.option("--min-agreement", default=None, type=click.FloatRange(0, 1),
              help="int8 gate: mean top-10 neighbour overlap with fp32 on the calibration images [default: 0.8].")
@click.option("--device", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Triton instance kind (KIND_CPU/KIND_GPU) and where verification runs.")
@click.option("--trt-fp16", is_flag=True, help="Add Triton's TensorRT FP16 accelerator (needs --device gpu).")
@click.option("--verify-images", default=None, type=click.Path(exists=True, file_okay=False),
              help="Folder of images to verify with [default: generated pictures].")
@click.option("--tolerance", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Max abs difference allowed, per unit of output magnitude [default: 1e-4, 5e-2 with --fp16].")
@click.option("--checkpoint-key", type=click.Choice(["teacher", "student"]), default="teacher", show_default=True,
              help="Which network of a training checkpoint.")
@click.option("--crop-pct", default=0.875, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True),
              help="Evaluation crop recorded for clients (resize to size/crop_pct, centre-crop).")
@click.option("--fit", type=click.Choice(["crop", "pad"]), default=None,
              help="How clients fit images into the input: crop (shorter side, centre crop) or pad (white "
                   "border trimmed, padded on white) [default: what the model was trained with, else crop].")
@click.option("--patch-tokens", is_flag=True,
              help="Add the `patch_tokens` output [B, N, D]: final-normed patch features (ViT CLS and register "
                   "tokens left out; a ConvNeXt's last feature map), for dense features.")
@click.option("--external-data", is_flag=True, default=None,
              help="Keep the weights in model.onnx.data beside model.onnx. Default: only when they are "
                   "over 1.8 GB (one ONNX file holds at most 2 GB: DINOv2 ViT-g, DINOv3 ViT-H+).")
def export(onnx_, weights, arch, name, repo, image_size, max_batch, fp16, int8, calibration, int8_scheme, min_cosine,
           min_agreement, device, trt_fp16, verify_images, tolerance, checkpoint_key, crop_pct, fit, patch_tokens,
           external_data):
    """Export a DINO backbone as the next version of REPO/NAME and verify it.

    The ONNX graph takes uint8 images [B, 3, H, W], normalises inside, and returns
    `embedding` (and `attention` for ViTs; `patch_tokens` with --patch-tokens). onnxruntime is checked against PyTorch on
    real images; on failure the repository is left exactly as it was. Prints one JSON object.

    With --int8 the verified graph is quantised (static QDQ) on the calibration images and
    written only if its embeddings match fp32 there (mean cosine, top-10 neighbours); the
    precision is recorded in config.pbtxt and clients and `serve` run it unchanged.

    \b
    Example:
      dinoserve export --onnx --weights dino_vits16 --name dino_vits16
      dinoserve export --onnx --weights runs/exp/checkpoint.pth --name mine --image-size 112
      dinoserve export --onnx --weights runs/exp/checkpoint.pth --name mine_int8 --int8 --calibration photos/
      dinoserve export --onnx -w dinov2_s_reg4.safetensors --arch vit_small_patch14_reg4_dinov2 \\
          --name dinov2 --image-size 224 --patch-tokens
    """
    if not onnx_:
        raise click.UsageError("choose the export format: --onnx (the only one so far)")
    from dinoserve.export import export_onnx

    res = export_onnx(weights, name=name, arch=arch, repo=repo, image_size=image_size, max_batch=max_batch,
                      fp16=fp16, device=device, trt_fp16=trt_fp16, verify_images=verify_images,
                      tolerance=tolerance, checkpoint_key=checkpoint_key, crop_pct=crop_pct, fit=fit, int8=int8,
                      calibration=calibration, min_cosine=min_cosine, min_agreement=min_agreement,
                      int8_scheme=int8_scheme, patch_tokens=patch_tokens,
                      external_data=True if external_data else None)  # not given: decided by size
    click.echo(f"verified: max abs difference onnxruntime vs PyTorch {res.max_abs_diff:.3g} "
               f"(allowed {res.tolerance:g} per unit of magnitude) at sizes {list(res.sizes_checked)}", err=True)
    if res.int8:
        click.echo(f"int8 gate passed: {res.int8.describe()} ({res.calibration})", err=True)
    click.echo(json.dumps({
        "name": name, "version": res.version, "model_dir": str(res.model_dir), "onnx": str(res.onnx_path),
        "arch": res.card.arch, "family": res.card.family, "embed_dim": res.card.embed_dim,
        "image_size": res.image_size, "fit": res.card.fit, "max_abs_diff": res.max_abs_diff,
        "sizes_checked": [list(s) for s in res.sizes_checked], "precision": res.card.precision,
        "patch_tokens": patch_tokens, "files": [str(p) for p in res.files],
        **({"int8_scheme": res.card.int8_scheme, "int8_gate": res.int8.to_dict(), "calibration": res.calibration}
           if res.int8 else {}),
    }))
