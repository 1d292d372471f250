"""csl.model: DeepLabV3+ shapes for OS 16 / 8, dilation patching, need_fp, param groups, local weights, SyncBN."""

from __future__ import annotations

import logging
import os
import re

import pytest
import torch
from conftest import SHARED
from torch import nn
from torchvision import models

from csl.model import DeepLabV3Plus, ResNetBackbone, build_model, convert_sync_bn


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
@pytest.mark.parametrize("output_stride", [16, 8])
def test_output_shapes(backbone, output_stride):
    torch.manual_seed(0)
    model = build_model({"backbone": backbone, "output_stride": output_stride, "dilations": [6, 12, 18]}, 7).eval()
    x = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        c1, c4 = model.backbone(x)
        out = model(x)
    assert out.shape == (1, 7, 64, 48) and torch.isfinite(out).all()
    assert c1.shape[-2:] == (16, 12)
    assert c4.shape[-2:] == (64 // output_stride, 48 // output_stride)
    assert c1.shape[1] == model.backbone.low_channels and c4.shape[1] == model.backbone.high_channels
    # odd input sizes come back at the input resolution too
    with torch.no_grad():
        assert model(torch.randn(1, 3, 37, 53)).shape == (1, 7, 37, 53)


@pytest.mark.parametrize("output_stride,flags", [(16, [False, False, True]), (8, [False, True, True])])
def test_dilation_patch_matches_torchvision(output_stride, flags):
    """Patched ResNet-50 has the strides / dilations / paddings of torchvision's replace_stride_with_dilation."""
    ours = ResNetBackbone("resnet50", output_stride)
    ref = models.resnet50(weights=None, replace_stride_with_dilation=flags)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        a = [m for m in getattr(ours, name).modules() if isinstance(m, nn.Conv2d)]
        b = [m for m in getattr(ref, name).modules() if isinstance(m, nn.Conv2d)]
        assert len(a) == len(b)
        for ma, mb in zip(a, b, strict=True):
            assert (ma.stride, ma.dilation, ma.padding) == (mb.stride, mb.dilation, mb.padding), name


def test_resnet18_basic_block_dilation():
    bb = ResNetBackbone("resnet18", 8)
    convs = [m for m in bb.layer4.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [m.dilation[0] for m in convs] == [2, 2, 4, 4]  # first block keeps the previous stage's dilation
    assert all(m.stride == (1, 1) for m in bb.layer3.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ValueError, match="output_stride"):
        ResNetBackbone("resnet18", 4)
    with pytest.raises(ValueError, match="backbone"):
        ResNetBackbone("vgg16", 16)


def test_need_fp():
    torch.manual_seed(0)
    model = DeepLabV3Plus(4, backbone="resnet18", output_stride=16)
    x = torch.randn(2, 3, 48, 48)
    model.train()
    logits, logits_fp = model(x, need_fp=True)
    assert logits.shape == logits_fp.shape == (2, 4, 48, 48)
    assert not torch.allclose(logits, logits_fp)
    (logits.mean() + logits_fp.mean()).backward()
    assert model.classifier.weight.grad is not None and model.backbone.conv1.weight.grad is not None
    # In eval mode BatchNorm uses running stats, so the clean half equals a plain forward pass.
    model.eval()
    with torch.no_grad():
        clean, perturbed = model(x, need_fp=True)
        assert torch.allclose(clean, model(x), atol=1e-5)
        assert not torch.allclose(clean, perturbed)  # the perturbation stays on (UniMatch's Dropout2d(0.5))


def test_param_groups():
    model = DeepLabV3Plus(3, backbone="resnet18")
    groups = model.param_groups(0.01, head_lr_mult=10.0)
    assert [g["lr"] for g in groups] == [0.01, pytest.approx(0.1)]
    backbone_ids = {id(p) for p in groups[0]["params"]}
    head_ids = {id(p) for p in groups[1]["params"]}
    assert backbone_ids == {id(p) for p in model.backbone.parameters()}
    assert not backbone_ids & head_ids
    assert backbone_ids | head_ids == {id(p) for p in model.parameters()}
    assert id(model.classifier.weight) in head_ids
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)  # accepted by an optimizer as is


def test_pretrained_weights_from_local_file(tmp_path, caplog):
    torch.manual_seed(1)
    ref = models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    model = build_model({"backbone": "resnet18", "pretrained": str(path)}, 5)
    assert torch.equal(model.backbone.conv1.weight, ref.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
    assert model.pretrained_report["missing"] == [] and model.pretrained_report["unexpected"] == []
    assert model.pretrained_report["loaded"] == len(ref.state_dict()) - 2  # all but fc.weight / fc.bias

    # A checkpoint wrapper with a DDP prefix and one extra key: loaded, the extra key reported.
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}
    sd["module.extra.weight"] = torch.zeros(3)
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    with caplog.at_level(logging.WARNING, logger="csl"):
        model = build_model({"backbone": "resnet18", "pretrained": str(tmp_path / "wrapped.pth")}, 5)
    assert model.pretrained_report["missing"] == [] and model.pretrained_report["unexpected"] == ["extra.weight"]
    assert "extra.weight" in caplog.text
    assert torch.equal(model.backbone.layer2[0].conv1.weight, ref.layer2[0].conv1.weight)
    # A backbone key missing from the file: an error naming it, nothing left at random init silently.
    del sd["module.layer1.0.conv1.weight"]
    torch.save({"state_dict": sd}, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"lacks 1 of .*layer1\.0\.conv1\.weight"):
        build_model({"backbone": "resnet18", "pretrained": str(tmp_path / "partial.pth")}, 5)

    with pytest.raises(FileNotFoundError, match="no_such_weights.pth"):
        build_model({"backbone": "resnet18", "pretrained": str(tmp_path / "no_such_weights.pth")}, 5)
    with pytest.raises(ValueError, match="shape mismatch"):
        build_model({"backbone": "resnet50", "pretrained": str(path)}, 5)
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no parameter"):
        build_model({"backbone": "resnet18", "pretrained": str(tmp_path / "other.pth")}, 5)
    whole = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])  # an interrupted download
    with pytest.raises(ValueError, match=r"model.pretrained: checkpoint .*cut.pth is not a readable PyTorch"):
        build_model({"backbone": "resnet18", "pretrained": str(tmp_path / "cut.pth")}, 5)


