"""Semi-supervised splits: a labeled fraction of a list and the rest unlabeled, as UniMatch-style split folders.

``write_splits("data/camvid/train.txt", "csl/splits/camvid", ["1/8", "1/4"], seed=0)`` writes
``csl/splits/camvid/1_8/{labeled,unlabeled}.txt`` and ``.../1_4/...``. One seeded permutation of the list serves
every fraction, so the splits are nested (the 1/8 labeled images are among the 1/4 ones) and the same seed always
gives the same files. Unlabeled lines keep their mask paths: training never reads them, the pseudo-label metrics
and ``csl analyze`` do.
"""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

from ..files import atomic_write_text
from .datasets import SplitItems, read_split, split_text


def parse_fraction(text: str) -> Fraction:
    """``"1/8"``, ``"0.125"`` or ``"1_8"`` -> ``Fraction(1, 8)``; must lie in (0, 1)."""
    try:
        value = Fraction(str(text).strip().replace("_", "/"))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"a split fraction looks like 1/8 or 0.125, got {text!r}") from None
    if not 0 < value < 1:
        raise ValueError(f"a split fraction must lie strictly between 0 and 1, got {text!r}")
    return value


def fraction_name(value: Fraction) -> str:
    """The folder name of a fraction: ``1/8`` -> ``1_8`` (UniMatch's naming)."""
    return f"{value.numerator}_{value.denominator}"


def split_items(items: SplitItems, fraction: Fraction | str, seed: int = 0) -> tuple[SplitItems, SplitItems]:
    """``(labeled, unlabeled)``: ``round(len(items) * fraction)`` items chosen by a permutation seeded with ``seed``, in
    list order; the rest unlabeled, in list order. A fraction that rounds to no labeled or no unlabeled item is an
    error (a folder named after it would hold another fraction)."""
    fraction = parse_fraction(fraction) if not isinstance(fraction, Fraction) else fraction
    if len(items) < 2:
        raise ValueError(f"a split needs at least 2 items, got {len(items)}")
    order = np.random.default_rng(seed).permutation(len(items))
    count = round(len(items) * fraction)
    if not 1 <= count <= len(items) - 1:
        n = len(items)
        counts, examples = ("1", "1/2") if n == 2 else (f"1 to {n - 1}", f"1/{n} to {n - 1}/{n}")
        raise ValueError(f"fraction {fraction} of {n} items rounds to {count} labeled: no "
                         f"{'labeled' if count < 1 else 'unlabeled'} item would be left; this list needs a fraction "
                         f"that rounds to {counts} of its {n} items (e.g. {examples})")
    chosen = set(order[:count].tolist())
    labeled = [it for i, it in enumerate(items) if i in chosen]
    unlabeled = [it for i, it in enumerate(items) if i not in chosen]
    return labeled, unlabeled


def write_splits(list_path: str, out_dir: str, fractions, seed: int = 0, overwrite: bool = False) -> dict[str, dict]:
    """Write ``<out_dir>/<a_b>/labeled.txt`` and ``unlabeled.txt`` for each fraction of the list at ``list_path``.
    Returns ``{folder: {"labeled": n, "unlabeled": n, "dir": path}}``.

    Nothing is written unless every fraction is valid and the list names each image once (an image listed twice
    could land in both parts). A split file that exists with other content (another seed or list) is an error
    unless ``overwrite``: a run trained on it would otherwise be analysed on other images. Each file is replaced
    atomically."""
    from ..run_folder import check_output_folder

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"the split seed (--seed) must be an int >= 0, got {seed!r}")
    check_output_folder(out_dir)  # a file, or a folder that cannot be written in: said as --out's
    items = read_split(list_path)
    without = [img for img, mask in items if mask is None]
    if without:
        raise ValueError(f"{list_path}: every line needs a mask path to make a labeled split; {len(without)} of "
                         f"{len(items)} name only an image, e.g. {without[0]}")
    first: dict[str, int] = {}
    for i, (img, _) in enumerate(items):
        if img in first:
            raise ValueError(f"{list_path}: image {img} is listed twice (items {first[img] + 1} and {i + 1}); a "
                             f"split of this list could put it in both the labeled and the unlabeled part")
        first[img] = i
    values = [parse_fraction(text) for text in fractions]
    files: dict[str, str] = {}
    written = {}
    for value in values:
        labeled, unlabeled = split_items(items, value, seed)
        folder = os.path.join(out_dir, fraction_name(value))
        files[os.path.join(folder, "labeled.txt")] = split_text(labeled)
        files[os.path.join(folder, "unlabeled.txt")] = split_text(unlabeled)
        written[fraction_name(value)] = {"labeled": len(labeled), "unlabeled": len(unlabeled), "dir": folder}
    if not overwrite:
        for path, text in files.items():
            if os.path.isfile(path):
                with open(path) as f:
                    if f.read() != text:
                        raise ValueError(f"{path} exists with another split (another seed or list); pass "
                                         f"--overwrite to replace it, or choose another --out")
    for path, text in files.items():
        atomic_write_text(path, text)
    return written


__all__ = ["fraction_name", "parse_fraction", "split_items", "write_splits"]
