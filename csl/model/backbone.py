"""DeepLabV3+ backbones (torchvision ResNet-18/34/50/101 and MobileNetV2 with output stride 32 / 16 / 8; UniMatch's
Xception-65 with 16 / 8, in :mod:`csl.model.xception`), and their ImageNet weights from a local file or torchvision's
weights API."""

from __future__ import annotations

import hashlib
import logging
import os
import re

import torch
from torch import nn
from torchvision import models

from .xception import UNIMATCH_XCEPTION_URL, XceptionBackbone

log = logging.getLogger("csl")

# name -> (constructor, layer1 channels, layer4 channels)
RESNETS = {
    "resnet18": (models.resnet18, 64, 512),
    "resnet34": (models.resnet34, 64, 512),
    "resnet50": (models.resnet50, 256, 2048),
    "resnet101": (models.resnet101, 256, 2048),
}
BACKBONES = (*RESNETS, "mobilenet_v2", "xception")
# torchvision's ImageNet weights of each backbone (``pretrained: imagenet``); torchvision has no Xception.
IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
    "resnet34": "ResNet34_Weights.IMAGENET1K_V1",
    "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
    "resnet101": "ResNet101_Weights.IMAGENET1K_V1",
    "mobilenet_v2": "MobileNet_V2_Weights.IMAGENET1K_V1",
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


STEMS = ("torchvision", "deep")


