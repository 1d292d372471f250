"""DeepLabV3+ for semi-supervised segmentation: ``build_model(model_cfg, num_classes)``, ``convert_sync_bn``."""

from __future__ import annotations

from torch import nn

from .backbone import (
    BACKBONES,
    IMAGENET_WEIGHTS,
    MobileNetV2Backbone,
    ResNetBackbone,
    build_backbone,
    deep_stem,
    dilate_layer,
    from_unimatch_state_dict,
    is_unimatch_state_dict,
    load_backbone_weights,
    verify_file_hash,
)
from .deeplabv3plus import ASPP, DeepLabV3Plus
from .xception import XceptionBackbone

__all__ = ["ASPP", "BACKBONES", "IMAGENET_WEIGHTS", "DeepLabV3Plus", "MobileNetV2Backbone", "ResNetBackbone",
           "XceptionBackbone", "build_backbone", "build_model", "convert_sync_bn", "deep_stem", "dilate_layer",
           "from_unimatch_state_dict", "is_unimatch_state_dict", "load_backbone_weights", "verify_file_hash"]


def build_model(model_cfg: dict, num_classes: int) -> DeepLabV3Plus:
    """DeepLabV3+ from the config's ``model`` section: ``backbone`` (resnet18 | resnet34 | resnet50 | resnet101 |
    mobilenet_v2 | xception: UniMatch's Xception-65), ``stem`` (ResNets: ``torchvision`` or UniMatch's ``deep``),
    ``output_stride`` (16 or 8; 32 = no dilation, not for xception), ``dilations`` ([6, 12, 18] or [12, 24, 36]),
    ``pretrained`` (a local ImageNet state dict of the backbone, ``imagenet`` for torchvision's download, or None for
    random init). The load report is kept in ``model.pretrained_report``."""
    if not isinstance(model_cfg, dict):
        raise TypeError(f"model_cfg must be a dict (the config's model section), got {type(model_cfg).__name__}")
    model = DeepLabV3Plus(
        num_classes,
        backbone=model_cfg.get("backbone", "resnet50"),
        output_stride=int(model_cfg.get("output_stride", 16)),
        dilations=model_cfg.get("dilations") or (6, 12, 18),
        stem=model_cfg.get("stem", "torchvision"),
    )
    if model_cfg.get("pretrained"):
        model.pretrained_report = load_backbone_weights(model.backbone, model_cfg["pretrained"])
    return model


def convert_sync_bn(model: nn.Module, world_size: int | None = None) -> nn.Module:
    """Convert BatchNorm to SyncBatchNorm when training on more than one process; otherwise return ``model``
    unchanged. ``world_size`` defaults to the initialised process group's size (1 without one)."""
    if world_size is None:
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world_size <= 1:
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
