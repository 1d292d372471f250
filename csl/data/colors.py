"""Colour palettes for prediction PNGs."""

from __future__ import annotations

import numpy as np

# Cityscapes train-id colours (19 classes), as published with the dataset's scripts.
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)

# CamVid's 11 classes in the colours of the SegNet tutorial's CamVid release (sky, building, pole, road, sidewalk,
# tree, sign, fence, car, pedestrian, bicyclist).
CAMVID_PALETTE = np.array([
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0), (192, 128, 128),
    (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
], dtype=np.uint8)
DATASET_PALETTES = {"cityscapes": CITYSCAPES_PALETTE, "camvid": CAMVID_PALETTE}


def voc_palette(n: int = 256) -> np.ndarray:
    """The Pascal VOC colour map: ``n x 3`` uint8, class k's colour from the bits of k spread over R, G, B."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        c, r, g, b = k, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out[k] = (r, g, b)
    return out


def palette(num_classes: int, dataset: str | None = None) -> np.ndarray:
    """``num_classes x 3`` uint8 colours: the dataset's own colours for ``dataset="cityscapes"`` (19 classes) or
    ``"camvid"`` (11), else the VOC palette (up to 256 classes; beyond that, deterministic pseudo-random colours)."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    own = DATASET_PALETTES.get(dataset)
    if own is not None and num_classes <= len(own):
        return own[:num_classes].copy()
    if num_classes <= 256:
        return voc_palette(256)[:num_classes]
    extra = np.random.default_rng(0).integers(0, 256, size=(num_classes - 256, 3), dtype=np.uint8)
    return np.concatenate([voc_palette(256), extra])
