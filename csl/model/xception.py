"""Xception-65, the backbone of UniMatch's COCO results (and an option of its Pascal / Cityscapes configs), built so
that their ImageNet file ``pretrained/xception.pth`` loads unchanged and the network computes what theirs computes.

Layout (parameter names as in that file): a stem of two 3x3 convs (``conv1`` stride 2, ``conv2``), 20 residual blocks
of three separable convs each (``block1``-``block3`` downsample, ``block4``-``block19`` keep 728 channels,
``block20`` grows to 1024), then three separable convs to 1536, 1536 and 2048 channels (``conv3``-``conv5``). A
separable conv is a depthwise 3x3 conv, BN, a pointwise 1x1 conv, BN. Low-level features: ``block2``'s second
separable conv (256 channels, stride 4); high-level: ``conv5`` (2048 channels, stride 16 or 8).

Two details of UniMatch's network follow from its in-place ReLUs and are kept here on purpose, written out:

- A block whose shortcut is the identity (``block4``-``block19``) adds the ReLU of its input, not the input: the first
  separable conv's ReLU runs in place on the tensor the shortcut returns.
- The low-level features are taken before the ReLU that opens ``block2``'s third separable conv (that ReLU is not
  in place), so they keep negative values.

Its BatchNorm layers have momentum 0.0003 (their running statistics move slowly away from ImageNet's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.0003  # UniMatch's Xception BatchNorm momentum
# output stride -> (stride of block2, block3, block20) and the dilation of block4 to conv5
_STRIDES = {16: ((2, 2, 1), 1), 8: ((2, 1, 1), 2)}
# Where UniMatch's README has its ImageNet Xception-65 (there is no torchvision one).
UNIMATCH_XCEPTION_URL = "https://drive.google.com/open?id=1_j_mE07tiV24xXOJw4XDze0-a0NAhNVi"


class SeparableConv(nn.Module):
    """Depthwise 3x3 conv, BN, pointwise 1x1 conv, BN. ``relu_first``: one ReLU on the input (the blocks' convs);
    else a ReLU after each BN (``conv3``-``conv5``). ``inplace``: that first ReLU may overwrite its input."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, relu_first: bool = True,
                 inplace: bool = True):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, padding=dilation, dilation=dilation, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin, momentum=BN_MOMENTUM)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=BN_MOMENTUM)
        self.relu_first, self.inplace = relu_first, inplace

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        """The convs and BNs without the first ReLU (for an input already through it)."""
        return self.bn2(self.pointwise(self.bn1(self.depthwise(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu_first:
            return self.convolve(F.relu(x, inplace=self.inplace))
        x = F.relu(self.bn1(self.depthwise(x)), inplace=True)
        return F.relu(self.bn2(self.pointwise(x)), inplace=True)


class XceptionBlock(nn.Module):
    """Three separable convs (the last with the block's stride) plus a shortcut: a strided 1x1 conv and BN where the
    channels or the size change (``skip``, ``skipbn``), else the ReLU of the input (see the module's docstring).
    ``grow_first``: the first conv changes the channels, else the second does; ``keep_inner``: the second conv's
    output is kept as it is (the third conv's ReLU does not overwrite it), for :meth:`forward_with_inner`."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dilation: int = 1, grow_first: bool = True,
                 keep_inner: bool = False):
        super().__init__()
        mid = cout if grow_first else cin
        if cout != cin or stride != 1:
            self.skip = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            self.skipbn = nn.BatchNorm2d(cout, momentum=BN_MOMENTUM)
        else:
            self.skip = self.skipbn = None
        self.sepconv1 = SeparableConv(cin, mid, dilation=dilation, inplace=False)  # its input feeds the shortcut
        self.sepconv2 = SeparableConv(mid, cout, dilation=dilation)
        self.sepconv3 = SeparableConv(cout, cout, stride=stride, dilation=dilation, inplace=not keep_inner)

    def forward_with_inner(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, the second separable conv's output)``; the latter as it came out only with ``keep_inner``."""
        if self.skip is not None:
            shortcut = self.skipbn(self.skip(x))
            x = self.sepconv1(x)
        else:
            x = F.relu(x)
            shortcut = x
            x = self.sepconv1.convolve(x)
        inner = self.sepconv2(x)
        return self.sepconv3(inner) + shortcut, inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_inner(x)[0]


class XceptionBackbone(nn.Module):
    """UniMatch's Xception-65 (see the module's docstring). ``forward(x) -> (c1, c4)``: 256 channels at stride 4 and
    2048 channels at stride ``output_stride`` (16 or 8, as UniMatch supports)."""

    low_channels, high_channels = 256, 2048
    head_prefixes: tuple[str, ...] = ()  # the ImageNet file holds the backbone only
    # UniMatch's loader drops these keys of the file (bookkeeping of the network it was converted from)
    ignored_key_fragments = ("itr", "tmp")

    def __init__(self, output_stride: int = 16):
        super().__init__()
        if output_stride not in _STRIDES:
            raise ValueError(f"xception supports output_stride {sorted(_STRIDES)} (UniMatch's), got {output_stride!r}")
        self.name, self.output_stride = "xception", output_stride
        (s2, s3, s20), d = _STRIDES[output_stride]
        self.conv1 = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32, momentum=BN_MOMENTUM)
        self.conv2 = nn.Conv2d(32, 64, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64, momentum=BN_MOMENTUM)
        self.block1 = XceptionBlock(64, 128, 2)
        self.block2 = XceptionBlock(128, 256, s2, keep_inner=True)
        self.block3 = XceptionBlock(256, 728, s3)
        for i in range(4, 20):
            setattr(self, f"block{i}", XceptionBlock(728, 728, 1, d))
        self.block20 = XceptionBlock(728, 1024, s20, d, grow_first=False)
        self.conv3 = SeparableConv(1024, 1536, dilation=d, relu_first=False)
        self.conv4 = SeparableConv(1536, 1536, dilation=d, relu_first=False)
        self.conv5 = SeparableConv(1536, 2048, dilation=d, relu_first=False)
        self.blocks = [getattr(self, f"block{i}") for i in range(3, 21)]  # after block2 (a plain list: no new names)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x, c1 = self.block2.forward_with_inner(self.block1(x))
        for block in self.blocks:
            x = block(x)
        return c1, self.conv5(self.conv4(self.conv3(x)))