def test_a_deeper_resnets_file_is_refused_and_old_files_without_num_batches_tracked_load(tmp_path):
    torch.manual_seed(2)
    # resnet34's keys include all of resnet18's with the same shapes: only its extra blocks tell them apart.
    torch.save(models.resnet34(weights=None).state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(ValueError, match=r"another architecture; blocks per layer: file \[3, 4, 6, 3\], resnet18 "
                                         r"\[2, 2, 2, 2\]"):
        build_model({"backbone": "resnet18", "pretrained": str(tmp_path / "resnet34.pth")}, 5)
    # A file saved before PyTorch 0.4.1 has no num_batches_tracked: loaded whole, as torch's strict loader does.
    ref = models.resnet18(weights=None)
    old = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "resnet18_old.pth")
    model = build_model({"backbone": "resnet18", "pretrained": str(tmp_path / "resnet18_old.pth")}, 5)
    assert model.pretrained_report["loaded"] == len(old) - 2
    assert torch.equal(model.backbone.layer3[1].bn1.running_mean, ref.layer3[1].bn1.running_mean)


def test_only_torchvision_file_names_are_read_as_a_hash(tmp_path):
    from csl.model import verify_file_hash

    ref = models.mobilenet_v2(weights=None)
    for name in ("mnv2_finetuned-20240115.pth", "resnet101-backbone.pth", "my_resnet50-0676ba61.pth"):
        torch.save(ref.state_dict(), tmp_path / name)
        assert verify_file_hash(str(tmp_path / name)) is None, name
    model = build_model({"backbone": "mobilenet_v2", "pretrained": str(tmp_path / "mnv2_finetuned-20240115.pth")}, 3)
    assert model.pretrained_report["sha256_prefix"] is None and model.pretrained_report["loaded"] > 0
    torch.save(ref.state_dict(), tmp_path / "resnet50-0676ba61.pth")
    with pytest.raises(ValueError, match="does not start with 0676ba61 as its torchvision file name says"):
        verify_file_hash(str(tmp_path / "resnet50-0676ba61.pth"))


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_mobilenet_v2_backbone_strides_and_torchvision_keys(tmp_path, output_stride):
    torch.manual_seed(0)
    model = build_model({"backbone": "mobilenet_v2", "output_stride": output_stride}, 3).eval()
    c1, c4 = model.backbone(torch.randn(1, 3, 64, 96))
    assert c1.shape == (1, 24, 16, 24) and c4.shape == (1, 320, 64 // output_stride, 96 // output_stride)
    assert model(torch.randn(2, 3, 50, 70)).shape == (2, 3, 50, 70)
    # torchvision's state dict loads unchanged (its last conv and classifier dropped); dilation keeps the weights.
    ref = models.mobilenet_v2(weights=None)
    torch.save(ref.state_dict(), tmp_path / "mnv2.pth")
    model = build_model({"backbone": "mobilenet_v2", "output_stride": output_stride,
                         "pretrained": str(tmp_path / "mnv2.pth")}, 3)
    assert model.pretrained_report["loaded"] == len(model.backbone.state_dict())
    assert model.pretrained_report["unexpected"] == []
    assert torch.equal(model.backbone.features[17].conv[1][0].weight, ref.features[17].conv[1][0].weight)
    if output_stride == 32:  # undilated: exactly torchvision's features[:18]
        ref.eval()
        model.eval()
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(model.backbone(x)[1], ref.features[:18](x))


def test_pretrained_file_hash_and_imagenet_download_errors(tmp_path, monkeypatch):
    from csl.model import backbone as bb

    ref = models.mobilenet_v2(weights=None)
    path = tmp_path / "mobilenet_v2-00000000.pth"  # a torchvision-style name whose hash prefix cannot match
    torch.save(ref.state_dict(), path)
    with pytest.raises(ValueError, match="does not start with 00000000"):
        build_model({"backbone": "mobilenet_v2", "pretrained": str(path)}, 3)
    digest = bb.hashlib.sha256(path.read_bytes()).hexdigest()
    first_off = "0123456789abcdef"[("0123456789abcdef".index(digest[0]) + 1) % 16] + digest[1:8]
    path = path.rename(tmp_path / f"mobilenet_v2-{first_off}.pth")  # the prefix checked from its first digit
    with pytest.raises(ValueError, match=f"does not start with {first_off}"):
        build_model({"backbone": "mobilenet_v2", "pretrained": str(path)}, 3)
    good = tmp_path / f"mobilenet_v2-{digest[:8]}.pth"
    path.rename(good)
    assert build_model({"backbone": "mobilenet_v2", "pretrained": str(good)}, 3).pretrained_report[
        "sha256_prefix"] == digest[:8]

    # pretrained=imagenet goes through torchvision's weights API; unreachable, the error names the file to fetch.
    def offline(self, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(OSError, match=r"mobilenet_v2-b0353104\.pth.*by hand"):
        build_model({"backbone": "mobilenet_v2", "pretrained": "imagenet"}, 3)
    monkeypatch.setattr(models.WeightsEnum, "get_state_dict", lambda self, *a, **k: ref.state_dict())
    assert build_model({"backbone": "mobilenet_v2", "pretrained": "imagenet"}, 3).pretrained_report["loaded"] > 0


def test_convert_sync_bn_only_for_several_processes():
    model = DeepLabV3Plus(3, backbone="resnet18")
    assert convert_sync_bn(model) is model
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    converted = convert_sync_bn(model, world_size=2)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())


def test_bad_config():
    with pytest.raises(ValueError, match="dilations"):
        build_model({"backbone": "resnet18", "dilations": [6, 12]}, 3)
    with pytest.raises(TypeError, match="model_cfg"):
        build_model(None, 3)


# UniMatch's / CSL's key layout, written out by hand from their model code (deep-stem ResNet, DeepLabV3+ head names).
def _unimatch_stem_keys() -> dict[str, tuple]:
    keys = {"conv1.0.weight": (64, 3, 3, 3), "conv1.3.weight": (64, 64, 3, 3), "conv1.6.weight": (128, 64, 3, 3),
            "layer1.0.conv1.weight": (64, 128, 1, 1), "layer1.0.downsample.0.weight": (256, 128, 1, 1)}
    for prefix, ch in (("conv1.1", 64), ("conv1.4", 64), ("bn1", 128)):
        keys.update({f"{prefix}.{n}": (ch,) for n in ("weight", "bias", "running_mean", "running_var")})
        keys[f"{prefix}.num_batches_tracked"] = ()
    return keys


def _unimatch_backbone_state(name: str = "resnet50") -> dict[str, torch.Tensor]:
    ref = getattr(models, name)(weights=None).state_dict()
    stem = _unimatch_stem_keys()
    sd = {k: v for k, v in ref.items() if not k.startswith(("conv1.", "bn1.", "fc.")) and k not in stem}
    gen = torch.Generator().manual_seed(0)
    for k, shape in stem.items():
        sd[k] = torch.randint(0, 5, shape, generator=gen) if k.endswith("num_batches_tracked") else torch.randn(
            shape, generator=gen)
    return sd


def test_deep_stem_loads_unimatch_imagenet_weights_unchanged(tmp_path):
    sd = _unimatch_backbone_state("resnet50")
    sd.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(sd, tmp_path / "resnet50.pth")  # UniMatch's pretrained/resnet50.pth layout
    # torchvision's 7x7 stem: refused, not half-loaded, and the error names the stem setting that fits.
    with pytest.raises(ValueError, match="shape mismatch.*model has model.stem=torchvision, the file fits "
                                         "model.stem=deep"):
        build_model({"backbone": "resnet50", "pretrained": str(tmp_path / "resnet50.pth")}, 3)
    torch.save(models.resnet50().state_dict(), tmp_path / "torchvision_resnet50.pth")
    with pytest.raises(ValueError, match="model has model.stem=deep, the file fits model.stem=torchvision"):
        build_model({"backbone": "resnet50", "stem": "deep", "pretrained": str(tmp_path / "torchvision_resnet50.pth")},
                    3)
    model = build_model({"backbone": "resnet50", "stem": "deep", "pretrained": str(tmp_path / "resnet50.pth")}, 3)
    assert model.pretrained_report["loaded"] == len(model.backbone.state_dict())
    assert torch.equal(model.backbone.conv1[6].weight, sd["conv1.6.weight"])
    assert model.eval()(torch.randn(1, 3, 33, 33)).shape == (1, 3, 33, 33)
    with pytest.raises(ValueError, match="deep stem"):
        build_model({"backbone": "resnet18", "stem": "deep"}, 3)


def test_unimatch_checkpoint_evaluates_under_our_names(tmp_path, caplog):
    from csl.cli import model_from_checkpoint
    from csl.config import load_config

    sd = {f"backbone.{k}": v for k, v in _unimatch_backbone_state("resnet50").items()}
    shapes = {"head.b0.0.weight": (256, 2048, 1, 1), "head.b4.gap.1.weight": (256, 2048, 1, 1),
              "head.project.0.weight": (256, 1280, 1, 1), "reduce.0.weight": (48, 256, 1, 1),
              "fuse.0.weight": (256, 304, 3, 3), "fuse.3.weight": (256, 256, 3, 3),
              "classifier.weight": (21, 256, 1, 1), "classifier.bias": (21,)}
    shapes.update({f"head.b{i}.0.weight": (256, 2048, 3, 3) for i in (1, 2, 3)})
    bns = [f"head.b{i}.1" for i in range(4)] + ["head.b4.gap.2", "head.project.1", "fuse.1", "fuse.4"]
    for prefix in bns + ["reduce.1"]:
        ch = 48 if prefix == "reduce.1" else 256
        shapes.update({f"{prefix}.{n}": (ch,) for n in ("weight", "bias", "running_mean", "running_var")})
    gen = torch.Generator().manual_seed(1)
    sd.update({k: torch.randn(s, generator=gen) for k, s in shapes.items()})
    sd.update({f"{p}.num_batches_tracked": torch.tensor(7) for p in bns + ["reduce.1"]})
    ckpt = {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3, "previous_best": 70.0}
    cfg = load_config("voc_321", ["model.backbone=resnet50", "model.pretrained=null", "device=cpu"])
    model, num_classes = model_from_checkpoint(cfg, ckpt, "unimatch.pth", torch.device("cpu"))
    assert num_classes == 21
    assert torch.equal(model.fuse[1][0].weight, sd["fuse.3.weight"])
    assert torch.equal(model.head.branches[4].conv[1].running_var, sd["head.b4.gap.2.running_var"])
    assert model(torch.randn(1, 3, 33, 33)).shape == (1, 21, 33, 33)
    from csl.config import ConfigError

    with pytest.raises(ConfigError, match="model.stem=deep"):
        model_from_checkpoint(load_config("voc_321", ["model.backbone=resnet50", "model.stem=torchvision",
                                                      "model.pretrained=null"]), ckpt, "unimatch.pth", "cpu")
    # At stride 8 (cityscapes_801's model) the weights load as well; the load says they are a stride-16 model's.
    with caplog.at_level(logging.WARNING, logger="csl"):
        model_from_checkpoint(cfg, ckpt, "unimatch.pth", torch.device("cpu"))
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        stride8 = load_config("voc_321", ["model.backbone=resnet50", "model.pretrained=null", "device=cpu",
                                          "model.output_stride=8", "model.dilations=[12,24,36]"])
        model_from_checkpoint(stride8, ckpt, "unimatch.pth", torch.device("cpu"))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "unimatch.pth is a UniMatch / CSL checkpoint: those models are trained at output stride 16 with ASPP "
        "dilations [6, 12, 18] (every UniMatch config), but this config builds stride 8 with dilations [12, 24, 36]; "
        "the weights load, the predictions differ. To run them as trained, add model.output_stride=16 "
        "'model.dilations=[6,12,18]'"]


