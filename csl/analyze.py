"""``csl analyze``: which rule selects the better pseudo-labels, on a trained model's real predictions.

The paper's Tab. 9 question, asked of any checkpoint and any images that have masks (by default the unlabeled part
of the split, whose true masks training never reads). Every image is predicted at full size (the config's
evaluation mode), and each selection rule is applied to the prediction exactly as in training — it sees the logits
only, never the mask. Against the masks the analysis then reports, overall and per class:

- **share**: the selected share of the valid pixels (for soft weights: the mean weight);
- **accuracy**: the share of correct pseudo-labels among the selected pixels (weighted by the soft weight);
- **recall**: the share of the correct pseudo-labels that are selected (weighted likewise).

Rules: the confidence threshold over a sweep of ``tau`` (0.95 = FixMatch / UniMatch), CSL per image and per
(image, class) — hard (``reliable``, weight 1) and weighted (the Gaussian soft weight) — and entropy and margin
scores swept over the same shares; each score is also cut at CSL's weighted share, so the rules compare at equal
quantity. Per class: share and accuracy by pseudo-label class, recall by true class.

Output folder: ``analysis.json`` and the pictures ``accuracy_recall.png`` (the sweeps with the CSL points),
``feature_plane.png`` (the confidence / residual-dispersion plane of one image: the PCOS clusters, the Gaussian
weight contours and the threshold line — the paper's Fig. 1 view), ``per_class.png`` and ``panels.png`` (image,
ground truth, prediction, CSL weight, threshold mask, TMP cover for a few images).
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import torch

import csl_kernels
from csl_kernels import IGNORE_INDEX

log = logging.getLogger("csl")

DEFAULT_TAUS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)
DEFAULT_SHARES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
BASELINE_TAU = 0.95


# ---------------------------------------------------------------------------------------------------------------
# Selection quality of pixel arrays.


def selection_quality(weight: np.ndarray, correct: np.ndarray, pred: np.ndarray, target: np.ndarray,
                      num_classes: int) -> dict:
    """Share, accuracy and recall of a selection over valid pixels (1-D arrays of one length).

    ``weight``: 0/1 for a hard selection or the soft weight in [0, 1]; ``correct``: pseudo-label == ground truth;
    ``pred`` / ``target``: pseudo-label and true class. Per class: ``share`` and ``accuracy`` grouped by pseudo-label
    class, ``recall`` by true class (NaN where a class has no pixel)."""
    w = weight.astype(np.float64)
    wc = w * correct
    total, selected, selected_correct, all_correct = len(w), w.sum(), wc.sum(), float(correct.sum())

    def ratio(num, den):
        num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
        return np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)

    by_pred = np.bincount(pred, minlength=num_classes)[:num_classes]
    sel_pred = np.bincount(pred, weights=w, minlength=num_classes)[:num_classes]
    selc_pred = np.bincount(pred, weights=wc, minlength=num_classes)[:num_classes]
    selc_true = np.bincount(target, weights=wc, minlength=num_classes)[:num_classes]
    corr_true = np.bincount(target, weights=correct.astype(np.float64), minlength=num_classes)[:num_classes]
    return {
        "share": float(ratio(selected, total)),
        "accuracy": float(ratio(selected_correct, selected)),
        "recall": float(ratio(selected_correct, all_correct)),
        "per_class": {
            "share": _nan_to_none(ratio(sel_pred, by_pred)),
            "accuracy": _nan_to_none(ratio(selc_pred, sel_pred)),
            "recall": _nan_to_none(ratio(selc_true, corr_true)),
        },
    }


def _nan_to_none(values: np.ndarray) -> list:
    return [None if v != v else float(v) for v in np.asarray(values).tolist()]


def _cut_at_share(score: np.ndarray, share: float, higher_is_better: bool) -> np.ndarray:
    """Boolean selection of the best ``share`` of the pixels by ``score`` (ties at the cut all selected)."""
    s = score if higher_is_better else -score
    cut = np.quantile(s, 1.0 - share) if share < 1 else -np.inf
    return s >= cut


# ---------------------------------------------------------------------------------------------------------------
# Per-image predictions and the rules applied to them.


class _Pixels:
    """Valid pixels of every analysed image, concatenated."""

    KEYS = ("conf", "dispersion", "entropy", "margin", "w_csl", "w_class", "w_released", "pred", "target")

    def __init__(self):
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in self.KEYS}

    def add(self, **arrays: np.ndarray) -> None:
        for k in self.KEYS:
            self.parts[k].append(arrays[k])

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.parts.items()}


def _image_outputs(logits: torch.Tensor, alpha: float, confidence: str, backend: str) -> dict[str, torch.Tensor]:
    """Every rule's per-pixel output for ``1 x C x H x W`` logits (no mask involved, as in training)."""
    sel = csl_kernels.pcos_weights(logits, None, alpha=alpha, confidence=confidence, groups="image",
                                   backend=backend, return_stats=True)
    sel_class = csl_kernels.pcos_weights(logits, None, alpha=alpha, confidence=confidence, groups="class",
                                         backend=backend)
    # The authors' released rule (its own log confidence; docs/selection.md Sec. 2b), image groups.
    sel_released = csl_kernels.pcos_weights(logits, None, alpha=alpha, groups="image", rule="released",
                                            backend=backend)
    f0, dispersion, _ = csl_kernels.residual_features(logits, None, confidence=confidence, backend=backend)
    return {
        "sel": sel,
        "w_class": sel_class.weight,
        "w_released": sel_released.weight,
        "f0": f0,
        "conf": csl_kernels.selection_scores(logits, None, score="confidence"),
        "dispersion": dispersion,
        "entropy": csl_kernels.selection_scores(logits, None, score="entropy"),
        "margin": csl_kernels.selection_scores(logits, None, score="margin"),
    }


