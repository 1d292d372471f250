"""Embedded default data: procedurally generated segmentation scenes (no download, deterministic from a seed).

Each scene is a shaded background of muted colours with clutter (thin lines and small blobs, labelled background) and
2-5 overlapping objects painted in order (later objects occlude earlier ones). Object class = shape:

====  ==========  ====================
 k    shape       preferred texture
====  ==========  ====================
 0    background  (gradient + clutter)
 1    disk        flat
 2    rectangle   stripes
 3    triangle    checker
 4    ring        dots
 5    cross       noise
====  ==========  ====================

Colours are drawn from one distribution for every class (colour alone tells nothing); an object wears its
class's preferred texture four times out of five (a strong but imperfect local cue); sizes, aspect ratios and
rotations vary; the whole image gets a random brightness / contrast change and pixel noise. Telling a disk from a
ring or a rectangle from a cross when the texture misleads, or under occlusion, needs context beyond a few pixels,
which a few labelled images teach poorly and unlabelled images help with.

Scene ``i`` of split ``s`` depends only on ``(seed, s, i)``, so lists of different lengths share their prefixes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

SHAPES = ("disk", "rectangle", "triangle", "ring", "cross")
TEXTURES = ("flat", "stripes", "checker", "dots", "noise")
CLASS_NAMES = ("background",) + SHAPES
MAX_CLASSES = len(CLASS_NAMES)
SPLIT_CODES = {"labeled": 0, "unlabeled": 1, "val": 2}
# How often an object wears its class's texture (else a random one): a strong but imperfect local cue.
PREFERRED_TEXTURE_P = 0.75


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled ``(cells + 1)^2`` Gaussian grid: smooth noise of unit-ish amplitude."""
    coarse = rng.normal(size=(cells + 1, cells + 1)).astype(np.float32)
    u = np.linspace(0.0, cells, size, dtype=np.float32)
    i0 = np.minimum(u.astype(np.int64), cells - 1)
    f = (u - i0)[:, None]
    rows = coarse[i0] * (1 - f) + coarse[i0 + 1] * f  # size x (cells + 1)
    f = f.T
    return rows[:, i0] * (1 - f) + rows[:, i0 + 1] * f