def test_feature_perturbation_drops_channels_of_both_feature_maps(monkeypatch):
    """UniMatch's fp pass: Dropout2d(0.5) on the low-level (c1) and the high-level (c4) features alike."""
    import torch.nn.functional as F

    seen, real = [], F.dropout2d

    def recording(x, p=0.5, training=True, inplace=False):
        seen.append((x.shape[1], p, training))
        return real(x, p, training, inplace)

    monkeypatch.setattr(F, "dropout2d", recording)
    model = DeepLabV3Plus(4, backbone="resnet18", output_stride=16).train()
    model(torch.randn(2, 3, 48, 48), need_fp=True)
    assert sorted(seen) == [(64, 0.5, True), (512, 0.5, True)]


def test_the_aspp_uses_its_image_pooling_branch():
    model = DeepLabV3Plus(4, backbone="resnet18", output_stride=16).eval()
    x = torch.randn(1, 512, 6, 6)
    with torch.no_grad():
        before = model.head(x)
        model.head.branches[-1].conv[0].weight.mul_(-3)
        assert not torch.allclose(before, model.head(x))


# ---------------------------------------------------------------------------------------------------------------
# Mutation audit: forward paths against torchvision, MobileNetV2 dilations, the decoder as UniMatch builds it, and
# weight files loaded tensor for tensor.


