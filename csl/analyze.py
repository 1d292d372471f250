"""``csl analyze``: which rule selects the better pseudo-labels, on a trained model's real predictions.

The paper's Tab. 9 question, asked of any checkpoint and any images that have masks (by default the unlabeled part
of the split, whose true masks training never reads). Every image is predicted at full size (the config's
evaluation mode, BatchNorm in eval mode), and each selection rule is applied to the prediction as in training — it
sees the logits only, never the mask (training selects from train-mode predictions of crops, so its shares are close
to, not equal to, these). Against the masks the analysis then reports, overall and per class:

- **share**: the selected share of the valid pixels (for soft weights: the mean weight);
- **accuracy**: the share of correct pseudo-labels among the selected pixels (weighted by the soft weight);
- **recall**: the share of the correct pseudo-labels that are selected (weighted likewise).

Rules: the confidence threshold over a sweep of ``tau`` (0.95 = FixMatch / UniMatch), CSL per image and per
(image, class) — hard (``reliable``, weight 1) and weighted (the Gaussian soft weight) — and entropy and margin
scores swept over the same shares; each score is also cut at CSL's weighted share, so the rules compare at equal
quantity: over all images' pixels pooled (a cut that may give easy images more and hard ones less than CSL does) and,
for the confidence, image by image at each image's CSL amount (``round(sum of its weights)`` pixels, as the trained
control ``selection.mode=confidence_share``). Per class: share and accuracy by pseudo-label class, recall by true
class.

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

from .files import atomic_write_text
from .logging_utils import with_progress

log = logging.getLogger("csl")

DEFAULT_TAUS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)
DEFAULT_SHARES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
BASELINE_TAU = 0.95
ANALYSIS_OPS = ("pcos_weights", "residual_features", "trusted_mask")  # the kernels kernels.backend runs here


# ---------------------------------------------------------------------------------------------------------------
# Selection quality of pixel arrays.


def _bincount(values: np.ndarray, num_classes: int, weights: np.ndarray | None = None) -> np.ndarray:
    return np.bincount(values, weights=weights, minlength=num_classes)[:num_classes].astype(np.float64)


def _counts(weight: np.ndarray, correct: np.ndarray, pred: np.ndarray, target: np.ndarray, num_classes: int) -> dict:
    """The sums :func:`_quality` needs, which add up over images: overall and per class."""
    w = weight.astype(np.float64)
    wc = w * correct
    return {"total": float(len(w)), "selected": float(w.sum()), "selected_correct": float(wc.sum()),
            "all_correct": float(correct.sum()), "by_pred": _bincount(pred, num_classes),
            "sel_pred": _bincount(pred, num_classes, w), "selc_pred": _bincount(pred, num_classes, wc),
            "selc_true": _bincount(target, num_classes, wc),
            "corr_true": _bincount(target, num_classes, correct.astype(np.float64))}


def _add_counts(into: dict, counts: dict) -> None:
    for k, v in counts.items():
        into[k] = into[k] + v if k in into else v


def _ratio(num, den) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)


def _quality(c: dict) -> dict:
    return {
        "share": _none_if_nan(_ratio(c["selected"], c["total"])),
        "accuracy": _none_if_nan(_ratio(c["selected_correct"], c["selected"])),
        "recall": _none_if_nan(_ratio(c["selected_correct"], c["all_correct"])),
        "per_class": {
            "share": _nan_to_none(_ratio(c["sel_pred"], c["by_pred"])),
            "accuracy": _nan_to_none(_ratio(c["selc_pred"], c["sel_pred"])),
            "recall": _nan_to_none(_ratio(c["selc_true"], c["corr_true"])),
            # the denominators' sizes, so a ratio over a handful of pixels can be told from a measured one:
            # pixels predicted as the class, the selected weight among them, correct pixels of the true class
            "pixels_predicted": [float(v) for v in c["by_pred"]],
            "selected_weight": [float(v) for v in c["sel_pred"]],
            "correct_of_class": [float(v) for v in c["corr_true"]],
        },
    }


def selection_quality(weight: np.ndarray, correct: np.ndarray, pred: np.ndarray, target: np.ndarray,
                      num_classes: int) -> dict:
    """Share, accuracy and recall of a selection over valid pixels (1-D arrays of one length).

    ``weight``: 0/1 for a hard selection or the soft weight in [0, 1]; ``correct``: pseudo-label == ground truth;
    ``pred`` / ``target``: pseudo-label and true class. Per class: ``share`` and ``accuracy`` grouped by pseudo-label
    class, ``recall`` by true class. A ratio without pixels (nothing selected, a class absent) is None, so
    ``analysis.json`` stays strict JSON."""
    return _quality(_counts(weight, correct, pred, target, num_classes))


def _none_if_nan(value) -> float | None:
    value = float(value)
    return None if value != value else value


def _nan_to_none(values: np.ndarray) -> list:
    return [None if v != v else float(v) for v in np.asarray(values).tolist()]


def _cut_at_share(score: np.ndarray, share: float, higher_is_better: bool, seed: int = 0) -> np.ndarray:
    """Boolean selection of exactly ``round(share * n)`` pixels, the best by ``score``. Pixels tied at the cut (a
    saturated confidence of exactly 1.0 covers large areas) are drawn at random with a fixed seed, so every rule
    compared at a share selects the same quantity."""
    n = len(score)
    k = min(n, max(0, int(round(share * n))))
    chosen = np.zeros(n, dtype=bool)
    if k == 0:
        return chosen
    s = score if higher_is_better else -score
    cut = np.partition(s, n - k)[n - k]  # the k-th largest value
    above = s > cut
    chosen |= above
    tied = np.flatnonzero(s == cut)
    need = k - int(above.sum())
    chosen[np.random.default_rng(seed).choice(tied, size=need, replace=False)] = True
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# Per-image predictions and the rules applied to them.

# Pixels kept for the rules that rank all pixels together (cuts at a share): beyond this many, a uniform random
# sample of this size is kept (the thresholds and the CSL rules are always counted on every pixel).
DEFAULT_MAX_RANKED_PIXELS = 20_000_000


class _Tally:
    """What the analysis needs of every valid pixel, added image by image.

    The rules that decide pixel by pixel (threshold sweep, the three CSL rules, all pixels) are counted exactly as
    they come. The rules cut at a share of all pixels (entropy and margin sweeps, every score at CSL's share) rank
    the pixels of every image together: their scores are kept, for at most ``max_ranked`` pixels — beyond that a
    uniform Bernoulli sample whose rate halves whenever it would grow past the limit (about 16 B per kept pixel; a
    Pascal VOC unlabeled set has ~1.7 billion valid pixels)."""

    RANKED = ("conf", "entropy", "margin", "pred", "target")

    def __init__(self, num_classes: int, taus, max_ranked: int = DEFAULT_MAX_RANKED_PIXELS, seed: int = 0):
        if max_ranked < 1:
            raise ValueError(f"max_ranked must be >= 1, got {max_ranked}")
        self.num_classes, self.taus, self.max_ranked = num_classes, tuple(taus), int(max_ranked)
        self.counts: dict[str, dict] = {}
        self.pixels = 0
        self.w_csl_sum = self.w_released_sum = 0.0
        self.rate = 1.0
        self.kept: dict[str, list[np.ndarray]] = {k: [] for k in self.RANKED}
        self.n_kept = 0
        self.rng = np.random.default_rng(seed)

    def _count(self, name: str, weight: np.ndarray, correct, pred, target) -> None:
        _add_counts(self.counts.setdefault(name, {}), _counts(weight, correct, pred, target, self.num_classes))

    def add(self, *, conf, entropy, margin, w_csl, w_class, w_released, pred, target, **_unused) -> None:
        """One image's valid pixels (1-D arrays of one length)."""
        pred, target = pred.astype(np.int64), target.astype(np.int64)
        correct = pred == target
        for t in self.taus:
            self._count(f"tau={t!r}", conf >= t, correct, pred, target)
        for name, w in (("csl", w_csl), ("csl_class", w_class), ("csl_released", w_released)):
            self._count(f"{name}/hard", w >= 1.0, correct, pred, target)
            self._count(f"{name}/weighted", w, correct, pred, target)
        self._count("all", np.ones(len(pred), dtype=bool), correct, pred, target)
        # The confidence ranking with this image's CSL amount (round(sum of its weights) pixels): CSL's quantity per
        # image, the confidence's choice within the image, as the trained control selection.mode=confidence_share.
        image_share = float(np.sum(w_csl, dtype=np.float64)) / max(len(pred), 1)
        self._count("confidence_per_image_at_csl", _cut_at_share(conf, image_share, True), correct, pred, target)
        self.pixels += len(pred)
        self.w_csl_sum += float(np.sum(w_csl, dtype=np.float64))
        self.w_released_sum += float(np.sum(w_released, dtype=np.float64))
        keep = slice(None) if self.rate >= 1 else self.rng.random(len(pred)) < self.rate
        for k, v in (("conf", conf), ("entropy", entropy), ("margin", margin), ("pred", pred), ("target", target)):
            v = v[keep]
            self.kept[k].append(v.astype(np.int16) if k in ("pred", "target") else v.astype(np.float32))
        self.n_kept += len(self.kept["pred"][-1])
        while self.n_kept > self.max_ranked:  # halve the rate: every kept pixel stays with probability 1/2
            self.rate /= 2
            for i in range(len(self.kept["pred"])):
                half = self.rng.random(len(self.kept["pred"][i])) < 0.5
                for k in self.RANKED:
                    self.kept[k][i] = self.kept[k][i][half]
            self.n_kept = sum(len(a) for a in self.kept["pred"])

    def result(self, shares=DEFAULT_SHARES) -> dict:
        q = {name: _quality(c) for name, c in self.counts.items()}
        ranked = {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.kept.items()}
        pred, target = ranked["pred"].astype(np.int64), ranked["target"].astype(np.int64)
        correct = pred == target

        def cut_quality(score, share, hib):
            return selection_quality(_cut_at_share(score, share, hib), correct, pred, target, self.num_classes)

        scores = {"confidence": (ranked["conf"], True), "entropy": (ranked["entropy"], False),
                  "margin": (ranked["margin"], True)}
        out = {
            "threshold": [{"tau": float(t), **q[f"tau={t!r}"]} for t in self.taus],
            **{name: {"hard": q[f"{name}/hard"], "weighted": q[f"{name}/weighted"]}
               for name in ("csl", "csl_class", "csl_released")},
            "all_pixels": q["all"],
            "ranked_pixels": {"kept": int(len(pred)), "of": int(self.pixels), "rate": self.rate},
            # counted on every pixel, not on the ranked sample
            "confidence_per_image_at_csl_share": q["confidence_per_image_at_csl"],
        }
        if len(pred) == 0:  # no pixel, or a sample halved down to none (a tiny --max-ranked-pixels)
            return {**out, "sweeps": {}, "at_csl_share": {}, "confidence_at_released_share": None}
        csl_share, released_share = self.w_csl_sum / self.pixels, self.w_released_sum / self.pixels
        out["sweeps"] = {name: [{"share": float(s), **cut_quality(score, s, hib)} for s in shares]
                         for name, (score, hib) in scores.items() if name != "confidence"}
        out["at_csl_share"] = {name: {"share_target": csl_share, **cut_quality(score, csl_share, hib)}
                               for name, (score, hib) in scores.items()}
        # the confidence ranking at the released rule's weighted share
        out["confidence_at_released_share"] = {"share_target": released_share,
                                               **cut_quality(ranked["conf"], released_share, True)}
        return out


def _image_outputs(logits: torch.Tensor, alpha: float, confidence: str, backend: str,
                   released_confidence: str | None = None) -> dict[str, torch.Tensor]:
    """Every rule's per-pixel output for ``1 x C x H x W`` logits (no mask involved, as in training)."""
    sel = csl_kernels.pcos_weights(logits, None, alpha=alpha, confidence=confidence, groups="image",
                                   backend=backend, return_stats=True)
    sel_class = csl_kernels.pcos_weights(logits, None, alpha=alpha, confidence=confidence, groups="class",
                                         backend=backend)
    # The authors' released rule (docs/selection.md Sec. 2b; None: its own log confidence), image groups.
    sel_released = csl_kernels.pcos_weights(logits, None, alpha=alpha, groups="image", rule="released",
                                            confidence=released_confidence, backend=backend)
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
                      ignore_index=bundle.unlabeled.ignore_index, optional_masks=True)


