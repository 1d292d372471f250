"""DeepLabV3+ as UniMatch builds it: ResNet, Xception-65 (or MobileNetV2) backbone, ASPP on its last features,
48-channel reduction of its stride-4 features, 2x3x3 fuse, 1x1 classifier; ``need_fp`` runs the decoder a second time
on channel-dropped features (feature perturbation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import build_backbone


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = 0 if kernel == 1 else dilation
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPPPooling(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = _conv_bn_relu(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(self.pool(x)), size=x.shape[-2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """1x1 branch, three dilated 3x3 branches, image pooling; concatenated and projected to ``cout``."""

    def __init__(self, cin: int, cout: int, dilations: Sequence[int]):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, cout)]
                                      + [_conv_bn_relu(cin, cout, 3, d) for d in dilations]
                                      + [ASPPPooling(cin, cout)])
        self.project = _conv_bn_relu(cout * len(self.branches), cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ on a torchvision ResNet or MobileNetV2, or UniMatch's Xception-65.

    ``model(x)`` -> logits ``B x C x H x W`` at the input resolution;
    ``model(x, need_fp=True)`` -> ``(logits, logits_fp)``, ``logits_fp`` being a second decoder pass on the same
    encoder features with ``Dropout2d(0.5)`` (always active, as in UniMatch) on both feature maps.
    """

    def __init__(self, num_classes: int, backbone: str = "resnet50", output_stride: int = 16,
                 dilations: Sequence[int] = (6, 12, 18), aspp_channels: int = 256, reduce_channels: int = 48,
                 stem: str = "torchvision"):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        dilations = tuple(int(d) for d in dilations)
        if len(dilations) != 3 or min(dilations) < 1:
            raise ValueError(f"dilations must be three positive ints (e.g. [6, 12, 18]), got {dilations}")
        self.num_classes = num_classes
        self.backbone = build_backbone(backbone, output_stride, stem)
        self.head = ASPP(self.backbone.high_channels, aspp_channels, dilations)
        self.reduce = _conv_bn_relu(self.backbone.low_channels, reduce_channels)
        self.fuse = nn.Sequential(_conv_bn_relu(aspp_channels + reduce_channels, 256, 3),
                                  _conv_bn_relu(256, 256, 3))
        self.classifier = nn.Conv2d(256, num_classes, 1)
        self.pretrained_report: dict | None = None

    def _decode(self, c1: torch.Tensor, c4: torch.Tensor) -> torch.Tensor:
        c4 = self.head(c4)
        c4 = F.interpolate(c4, size=c1.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(self.fuse(torch.cat([self.reduce(c1), c4], dim=1)))

    def forward(self, x: torch.Tensor, need_fp: bool = False):
        h, w = x.shape[-2:]
        c1, c4 = self.backbone(x)
        if need_fp:
            both = self._decode(torch.cat([c1, F.dropout2d(c1, 0.5, training=True)]),
                                torch.cat([c4, F.dropout2d(c4, 0.5, training=True)]))
            both = F.interpolate(both, size=(h, w), mode="bilinear", align_corners=True)
            logits, logits_fp = both.chunk(2)
            return logits, logits_fp
        return F.interpolate(self._decode(c1, c4), size=(h, w), mode="bilinear", align_corners=True)

    def param_groups(self, lr: float, head_lr_mult: float = 10.0) -> list[dict]:
        """Two optimizer groups: the backbone at ``lr``, the decoder (ASPP, reduce, fuse, classifier) at
        ``lr * head_lr_mult``."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        ids = {id(p) for p in self.backbone.parameters()}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": backbone, "lr": lr, "name": "backbone"},
                {"params": head, "lr": lr * head_lr_mult, "name": "head"}]