@pytest.mark.parametrize("name,output_stride,flags", [("resnet18", 32, None), ("resnet50", 16, [False, False, True]),
                                                      ("resnet50", 8, [False, True, True])])
def test_resnet_backbone_computes_torchvisions_features(name, output_stride, flags):
    """c1 / c4 are torchvision's layer1 / layer4 outputs (with replace_stride_with_dilation for stride 16 / 8) under
    the same weights: stem, ReLU, max pool and the dilated stages as torchvision runs them."""
    torch.manual_seed(0)
    ref = getattr(models, name)(weights=None, replace_stride_with_dilation=flags).eval()
    ours = ResNetBackbone(name, output_stride).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        c1, c4 = ours(x)
        stem = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
        ref_c1 = ref.layer1(stem)
        ref_c4 = ref.layer4(ref.layer3(ref.layer2(ref_c1)))
    torch.testing.assert_close(c1, ref_c1)
    torch.testing.assert_close(c4, ref_c4)


def _depthwise_dilations(backbone) -> list[int]:
    """The dilation of each block's (last) 3x3 conv in features[0:18]."""
    out = []
    for block in backbone.features:
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert all(m.padding == m.dilation for m in convs)
        out.append(convs[-1].dilation[0])
    return out


def test_mobilenet_v2_dilations_and_low_level_features():
    """As in the DeepLabV3+-MobileNet code (VainF's ``_nostride_dilate``): the block that would stride keeps the
    previous dilation, the blocks after it take the doubled one. Low-level features: torchvision's features[:4]."""
    from csl.model import MobileNetV2Backbone

    assert _depthwise_dilations(MobileNetV2Backbone(32)) == [1] * 18
    assert _depthwise_dilations(MobileNetV2Backbone(16)) == [1] * 15 + [2] * 3
    assert _depthwise_dilations(MobileNetV2Backbone(8)) == [1] * 8 + [2] * 7 + [4] * 3
    torch.manual_seed(0)
    ref = models.mobilenet_v2(weights=None).eval()
    ours = MobileNetV2Backbone(16).eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k.startswith("features.")
                          and not k.startswith("features.18.")})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref.features[:4](x))


