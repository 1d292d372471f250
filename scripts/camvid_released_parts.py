"""Which of the released rule's three differences from the paper's (docs/selection.md Sec. 2b) makes it keep almost
every pixel: its confidence feature (log), its residual variance (+ m^2 / (C - 1)), its preservation side (weight 1
below the reliable cluster's mean dispersion instead of above). All 8 combinations, through the float64 reference
(image groups, no mask, as in training), on a checkpoint's predictions of its split's unlabeled frames (made as
``csl analyze`` makes them); share / accuracy / recall of the pixels at weight 1 and of the soft weights, against the
ground truth (void ignored). The record's ``images`` counts the images scored; ``images_without_mask`` those read
but left out for want of a mask.

    .venv/bin/python scripts/camvid_released_parts.py --checkpoint runs/camvid/seed0/warmup/latest.pt \\
        --out parts.json data.root=../shared/data/camvid model.pretrained=../shared/weights/mobilenet_v2-b0353104.pth

The paper's rule is (prob, paper, above), the released code's (log, released, below); those two combinations are
checked against the package's own ``pcos_weights`` (reference backend) on the first image (the script stops if they
differ). 321 CamVid frames at 240 x 180 took 69-76 s on an idle 2-core CPU.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import csl_kernels  # noqa: E402
from csl.analyze import analysis_dataset  # noqa: E402
from csl.checkpoint import load_checkpoint  # noqa: E402
from csl.cli import config_for_checkpoint, model_from_checkpoint, stored_data_paths  # noqa: E402
from csl.data import default_eval_mode  # noqa: E402
from csl.evaluate import center_crop, predict_logits  # noqa: E402
from csl_kernels import IGNORE_INDEX  # noqa: E402

pcos_module = importlib.import_module("csl_kernels.pcos_weights")  # the package's attribute of that name is the op
COMBOS = list(itertools.product(("prob", "log"), ("paper", "released"), ("above", "below")))
_FEATURES = pcos_module.features_with_validity


def weights(logits: torch.Tensor, alpha: float, confidence: str, variance: str, side: str) -> torch.Tensor:
    """PCOS weights of one combination: the reference's ``released`` flag sets the side, and its features are
    computed with the variance asked for (the reference ties the two together; here they are set apart)."""
    pcos_module.features_with_validity = lambda z, valid, log_conf, _released: _FEATURES(
        z, valid, log_conf, variance == "released")
    try:
        return pcos_module.pcos_weights_reference(logits, None, alpha, confidence == "log", False,
                                                  side == "below").weight
    finally:
        pcos_module.features_with_validity = _FEATURES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", help="JSON file for the figures")
    parser.add_argument("--max-images", type=int)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    ckpt = load_checkpoint(args.checkpoint)
    cfg = config_for_checkpoint(args.checkpoint, ckpt, None, args.overrides)
    model, _ = model_from_checkpoint(cfg, ckpt, args.checkpoint, torch.device("cpu"))
    with stored_data_paths(args.checkpoint, None, args.overrides):
        dataset = analysis_dataset(cfg, "unlabeled")
    mode = cfg["eval"]["mode"] or default_eval_mode(cfg["data"]["dataset"])
    crop = cfg["eval"]["crop_size"] or cfg["data"]["crop_size"]
    alpha = float(cfg["selection"]["alpha"])
    sums = {c: {"hard": [0.0, 0.0], "weighted": [0.0, 0.0]} for c in COMBOS}  # selected, selected and correct
    total = all_correct = 0.0
    n_images = len(dataset) if args.max_images is None else min(len(dataset), args.max_images)
    worst, checked, without_mask = 0.0, False, 0
    with torch.no_grad():
        for i in tqdm(range(n_images), desc="images"):
            item = dataset[i]
            if item["mask"] is None:
                without_mask += 1
                continue
            image, target = item["image"].unsqueeze(0), item["mask"]
            logits = predict_logits(model, image, mode=mode, crop_size=crop,
                                    stride_ratio=cfg["eval"]["stride_ratio"]).float()
            if mode == "center_crop":
                target, image = center_crop(target, crop), center_crop(image, crop)
            valid = (target != IGNORE_INDEX).reshape(-1)
            label = logits.argmax(dim=1).reshape(-1)
            correct = (label == target.reshape(-1).long())[valid].double()
            total += float(valid.sum())
            all_correct += float(correct.sum())
            for combo in COMBOS:
                every = weights(logits, alpha, *combo).reshape(-1).double()  # every pixel: void ones too
                w = every[valid]
                for kind, sel in (("hard", (w >= 1.0).double()), ("weighted", w)):
                    sums[combo][kind][0] += float(sel.sum())
                    sums[combo][kind][1] += float((sel * correct).sum())
                if not checked and combo in (("prob", "paper", "above"), ("log", "released", "below")):
                    rule = "paper" if combo[1] == "paper" else "released"
                    package = csl_kernels.pcos_weights(logits, None, alpha=alpha, confidence=combo[0], rule=rule,
                                                       groups="image", backend="reference").weight
                    worst = max(worst, float((package.reshape(-1).double() - every).abs().max()))
                    if worst > 1e-5:
                        raise SystemExit(f"combination {combo} differs from pcos_weights(rule={rule!r}) by {worst}")
            checked = True
    scored = n_images - without_mask
    if total == 0:
        raise SystemExit(f"no valid (non-void) pixel in the {scored} image(s) with a mask of the {n_images} read "
                         f"({without_mask} without a mask): nothing to score the weights against")
    rows = []
    for combo in COMBOS:
        row = {"confidence": combo[0], "variance": combo[1], "side": combo[2]}
        for kind, (selected, selected_correct) in sums[combo].items():
            row[kind] = {"share": selected / total, "accuracy": selected_correct / max(selected, 1e-300),
                         "recall": selected_correct / all_correct}
        rows.append(row)
    print("| confidence | residual variance | weight 1 where the dispersion is | w = 1: share / accuracy / recall (%) "
          "| weighted: share / accuracy / recall (%) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [" / ".join(f"{100 * r[k][m]:.1f}" for m in ("share", "accuracy", "recall"))
                 for k in ("hard", "weighted")]
        print(f"| {r['confidence']} | {r['variance']} | {r['side']} the mean | {cells[0]} | {cells[1]} |")
    print(f"all pixels: accuracy {100 * all_correct / total:.1f} %, {int(total)} valid pixels of {scored} images"
          + (f" ({without_mask} more without a mask, not scored)" if without_mask else "")
          + f"; the two rules match pcos_weights within {worst:.1e} (first image); {time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "images": scored, "images_without_mask": without_mask,
                       "valid_pixels": total, "all_pixels_accuracy": all_correct / total, "alpha": alpha, "rows": rows,
                       "max_dev_from_pcos_weights": worst}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