def deep_stem() -> nn.Sequential:
    """The deep stem of UniMatch's / CSL's ResNets (ResNet-C of "Bag of Tricks"): three 3x3 convs, 3 -> 64 (stride 2)
    -> 64 -> 128, with BN + ReLU between them; indices 0, 1, 3, 4, 6 hold parameters, as in their weight files."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        nn.Conv2d(64, 128, 3, padding=1, bias=False),
    )


class ResNetBackbone(nn.Module):
    """The stem and the four stages of a torchvision ResNet (no pooling / fc). ``forward(x) -> (c1, c4)``: layer1
    features (stride 4) and layer4 features (stride ``output_stride``). Parameter names match torchvision's, so an
    ImageNet state dict loads directly.

    ``stem="deep"``: UniMatch's / CSL's variant (ResNet-50/101 only): ``conv1`` is :func:`deep_stem`, ``bn1`` has 128
    channels and ``layer1`` starts from 128 inputs, so their ImageNet files (``pretrained/resnet101.pth``) load
    unchanged."""

    def __init__(self, name: str = "resnet50", output_stride: int = 16, stem: str = "torchvision"):
        super().__init__()
        if name not in RESNETS:
            raise ValueError(f"backbone must be one of {sorted(RESNETS)}, got {name!r}")
        if output_stride not in _DILATIONS:
            raise ValueError(f"output_stride must be one of {sorted(_DILATIONS)}, got {output_stride!r}")
        if stem not in STEMS:
            raise ValueError(f"model.stem must be one of {list(STEMS)}, got {stem!r}")
        ctor, self.low_channels, self.high_channels = RESNETS[name]
        net = ctor(weights=None)
        self.name, self.output_stride, self.stem = name, output_stride, stem
        if stem == "deep":
            if self.low_channels != 256:
                raise ValueError(f"the deep stem exists for resnet50 / resnet101 (UniMatch's backbones), not {name}")
            net.conv1, net.bn1 = deep_stem(), nn.BatchNorm2d(128)
            first = net.layer1[0]
            first.conv1 = nn.Conv2d(128, first.conv1.out_channels, 1, bias=False)
            first.downsample[0] = nn.Conv2d(128, first.downsample[0].out_channels, 1, bias=False)
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

    # ImageNet state-dict keys that are not part of the backbone (the classifier).
    head_prefixes = ("fc.",)


def _dilate_blocks(blocks, first_dilation: int, dilation: int) -> None:
    """MobileNetV2 counterpart of :func:`dilate_layer`: the stride-2 block strides 1 and keeps the previous
    dilation, the later blocks get ``dilation``; every 3x3 (depthwise) conv gets ``dilation = padding = d``."""
    for i, block in enumerate(blocks):
        d = first_dilation if i == 0 else dilation
        for m in block.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                m.stride, m.dilation, m.padding = (1, 1), (d, d), (d, d)


class MobileNetV2Backbone(nn.Module):
    """torchvision's MobileNetV2 ``features[0:18]`` (the last 1x1 conv to 1280 channels and the classifier are
    dropped), as the common DeepLabV3+-MobileNet variants use it: low-level features after ``features[3]`` (24
    channels, stride 4), high-level features after ``features[17]`` (320 channels, stride ``output_stride``; the
    stride-16 and stride-32 stages dilated for 8 and 16). ``forward(x) -> (c1, c4)``; parameter names match
    torchvision's (``features.N.*``), so the ImageNet state dict loads directly."""

    low_channels, high_channels = 24, 320
    head_prefixes = ("classifier.", "features.18.")
    # output stride -> (dilation of features[7:14] (stride 16), dilation of features[14:18] (stride 32))
    _STAGE_DILATIONS = {32: (1, 1), 16: (1, 2), 8: (2, 4)}

    def __init__(self, output_stride: int = 16):
        super().__init__()
        if output_stride not in self._STAGE_DILATIONS:
            raise ValueError(f"output_stride must be one of {sorted(self._STAGE_DILATIONS)}, got {output_stride!r}")
        self.name, self.output_stride = "mobilenet_v2", output_stride
        self.features = models.mobilenet_v2(weights=None).features[:18]
        d16, d32 = self._STAGE_DILATIONS[output_stride]
        if d16 > 1:
            _dilate_blocks(self.features[7:14], 1, d16)
        if d32 > 1:
            _dilate_blocks(self.features[14:18], d16, d32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c1 = self.features[:4](x)
        return c1, self.features[4:](c1)


def build_backbone(name: str, output_stride: int = 16, stem: str = "torchvision") -> nn.Module:
    """A backbone by name (see :data:`BACKBONES`); ``.low_channels`` / ``.high_channels`` give its two outputs'
    channels. ``stem`` applies to ResNets (``torchvision`` or ``deep``)."""
    if name in ("mobilenet_v2", "xception"):
        if stem != "torchvision":
            raise ValueError(f"model.stem={stem!r} applies to ResNets; {name} has one stem only (leave model.stem "
                             f"at torchvision)")
        return MobileNetV2Backbone(output_stride) if name == "mobilenet_v2" else XceptionBackbone(output_stride)
    if name not in RESNETS:
        raise ValueError(f"model.backbone must be one of {list(BACKBONES)}, got {name!r}")
    return ResNetBackbone(name, output_stride, stem)


def _unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """The tensors of a loaded weights file (``load_checkpoint`` reads tensors and containers only, never a pickled
    module): under a ``state_dict`` / ``model`` / ``model_state`` key or at the top, without a ``module.`` /
    ``backbone.`` / ``encoder.`` prefix that every key has."""
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


# torchvision names its weight files <arch>-<first hex digits of the file's sha256>.pth; only those names are read as
# a hash (a file of one's own named <anything>-20240115.pth is not)
_HASH_IN_NAME = re.compile(rf"^(?:{'|'.join(IMAGENET_WEIGHTS)})-([0-9a-f]{{8,64}})\.pth?$")


def verify_file_hash(path: str) -> str | None:
    """When ``path`` has torchvision's name for a backbone's weights (``mobilenet_v2-b0353104.pth``: an architecture
    of :data:`IMAGENET_WEIGHTS`, ``-``, hex digits), check that the file's sha256 starts with the hex digits in the
    name; raise ValueError on a mismatch (a truncated or different file). Returns the prefix checked, or None for
    other names."""
    match = _HASH_IN_NAME.search(os.path.basename(path))
    if match is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise ValueError(f"{path}: sha256 {digest.hexdigest()[:16]}... does not start with {match.group(1)} as its "
                         f"torchvision file name says (a partial download or another file under this name); fetch "
                         f"it again, or rename a file of your own")
    return match.group(1)


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights of backbone ``name`` through its weights API (downloaded once into the torch
    hub cache). Where the download server cannot be reached, the error names the file and the folder to put it in."""
    from torchvision.models import get_weight

    weights = get_weight(IMAGENET_WEIGHTS[name])
    try:
        return weights.get_state_dict(progress=True)
    except Exception as e:  # URLError, HTTPError, socket errors: the message says what to do instead
        folder = os.path.join(torch.hub.get_dir(), "checkpoints")
        raise OSError(f"model.pretrained=imagenet: could not get torchvision's {IMAGENET_WEIGHTS[name]} "
                      f"({type(e).__name__}: {e}); download {weights.url} by hand into {folder}/ (or anywhere, "
                      f"and set model.pretrained to that file)") from e


# Where UniMatch's README has its ImageNet ResNets (deep stem: model.stem=deep).
UNIMATCH_RESNET_URLS = {
    "resnet50": "https://drive.google.com/file/d/1mqUrqFvTQ0k5QEotk4oiOFyP6B9dVZXS/view?usp=sharing",
    "resnet101": "https://drive.google.com/file/d/1Rx0legsMolCWENpfvE2jUScT3ogalMO8/view?usp=sharing",
}


def weights_source(name: str, stem: str = "torchvision") -> str:
    """Where the ImageNet weights of backbone ``name`` (with ``stem``) come from, said for an error message."""
    if name == "xception":
        return (f"model.pretrained is a local file, for Xception-65 UniMatch's ImageNet xception.pth from "
                f"{UNIMATCH_XCEPTION_URL} (their README's link)")
    if stem == "deep" and name in UNIMATCH_RESNET_URLS:
        return (f"model.pretrained is a local file, for model.stem=deep UniMatch's ImageNet {name}.pth from "
                f"{UNIMATCH_RESNET_URLS[name]} (their README's link); model.stem=torchvision takes torchvision's "
                f"files and model.pretrained=imagenet")
    return (f"model.pretrained is a local file, or 'imagenet' to use torchvision's download: "
            f"{IMAGENET_WEIGHTS.get(name, '?')}")


def check_imagenet_available(name: str, stem: str = "torchvision") -> None:
    """A ValueError saying where the weights come from when torchvision has no ImageNet weights of backbone ``name``
    with ``stem`` (``model.pretrained=imagenet`` with xception, or with UniMatch's deep-stem ResNet)."""
    if name not in IMAGENET_WEIGHTS:
        raise ValueError(f"model.pretrained=imagenet: torchvision has no ImageNet {name}; {weights_source(name)}")
    if stem != "torchvision":
        raise ValueError(f"model.pretrained=imagenet: torchvision's ImageNet {name} has torchvision's stem, not "
                         f"model.stem={stem}; {weights_source(name, stem)}")


def _expected_file(name: str) -> str:
    return "UniMatch's xception.pth" if name == "xception" else f"torchvision's {name} ImageNet state dict"


def _block_counts_hint(sd: dict, own: dict, name: str) -> str:
    """``"; blocks per layer: file [3, 4, 23, 3], resnet50 [3, 4, 6, 3]"`` for ResNet state dicts, else ``""``."""
    def counts(keys) -> list[int]:
        blocks: dict[str, set[str]] = {}
        for k in keys:
            parts = k.split(".")
            if len(parts) > 2 and re.fullmatch(r"layer\d", parts[0]) and parts[1].isdigit():
                blocks.setdefault(parts[0], set()).add(parts[1])
        return [len(blocks[layer]) for layer in sorted(blocks)]

    theirs, ours = counts(sd), counts(own)
    return f"; blocks per layer: file {theirs}, {name} {ours}" if theirs and theirs != ours else ""


def load_backbone_weights(backbone: nn.Module, path: str) -> dict:
    """Load ImageNet weights into ``backbone``: ``path`` is a local torchvision state dict saved with
    ``torch.save`` (a torchvision-style file name's sha256 prefix is verified) or ``"imagenet"`` (torchvision's
    weights API, see :func:`imagenet_state_dict`).

    The classifier keys (``backbone.head_prefixes``) are dropped; every backbone key must be in the file with its
    shape (FileNotFoundError for a missing file; ValueError on shape mismatches, missing keys, or a file of another
    architecture, also one whose extra tensors lie in the backbone's modules: a deeper ResNet's). BatchNorm's
    ``num_batches_tracked`` may be absent (files saved before PyTorch 0.4.1). Other extra keys are logged and
    ignored.

    Returns ``{"path", "loaded", "missing", "unexpected", "sha256_prefix"}``.
    """
    prefix = None
    if path == "imagenet":
        check_imagenet_available(backbone.name, getattr(backbone, "stem", "torchvision"))
        sd = imagenet_state_dict(backbone.name)
    else:
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"pretrained weights not found: {path!r} "
                                    f"({weights_source(backbone.name, getattr(backbone, 'stem', 'torchvision'))})")
        prefix = verify_file_hash(path)
        from ..checkpoint import load_checkpoint

        try:
            sd = _unwrap_state_dict(load_checkpoint(path))
        except ValueError as e:  # cut short, another kind of file: said as one line naming the config key
            raise ValueError(f"model.pretrained: {e}") from None
    sd = {k: v for k, v in sd.items() if not k.startswith(tuple(backbone.head_prefixes))}
    fragments = getattr(backbone, "ignored_key_fragments", ())
    ignored = [k for k in sd if any(f in k for f in fragments)]
    if ignored:
        log.info("pretrained %s: %d tensors whose names hold %s ignored, as UniMatch's loader ignores them (e.g. %s)",
                 path, len(ignored), " / ".join(fragments), ignored[:3])
        sd = {k: v for k, v in sd.items() if k not in ignored}
    own = backbone.state_dict()
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        stem = getattr(backbone, "stem", None)  # ResNets: torchvision's 7x7 conv or UniMatch's deep stem
        hint = ""
        if stem is not None and any(k.startswith(("conv1.", "bn1.")) for k in mismatched):
            other = "torchvision" if stem == "deep" else "deep"
            hint = (f"; the stems differ: the model has model.stem={stem}, the file fits model.stem={other} ("
                    + ("torchvision's ImageNet weights" if other == "torchvision" else
                       "UniMatch's / CSL's ResNet weights") + ")")
        raise ValueError(f"{path} does not fit backbone {backbone.name} ({len(mismatched)} shape mismatches): "
                         + "; ".join(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                                     for k in mismatched[:5]) + hint)
    matched = [k for k in sd if k in own]
    if not matched:
        raise ValueError(f"{path} has no parameter of backbone {backbone.name} (keys look like "
                         f"{list(sd)[:3]}); is it {_expected_file(backbone.name)}?")
    # BatchNorm's num_batches_tracked is not in files saved before PyTorch 0.4.1 (torch's own loader fills it in)
    missing = [k for k in own if k not in sd and not k.endswith(".num_batches_tracked")]
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} of the {len(own)} tensors of backbone {backbone.name} "
                         f"(e.g. {missing[:5]}); is it {_expected_file(backbone.name)}?")
    modules = {k.split(".")[0] for k in own}
    foreign = [k for k in sd if k not in own and k.split(".")[0] in modules]
    if foreign:  # a deeper network's file fits a shallower one key for key (resnet34 -> resnet18, 101 -> 50)
        raise ValueError(f"{path} has {len(foreign)} tensors in backbone {backbone.name}'s modules that it does not "
                         f"have (e.g. {foreign[:3]}): a file of another architecture"
                         + _block_counts_hint(sd, own, backbone.name))
    result = backbone.load_state_dict(sd, strict=False)
    report = {"path": path, "loaded": len(matched), "missing": [], "unexpected": list(result.unexpected_keys),
              "sha256_prefix": prefix}
    log.info("loaded %d tensors of %s from %s%s", len(matched), backbone.name, path,
             f" (sha256 {prefix}... verified)" if prefix else "")
    if report["unexpected"]:
        log.warning("pretrained %s: %d unexpected keys ignored: %s", path, len(report["unexpected"]),
                    report["unexpected"][:10])
    return report