def _texture(rng: np.random.Generator, kind: str, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """A pattern in [-1, 1] over the whole frame."""
    if kind == "flat":
        return np.zeros_like(xx)
    phi = rng.uniform(0, np.pi)
    u = np.cos(phi) * xx + np.sin(phi) * yy
    v = -np.sin(phi) * xx + np.cos(phi) * yy
    freq = rng.uniform(0.5, 1.0)
    if kind == "stripes":
        return np.sin(freq * u + rng.uniform(0, 2 * np.pi))
    if kind == "checker":
        return np.sign(np.sin(freq * u) * np.sin(freq * v))
    if kind == "dots":
        return np.where(np.sin(freq * u) * np.sin(freq * v) > 0.4, 1.0, -1.0).astype(np.float32)
    if kind == "noise":
        n = _smooth_noise(rng, xx.shape[0], max(xx.shape[0] // 4, 2))
        return np.clip(n, -1.0, 1.0)
    raise ValueError(f"unknown texture {kind!r}")


def _shape_mask(rng: np.random.Generator, shape: str, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    r = rng.uniform(0.12, 0.24) * size
    cy, cx = rng.uniform(0.1 * size, 0.9 * size, 2)
    theta = rng.uniform(0, 2 * np.pi)
    dy, dx = yy - cy, xx - cx
    u = np.cos(theta) * dx + np.sin(theta) * dy
    v = -np.sin(theta) * dx + np.cos(theta) * dy
    if shape == "disk":
        a = rng.uniform(0.8, 1.25)
        return (u / (r * a)) ** 2 + (v * a / r) ** 2 <= 1.0
    if shape == "rectangle":
        a = rng.uniform(0.7, 1.4)
        return (np.abs(u) <= r * a) & (np.abs(v) <= r / a)
    if shape == "triangle":
        big = 1.25 * r  # circumradius; the inradius is half of it
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            ang = 2 * np.pi * k / 3
            inside &= np.cos(ang) * u + np.sin(ang) * v <= big / 2
        return inside
    if shape == "ring":
        d2 = u * u + v * v
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "cross":
        arm = rng.uniform(0.28, 0.4) * r
        return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))
    raise ValueError(f"unknown shape {shape!r}")


def generate_scene(rng: np.random.Generator, size: int = 128, num_classes: int = 5
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One scene: ``(image H x W x 3 uint8, mask H x W uint8 in [0, num_classes))``, ``H = W = size``."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"synthetic scenes have 2 to {MAX_CLASSES} classes, got num_classes={num_classes}")
    if size < 16:
        raise ValueError(f"synthetic scene size must be >= 16, got {size}")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # Background: gradient between two muted (greyish) colours, smooth blotches, sometimes a faint texture.
    c1, c2 = (rng.uniform(0.3, 0.7, (2, 1)) + rng.uniform(-0.06, 0.06, (2, 3))).astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    t = np.cos(ang) * xx + np.sin(ang) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c1 * (1 - t[..., None]) + c2 * t[..., None]
    img += 0.12 * _smooth_noise(rng, size, 4)[..., None] * rng.uniform(0.5, 1.0, 3).astype(np.float32)
    if rng.random() < 0.3:
        img += rng.uniform(0.02, 0.08) * _texture(rng, str(rng.choice(TEXTURES[1:])), yy, xx)[..., None]
    # Clutter labelled background: thin lines and small blobs.
    for _ in range(int(rng.integers(0, 4))):
        phi, off = rng.uniform(0, np.pi), rng.uniform(0, size)
        dist = np.abs(np.cos(phi) * (xx - size / 2) + np.sin(phi) * (yy - size / 2) - (off - size / 2))
        img[dist <= rng.uniform(0.5, 1.8)] = rng.uniform(0, 1, 3)
    for _ in range(int(rng.integers(0, 4))):
        by, bx = rng.uniform(0, size, 2)
        img[(yy - by) ** 2 + (xx - bx) ** 2 <= rng.uniform(2.0, 5.0) ** 2] = rng.uniform(0, 1, 3)

    mask = np.zeros((size, size), dtype=np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        cls = int(rng.integers(1, num_classes))
        region = _shape_mask(rng, SHAPES[cls - 1], yy, xx, size)
        if not region.any():
            continue
        # 0.75 + 0.25 / 5: the other draws pick any texture, the preferred one included
        kind = TEXTURES[cls - 1] if rng.random() < PREFERRED_TEXTURE_P else str(rng.choice(TEXTURES))
        colour = rng.uniform(0.05, 0.95, 3).astype(np.float32)
        pattern = rng.uniform(0.15, 0.35) * _texture(rng, kind, yy, xx)
        g = rng.uniform(-1, 1, 2)
        shade = 0.1 * (g[0] * (xx - xx[region].mean()) + g[1] * (yy - yy[region].mean())) / size
        obj = colour + (pattern + shade)[..., None]
        img[region] = obj[region]
        mask[region] = cls

    img = (img - 0.5) * rng.uniform(0.8, 1.2) + 0.5 + rng.normal(0, 0.05)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), mask


def generate_scenes(num: int, *, size: int = 128, seed: int = 0, split: str = "labeled", num_classes: int = 5
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``num`` scenes of one split: ``(images N x H x W x 3 uint8, masks N x H x W uint8)``."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {sorted(SPLIT_CODES)}, got {split!r}")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    images = np.empty((num, size, size, 3), dtype=np.uint8)
    masks = np.empty((num, size, size), dtype=np.uint8)
    for i in range(num):
        rng = np.random.default_rng([int(seed), SPLIT_CODES[split], i])
        images[i], masks[i] = generate_scene(rng, size, num_classes)
    return images, masks


class SyntheticSource:
    """In-memory scenes with the item interface of :class:`csl.data.datasets.ListSource`."""

    def __init__(self, num: int, *, size: int = 128, seed: int = 0, split: str = "labeled", num_classes: int = 5):
        self.images, self.masks = generate_scenes(num, size=size, seed=seed, split=split, num_classes=num_classes)
        self.split, self.num_classes = split, num_classes
        self.has_masks = True
        self.description = f"synthetic {split} scenes (seed {seed})"

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int, optional_mask: bool = False) -> tuple[np.ndarray, np.ndarray]:
        return self.images[index], self.masks[index]

    def name(self, index: int) -> str:
        return f"synthetic_{self.split}_{index:05d}"

    def validate(self, progress: bool = True) -> dict:
        counts = np.bincount(self.masks.reshape(-1), minlength=self.num_classes)
        return {"num_items": len(self), "class_pixels": counts.tolist(), "errors": []}


LAYOUTS = ("pascal", "cityscapes", "coco", "folder")


def _layout_paths(layout: str, split: str, index: int) -> tuple[str, str]:
    stem = f"{split}_{index:05d}"
    if layout == "pascal":
        return f"JPEGImages/{stem}.jpg", f"SegmentationClass/{stem}.png"
    if layout == "cityscapes":
        part = "val" if split == "val" else "train"
        city = "synth"
        base = f"{city}_{SPLIT_CODES[split]:03d}{index:03d}_000019"
        return (f"leftImg8bit/{part}/{city}/{base}_leftImg8bit.png",
                f"gtFine/{part}/{city}/{base}_gtFine_labelTrainIds.png")
    if layout == "coco":
        part = "val2017" if split == "val" else "train2017"
        base = f"{SPLIT_CODES[split]:02d}{index:010d}"
        return f"{part}/{base}.jpg", f"masks/{base}.png"  # UniMatch's layout: one mask folder for both parts
    if layout == "folder":
        return f"images/{stem}.png", f"masks/{stem}.png"
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def write_synthetic_folder(root: str, *, layout: str = "folder", num_labeled: int = 4, num_unlabeled: int = 8,
                           num_val: int = 4, size: int = 64, seed: int = 0, num_classes: int = 5,
                           unlabeled_masks: bool = True, mask_palette: Sequence[int] | None = None) -> dict:
    """Write synthetic scenes as a dataset folder in ``layout`` with UniMatch-format split files.

    Layouts: ``pascal`` (JPEGImages/*.jpg + SegmentationClass/*.png palette PNGs + ImageSets/Segmentation/val.txt),
    ``cityscapes`` (leftImg8bit/{train,val}/<city>/*_leftImg8bit.png + gtFine/.../*_gtFine_labelTrainIds.png),
    ``coco`` (train2017|val2017/*.jpg + masks/*.png), ``folder`` (images/*.png + masks/*.png).
    Split files go to ``<root>/splits/{labeled,unlabeled}.txt`` and ``<root>/splits/val.txt`` (lines
    ``img_path mask_path`` relative to ``root``; unlabeled lines without a mask when ``unlabeled_masks=False``).

    Returns ``{"root", "split_dir", "labeled_list", "unlabeled_list", "val_list"}``.
    """
    split_dir = os.path.join(root, "splits")
    os.makedirs(split_dir, exist_ok=True)
    flat_palette = list(mask_palette) if mask_palette is not None else None
    if flat_palette is None:
        from .colors import voc_palette
        flat_palette = voc_palette(256).reshape(-1).tolist()
    lists = {}
    for split, num in (("labeled", num_labeled), ("unlabeled", num_unlabeled), ("val", num_val)):
        images, masks = generate_scenes(num, size=size, seed=seed, split=split, num_classes=num_classes)
        lines = []
        for i in range(num):
            img_rel, mask_rel = _layout_paths(layout, split, i)
            for rel in (img_rel, mask_rel):
                os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
            Image.fromarray(images[i]).save(os.path.join(root, img_rel), quality=95)
            if layout == "pascal":  # VOC masks are palette PNGs whose indices are the classes
                mask_img = Image.frombytes("P", (size, size), masks[i].tobytes())
                mask_img.putpalette(flat_palette)
            else:
                mask_img = Image.fromarray(masks[i])
            mask_img.save(os.path.join(root, mask_rel))
            with_mask = split != "unlabeled" or unlabeled_masks
            lines.append(f"{img_rel} {mask_rel}" if with_mask else img_rel)
        path = os.path.join(split_dir, f"{split}.txt")
        with open(path, "w") as f:
            f.write("\n".join(lines) + ("\n" if lines else ""))
        lists[split] = path
        if layout == "pascal" and split == "val":
            os.makedirs(os.path.join(root, "ImageSets", "Segmentation"), exist_ok=True)
            with open(os.path.join(root, "ImageSets", "Segmentation", "val.txt"), "w") as f:
                f.write("".join(f"val_{i:05d}\n" for i in range(num)))
    return {"root": root, "split_dir": split_dir, "labeled_list": lists["labeled"],
            "unlabeled_list": lists["unlabeled"], "val_list": lists["val"]}