def test_aspp_has_the_configured_dilations_and_five_branches():
    model = build_model({"backbone": "resnet18", "dilations": [12, 24, 36]}, 3)
    branches = model.head.branches
    assert len(branches) == 5  # 1x1, three dilated 3x3, image pooling
    assert [(b[0].kernel_size, b[0].dilation, b[0].padding) for b in branches[:4]] == [
        ((1, 1), (1, 1), (0, 0)), ((3, 3), (12, 12), (12, 12)), ((3, 3), (24, 24), (24, 24)),
        ((3, 3), (36, 36), (36, 36))]
    assert model.head.project[0].in_channels == 5 * 256
    default = build_model({"backbone": "resnet18"}, 3)
    assert [b[0].dilation[0] for b in default.head.branches[:4]] == [1, 6, 12, 18]
    assert default.backbone.output_stride == 16


def _lerp_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """Bilinear resizing with align_corners=True along one axis: output i samples input i * (n_in - 1) / (n_out - 1)."""
    pos = torch.arange(n_out, dtype=torch.float64) * (n_in - 1) / max(n_out - 1, 1)
    low = pos.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = pos - low
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    a[torch.arange(n_out), low] += 1 - frac
    a[torch.arange(n_out), high] += frac
    return a.float()


def test_decoder_as_unimatch_builds_it():
    """UniMatch's decoder: ``cat([reduce(c1), upsample(aspp(c4))])`` (reduced low-level features first, the order its
    checkpoints' fuse weights expect), bilinear resizes with align_corners=True, each conv block ending in BN + ReLU
    with PyTorch's BatchNorm defaults."""
    torch.manual_seed(0)
    model = DeepLabV3Plus(3, backbone="resnet18").eval()
    seen = {}
    for name in ("head", "reduce", "fuse", "classifier"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen.update({name: (i[0], o)}))
    for name, block in [("branch", model.head.branches[1]), ("project", model.head.project), ("fuse0", model.fuse[0])]:
        block.register_forward_hook(lambda m, i, o, name=name: seen.update({name: (i[0], o)}))
    x = torch.randn(1, 3, 61, 45)
    with torch.no_grad():
        out = model(x)
    reduced, aspp = seen["reduce"][1], seen["head"][1]
    fuse_in = seen["fuse"][0]
    assert fuse_in.shape[1] == 48 + 256
    torch.testing.assert_close(fuse_in[:, :48], reduced)
    h, w = reduced.shape[-2:]
    expected_up = _lerp_matrix(h, aspp.shape[-2]) @ aspp @ _lerp_matrix(w, aspp.shape[-1]).T
    torch.testing.assert_close(fuse_in[:, 48:], expected_up, atol=1e-5, rtol=1e-4)
    logits = seen["classifier"][1]
    torch.testing.assert_close(out, _lerp_matrix(61, h) @ logits @ _lerp_matrix(45, w).T, atol=1e-4, rtol=1e-4)
    for name in ("branch", "project", "fuse0", "reduce", "fuse"):
        assert (seen[name][1] >= 0).all() and (seen[name][1] == 0).any(), name  # ReLU at the end
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.momentum, m.eps) == (0.1, 1e-5)


def test_unimatch_names_are_mapped_key_by_key():
    """Every UniMatch / CSL decoder name onto ours, written out by hand (BN layers of one shape cannot tell a
    swapped pair apart by shape)."""
    from csl.model import from_unimatch_state_dict

    expected = {
        "backbone.layer1.0.conv1.weight": "backbone.layer1.0.conv1.weight",
        "backbone.conv1.1.weight": "backbone.conv1.1.weight",
        "head.b0.0.weight": "head.branches.0.0.weight", "head.b0.1.running_var": "head.branches.0.1.running_var",
        "head.b1.0.weight": "head.branches.1.0.weight", "head.b2.1.bias": "head.branches.2.1.bias",
        "head.b3.0.weight": "head.branches.3.0.weight", "head.b3.1.running_mean": "head.branches.3.1.running_mean",
        "head.b4.gap.1.weight": "head.branches.4.conv.0.weight",
        "head.b4.gap.2.num_batches_tracked": "head.branches.4.conv.1.num_batches_tracked",
        "head.project.0.weight": "head.project.0.weight", "head.project.1.weight": "head.project.1.weight",
        "reduce.0.weight": "reduce.0.weight", "reduce.1.running_mean": "reduce.1.running_mean",
        "fuse.0.weight": "fuse.0.0.weight", "fuse.1.weight": "fuse.0.1.weight",
        "fuse.1.running_var": "fuse.0.1.running_var", "fuse.3.weight": "fuse.1.0.weight",
        "fuse.4.weight": "fuse.1.1.weight", "fuse.4.running_mean": "fuse.1.1.running_mean",
        "classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias",
    }
    sd = {k: torch.full((1,), float(i)) for i, k in enumerate(expected)}
    out = from_unimatch_state_dict(sd)
    assert set(out) == set(expected.values())
    for old, new in expected.items():
        assert torch.equal(out[new], sd[old]), old
    assert set(DeepLabV3Plus(3).state_dict()) >= {v for v in expected.values() if not v.startswith("backbone.")}