# UniMatch's / CSL's DeepLabV3+ module names -> ours (the backbone, reduce, head.project and classifier agree).
_UNIMATCH_RENAMES = [
    (re.compile(r"^head\.b([0-3])\.([01])\."), r"head.branches.\1.\2."),
    (re.compile(r"^head\.b4\.gap\.1\."), "head.branches.4.conv.0."),
    (re.compile(r"^head\.b4\.gap\.2\."), "head.branches.4.conv.1."),
    (re.compile(r"^fuse\.0\."), "fuse.0.0."),
    (re.compile(r"^fuse\.1\."), "fuse.0.1."),
    (re.compile(r"^fuse\.3\."), "fuse.1.0."),
    (re.compile(r"^fuse\.4\."), "fuse.1.1."),
]


def is_unimatch_state_dict(sd: dict) -> bool:
    """A DeepLabV3+ state dict in UniMatch's / CSL's module names (``head.b0``, ``fuse.3``, ...)."""
    return "head.b0.0.weight" in sd and "classifier.weight" in sd


def from_unimatch_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UniMatch's / the official CSL code's DeepLabV3+ weights (``checkpoint["model"]``, ``module.`` removed) under
    this package's module names. Their ResNet backbone is the deep-stem one: build the model with
    ``model.stem: deep``."""
    out = {}
    for key, value in sd.items():
        for pattern, repl in _UNIMATCH_RENAMES:
            new = pattern.sub(repl, key)
            if new != key:
                key = new
                break
        out[key] = value
    return out
