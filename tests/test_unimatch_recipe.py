"""docs/unimatch.md's recipe, run on UniMatch-shaped tensors: it computes what the csl trainer's step pieces compute,
and with the threshold it is UniMatch's own loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import csl_kernels as ck
from csl.selection import build_selector
from csl.step import KernelOps, paste


def _batch(seed: int, b: int = 2, c: int = 21, h: int = 24, w: int = 20):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g) * 4
    ignore = torch.zeros(b, h, w, dtype=torch.long)
    ignore[:, -3:] = 255  # padding at the bottom, as UniMatch's loader pads a crop
    box = torch.zeros(b, h, w)  # UniMatch's obtain_cutmix_box: float32, 1 inside the box
    box[0, 4:15, 3:12] = 1  # one sample without a box
    return logits, ignore, box


def test_recipe_matches_the_trainer_step_pieces():
    pred_u_w_mix, ignore_mask_mix, _ = _batch(0)
    pred_u_w, ignore_mask, cutmix_box1 = _batch(1)
    pred_u_s1 = _batch(2)[0].requires_grad_(True)

    # docs/unimatch.md, sections 1-3
    sel_mix = ck.pcos_weights(pred_u_w_mix.detach(), ignore_mask_mix, alpha=8.0)
    sel = ck.pcos_weights(pred_u_w.detach(), ignore_mask, alpha=8.0)
    mask_u_w_mix, weight_u_w_mix = sel_mix.label, sel_mix.weight
    mask_u_w, weight_u_w = sel.label, sel.weight
    mask_u_w_cutmixed1, weight_u_w_cutmixed1, ignore_mask_cutmixed1 = mask_u_w.clone(), weight_u_w.clone(), \
        ignore_mask.clone()
    mask_u_w_cutmixed1[cutmix_box1 == 1] = mask_u_w_mix[cutmix_box1 == 1]
    weight_u_w_cutmixed1[cutmix_box1 == 1] = weight_u_w_mix[cutmix_box1 == 1]
    ignore_mask_cutmixed1[cutmix_box1 == 1] = ignore_mask_mix[cutmix_box1 == 1]
    loss_recipe = ck.weighted_cross_entropy(pred_u_s1, mask_u_w_cutmixed1, weight_u_w_cutmixed1,
                                            ignore_mask_cutmixed1)

    # the trainer's pieces (csl/step.py: selector, paste, KernelOps.loss)
    selector = build_selector({"mode": "csl", "alpha": 8.0})
    t_mix, t_sel = selector(pred_u_w_mix, ignore_mask_mix), selector(pred_u_w, ignore_mask)
    box = cutmix_box1 == 1
    loss_trainer = KernelOps().loss(pred_u_s1, paste(box, t_mix.label, t_sel.label),
                                    paste(box, t_mix.weight, t_sel.weight), paste(box, ignore_mask_mix, ignore_mask))
    torch.testing.assert_close(loss_recipe, loss_trainer, rtol=0, atol=0)
    assert 0 < weight_u_w_cutmixed1[ignore_mask_cutmixed1 != 255].mean() < 1  # soft weights, not a 0/1 mask

    # UniMatch's own loss lines with the threshold mask replaced by the pasted weights, in float64
    valid = ignore_mask_cutmixed1 != 255
    unimatch_style = (F.cross_entropy(pred_u_s1.double(), mask_u_w_cutmixed1, reduction="none")
                      * weight_u_w_cutmixed1.double() * valid).sum() / valid.sum()
    torch.testing.assert_close(loss_recipe.double(), unimatch_style, rtol=1e-6, atol=1e-7)
    loss_recipe.backward()
    grad_recipe = pred_u_s1.grad.clone()
    pred_u_s1.grad = None
    unimatch_style.backward()
    torch.testing.assert_close(grad_recipe, pred_u_s1.grad, rtol=1e-5, atol=1e-7)

    # section 4: the trusted mask hides reliable pixels only, and only where the grid covers
    img_u_m = torch.randn(2, 3, 24, 20)
    masked, cover = ck.trusted_mask(img_u_m, sel.reliable, block=8, rate=0.7,
                                    generator=torch.Generator().manual_seed(0))
    assert not (cover & ~sel.reliable).any() and cover.any()
    torch.testing.assert_close(masked, torch.where(cover[:, None], torch.zeros(()), img_u_m))

    # section 4's second stream: masked samples take the masked view and no CutMix box, the others stay as they were
    img_u_s2 = torch.randn(2, 3, 24, 20)
    cutmix_box2 = torch.ones(2, 24, 20)
    use_tmp = torch.tensor([True, False])
    stream2 = torch.where(use_tmp[:, None, None, None], masked, img_u_s2)
    box2 = (cutmix_box2 == 1) & ~use_tmp[:, None, None]
    assert torch.equal(stream2[0], masked[0]) and torch.equal(stream2[1], img_u_s2[1])
    assert not box2[0].any() and box2[1].all()
    mask_u_w_cutmixed2 = mask_u_w.clone()
    mask_u_w_cutmixed2[box2] = mask_u_w_mix[box2]
    assert torch.equal(mask_u_w_cutmixed2, paste(box2, mask_u_w_mix, mask_u_w))
    assert torch.equal(mask_u_w_cutmixed2[0], mask_u_w[0])  # the masked sample trains on its own pseudo-labels


def test_with_the_threshold_the_recipe_is_unimatch_loss():
    pred_u_w, ignore_mask, _ = _batch(3)
    pred_u_s = _batch(4)[0]
    conf_u_w = pred_u_w.softmax(dim=1).max(dim=1)[0]
    mask_u_w = pred_u_w.argmax(dim=1)
    # UniMatch's lines (criterion_u = CrossEntropyLoss(reduction='none'))
    loss_u = F.cross_entropy(pred_u_s, mask_u_w, reduction="none")
    loss_u = loss_u * ((conf_u_w >= 0.95) & (ignore_mask != 255))
    unimatch = torch.sum(loss_u) / torch.sum(ignore_mask != 255).item()
    # the drop-in: threshold weights through the fused loss
    sel = ck.threshold_weights(pred_u_w, ignore_mask, tau=0.95)
    valid = ignore_mask != 255
    assert torch.equal(sel.label[valid], mask_u_w[valid])  # padded pixels carry label 0 and weight 0
    fused = ck.weighted_cross_entropy(pred_u_s, sel.label, sel.weight, ignore_mask)
    torch.testing.assert_close(fused, unimatch, rtol=1e-5, atol=1e-6)
