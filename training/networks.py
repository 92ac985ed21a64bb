"""Student and teacher: a timm backbone plus a DINO head each, built the same way for a run,
a resumed run and the throughput benchmark."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dinoserve.card import ModelCard
from dinoserve.models import Weights, backbone_card, create_backbone, load_weights
from dinoserve.registry import family_of_name
from dinoserve.training import distributed as D
from dinoserve.training.config import TrainConfig
from dinoserve.training.head import DINOHead, MultiCropWrapper
from dinoserve.training.init import match_reference_init

logger = logging.getLogger("dinoserve.training")


@dataclass(frozen=True)
class Networks:
    """The two networks of a run and the teacher backbone's model card.

    ``ddp_student`` is the student wrapped for DistributedDataParallel (the student itself
    on one process); forward the student through it so gradients are averaged."""

    student: MultiCropWrapper
    teacher: MultiCropWrapper
    ddp_student: nn.Module
    card: ModelCard


def build_networks(cfg: TrainConfig, info: D.DistInfo, pretrained: Weights | None = None,
                   initialise: bool = True) -> Networks:
    """Student and teacher for ``cfg`` on ``info.device``, equal on every process; the
    teacher starts as a copy of the student and gets no gradients.

    With ``initialise`` (a new run, not a resumed one) the student backbone starts from
    ``pretrained`` (and its head too when it has this run's shape), or from the reference
    initialisation with ``--reference-init``; a resumed run loads every value afterwards."""
    device = info.device
    torch.manual_seed(cfg.seed)
    kwargs = _backbone_kwargs(cfg, pretrained)
    student_bb = create_backbone(cfg.arch, drop_path_rate=cfg.drop_path_rate, **kwargs)
    teacher_bb = create_backbone(cfg.arch, drop_path_rate=0.0, **kwargs)
    if initialise and pretrained is not None:
        load_weights(student_bb, pretrained)
        logger.info("student and teacher start from %s (%s)", pretrained.source, pretrained.format)
    elif initialise and cfg.reference_init:
        match_reference_init(student_bb)
    card = training_card(teacher_bb, cfg)
    teacher_bb.dino_card = student_bb.dino_card = card
    head_kw = dict(use_bn=cfg.use_bn_in_head, nlayers=cfg.head_layers, hidden_dim=cfg.hidden_dim,
                   bottleneck_dim=cfg.bottleneck_dim)
    student = MultiCropWrapper(student_bb, DINOHead(card.embed_dim, cfg.out_dim, norm_last_layer=cfg.norm_last_layer,
                                                    **head_kw))
    teacher = MultiCropWrapper(teacher_bb, DINOHead(card.embed_dim, cfg.out_dim, **head_kw))
    if card.family == "resnet" and info.enabled and device.type == "cuda":
        # gloo has no SyncBatchNorm kernels, so CPU runs keep per-process statistics
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    if initialise and pretrained is not None and pretrained.head_state_dict:
        _load_head(student.head, pretrained)
    student.to(device)
    teacher.to(device)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    ddp_student = (DistributedDataParallel(student, device_ids=[device] if device.type == "cuda" else None)
                   if info.enabled else student)
    return Networks(student, teacher, ddp_student, card)


def training_card(backbone: nn.Module, cfg: TrainConfig) -> ModelCard:
    """The backbone's card as this run serves it: images fitted as trained (``--fit``), and
    for a ResNet, whose resolution is not architectural, the size it trains at."""
    card = backbone_card(backbone).replace(fit=cfg.fit)
    return card.replace(image_size=cfg.global_crop_size) if card.family == "resnet" else card


def _load_head(head: DINOHead, pretrained: Weights) -> None:
    """Start the head from the one stored with the pretrained backbone when it has this
    run's shape (same K, widths, BatchNorm); otherwise keep a fresh head and say so."""
    own = head.state_dict()
    theirs = pretrained.head_state_dict
    if set(own) == set(theirs) and all(own[k].shape == theirs[k].shape for k in own):
        head.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in theirs.items()})
        logger.info("the head starts from %s too", pretrained.source)
    else:
        logger.info("%s holds a head of another shape; the head starts fresh", pretrained.source)


def _backbone_kwargs(cfg: TrainConfig, pretrained: Weights | None) -> dict[str, Any]:
    if family_of_name(cfg.arch) != "vit":
        return {}  # validate() has refused ViT options for other architectures
    kwargs = {"patch_size": cfg.patch_size, "depth": cfg.depth, "img_size": cfg.img_size}
    if kwargs["img_size"] is None:
        # position embeddings at the training size, or at the size the weights were made for
        kwargs["img_size"] = pretrained.image_size if pretrained is not None else cfg.global_crop_size
    return kwargs
