"""torchvision ResNet backbones with output stride 32 / 16 / 8 and local ImageNet weights."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from torchvision import models

log = logging.getLogger("csl")

# name -> (constructor, layer1 channels, layer4 channels)
BACKBONES = {
    "resnet18": (models.resnet18, 64, 512),
    "resnet34": (models.resnet34, 64, 512),
    "resnet50": (models.resnet50, 256, 2048),
    "resnet101": (models.resnet101, 256, 2048),
}
# output stride -> (layer3 dilation, layer4 dilation); a dilated layer's first block keeps the previous dilation.
_DILATIONS = {32: (1, 1), 16: (1, 2), 8: (2, 4)}


def dilate_layer(layer: nn.Sequential, first_dilation: int, dilation: int) -> None:
    """Turn a stride-2 ResNet stage into a stride-1 dilated one, in place.

    Matches torchvision's ``replace_stride_with_dilation`` (first block: stride 1 with the previous dilation; later
    blocks: the new dilation), and also works for BasicBlock (ResNet-18/34), whose constructor refuses dilation > 1:
    every 3x3 conv gets ``dilation = padding = d`` and the stride-2 convs (3x3 and the 1x1 downsample) stride 1.
    """
    for i, block in enumerate(layer):
        d = first_dilation if i == 0 else dilation
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                if m.stride != (1, 1):
                    m.stride = (1, 1)
                if m.kernel_size == (3, 3):
                    m.dilation, m.padding = (d, d), (d, d)


class ResNetBackbone(nn.Module):
    """The stem and the four stages of a torchvision ResNet (no pooling / fc). ``forward(x) -> (c1, c4)``: layer1
    features (stride 4) and layer4 features (stride ``output_stride``). Parameter names match torchvision's, so an
    ImageNet state dict loads directly."""

    def __init__(self, name: str = "resnet50", output_stride: int = 16):
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {name!r}")
        if output_stride not in _DILATIONS:
            raise ValueError(f"output_stride must be one of {sorted(_DILATIONS)}, got {output_stride!r}")
        ctor, self.low_channels, self.high_channels = BACKBONES[name]
        net = ctor(weights=None)
        self.name, self.output_stride = name, output_stride
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        d3, d4 = _DILATIONS[output_stride]
        if d3 > 1:
            dilate_layer(self.layer3, 1, d3)
        if d4 > 1:
            dilate_layer(self.layer4, d3, d4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c4 = self.layer4(self.layer3(self.layer2(c1)))
        return c1, c4


def _unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise TypeError(f"expected a state dict, got {type(obj).__name__}")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "backbone.", "encoder."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_backbone_weights(backbone: ResNetBackbone, path: str) -> dict:
    """Load ImageNet weights (a torchvision ResNet state dict saved with ``torch.save``) from a local file.

    Never downloads. The classifier (``fc.*``) is dropped silently; any other missing or unexpected key is reported
    (logged and returned). Raises FileNotFoundError when the file is missing, ValueError on shape mismatches or
    when no key matches (wrong architecture).

    Returns ``{"path", "loaded", "missing", "unexpected"}``.
    """
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights not found: {path!r} (model.pretrained must be a local file; "
                                f"weights are never downloaded — save torchvision's {backbone.name} ImageNet "
                                f"state dict there with torch.save)")
    sd = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
                  if k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"{path} does not fit backbone {backbone.name} ({len(mismatched)} shape mismatches): "
                         + "; ".join(mismatched[:5]))
    matched = [k for k in sd if k in own]
    if not matched:
        raise ValueError(f"{path} has no parameter of backbone {backbone.name} (keys look like "
                         f"{list(sd)[:3]}); is it a torchvision ResNet state dict?")
    result = backbone.load_state_dict(sd, strict=False)
    report = {"path": path, "loaded": len(matched), "missing": list(result.missing_keys),
              "unexpected": list(result.unexpected_keys)}
    log.info("loaded %d tensors of %s from %s", len(matched), backbone.name, path)
    if report["missing"]:
        log.warning("pretrained %s: %d backbone keys missing (left at random init): %s", path,
                    len(report["missing"]), report["missing"][:10])
    if report["unexpected"]:
        log.warning("pretrained %s: %d unexpected keys ignored: %s", path, len(report["unexpected"]),
                    report["unexpected"][:10])
    return report
