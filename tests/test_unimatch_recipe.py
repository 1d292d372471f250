"""docs/unimatch.md's recipe, run on UniMatch-shaped tensors: it computes what the csl trainer's step pieces compute,
placed in UniMatch's loop it is the trainer's train_step, and with the threshold it is UniMatch's own loss."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from torch import nn

import csl.step as step_mod
import csl_kernels as ck
from csl.selection import build_selector
from csl.step import CUTMIX_CANDIDATES, KernelOps, StepConfig, paste, train_step


def _batch(seed: int, b: int = 2, c: int = 21, h: int = 24, w: int = 20):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g) * 4
    ignore = torch.zeros(b, h, w, dtype=torch.long)
    ignore[:, -3:] = 255  # padding at the bottom, as UniMatch's loader pads a crop
    box = torch.zeros(b, h, w)  # UniMatch's obtain_cutmix_box: float32, 1 inside the box
    box[0, 4:15, 3:12] = 1  # one sample without a box
    return logits, ignore, box




def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a Markdown file, in order."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def recipe_blocks() -> list[str]:
    """docs/unimatch.md's code for the trainer: every python block but the UniMatch lines it replaces (those read
    ``conf_u_w``) and the dataset change of section 4 (UniMatch's ``SemiDataset``, not runnable here)."""
    blocks = [b for b in python_blocks(ROOT / "docs" / "unimatch.md")
              if "conf_u_w" not in b and "self.mild_view" not in b]
    assert len(blocks) == 6 and blocks[0].startswith("import csl_kernels as ck")
    return blocks


def unimatch_blocks() -> list[str]:
    """The UniMatch lines docs/unimatch.md quotes as what its blocks replace (section 1's selection, section 3's
    loss), in order."""
    blocks = [b for b in python_blocks(ROOT / "docs" / "unimatch.md") if "conf_u_w" in b]
    assert len(blocks) == 2 and "argmax" in blocks[0] and "criterion_u" in blocks[1]
    return blocks


def test_the_documented_recipe_matches_the_trainer_step_pieces():
    """docs/unimatch.md's blocks, executed in order on UniMatch-shaped tensors: the selection, the pasted weights,
    the three losses, the mask ratio and the masking view agree with the csl trainer's step pieces and with UniMatch's
    own loss lines (the threshold mask replaced by the weights)."""
    pred_u_w_mix, ignore_mask_mix, _ = _batch(0, h=64, w=48)
    pred_u_w, ignore_mask, cutmix_box1 = _batch(1, h=64, w=48)
    cutmix_box2 = torch.zeros_like(cutmix_box1)
    cutmix_box2[:, 10:40, 5:30] = 1
    torch.manual_seed(2)
    ns = {"torch": torch, "pred_u_w_mix": pred_u_w_mix, "ignore_mask_mix": ignore_mask_mix, "pred_u_w": pred_u_w,
          "ignore_mask": ignore_mask, "cutmix_box1": cutmix_box1, "cutmix_box2": cutmix_box2,
          "pred_u_s1": _batch(2, h=64, w=48)[0].requires_grad_(True),
          "pred_u_s2": _batch(3, h=64, w=48)[0].requires_grad_(True),
          "pred_u_w_fp": _batch(4, h=64, w=48)[0].requires_grad_(True), "total_mask_ratio": 0.0, "num_ulb": 2,
          "img_u_w": torch.randn(2, 3, 64, 48), "img_u_m": torch.randn(2, 3, 64, 48),
          "img_u_s2": torch.randn(2, 3, 64, 48)}
    img_u_s2 = ns["img_u_s2"]
    for block in recipe_blocks():
        exec(compile(block, "docs/unimatch.md", "exec"), ns)
    pred_u_s1, pred_u_w_fp = ns["pred_u_s1"], ns["pred_u_w_fp"]

    # the trainer's pieces (csl/step.py: selector, paste, KernelOps.loss)
    selector = build_selector({"mode": "csl", "alpha": ns["ALPHA"]})
    t_mix, t_sel = selector(pred_u_w_mix, ignore_mask_mix), selector(pred_u_w, ignore_mask)
    box = cutmix_box1 == 1
    loss_trainer = KernelOps().loss(pred_u_s1, paste(box, t_mix.label, t_sel.label),
                                    paste(box, t_mix.weight, t_sel.weight), paste(box, ignore_mask_mix, ignore_mask))
    torch.testing.assert_close(ns["loss_u_s1"], loss_trainer, rtol=0, atol=0)
    box2_full = cutmix_box2 == 1  # section 2's second stream, pasted before section 4 narrows the box
    torch.testing.assert_close(ns["loss_u_s2"], KernelOps().loss(
        ns["pred_u_s2"], paste(box2_full, t_mix.label, t_sel.label), paste(box2_full, t_mix.weight, t_sel.weight),
        paste(box2_full, ignore_mask_mix, ignore_mask)), rtol=0, atol=0)
    torch.testing.assert_close(ns["loss_u_w_fp"], KernelOps().loss(pred_u_w_fp, t_sel.label, t_sel.weight,
                                                                   ignore_mask), rtol=0, atol=0)
    weight1, mask1, ignore1 = ns["weight_u_w_cutmixed1"], ns["mask_u_w_cutmixed1"], ns["ignore_mask_cutmixed1"]
    assert 0 < weight1[ignore1 != 255].mean() < 1  # soft weights, not a 0/1 mask
    valid_w = ignore_mask != 255
    assert ns["total_mask_ratio"] == pytest.approx(float(t_sel.weight[valid_w].sum() / valid_w.sum()), rel=1e-6)

    # UniMatch's own loss lines with the threshold mask replaced by the pasted weights, in float64
    valid = ignore1 != 255
    unimatch_style = (F.cross_entropy(pred_u_s1.double(), mask1, reduction="none") * weight1.double() * valid).sum() \
        / valid.sum()
    torch.testing.assert_close(ns["loss_u_s1"].double(), unimatch_style, rtol=1e-6, atol=1e-7)
    ns["loss_u_s1"].backward()
    grad_recipe = pred_u_s1.grad.clone()
    pred_u_s1.grad = None
    unimatch_style.backward()
    torch.testing.assert_close(grad_recipe, pred_u_s1.grad, rtol=1e-5, atol=1e-7)

    # section 4: the trusted mask hides reliable pixels only; the masked samples take the masked view and no CutMix
    # box, the others keep theirs
    masked, cover, use_tmp, box2 = ns["masked"], ns["cover"], ns["use_tmp"], ns["box2"]
    reliable = ns["sel"].reliable
    assert torch.equal(reliable, t_sel.reliable) and not (cover & ~reliable).any() and cover.any()
    torch.testing.assert_close(masked, torch.where(cover[:, None], torch.zeros(()), ns["img_u_m"]))
    assert use_tmp.tolist() == [True, False]  # this seed draws one of each
    assert torch.equal(ns["img_u_s2"][0], masked[0]) and torch.equal(ns["img_u_s2"][1], img_u_s2[1])
    assert not box2[0].any() and box2[1].any() and torch.equal(box2[1], cutmix_box2[1] == 1)
    mask_u_w_cutmixed2 = ns["mask_u_w"].clone()  # the block's last comment: section 2's paste with box2
    mask_u_w_cutmixed2[box2] = ns["mask_u_w_mix"][box2]
    assert torch.equal(mask_u_w_cutmixed2, paste(box2, t_mix.label, t_sel.label))
    assert torch.equal(mask_u_w_cutmixed2[0], t_sel.label[0])  # the masked sample trains on its own pseudo-labels


def test_the_readme_kernel_example_runs():
    """The README's three calls, on a small batch: weights in [0, 1], a scalar loss with a gradient, the masked view
    zero exactly where reliable pixels are covered."""
    (block,) = [b for b in python_blocks(ROOT / "README.md") if "ck.pcos_weights" in b]
    logits_weak, ignore, _ = _batch(5, h=64, w=48)
    ns = {"logits_weak": logits_weak, "ignore": ignore, "logits_strong": _batch(6, h=64, w=48)[0].requires_grad_(),
          "images_mild": torch.randn(2, 3, 64, 48), "gen": torch.Generator().manual_seed(0)}
    exec(compile(block, "README.md", "exec"), ns)
    sel, loss_u, masked, cover = ns["sel"], ns["loss_u"], ns["masked"], ns["cover"]
    assert ((sel.weight >= 0) & (sel.weight <= 1)).all() and (sel.weight[ignore == 255] == 0).all()
    assert loss_u.ndim == 0 and torch.isfinite(loss_u)
    loss_u.backward()
    assert ns["logits_strong"].grad.abs().sum() > 0
    assert cover.any() and not (cover & ~sel.reliable).any()
    assert torch.equal(masked, torch.where(cover[:, None], torch.zeros(()), ns["images_mild"]))


@pytest.mark.parametrize("conf_thresh", [0.95, 0.0])  # Pascal's and Cityscapes' conf_thresh
def test_with_the_threshold_the_recipe_is_unimatch_loss(conf_thresh):
    """The UniMatch lines the document quotes (sections 1 and 3), run as UniMatch runs them, give the loss of its
    baseline drop-in: ck.threshold_weights(pred_u_w, ignore_mask, tau=cfg['conf_thresh']) through section 3's call."""
    pred_u_w_mix, ignore_mask_mix, _ = _batch(2)
    pred_u_w, ignore_mask, cutmix_box1 = _batch(3)
    ns = {"torch": torch, "cfg": {"conf_thresh": conf_thresh}, "pred_u_w_mix": pred_u_w_mix, "pred_u_w": pred_u_w,
          "pred_u_s1": _batch(4)[0], "criterion_u": nn.CrossEntropyLoss(reduction="none")}
    selection, loss = unimatch_blocks()
    exec(compile(selection, "docs/unimatch.md", "exec"), ns)
    # UniMatch's paste of the CutMix source's pseudo-labels, confidences and padding into the box (not quoted)
    box = cutmix_box1 == 1
    ns["mask_u_w_cutmixed1"] = torch.where(box, ns["mask_u_w_mix"], ns["mask_u_w"])
    ns["conf_u_w_cutmixed1"] = torch.where(box, ns["conf_u_w_mix"], ns["conf_u_w"])
    ns["ignore_mask_cutmixed1"] = torch.where(box, ignore_mask_mix, ignore_mask)
    exec(compile(loss, "docs/unimatch.md", "exec"), ns)
    unimatch = ns["loss_u_s1"]
    # the drop-in: threshold weights pasted as section 2 pastes them, through section 3's fused call
    sel_mix = ck.threshold_weights(pred_u_w_mix, ignore_mask_mix, tau=conf_thresh)
    sel = ck.threshold_weights(pred_u_w, ignore_mask, tau=conf_thresh)
    valid = ignore_mask != 255
    assert torch.equal(sel.label[valid], ns["mask_u_w"][valid])  # padded pixels carry label 0 and weight 0
    if conf_thresh == 0:
        assert torch.equal(sel.weight, valid.float())  # tau = 0 keeps every valid pixel
    fused = ck.weighted_cross_entropy(ns["pred_u_s1"], paste(box, sel_mix.label, sel.label),
                                      paste(box, sel_mix.weight, sel.weight), ns["ignore_mask_cutmixed1"])
    torch.testing.assert_close(fused, unimatch, rtol=1e-5, atol=1e-6)


class _TinyUniMatchModel(nn.Module):
    """UniMatch's ``forward(x, need_fp)``: ``need_fp`` decodes the features twice, the second time through
    ``Dropout2d(0.5)``, and returns both predictions. BatchNorm makes train and eval mode differ, as in DeepLabV3+."""

    def __init__(self, classes: int = 6):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.classifier = nn.Conv2d(8, classes, 1)

    def forward(self, x, need_fp=False):
        feats = self.encoder(x)
        if need_fp:
            return self.classifier(torch.cat((feats, nn.Dropout2d(0.5)(feats)))).chunk(2)
        return self.classifier(feats)


def test_the_recipe_in_unimatchs_loop_is_the_trainers_step(monkeypatch):
    """The document's blocks placed in UniMatch's loop as section 4 orders it (the selection after the weak forward,
    the masked view before the strong one, the second stream's pastes with box2) and one SGD step: the same losses
    and the same updated weights as csl/step.py's train_step on the same batch, boxes and random state, as the
    document says ("this recipe with the TMP half drawn on the device")."""
    b, h, w = 4, 48, 40
    g = torch.Generator().manual_seed(7)
    def images():
        return torch.randn(b, 3, h, w, generator=g)
    img_x, img_u_w, img_u_s1, img_u_s2, img_u_m = images(), images(), images(), images(), images()
    img_u_w_mix, img_u_s1_mix, img_u_s2_mix = images(), images(), images()
    mask_x = torch.randint(0, 6, (b, h, w), generator=g)
    mask_x[:, :4] = 255
    ignore_mask, ignore_mask_mix = torch.zeros(b, h, w, dtype=torch.long), torch.zeros(b, h, w, dtype=torch.long)
    ignore_mask[:, -6:] = 255  # padded crops, as UniMatch's loader pads them
    ignore_mask_mix[:, :, -5:] = 255
    cutmix_box1, cutmix_box2 = torch.zeros(b, h, w), torch.zeros(b, h, w)  # float32, as obtain_cutmix_box
    cutmix_box1[0, 5:30, 4:20] = cutmix_box1[2, 10:40, 10:35] = 1
    cutmix_box2[:, 8:36, 6:30] = 1  # every sample: the masked ones must drop theirs

    torch.manual_seed(0)
    model = _TinyUniMatchModel()
    trainer_model = _TinyUniMatchModel()
    trainer_model.load_state_dict(model.state_dict())
    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    criterion_l = nn.CrossEntropyLoss(ignore_index=255)
    blocks = dict(zip(("constants", "select", "paste", "loss", "mask_ratio", "tmp"), recipe_blocks(), strict=True))
    rng_state = torch.get_rng_state()

    # UniMatch's loop body (unimatch.py), the document's blocks where it puts them
    optimizer = sgd(model)
    ns = {"torch": torch, "total_mask_ratio": 0.0}
    exec(compile(blocks["constants"], "docs/unimatch.md", "exec"), ns)
    with torch.no_grad():
        model.eval()
        pred_u_w_mix = model(img_u_w_mix).detach()
    box1_img = cutmix_box1.unsqueeze(1).expand(img_u_s1.shape)
    box2_img = cutmix_box2.unsqueeze(1).expand(img_u_s2.shape)
    s1, s2 = img_u_s1.clone(), img_u_s2.clone()
    s1[box1_img == 1] = img_u_s1_mix[box1_img == 1]
    s2[box2_img == 1] = img_u_s2_mix[box2_img == 1]
    model.train()
    num_lb, num_ulb = img_x.shape[0], img_u_w.shape[0]
    preds, preds_fp = model(torch.cat((img_x, img_u_w)), True)
    pred_x, pred_u_w = preds.split([num_lb, num_ulb])
    ns.update(pred_u_w_mix=pred_u_w_mix, ignore_mask_mix=ignore_mask_mix, pred_u_w=pred_u_w, ignore_mask=ignore_mask,
              img_u_w=img_u_w, img_u_m=img_u_m, img_u_s2=s2, num_ulb=num_ulb, cutmix_box1=cutmix_box1,
              cutmix_box2=cutmix_box2, pred_u_w_fp=preds_fp[num_lb:])
    exec(compile(blocks["select"], "docs/unimatch.md", "exec"), ns)
    exec(compile(blocks["tmp"], "docs/unimatch.md", "exec"), ns)
    use_tmp = ns["use_tmp"]
    assert use_tmp.any() and not use_tmp.all()  # this seed draws both kinds of sample
    ns["pred_u_s1"], ns["pred_u_s2"] = model(torch.cat((s1, ns["img_u_s2"]))).chunk(2)
    ns["cutmix_box2"] = ns["box2"]  # the block's last comment: section 2's pastes with box2
    exec(compile(blocks["paste"], "docs/unimatch.md", "exec"), ns)
    exec(compile(blocks["loss"], "docs/unimatch.md", "exec"), ns)
    exec(compile(blocks["mask_ratio"], "docs/unimatch.md", "exec"), ns)
    loss_x = criterion_l(pred_x, mask_x)
    loss = (loss_x + ns["loss_u_s1"] * 0.25 + ns["loss_u_s2"] * 0.25 + ns["loss_u_w_fp"] * 0.5) / 2.0
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    # csl/step.py's train_step from the same random state, given UniMatch's boxes
    boxes = [cutmix_box1 == 1, cutmix_box2 == 1]
    monkeypatch.setattr(step_mod, "cutmix_boxes", lambda *args, **kwargs: boxes.pop(0))
    torch.set_rng_state(rng_state)
    trainer_optimizer = sgd(trainer_model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(trainer_optimizer, lambda i: 1.0)
    truth = torch.zeros(b, h, w, dtype=torch.long)
    out = train_step(trainer_model, trainer_optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                     {"image": img_x, "mask": mask_x},
                     {"image_w": img_u_w, "image_s": img_u_s1, "image_s2": img_u_s2, "image_m": img_u_m,
                      "ignore": ignore_mask, "mask": truth},
                     {"image_w": img_u_w_mix, "image_s": img_u_s1_mix, "image_s2": img_u_s2_mix,
                      "image_m": img_u_m, "ignore": ignore_mask_mix, "mask": truth},
                     selector=build_selector({"mode": "csl", "alpha": ns["ALPHA"]}), criterion=criterion_l,
                     cfg=StepConfig(tmp_block=ns["TMP_BLOCK"], tmp_rate=ns["TMP_RATE"]),
                     generator=torch.default_generator)
    assert not boxes  # both of UniMatch's boxes were used
    for name, recipe in (("loss_x", loss_x), ("loss_s", ns["loss_u_s1"]), ("loss_m", ns["loss_u_s2"]),
                         ("loss_fp", ns["loss_u_w_fp"]), ("loss", loss)):
        torch.testing.assert_close(out[name], recipe.detach(), rtol=0, atol=0, msg=name)
    assert ns["total_mask_ratio"] == pytest.approx(float(out["weight_sum"] / out["valid"]), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), trainer_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_the_documented_share_of_clamped_cutmix_boxes_is_the_exact_one():
    """docs/unimatch.md's share of CutMix boxes that none of csl/step.py's candidates fits (then clamped), at crop
    321: the probability that all CUTMIX_CANDIDATES draws of ratio and corner miss, integrated over the box area
    U(0.02, 0.4) and the ratio U(0.3, 1/0.3) (width floor(sqrt(area / ratio)), height floor(sqrt(area * ratio)),
    corner uniform over the crop's integer positions, as cutmix_boxes draws them)."""
    size = 321
    (documented,) = re.findall(r"([0-9.]+) % of boxes at crop 321", (ROOT / "docs" / "unimatch.md").read_text())
    area = (0.02 + 0.38 * (np.arange(2000) + 0.5) / 2000)[:, None] * size * size
    ratio = 0.3 + (1 / 0.3 - 0.3) * (np.arange(1000) + 0.5) / 1000
    box_w, box_h = np.floor(np.sqrt(area / ratio)), np.floor(np.sqrt(area * ratio))
    fits = (np.clip(size - box_w + 1, 0, size) / size * np.clip(size - box_h + 1, 0, size) / size).mean(1)
    clamped = 100 * ((1 - fits) ** CUTMIX_CANDIDATES).mean()
    assert float(documented) == pytest.approx(clamped, abs=0.005), clamped