def _pick(n_items: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(n_items)``."""
    if count <= 0 or n_items == 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n_items - 1, min(count, n_items))})


PICTURES = ("accuracy_recall.png", "feature_plane.png", "per_class.png", "panels.png")


def prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    """Refuse a folder that holds an analysis unless ``overwrite``. The pictures of an earlier analysis go first, also
    those of one stopped before its JSON (written last), so that none is left beside the new JSON."""
    existing = os.path.join(out_dir, "analysis.json")
    if os.path.exists(existing) and not overwrite:
        raise ValueError(f"{out_dir} already holds an analysis ({existing}); pass --overwrite to replace it, or "
                         f"--out another folder")
    for name in ("analysis.json", *PICTURES):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    os.makedirs(out_dir, exist_ok=True)


def split_suffix(split: str) -> str:
    """What an analysis folder's name adds for ``split``: nothing for the unlabeled images, ``_val`` for ``val``."""
    return "" if split == "unlabeled" else f"_{split}"


def default_out_dir(checkpoint: str, split: str = "unlabeled") -> str:
    """``<demo folder>/analysis/<run>`` for a run of a ``csl demo`` folder (where ``csl.report`` reads it), else
    ``<checkpoint folder>/analysis``; :func:`split_suffix` appended."""
    run_dir = os.path.dirname(os.path.abspath(checkpoint))
    suffix = split_suffix(split)
    parent = os.path.dirname(run_dir)
    if os.path.isfile(os.path.join(parent, "summary.json")):
        return os.path.join(parent, "analysis", os.path.basename(run_dir) + suffix)
    return os.path.join(run_dir, "analysis" + suffix)


def run_analysis(checkpoint: str, out_dir: str, *, overrides: list[str] | None = None, config: str | None = None,
                 split: str = "unlabeled", max_images: int | None = None, taus=DEFAULT_TAUS,
                 shares=DEFAULT_SHARES, panels: int = 4, progress: bool = True,
                 max_ranked_pixels: int = DEFAULT_MAX_RANKED_PIXELS, overwrite: bool = False) -> dict:
    """Analyse ``checkpoint`` on the images of ``split`` and write ``analysis.json`` and the pictures into
    ``out_dir`` (refused when it holds an analysis, unless ``overwrite``). Returns the JSON content.

    Unlabeled images whose mask is missing or unusable are skipped (one warning; listed in ``skipped_images``), as
    training treats them; a validation mask must be there."""

    from .checkpoint import load_checkpoint
    from .cli import config_for_checkpoint, model_from_checkpoint, stored_data_paths
    from .data import class_names, default_eval_mode
    from .distributed import pick_device
    from .evaluate import center_crop, predict_logits
    from .run_folder import check_output_folder
    from .trainer import check_kernels_backend

    start = time.perf_counter()
    check_output_folder(out_dir)
    if max_ranked_pixels < 1:
        raise ValueError(f"max_ranked_pixels (--max-ranked-pixels) must be >= 1, got {max_ranked_pixels}")
    if panels < 0:
        raise ValueError(f"panels (--panels) must be >= 0, got {panels}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images (--max-images) must be >= 1, got {max_images}")
    if not overwrite and os.path.exists(os.path.join(out_dir, "analysis.json")):
        prepare_out_dir(out_dir, overwrite)  # refused before hours of prediction
    ckpt = load_checkpoint(checkpoint)
    cfg = config_for_checkpoint(checkpoint, ckpt, config, overrides)
    device = pick_device(cfg["device"])
    check_kernels_backend(cfg["kernels"]["backend"], device, ops=ANALYSIS_OPS)
    model, num_classes = model_from_checkpoint(cfg, ckpt, checkpoint, device)
    with stored_data_paths(checkpoint, config, overrides):
        dataset = analysis_dataset(cfg, split)
    n_images = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    if n_images < 1:
        raise ValueError(f"no image to analyse: the {split} set is empty")
    mode = cfg["eval"]["mode"] or default_eval_mode(cfg["data"]["dataset"])
    crop = cfg["eval"]["crop_size"] or cfg["data"]["crop_size"]
    sel_cfg, ignore_index = cfg["selection"], IGNORE_INDEX  # the datasets map the files' ignore value to it
    alpha, backend = float(sel_cfg["alpha"]), cfg["kernels"]["backend"]
    # The config's confidence applies to the rule the config trains; the other rule is analysed with its default.
    trained_released = sel_cfg["rule"] == "released"
    confidence = (None if trained_released else sel_cfg["confidence"]) or "prob"
    released_confidence = sel_cfg["confidence"] if trained_released else None
    shown = set(_pick(n_images, max(panels, 1)))  # the first is also feature_plane.png's image
    tally, examples, skipped = _Tally(num_classes, taus, max_ranked_pixels), [], []
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in with_progress(range(n_images), desc="analyze", enabled=progress):
            item = dataset[i]
            if item["mask"] is None:
                skipped.append(item["name"])
                continue
            image = item["image"].unsqueeze(0).to(device)
            target = item["mask"]
            logits = predict_logits(model, image, mode=mode, crop_size=crop,
                                    stride_ratio=cfg["eval"]["stride_ratio"]).float()
            if mode == "center_crop":
                target, image = center_crop(target, crop), center_crop(image, crop)
            out = _image_outputs(logits, alpha, confidence, backend, released_confidence)
            sel = out["sel"]
            valid = (target != ignore_index).reshape(-1).numpy()

            def flat(t: torch.Tensor, valid=valid) -> np.ndarray:
                return t[0].cpu().reshape(-1).numpy()[valid]

            tally.add(conf=flat(out["conf"]), entropy=flat(out["entropy"]), margin=flat(out["margin"]),
                      w_csl=flat(sel.weight), w_class=flat(out["w_class"]), w_released=flat(out["w_released"]),
                      pred=flat(sel.label), target=target.reshape(-1).numpy()[valid])
            if i in shown:
                stats = sel.stats
                _, cover = csl_kernels.trusted_mask(image, sel.reliable, block=cfg["tmp"]["block"],
                                                    rate=cfg["tmp"]["rate"], generator=generator, backend=backend)
                examples.append({
                    "name": item["name"], "image": _denormalize(image[0].cpu(), dataset.mean, dataset.std),
                    "target": target.numpy(), "pred": sel.label[0].cpu().numpy(),
                    "weight": sel.weight[0].cpu().numpy(), "conf": out["conf"][0].cpu().numpy(),
                    "f0": out["f0"][0].cpu().numpy(), "dispersion": out["dispersion"][0].cpu().numpy(),
                    "cover": cover[0].cpu().numpy(), "mu": stats.mu[0].cpu().numpy(), "var": stats.var[0].cpu().numpy(),
                    "chosen": int(stats.chosen[0]), "ignore_index": ignore_index,
                })
    if tally.pixels == 0:
        analysed = n_images - len(skipped)
        raise ValueError(f"no valid (non-ignored) pixel in the {analysed} analysed image(s) of the {split} images"
                         + (f" ({len(skipped)} skipped without a usable mask)" if skipped else "")
                         + ": nothing to score the pseudo-labels against")
    if tally.rate < 1:
        log.info("csl analyze: the share cuts rank a uniform sample of %d of the %d valid pixels (rate %.3g, "
                 "--max-ranked-pixels); the thresholds and the CSL rules count every pixel", tally.n_kept,
                 tally.pixels, tally.rate)
    result = tally.result(shares)
    names = class_names(cfg["data"], num_classes)
    result.update({
        "checkpoint": os.path.abspath(checkpoint), "checkpoint_iteration": ckpt.get("iteration"), "split": split,
        "images": n_images - len(skipped), "skipped_images": skipped, "valid_pixels": int(tally.pixels),
        "eval_mode": mode, "alpha": alpha, "confidence": confidence,
        "released_confidence": released_confidence or "log", "rule": sel_cfg["rule"], "num_classes": num_classes,
        "class_names": names,
        "seconds": time.perf_counter() - start, "model_accuracy": result["all_pixels"]["accuracy"],
    })
    prepare_out_dir(out_dir, overwrite)
    from .plots import plot_analysis

    result["pictures"] = plot_analysis(result, examples, out_dir, alpha=alpha, tau=BASELINE_TAU,
                                       dataset=cfg["data"]["dataset"], panels=panels > 0)
    atomic_write_text(os.path.join(out_dir, "analysis.json"), json.dumps(result, indent=1, allow_nan=False))
    return result


def summarize(arrays: dict[str, np.ndarray], num_classes: int, *, taus=DEFAULT_TAUS, shares=DEFAULT_SHARES,
              max_ranked: int = DEFAULT_MAX_RANKED_PIXELS) -> dict:
    """Every rule's quality (:func:`selection_quality`) from the valid pixels of all images at once."""
    tally = _Tally(num_classes, taus, max_ranked)
    tally.add(**arrays)
    return tally.result(shares)


def baseline_row(result: dict, tau: float = BASELINE_TAU) -> dict | None:
    """The threshold-sweep entry of ``tau`` (0.95 = UniMatch) of an analysis result, or None when not swept."""
    return next((r for r in result["threshold"] if abs(r["tau"] - tau) < 1e-9), None)


def _denormalize(image: torch.Tensor, mean, std) -> np.ndarray:
    img = image * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


__all__ = ["BASELINE_TAU", "DEFAULT_SHARES", "DEFAULT_TAUS", "analysis_dataset", "baseline_row", "run_analysis",
           "default_out_dir", "selection_quality", "summarize"]