def test_every_backbone_tensor_is_loaded_from_the_file(tmp_path):
    """Each tensor of the backbone after loading is the file's (none left at random init); a file without a BN
    layer's running statistics is refused like one without a weight; a plain file with one extra ``module.`` key
    keeps its names."""
    torch.manual_seed(3)
    ref = models.resnet18(weights=None)
    with torch.no_grad():  # running statistics that differ from a fresh BN's
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(11)
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, tmp_path / "r18.pth")
    model = build_model({"backbone": "resnet18", "pretrained": str(tmp_path / "r18.pth")}, 3)
    theirs = ref.state_dict()
    ours = model.backbone.state_dict()
    assert model.pretrained_report["loaded"] == len(ours) == len(theirs) - 2
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k
    sd = dict(theirs)
    del sd["layer2.1.bn1.running_var"]
    torch.save(sd, tmp_path / "no_stats.pth")
    with pytest.raises(ValueError, match=r"lacks 1 of .*layer2\.1\.bn1\.running_var"):
        build_model({"backbone": "resnet18", "pretrained": str(tmp_path / "no_stats.pth")}, 3)
    sd = dict(theirs, **{"module.note": torch.zeros(1)})
    torch.save(sd, tmp_path / "extra.pth")
    model = build_model({"backbone": "resnet18", "pretrained": str(tmp_path / "extra.pth")}, 3)
    assert model.pretrained_report["loaded"] == len(theirs) - 2
    assert model.pretrained_report["unexpected"] == ["module.note"]


SHARED_MNV2 = os.path.join(SHARED, "weights", "mobilenet_v2-b0353104.pth")


@pytest.mark.skipif(not os.path.isfile(SHARED_MNV2), reason=f"{SHARED_MNV2} not found (set CSL_SHARED)")
def test_torchvisions_mobilenet_v2_imagenet_file_loads_whole():
    """The shared ImageNet file (its name's sha256 prefix checked): every backbone tensor is the file's."""
    model = build_model({"backbone": "mobilenet_v2", "output_stride": 8, "pretrained": SHARED_MNV2}, 3)
    assert model.pretrained_report["sha256_prefix"] == "b0353104"
    sd = torch.load(SHARED_MNV2, weights_only=True)
    ours = model.backbone.state_dict()
    assert model.pretrained_report["loaded"] == len(ours)
    for k, v in ours.items():
        assert torch.equal(v, sd[k]), k