def analysis_dataset(cfg: dict, split: str = "unlabeled"):
    """Full images with masks: the unlabeled part of the config's split (``split="unlabeled"``, default) or its
    validation set (``"val"``), as a :class:`csl.data.ValDataset`."""
    from .data import ValDataset, build_datasets, build_val_dataset

    data_cfg = {k: v for k, v in cfg["data"].items() if v is not None}
    if split == "val":
        return build_val_dataset(data_cfg)
    if split != "unlabeled":
        raise ValueError(f"split must be 'unlabeled' or 'val', got {split!r}")
    bundle = build_datasets(data_cfg, need_val=False)
    if bundle.unlabeled is None:
        raise ValueError("the config names no unlabeled list (data.split_dir or data.unlabeled_list); pass "
                         "--split val to analyse the validation images")
    source = bundle.unlabeled.source
    if not getattr(source, "has_masks", False):
        raise ValueError(f"the unlabeled list {source.description} has no mask paths, so the pseudo-labels cannot be "
                         f"checked; pass --split val, or a list whose lines carry masks")
    return ValDataset(source, mean=bundle.unlabeled.mean, std=bundle.unlabeled.std,
                      ignore_index=bundle.unlabeled.ignore_index)


def _pick(n_items: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(n_items)``."""
    if count <= 0 or n_items == 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n_items - 1, min(count, n_items))})


def run_analysis(checkpoint: str, out_dir: str, *, overrides: list[str] | None = None, config: str | None = None,
                 split: str = "unlabeled", max_images: int | None = None, taus=DEFAULT_TAUS,
                 shares=DEFAULT_SHARES, panels: int = 4, progress: bool = True) -> dict:
    """Analyse ``checkpoint`` on the images of ``split`` and write ``analysis.json`` and the pictures into
    ``out_dir``. Returns the JSON content."""
    from tqdm import tqdm

    from .checkpoint import load_checkpoint
    from .cli import model_from_checkpoint
    from .config import build_config, load_config
    from .data import class_names, default_eval_mode
    from .distributed import pick_device
    from .evaluate import center_crop, predict_logits

    start = time.perf_counter()
    ckpt = load_checkpoint(checkpoint)
    if config:
        cfg = load_config(config, overrides)
    else:
        if not isinstance(ckpt.get("config"), dict):
            raise ValueError(f"{checkpoint} stores no config; pass --config")
        cfg = build_config(ckpt["config"], overrides)
    device = pick_device(cfg["device"])
    model, num_classes = model_from_checkpoint(cfg, ckpt, checkpoint, device)
    dataset = analysis_dataset(cfg, split)
    n_images = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    if n_images < 1:
        raise ValueError(f"no image to analyse (max_images={max_images})")
    mode = cfg["eval"]["mode"] or default_eval_mode(cfg["data"]["dataset"])
    crop = cfg["eval"]["crop_size"] or cfg["data"]["crop_size"]
    sel_cfg, ignore_index = cfg["selection"], IGNORE_INDEX  # the datasets map the files' ignore value to it
    alpha, backend = float(sel_cfg["alpha"]), cfg["kernels"]["backend"]
    confidence = sel_cfg["confidence"] or "prob"  # the paper's rule is analysed with the config's confidence
    shown = set(_pick(n_images, panels))
    pixels, examples = _Pixels(), []
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in tqdm(range(n_images), desc="analyze", disable=not progress):
            item = dataset[i]
            image = item["image"].unsqueeze(0).to(device)
            target = item["mask"]
            logits = predict_logits(model, image, mode=mode, crop_size=crop,
                                    stride_ratio=cfg["eval"]["stride_ratio"]).float()
            if mode == "center_crop":
                target, image = center_crop(target, crop), center_crop(image, crop)
            out = _image_outputs(logits, alpha, confidence, backend)
            sel = out["sel"]
            valid = (target != ignore_index).reshape(-1).numpy()
            pred = sel.label[0].cpu().reshape(-1).numpy()
            tgt = target.reshape(-1).numpy()
            flat = {k: out[k][0].cpu().reshape(-1).numpy() for k in ("conf", "dispersion", "entropy", "margin")}
            pixels.add(**{k: v[valid] for k, v in flat.items()}, w_csl=sel.weight[0].cpu().reshape(-1).numpy()[valid],
                       w_class=out["w_class"][0].cpu().reshape(-1).numpy()[valid],
                       w_released=out["w_released"][0].cpu().reshape(-1).numpy()[valid],
                       pred=pred[valid].astype(np.int16), target=tgt[valid].astype(np.int16))
            if i in shown:
                stats = sel.stats
                _, cover = csl_kernels.trusted_mask(image.cpu(), sel.reliable.cpu(), block=cfg["tmp"]["block"],
                                                    rate=cfg["tmp"]["rate"], generator=generator, backend=backend)
                examples.append({
                    "name": item["name"], "image": _denormalize(image[0].cpu(), dataset.mean, dataset.std),
                    "target": target.numpy(), "pred": sel.label[0].cpu().numpy(),
                    "weight": sel.weight[0].cpu().numpy(), "conf": out["conf"][0].cpu().numpy(),
                    "f0": out["f0"][0].cpu().numpy(), "dispersion": out["dispersion"][0].cpu().numpy(),
                    "cover": cover[0].numpy(), "mu": stats.mu[0].cpu().numpy(), "var": stats.var[0].cpu().numpy(),
                    "chosen": int(stats.chosen[0]), "ignore_index": ignore_index,
                })
    arrays = pixels.arrays()
    result = summarize(arrays, num_classes, taus=taus, shares=shares)
    names = class_names(cfg["data"], num_classes)
    result.update({
        "checkpoint": os.path.abspath(checkpoint), "split": split, "images": n_images,
        "valid_pixels": int(len(arrays["pred"])), "eval_mode": mode, "alpha": alpha, "confidence": confidence,
        "num_classes": num_classes, "class_names": names, "seconds": time.perf_counter() - start,
        "model_accuracy": float((arrays["pred"] == arrays["target"]).mean()) if len(arrays["pred"]) else None,
    })
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "analysis.json"), "w") as f:
        json.dump(result, f, indent=1)
    from .plots import plot_analysis

    result["pictures"] = plot_analysis(result, examples, out_dir, alpha=alpha, tau=BASELINE_TAU,
                                       dataset=cfg["data"]["dataset"])
    with open(os.path.join(out_dir, "analysis.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def summarize(arrays: dict[str, np.ndarray], num_classes: int, *, taus=DEFAULT_TAUS, shares=DEFAULT_SHARES) -> dict:
    """Every rule's :func:`selection_quality` from the concatenated valid pixels."""
    pred, target = arrays["pred"].astype(np.int64), arrays["target"].astype(np.int64)
    correct = pred == target

    def quality(weight):
        return selection_quality(weight, correct, pred, target, num_classes)

    w_csl, w_class = arrays["w_csl"], arrays["w_class"]
    csl_share = float(w_csl.mean()) if len(w_csl) else float("nan")
    scores = {"confidence": (arrays["conf"], True), "entropy": (arrays["entropy"], False),
              "margin": (arrays["margin"], True)}
    out = {
        "threshold": [{"tau": float(t), **quality(arrays["conf"] >= t)} for t in taus],
        "csl": {"hard": quality(w_csl >= 1.0), "weighted": quality(w_csl)},
        "csl_class": {"hard": quality(w_class >= 1.0), "weighted": quality(w_class)},
        "csl_released": {"hard": quality(arrays["w_released"] >= 1.0), "weighted": quality(arrays["w_released"])},
        "all_pixels": quality(np.ones_like(w_csl)),
        "sweeps": {name: [{"share": float(s), **quality(_cut_at_share(score, s, hib))} for s in shares]
                   for name, (score, hib) in scores.items() if name != "confidence"},
        "at_csl_share": {name: {"share_target": csl_share, **quality(_cut_at_share(score, csl_share, hib))}
                         for name, (score, hib) in scores.items()} if len(w_csl) else {},
    }
    if "w_released" in arrays and len(w_csl):  # the confidence ranking at the released rule's weighted share
        share = float(arrays["w_released"].mean())
        out["confidence_at_released_share"] = {"share_target": share,
                                               **quality(_cut_at_share(arrays["conf"], share, True))}
    return out


def baseline_row(result: dict, tau: float = BASELINE_TAU) -> dict | None:
    """The threshold-sweep entry of ``tau`` (0.95 = UniMatch) of an analysis result, or None when not swept."""
    return next((r for r in result["threshold"] if abs(r["tau"] - tau) < 1e-9), None)


def _denormalize(image: torch.Tensor, mean, std) -> np.ndarray:
    img = image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


__all__ = ["BASELINE_TAU", "DEFAULT_SHARES", "DEFAULT_TAUS", "analysis_dataset", "baseline_row", "run_analysis",
           "selection_quality", "summarize"]