def test_deep_stem_is_unimatchs_and_keeps_the_strides():
    """UniMatch's deep stem: conv 3x3 stride 2 -> BN -> ReLU -> conv 3x3 -> BN -> ReLU -> conv 3x3 (then bn1, ReLU,
    max pool): c1 at stride 4 and c4 at stride 16, as with torchvision's stem."""
    backbone = ResNetBackbone("resnet50", 16, stem="deep").eval()
    stem = backbone.conv1
    assert [type(m) for m in stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2 + [nn.Conv2d]
    assert [(m.stride, m.padding) for m in stem if isinstance(m, nn.Conv2d)] == [((2, 2), (1, 1))] + [
        ((1, 1), (1, 1))] * 2
    with torch.no_grad():
        c1, c4 = backbone(torch.randn(1, 3, 32, 64))
    assert c1.shape == (1, 256, 8, 16) and c4.shape == (1, 2048, 2, 4)


# ---------------------------------------------------------------------------------------------------------------
# Mutation audit (second pass): weight-file wrappers and prefixes, our own checkpoints not taken for UniMatch's,
# the model's argument checks.


def test_weight_files_under_wrapper_keys_and_prefixes_load(tmp_path):
    """A backbone state dict under ``model`` or ``model_state`` (training scripts' checkpoints) or ``state_dict``, and
    key prefixes ``module.`` (DDP) then ``backbone.`` or ``encoder.``, one after the other: every tensor loaded."""
    torch.manual_seed(4)
    ref = models.resnet18(weights=None)
    sd = ref.state_dict()
    files = {"model": {"model": sd}, "model_state": {"model_state": sd, "epoch": 3},
             "ddp_backbone": {"state_dict": {f"module.backbone.{k}": v for k, v in sd.items()}},
             "encoder": {f"encoder.{k}": v for k, v in sd.items()}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        model = build_model({"backbone": "resnet18", "pretrained": str(tmp_path / f"{name}.pth")}, 3)
        assert model.pretrained_report["loaded"] == len(sd) - 2 and model.pretrained_report["unexpected"] == [], name
        assert torch.equal(model.backbone.layer3[0].downsample[1].running_var, sd["layer3.0.downsample.1.running_var"])


def test_our_own_checkpoints_are_not_taken_for_unimatchs(tmp_path):
    """Only UniMatch's names (``head.b0`` and a classifier) are renamed: our model's state dict, which has a
    classifier too, keeps its names (renamed, ``fuse.0.0`` would become ``fuse.0.0.0``)."""
    from csl.checkpoint import checkpoint_weights
    from csl.model import is_unimatch_state_dict

    state = DeepLabV3Plus(3, backbone="resnet18").state_dict()
    assert not is_unimatch_state_dict(state)
    assert is_unimatch_state_dict({"head.b0.0.weight": torch.zeros(1), "classifier.weight": torch.zeros(1)})
    assert not is_unimatch_state_dict({"head.b0.0.weight": torch.zeros(1)})
    weights, num_classes = checkpoint_weights({"backbone": "resnet18", "stem": "torchvision"}, {"model": state},
                                              "ours.pt")
    assert num_classes == 3 and set(weights) == set(state)


def test_model_arguments_are_checked():
    with pytest.raises(ValueError, match=r"dilations must be three positive ints .*got \(0, 12, 18\)"):
        build_model({"backbone": "resnet18", "dilations": [0, 12, 18]}, 3)
    for bad in (0, 2.0):
        with pytest.raises(ValueError, match=f"num_classes must be a positive int, got {bad}"):
            DeepLabV3Plus(bad, backbone="resnet18")


# -- UniMatch's Xception-65 --------------------------------------------------------------------------------------------

def test_xception_has_unimatchs_parameter_names_and_shapes():
    """Counted on UniMatch's model/backbone/xception.py (commit 818609d, ``Xception(os=16)``): 792 state-dict entries
    holding 38,052,512 numbers (the num_batches_tracked counters left out), so their pretrained/xception.pth loads key
    for key."""
    from csl.model import XceptionBackbone

    sd = XceptionBackbone(16).state_dict()
    assert len(sd) == 792
    assert sum(v.numel() for k, v in sd.items() if not k.endswith("num_batches_tracked")) == 38_052_512
    shapes = {"conv1.weight": (32, 3, 3, 3), "bn2.running_var": (64,), "block1.skip.weight": (128, 64, 1, 1),
              "block2.sepconv2.pointwise.weight": (256, 256, 1, 1), "block3.skipbn.bias": (728,),
              "block4.sepconv1.depthwise.weight": (728, 1, 3, 3), "block19.sepconv3.bn2.weight": (728,),
              "block20.sepconv1.pointwise.weight": (728, 728, 1, 1),
              "block20.sepconv2.pointwise.weight": (1024, 728, 1, 1),
              "conv3.depthwise.weight": (1024, 1, 3, 3), "conv5.pointwise.weight": (2048, 1536, 1, 1),
              "conv5.bn2.running_mean": (2048,)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert "block4.skip.weight" not in sd and "block20.skip.weight" in sd  # identity shortcuts in block4-19 only
    bns = [m for m in XceptionBackbone(8).modules() if isinstance(m, nn.BatchNorm2d)]
    # stem 2, three separable convs x two BNs in each of the 20 blocks, 4 shortcut BNs, conv3-conv5 two each
    assert len(bns) == 2 + 20 * 3 * 2 + 4 + 3 * 2 and {m.momentum for m in bns} == {0.0003}


@pytest.mark.parametrize("output_stride", [16, 8])
def test_xception_output_shapes_and_dilations(output_stride):
    from csl.model import XceptionBackbone

    backbone = XceptionBackbone(output_stride).eval()
    with torch.no_grad():
        c1, c4 = backbone(torch.randn(1, 3, 65, 97))
    strided = lambda n, s: n if s == 1 else strided((n - 1) // 2 + 1, s // 2)  # noqa: E731 - k3/p1 or k1 stride 2
    assert c1.shape == (1, 256, strided(65, 4), strided(97, 4))
    assert c4.shape == (1, 2048, strided(65, output_stride), strided(97, output_stride))
    rate = 16 // output_stride
    assert backbone.block3.sepconv1.depthwise.dilation == (1, 1)
    assert backbone.block4.sepconv1.depthwise.dilation == (rate, rate) == backbone.conv5.depthwise.dilation
    assert backbone.block3.sepconv3.depthwise.stride == ((2, 2) if output_stride == 16 else (1, 1))
    with pytest.raises(ValueError, match=r"xception supports output_stride \[8, 16\]"):
        XceptionBackbone(32)


def _quiet_separable_convs(block):
    """The block's three separable convs output zeros (their last BN's scale and shift 0), in eval mode."""
    for conv in (block.sepconv1, block.sepconv2, block.sepconv3):
        nn.init.zeros_(conv.bn2.weight)
        nn.init.zeros_(conv.bn2.bias)
    return block.eval()


def test_xception_identity_blocks_add_the_relu_of_their_input():
    """UniMatch's first separable conv applies its ReLU in place to the tensor its identity shortcut returns, so those
    blocks add relu(x); a block with a 1x1 shortcut conv adds that conv of x itself, negative values included."""
    from csl.model.xception import XceptionBlock

    x = torch.randn(2, 8, 9, 11)
    identity = _quiet_separable_convs(XceptionBlock(8, 8, 1, 2))
    with torch.no_grad():
        assert torch.equal(identity(x), torch.relu(x))
    strided = _quiet_separable_convs(XceptionBlock(8, 8, 2))
    with torch.no_grad():
        strided.skip.weight.copy_(torch.eye(8).view(8, 8, 1, 1))
        out = strided(x)
    torch.testing.assert_close(out, x[:, :, ::2, ::2] / (1 + strided.skipbn.eps) ** 0.5)
    assert out.min() < 0


def test_xception_low_level_features_are_block2s_before_any_relu():
    """c1 is block2's second separable conv's output as it came out (negative values kept): the third conv's ReLU
    does not overwrite it."""
    from csl.model import XceptionBackbone

    backbone = XceptionBackbone(16).eval()
    seen = []
    backbone.block2.sepconv2.register_forward_hook(lambda module, args, out: seen.append(out.clone()))
    with torch.no_grad():
        c1, _ = backbone(torch.randn(1, 3, 33, 41))
    assert torch.equal(c1, seen[0]) and c1.min() < 0


def test_xception_deeplab_trains_a_step_with_feature_perturbation():
    model = DeepLabV3Plus(4, backbone="xception").train()
    logits, logits_fp = model(torch.randn(2, 3, 33, 33), need_fp=True)
    assert logits.shape == logits_fp.shape == (2, 4, 33, 33)
    (logits.square().mean() + logits_fp.square().mean()).backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert model.backbone.block2.sepconv2.pointwise.weight.grad.abs().sum() > 0  # through the low-level features
    groups = {g["name"]: g for g in model.param_groups(0.004)}
    assert groups["backbone"]["params"] == list(model.backbone.parameters()) and groups["head"]["lr"] == 0.04


def test_unimatchs_xception_file_loads_and_imagenet_names_it(tmp_path, caplog):
    """UniMatch's loader drops keys holding 'itr' / 'tmp' / 'track'; so does this one (num_batches_tracked may be
    absent in any file). torchvision has no Xception: ``imagenet`` and a missing file name UniMatch's file."""
    from csl.model import XceptionBackbone
    from csl.model.xception import UNIMATCH_XCEPTION_URL

    gen = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(v.shape, generator=gen) for k, v in XceptionBackbone(16).state_dict().items()
          if not k.endswith("num_batches_tracked")}
    sd.update({"block1.sepconv1.tmp_hook": torch.zeros(3), "conv5.itr": torch.tensor(5)})
    torch.save(sd, tmp_path / "xception.pth")
    with caplog.at_level(logging.INFO, logger="csl"):
        model = build_model({"backbone": "xception", "pretrained": str(tmp_path / "xception.pth")}, 81)
    assert model.pretrained_report["loaded"] == len(sd) - 2 and model.pretrained_report["unexpected"] == []
    assert torch.equal(model.backbone.block20.sepconv2.pointwise.weight, sd["block20.sepconv2.pointwise.weight"])
    assert any("2 tensors whose names hold itr / tmp ignored" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="torchvision has no ImageNet xception; .*UniMatch's ImageNet xception.pth "
                                         f"from {re.escape(UNIMATCH_XCEPTION_URL)}"):
        build_model({"backbone": "xception", "pretrained": "imagenet"}, 81)
    with pytest.raises(FileNotFoundError, match="missing.pth.*UniMatch's ImageNet xception.pth"):
        build_model({"backbone": "xception", "pretrained": str(tmp_path / "missing.pth")}, 81)
    del sd["block7.sepconv2.bn1.running_var"]
    torch.save(sd, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"lacks 1 of the .*block7.sepconv2.bn1.running_var.*UniMatch's xception.pth"):
        build_model({"backbone": "xception", "pretrained": str(tmp_path / "short.pth")}, 81)


def _to_unimatch_names(sd: dict) -> dict:
    """This package's DeepLabV3+ state dict under UniMatch's module names (the inverse of from_unimatch_state_dict)."""
    renames = [(r"^head\.branches\.([0-3])\.", r"head.b\1."), (r"^head\.branches\.4\.conv\.0\.", "head.b4.gap.1."),
               (r"^head\.branches\.4\.conv\.1\.", "head.b4.gap.2."), (r"^fuse\.0\.0\.", "fuse.0."),
               (r"^fuse\.0\.1\.", "fuse.1."), (r"^fuse\.1\.0\.", "fuse.3."), (r"^fuse\.1\.1\.", "fuse.4.")]
    out = {}
    for key, value in sd.items():
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def test_a_unimatch_xception_checkpoint_evaluates_with_the_coco_config():
    """UniMatch's COCO checkpoints are Xception-65 DeepLabV3+: they load into the coco config's model; a config
    with another backbone is told which one the checkpoint has, and so is the coco config given a ResNet one."""
    from csl.cli import model_from_checkpoint
    from csl.config import ConfigError, load_config

    trained = DeepLabV3Plus(81, backbone="xception").eval()
    ckpt = {"model": {f"module.{k}": v for k, v in _to_unimatch_names(trained.state_dict()).items()}, "epoch": 29}
    model, num_classes = model_from_checkpoint(load_config("coco", ["model.pretrained=null"]), ckpt, "best.pth",
                                               torch.device("cpu"))
    x = torch.randn(1, 3, 35, 37)
    with torch.no_grad():
        assert num_classes == 81 and torch.equal(model.eval()(x), trained(x))
    # voc_321 sets the deep stem, which the Xception-65 does not have: the advice names both keys, and works
    with pytest.raises(ConfigError, match="checkpoint of an Xception-65; pass model.backbone=xception "
                                          "model.stem=torchvision "):
        model_from_checkpoint(load_config("voc_321", ["model.pretrained=null", "data.num_classes=81"]), ckpt,
                              "best.pth", "cpu")
    with pytest.raises(ConfigError, match="checkpoint of an Xception-65; pass model.backbone=xception "
                                          r"\(the coco config"):
        model_from_checkpoint(load_config("demo", ["data.num_classes=4"]), ckpt, "best.pth", "cpu")
    advised = load_config("voc_321", ["model.pretrained=null", "data.num_classes=81", "model.backbone=xception",
                                      "model.stem=torchvision"])
    with torch.no_grad():
        assert torch.equal(model_from_checkpoint(advised, ckpt, "best.pth", "cpu")[0](x), trained(x))
    resnet = {f"module.{k}": v for k, v in _to_unimatch_names(
        DeepLabV3Plus(81, backbone="resnet50", stem="deep").state_dict()).items()}
    with pytest.raises(ConfigError, match="its ResNet has the deep stem; pass model.backbone=resnet50 "
                                          "model.stem=deep"):
        model_from_checkpoint(load_config("coco", ["model.pretrained=null"]), {"model": resnet}, "best.pth", "cpu")
    # A ResNet of another depth (layer3 of 3 blocks): the advice names no Xception as its ResNet.
    from csl.checkpoint import checkpoint_weights

    dropped = tuple(f"module.backbone.layer3.{i}." for i in range(3, 6))
    odd = {k: v for k, v in resnet.items() if not k.startswith(dropped)}
    with pytest.raises(ConfigError, match=r"its ResNet has the deep stem; pass model.backbone=resnet50 / resnet101 "
                                          r"\(its depth\) model.stem=deep"):
        checkpoint_weights(load_config("coco")["model"], {"model": odd}, "best.pth")
