"""File-based datasets (Pascal VOC, Cityscapes, COCO, generic folder) and the three training / evaluation views.

A *source* gives raw items: ``load(i) -> (image H x W x 3 uint8, mask H x W int | None)``, ``name(i)``,
``validate()``. :class:`ListSource` reads UniMatch-format split files; :class:`csl.data.synthetic.SyntheticSource`
holds generated scenes. The views wrap a source:

- :class:`LabeledDataset` -> ``{"image": 3xSxS float32, "mask": SxS int64}`` (weak augmentation);
- :class:`UnlabeledDataset` -> ``{"image_w", "image_s", "image_s2", "image_m", "ignore", "mask"}`` (four views of
  one weak geometric transform);
- :class:`ValDataset` -> ``{"image": 3xHxW, "mask": HxW, "name": str}`` (full image, no augmentation).
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from csl_kernels import IGNORE_INDEX

from ..logging_utils import with_progress
from .transforms import (
    ColorAugment,
    WeakAugment,
    image_to_tensor,
    image_to_uint8,
    labels_to_tensor,
    normalize,
    to_float,
)

log = logging.getLogger("csl")
# The warnings said once in this process, by key: a list whose optional masks (the unlabeled ground truth) were found
# unusable, a kind of image that load_image reads with a loss.
_SAID_ONCE: set = set()

SplitItems = list[tuple[str, str | None]]
_LOSSY_IMAGE_SUFFIXES = (".jpg", ".jpeg")  # an image format no label map is stored in: a split path's second half


def read_split(path: str) -> SplitItems:
    """Read a UniMatch-format split file: one ``img_path [mask_path]`` per line, paths relative to the dataset root.

    Blank lines and lines starting with ``#`` are skipped; a UTF-8 byte-order mark is read past, and a file that
    starts with a UTF-16 one is read as UTF-16. Paths cannot hold whitespace (UniMatch's format splits on it).
    Returns ``[(img_path, mask_path or None), ...]``.
    """
    return [item for _, item in read_split_lines(path)]


def read_split_lines(path: str) -> list[tuple[int, tuple[str, str | None]]]:
    """:func:`read_split`'s items, each with its line number in the file (from 1), for messages that point there."""
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise FileNotFoundError(f"split file {os.path.abspath(path)} is a folder; give its list file (e.g. "
                                    f"labeled.txt)")
        raise FileNotFoundError(f"split file not found: {os.path.abspath(path)}")
    with open(path, "rb") as f:  # UTF-16 with its byte-order mark: what Windows PowerShell's "> list.txt" writes
        encoding = "utf-16" if f.read(2) in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        with open(path, encoding=encoding) as f:
            text = f.read()
    except UnicodeDecodeError:  # an image or a checkpoint given as the list
        raise ValueError(f"split file {path} is not a text list (not UTF-8 text: an image or another binary file?); "
                         f"give a file of 'img_path [mask_path]' lines") from None
    lines = []
    for lineno, line in enumerate(text.split("\n"), 1):  # (text mode reads \r\n and \r as \n)
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) > 2 or (len(parts) == 2 and parts[1].lower().endswith(_LOSSY_IMAGE_SUFFIXES)):
            raise ValueError(f"{path}:{lineno}: expected 'img_path [mask_path]' (paths without whitespace), got "
                             f"{len(parts)} fields{' (a JPEG is no mask)' if len(parts) == 2 else ''}: {line!r}")
        lines.append((lineno, (parts[0], parts[1] if len(parts) == 2 else None)))
    if not lines:
        raise ValueError(f"split file {path} lists no images")
    return lines


def split_text(items: SplitItems) -> str:
    """``items`` in the UniMatch split-file format (``img_path [mask_path]`` per line)."""
    for img, mask in items:
        if any(c.isspace() for c in img + (mask or "")):
            raise ValueError(f"paths in split files cannot contain whitespace: {img!r} {mask!r}")
    return "".join(f"{img} {mask}\n" if mask is not None else f"{img}\n" for img, mask in items)


def write_split(path: str, items: SplitItems) -> None:
    """Write ``items`` as a UniMatch-format split file."""
    text = split_text(items)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def scan_folder(root: str, images: str = "images", masks: str | None = "masks",
                extensions: Sequence[str] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")) -> SplitItems:
    """Pair ``<root>/<images>/**/<stem>.<ext>`` with ``<root>/<masks>/**/<stem>.png`` (same sub-path) for the
    generic folder dataset. With ``masks=None`` (unlabelled data) every item has no mask. An image without a mask
    is an error naming it."""
    img_dir = os.path.join(root, images)
    if not os.path.isdir(img_dir):
        raise FileNotFoundError(f"image folder not found: {os.path.abspath(img_dir)}")
    items: SplitItems = []
    for dirpath, _, files in sorted(os.walk(img_dir)):
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() not in extensions:
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if masks is None:
                items.append((rel, None))
                continue
            sub = os.path.relpath(os.path.join(dirpath, os.path.splitext(name)[0] + ".png"), img_dir)
            mask_rel = os.path.join(masks, sub)
            if not os.path.isfile(os.path.join(root, mask_rel)):
                raise FileNotFoundError(f"no mask for image {os.path.join(root, rel)}: expected "
                                        f"{os.path.join(root, mask_rel)}")
            items.append((rel, mask_rel))
    if not items:
        raise ValueError(f"no images with extensions {tuple(extensions)} under {img_dir}")
    return items


def _warn_once(key, message: str, *args) -> None:
    if key not in _SAID_ONCE:
        _SAID_ONCE.add(key)
        log.warning(message, *args)


def load_image(path: str, upright: bool = False) -> np.ndarray:
    """H x W x 3 uint8. 16-bit and 32-bit grayscale images are scaled to 8 bits by their type's range (PIL's own
    conversion would clip them at 255); 16-bit data that stays within 12 bits (a sensor's raw range) comes out nearly
    black and is warned about. An alpha channel is dropped (transparent pixels keep their stored colour; warned
    about). A truncated or unreadable file is an error naming it. ``upright``: turned as its EXIF orientation says
    (a phone photo as viewers show it; the datasets' masks are drawn on the stored pixels, so training and
    evaluation read images as stored)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as stored:
            img = ImageOps.exif_transpose(stored) if upright else stored
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                data = np.asarray(img).astype(np.float64)
                largest = float(data.max()) if data.size else 0.0
                top = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and largest <= 65535) else \
                    max(largest, 1.0)
                if top == 65535.0 and 0 < largest <= 4095:
                    _warn_once("12-bit", "image %s is 16-bit but no pixel exceeds %d (12-bit data?): scaled by the "
                               "16-bit range to 8 bits it is nearly black; store such images as 8-bit, scaled by "
                               "their own range (said once, for the first such image)", path, int(largest))
                gray = np.clip(np.rint(data / top * 255.0), 0, 255).astype(np.uint8)
                return np.repeat(gray[:, :, None], 3, axis=2)
            if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") and img.getchannel("A").getextrema()[0] < 255:
                _warn_once("alpha", "image %s has transparent pixels: the alpha channel is dropped and they are "
                           "read with their stored colour (said once, for the first such image)", path)
            return np.array(img.convert("RGB"))
    except (OSError, SyntaxError) as e:  # PIL: "image file is truncated", "broken PNG file", "cannot identify ..."
        raise ValueError(f"cannot read image {path}: {e}") from None


_EXIF_ORIENTATION = 0x0112  # the EXIF tag: 1 stored upright, 2-8 turned and / or mirrored for display


def _size_mismatch(mask_path: str, mask_hw: tuple, img_path: str, img_hw: tuple, orientation: int) -> str:
    """The error of a mask whose size is not its image's; where the image's EXIF orientation turns it to the mask's
    size, that too (the mask was drawn on the view that viewers and annotation tools show)."""
    upright = orientation in (5, 6, 7, 8) and tuple(mask_hw) == tuple(img_hw)[::-1]
    return (f"mask {mask_path} is {mask_hw[1]}x{mask_hw[0]} but image {img_path} is {img_hw[1]}x{img_hw[0]} (W x H)"
            + (f"; the image's EXIF orientation {orientation} turns it to the mask's size in viewers, but training "
               f"reads images as stored: store the images upright (e.g. with PIL.ImageOps.exif_transpose)"
               if upright else ""))


# What :meth:`ListSource.validate` checks; raised when it checks more (2: images decoded whole; 3: JPEG masks
# refused, EXIF orientations named).
VALIDATION_VERSION = 3

# The last bytes of a whole file: PNG's IEND chunk (with its CRC), JPEG's end-of-image marker.
_END_MARKERS = {(".png",): b"IEND\xaeB`\x82", (".jpg", ".jpeg"): b"\xff\xd9"}


def _ends_early(path: str) -> bool:
    """Whether a PNG or JPEG file lacks its format's end marker (other formats: False). Some cameras write data
    after a JPEG's marker: such a file is a suspect, which :meth:`ListSource.damaged_images` then decodes."""
    lower = path.lower()
    for suffixes, marker in _END_MARKERS.items():
        if lower.endswith(suffixes):
            try:
                with open(path, "rb") as f:
                    f.seek(max(os.path.getsize(path) - len(marker), 0))
                    return f.read() != marker
            except OSError:
                return True
    return False


def load_mask(path: str) -> np.ndarray:
    """Class-index mask: a palette ('P') or grayscale PNG whose pixel values are the class ids. A JPEG file is
    refused whatever its name: its lossy compression changes the values along region edges into other classes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mask file not found: {path}")
    try:
        with Image.open(path) as img:
            if img.format in ("JPEG", "MPO"):  # MPO: a camera's multi-picture JPEG
                raise ValueError(f"mask {path} is a JPEG file: its lossy compression has changed the label values "
                                 f"along region edges; store masks as PNG written from the class ids")
            if img.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
                if img.mode == "RGB" and len(set(img.getextrema())) == 1 and np.ptp(
                        np.asarray(img, dtype=np.int16), axis=2).max() == 0:  # gray: the class ids thrice
                    raise ValueError(f"mask {path} is stored as RGB with three equal channels (class ids saved as "
                                     f"a colour image, e.g. by cv2.imwrite of a 3-channel array); expected a "
                                     f"single-channel class-index PNG: save its first channel alone")
                raise ValueError(f"mask {path} has mode {img.mode!r}; expected a single-channel class-index PNG "
                                 f"(palette or grayscale), not a colour rendering")
            return np.array(img)
    except OSError as e:  # truncated or not an image
        raise ValueError(f"cannot read mask {path}: {e}") from None


def map_labels(mask: np.ndarray, ignore_index: int, ignore_labels: Sequence[int] = (),
               reduce_zero_label: bool = False, num_classes: int | None = None) -> np.ndarray:
    """A stored mask in the trainer's convention: class ids ``0..C-1``, :data:`IGNORE_INDEX` (255) elsewhere, the
    one ignore value of the kernels, the losses and the metrics.

    ``ignore_index``: the value that means "ignored" in the files (``data.ignore_index``: any integer, e.g. -1 in a
    16-bit mask), mapped to 255. ``reduce_zero_label``: the file's 0 is "unlabelled" (ADE20K style): 0 -> ignore,
    k -> k - 1. ``ignore_labels``: stored values that mean "unlabelled" (CamVid's void 11), mapped to 255; they are
    values of the file, before the zero-label reduction. With ``num_classes``, a value that is neither a class nor
    ignored raises ValueError (a file value 255 is such a value when the files' ignore value is another one).
    """
    if not reduce_zero_label and not len(ignore_labels) and ignore_index == IGNORE_INDEX and num_classes is None:
        return mask
    raw = mask.astype(np.int64)
    void = np.isin(raw, np.asarray(list(ignore_labels), dtype=np.int64)) | (raw == ignore_index)
    out = raw
    if reduce_zero_label:
        void |= raw == 0
        out = raw - 1
    if num_classes is not None:
        bad = ~void & ((out < 0) | (out >= num_classes))
        if bad.any():
            values = np.unique(raw[bad])
            shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
            # 0 ignored and the classes stored as 1..C: the zero-label convention, not a class more
            shifted = (not reduce_zero_label and bool(void[raw == 0].any() or ignore_index == 0)
                       and values.tolist() == [num_classes])
            raise ValueError(f"label values outside [0, {num_classes}) that are not ignored "
                             f"(data.ignore_index {ignore_index}): {shown}" + (
                                 f" (classes stored as 1..{num_classes} with 0 unlabelled: set "
                                 f"data.reduce_zero_label=true, which reads k as k - 1)" if shifted else ""))
    out = out.copy() if out is mask else out
    out[void] = IGNORE_INDEX
    return out


def resize_pair(image: np.ndarray, mask: np.ndarray | None, scale: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale an image (bilinear, antialiased) and its mask (nearest) by ``scale``; 1.0 returns them unchanged."""
    if scale == 1.0:
        return image, mask
    h, w = image.shape[:2]
    size = (max(round(w * scale), 1), max(round(h * scale), 1))
    image = np.array(Image.fromarray(image).resize(size, Image.BILINEAR))
    if mask is not None:
        mask = np.array(Image.fromarray(mask.astype(np.int32)).resize(size, Image.NEAREST)).astype(mask.dtype)
    return image, mask


class ListSource:
    """Items of a UniMatch-format list under ``root``; masks are mapped to the trainer's label convention
    (:func:`map_labels`) and checked when loaded; images and masks are scaled by ``scale`` (e.g. 0.5 for a CPU
    experiment at half resolution)."""

    mask_hint = ""
    missing_mask_hint = ""  # appended to a missing mask file's error
    # Label values of this dataset's files that mean "unlabelled" besides ``ignore_index`` (data.ignore_labels).
    void_labels: tuple[int, ...] = ()
    class_names: tuple[str, ...] | None = None

    def __init__(self, root: str, list_path: str, num_classes: int, ignore_index: int,
                 items: SplitItems | None = None, hint: str | None = None, *,
                 ignore_labels: Sequence[int] | None = None, reduce_zero_label: bool = False, scale: float = 1.0):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset root not found (or not a folder): {os.path.abspath(root)}")
        if not 0 < scale <= 4:
            raise ValueError(f"scale must be in (0, 4], got {scale}")
        self.root, self.list_path = root, list_path
        # Errors name an item by the list's line where it was read from one, else by its number.
        lines = read_split_lines(list_path) if items is None else None
        self.items = items if lines is None else [item for _, item in lines]
        self._line_numbers = None if lines is None else [lineno for lineno, _ in lines]
        # ignore_index: the value of the files; every mask this source returns has IGNORE_INDEX there instead.
        self.num_classes, self.file_ignore_index, self.ignore_index = num_classes, ignore_index, IGNORE_INDEX
        self.ignore_labels = tuple(self.void_labels if ignore_labels is None else (int(v) for v in ignore_labels))
        self.reduce_zero_label, self.scale = bool(reduce_zero_label), float(scale)
        self.hint = self.mask_hint if hint is None else hint
        self.has_masks = all(m is not None for _, m in self.items)
        self.description = f"{list_path} ({len(self.items)} items)"
        first = self.items[0][0]
        if not os.path.isfile(os.path.join(root, first)):
            why = "are data.root and the split file from the same dataset?"
            if os.path.isabs(first):  # e.g. SegNet's CamVid lists: /SegNet/CamVid/train/x.png
                why = (f"the split file lists absolute paths, which are used as they are, without data.root; write "
                       f"them relative to data.root ({root})")
            elif "\\" in first and os.sep == "/":  # a list written on Windows
                why = "the split file separates folders with '\\' (a list written on Windows): write '/'"
            raise FileNotFoundError(f"image file not found: {os.path.join(root, first)} (first entry of "
                                    f"{list_path}; {why})")

    def __len__(self) -> int:
        return len(self.items)

    def _where(self, index: int) -> str:
        """Where item ``index`` comes from: ``<list>:<line>`` as the split file's own errors say it, or ``item <n> of
        <source>`` (from 1) for items not read from a file."""
        if self._line_numbers is not None:
            return f"{self.list_path}:{self._line_numbers[index]}"
        return f"item {index + 1} of {self.list_path}"

    def image_path(self, index: int) -> str:
        return os.path.join(self.root, self.items[index][0])

    def mask_path(self, index: int) -> str | None:
        m = self.items[index][1]
        return None if m is None else os.path.join(self.root, m)

    def load(self, index: int, optional_mask: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """The image and its mask in the trainer's convention. ``optional_mask``: a mask that is missing or cannot
        be used is None, with one warning per list and process (the unlabeled images' ground truth, which training
        never needs: it only scores the pseudo-labels); else it is an error naming the file and the list item."""
        img_path, mask_path = self.image_path(index), self.mask_path(index)
        try:
            image = load_image(img_path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} ({self._where(index)})") from None
        except ValueError as e:  # truncated, not an image: named with its list item
            raise ValueError(f"{e} ({self._where(index)})") from None
        mask = None
        if mask_path is not None:
            try:
                mask = self._checked_mask(mask_path, image, index)
            except (FileNotFoundError, ValueError) as e:
                if not optional_mask:
                    raise
                _warn_once(("optional masks", self.list_path), "%s; its image is trained on without ground truth, "
                           "which only the pseudo-label metrics use (said once for %s)", e, self.list_path)
        return resize_pair(image, mask, self.scale)

    def _checked_mask(self, mask_path: str, image: np.ndarray, index: int) -> np.ndarray:
        try:
            mask = load_mask(mask_path)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{e} ({self._where(index)}){self.missing_mask_hint}") from None
        if mask.shape != image.shape[:2]:
            img_path = self.image_path(index)
            try:
                with Image.open(img_path) as img:
                    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
            except OSError:
                orientation = 1
            raise ValueError(_size_mismatch(mask_path, mask.shape, img_path, image.shape[:2], orientation))
        return self.prepare_mask(mask, mask_path)

    def prepare_mask(self, mask: np.ndarray, path: str) -> np.ndarray:
        """The stored mask in the trainer's convention (:func:`map_labels`), with its values checked: a value that
        is neither a class nor ignored is an error naming ``path`` and the value."""
        hint = self.hint
        if self.ignore_labels or self.reduce_zero_label:
            rules = ([f"values {list(self.ignore_labels)} ignored"] if self.ignore_labels else []) + (
                ["0 ignored and 1.. shifted down by one (reduce_zero_label)"] if self.reduce_zero_label else [])
            hint = "; ".join([*rules, *([hint] if hint else [])])
        try:
            return map_labels(mask, self.file_ignore_index, self.ignore_labels, self.reduce_zero_label,
                              self.num_classes)
        except ValueError as e:
            raise ValueError(f"mask {path} has {e}" + (f" ({hint})" if hint else "") + "; values that mean "
                             "\"unlabelled\" go in data.ignore_labels (e.g. data.ignore_labels=[11])") from None

    def name(self, index: int) -> str:
        return os.path.splitext(self.items[index][0])[0]

    def missing_images(self) -> list[str]:
        """The listed image files that do not exist (one stat per item: no image is read), each with what its line
        means when its two fields are one file name with a space (split files split on whitespace)."""
        missing = []
        for i in range(len(self)):
            path = self.image_path(i)
            if not os.path.isfile(path):
                img, mask = self.items[i]
                joined = None if mask is None else os.path.join(self.root, f"{img} {mask}")
                missing.append(path if joined is None or not os.path.isfile(joined) else
                               f"{path} (the line names {joined}, a file name with a space: split files separate "
                               f"fields by whitespace; rename the file)")
        return missing

    def damaged_images(self) -> list[str]:
        """The listed PNG and JPEG files that end early (a copy or download cut short), each with the reader's
        error: only a file whose last bytes are not its format's end marker is decoded, so a folder of sound files
        costs one small read per file."""
        damaged = []
        for i in range(len(self)):
            path = self.image_path(i)
            if not _ends_early(path):
                continue
            try:
                load_image(path)
            except (FileNotFoundError, ValueError) as e:  # load_image's errors name the file
                damaged.append(f"{e} ({self._where(i)})")
        return damaged

    def check_cached(self, progress: bool = True) -> tuple[bool, list[int]]:
        """:meth:`validate`, skipped when the same files (paths, sizes, modification times) were found valid under
        the same label settings before (a stamp in ``$XDG_CACHE_HOME/csl/validated/``). Returns whether it ran and
        the pixel count of each class."""
        import hashlib
        import json

        # VALIDATION_VERSION: a stamp vouches only for the checks of the version that wrote it
        digest = hashlib.sha256(json.dumps([VALIDATION_VERSION, type(self).__name__, self.num_classes,
                                            self.file_ignore_index, list(self.ignore_labels), self.reduce_zero_label,
                                            self.scale]).encode())
        for i in range(len(self)):
            for path in (self.image_path(i), self.mask_path(i)):
                if path is not None:
                    st = os.stat(path) if os.path.exists(path) else None
                    digest.update(f"{os.path.abspath(path)}:{st and st.st_size}:{st and st.st_mtime_ns}\n".encode())
        from csl_kernels._paths import cache_dir

        stamp = str(cache_dir() / "validated" / digest.hexdigest()[:32])
        try:
            with open(stamp) as f:
                stored = json.load(f)
            counts, turned = stored["class_pixels"], stored.get("turned")
            if isinstance(counts, list) and len(counts) == self.num_classes and all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
                if isinstance(turned, dict) and isinstance(turned.get("count"), int) and isinstance(
                        turned.get("first"), str):  # what the check warned about, said again on every start
                    self._warn_turned(turned["count"], turned["first"])
                return False, counts
        except (OSError, ValueError, KeyError, TypeError):  # unreadable, not JSON, another shape: checked again
            pass
        result = self.validate(progress=progress)  # raises ValueError listing the bad items
        try:
            os.makedirs(os.path.dirname(stamp), exist_ok=True)
            with open(stamp, "w") as f:
                json.dump({"list": self.description, "class_pixels": result["class_pixels"],
                           "turned": result["turned"]}, f)
        except OSError:
            pass  # no cache: checked again next time
        return True, result["class_pixels"]

    def validate(self, progress: bool = True) -> dict:
        """Scan every item: files exist, image and mask sizes agree, label values are valid.

        Returns ``{"num_items", "class_pixels", "errors"}``; raises ValueError listing the problems (up to 20)
        when any item is bad.
        """

        counts = np.zeros(self.num_classes, dtype=np.int64)
        errors: list[str] = []
        turned: list[str] = []  # labelled images whose EXIF orientation turns or mirrors them in a viewer
        for i in with_progress(range(len(self)), desc=f"validating {self.list_path}", enabled=progress):
            img_path, mask_path = self.image_path(i), self.mask_path(i)
            try:
                if not os.path.isfile(img_path):
                    raise FileNotFoundError(f"image file not found: {img_path}")
                if mask_path is None:
                    continue
                try:
                    mask = load_mask(mask_path)
                except FileNotFoundError as e:
                    raise FileNotFoundError(f"{e}{self.missing_mask_hint}") from None
                with Image.open(img_path) as img:
                    img.load()  # the whole file: a truncated one is found now, not when a loader first draws it
                    orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
                    if img.size != (mask.shape[1], mask.shape[0]):
                        raise ValueError(_size_mismatch(mask_path, mask.shape, img_path, img.size[::-1],
                                                        orientation))
                    if orientation in range(2, 9):
                        turned.append(f"{img_path} (orientation {orientation})")
                mask = self.prepare_mask(mask, mask_path)
                valid = mask[mask != self.ignore_index].astype(np.int64)
                counts += np.bincount(valid.reshape(-1), minlength=self.num_classes)[: self.num_classes]
            except (OSError, ValueError, SyntaxError) as e:  # SyntaxError: PIL's "broken PNG file"
                errors.append(f"{self._where(i)}: {e}")
        if turned:
            self._warn_turned(len(turned), turned[0])
        if errors:
            more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
            raise ValueError(f"{len(errors)} bad item(s) in {self.list_path}:\n" + "\n".join(errors[:20]) + more)
        return {"num_items": len(self), "class_pixels": counts.tolist(), "errors": errors,
                "turned": {"count": len(turned), "first": turned[0]} if turned else None}

    def _warn_turned(self, count: int, first: str) -> None:
        log.warning("%d of the %d images of %s have an EXIF orientation that viewers and annotation tools show "
                    "turned or mirrored, e.g. %s: training and evaluation read the stored pixels, so their masks "
                    "must be drawn on those: masks drawn on the turned view (of a 180-degree or square image "
                    "they fit in size and train misaligned) need the images stored upright "
                    "(PIL.ImageOps.exif_transpose)", count, len(self), self.list_path, first)


# ---------------------------------------------------------------------------------------------------------------
# Dataset kinds: class count, the hint printed with a bad label value, and the standard val list when none is given.


class PascalVOC(ListSource):
    """Pascal VOC 2012 (+ SBD-augmented masks in SegmentationClass, as UniMatch): 21 classes, 255 = boundary."""

    num_classes_default = 21
    class_names = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                   "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train",
                   "tv/monitor")
    mask_hint = "VOC masks are palette PNGs of class indices 0-20 with 255 on boundaries"
    missing_mask_hint = ("; UniMatch's VOC splits use the SBD-augmented masks (SegmentationClassAug) under the name "
                         "SegmentationClass: put those files there, or link SegmentationClass to that folder")

    @staticmethod
    def default_val_items(root: str) -> tuple[str, SplitItems]:
        path = os.path.join(root, "ImageSets", "Segmentation", "val.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no val list given and the VOC val list {path} does not exist; set data.val_list")
        with open(path, encoding="utf-8-sig") as f:  # read past a byte-order mark, as read_split does
            ids = [line.strip() for line in f if line.strip()]
        return path, [(f"JPEGImages/{i}.jpg", f"SegmentationClass/{i}.png") for i in ids]


class Cityscapes(ListSource):
    """Cityscapes fine annotations as train ids (``*_gtFine_labelTrainIds.png``): 19 classes, 255 = ignore."""

    num_classes_default = 19
    class_names = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                   "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                   "bicycle")
    mask_hint = ("Cityscapes masks must be *_gtFine_labelTrainIds.png (0-18, 255); create them from the labelIds "
                 "with cityscapesscripts' createTrainIdLabelImgs")
    missing_mask_hint = ("; the *_gtFine_labelTrainIds.png files are not in the Cityscapes download: create them "
                         "with cityscapesscripts' createTrainIdLabelImgs (CITYSCAPES_DATASET=<data.root>)")

    @staticmethod
    def default_val_items(root: str) -> tuple[str, SplitItems]:
        folder = os.path.join(root, "leftImg8bit", "val")
        files = sorted(glob.glob(os.path.join(folder, "*", "*_leftImg8bit.png")))
        if not files:
            raise FileNotFoundError(f"no val list given and no images found under {folder}; set data.val_list")
        items = []
        for f in files:
            rel = os.path.relpath(f, root)
            city, base = rel.split(os.sep)[-2], os.path.basename(rel)[: -len("_leftImg8bit.png")]
            items.append((rel, os.path.join("gtFine", "val", city, f"{base}_gtFine_labelTrainIds.png")))
        return folder, items


class COCO(ListSource):
    """COCO as UniMatch uses it: ``train2017|val2017/*.jpg`` with class-index masks ``masks/<image id>.png`` in one
    folder for both (81 classes: background + 80 things)."""

    num_classes_default = 81
    class_names = ("background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
                   "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
                   "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
                   "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
                   "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
                   "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
                   "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv",
                   "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
                   "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
    mask_hint = "COCO masks are PNGs of class indices 0-80 (0 = background), 255 = ignore"

    @staticmethod
    def default_val_items(root: str) -> tuple[str, SplitItems]:
        folder = os.path.join(root, "val2017")
        files = sorted(glob.glob(os.path.join(folder, "*.jpg")))
        if not files:
            raise FileNotFoundError(f"no val list given and no images found under {folder}; set data.val_list")
        items = [(os.path.join("val2017", os.path.basename(f)),
                  os.path.join("masks", os.path.splitext(os.path.basename(f))[0] + ".png")) for f in files]
        return folder, items


class FolderDataset(ListSource):
    """Any folder of images and class-index PNG masks described by UniMatch-format lists."""

    num_classes_default = None
    mask_hint = ""

    @staticmethod
    def default_val_items(root: str) -> tuple[str, SplitItems]:
        raise FileNotFoundError(f"dataset 'folder' has no standard val list; set data.val_list (or put val.txt "
                                f"next to labeled.txt in data.split_dir); root was {root}")


class CamVid(ListSource):
    """CamVid in the 11-class SegNet version (``train/``, ``trainannot/``, ``val/``, ``valannot/``, lists
    ``train.txt`` / ``val.txt`` of ``img mask`` lines): 480 x 360 frames, class ids 0-10, **void = 11**, ignored."""

    num_classes_default = 11
    void_labels = (11,)
    class_names = ("sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car", "pedestrian",
                   "bicyclist")
    mask_hint = "CamVid (SegNet) masks hold class ids 0-10 and 11 = void"

    @staticmethod
    def default_val_items(root: str) -> tuple[str, SplitItems]:
        path = os.path.join(root, "val.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no val list given and the CamVid val list {path} does not exist; set "
                                    f"data.val_list")
        return path, read_split(path)


DATASET_KINDS: dict[str, type[ListSource]] = {
    "camvid": CamVid,
    "pascal": PascalVOC,
    "cityscapes": Cityscapes,
    "coco": COCO,
    "folder": FolderDataset,
}


# ---------------------------------------------------------------------------------------------------------------
# Views.


def _lines_without_masks(source: ListSource) -> str:
    """How many of a list's lines name no mask, and where the first one is."""
    missing = [i for i, (_, mask) in enumerate(source.items) if mask is None]
    return (f"{len(missing)} line(s) without a mask path, e.g. {source._where(missing[0])}: "
            f"{source.items[missing[0]][0]!r}; each needs 'img_path mask_path'")


class _View(Dataset):
    def __init__(self, source, *, mean: Sequence[float], std: Sequence[float], ignore_index: int):
        self.source, self.mean, self.std, self.ignore_index = source, tuple(mean), tuple(std), ignore_index

    def __len__(self) -> int:
        return len(self.source)

    def validate(self, progress: bool = True) -> dict:
        """Scan the whole list for missing files and bad label values (see :meth:`ListSource.validate`)."""
        return self.source.validate(progress=progress)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source.description})"


class LabeledDataset(_View):
    """Weakly augmented labelled crops: ``{"image": 3 x S x S float32, "mask": S x S int64}``."""

    def __init__(self, source, *, crop_size: int, mean, std, ignore_index: int,
                 scale_range: Sequence[float] = (0.5, 2.0)):
        super().__init__(source, mean=mean, std=std, ignore_index=ignore_index)
        if not source.has_masks:
            raise ValueError(f"the labelled list {source.description} has {_lines_without_masks(source)}")
        self.weak = WeakAugment(crop_size, ignore_index, scale_range)

    def __getitem__(self, index: int) -> dict:
        image, mask = self.source.load(index)
        img, labels = self.weak(image_to_uint8(image), labels_to_tensor(mask))
        return {"image": normalize(to_float(img), self.mean, self.std), "mask": labels[0]}


class UnlabeledDataset(_View):
    """Four views of one weak geometric transform: weak, two strong ones with independent colour augmentations
    (UniMatch's two strong streams ``img_s1`` / ``img_s2``) and mild (TMP's masking view), the padding map ``ignore``
    (ignore_index where padded, else 0) and the ground truth ``mask`` (all ignore_index when the list has no mask, or
    its mask is missing or unusable: for pseudo-label metrics only). ``masks_required``: such a mask is an error
    instead (``selection.mode=oracle`` trains on the masks)."""

    def __init__(self, source, *, crop_size: int, mean, std, ignore_index: int,
                 scale_range: Sequence[float] = (0.5, 2.0)):
        super().__init__(source, mean=mean, std=std, ignore_index=ignore_index)
        self.weak = WeakAugment(crop_size, ignore_index, scale_range)
        self.strong, self.mild = ColorAugment.strong(), ColorAugment.mild()
        self.masks_required = False

    def __getitem__(self, index: int) -> dict:
        image, mask = self.source.load(index, optional_mask=not self.masks_required)
        h, w = image.shape[:2]
        gt = np.full((h, w), self.ignore_index, dtype=np.int64) if mask is None else mask
        img, labels = self.weak(image_to_uint8(image), labels_to_tensor(gt, np.zeros((h, w), dtype=gt.dtype)))
        img = to_float(img)
        return {
            "image_w": normalize(img, self.mean, self.std),
            "image_s": normalize(self.strong(img), self.mean, self.std),
            "image_m": normalize(self.mild(img), self.mean, self.std),
            "image_s2": normalize(self.strong(img), self.mean, self.std),
            "ignore": labels[1],
            "mask": labels[0],
        }


class ValDataset(_View):
    """Full images at their original size: ``{"image": 3 x H x W, "mask": H x W int64, "name": str}``.

    ``optional_masks``: a mask that is missing or unusable gives ``"mask": None`` (one warning per list) instead of
    an error (``csl analyze`` on the unlabeled images, whose masks training never needs)."""

    def __init__(self, source, *, mean, std, ignore_index: int, optional_masks: bool = False):
        super().__init__(source, mean=mean, std=std, ignore_index=ignore_index)
        if not source.has_masks:
            raise ValueError(f"the val list {source.description} has {_lines_without_masks(source)}")
        self.optional_masks = optional_masks

    def __getitem__(self, index: int) -> dict:
        image, mask = self.source.load(index, optional_mask=self.optional_masks)
        return {"image": normalize(image_to_tensor(image), self.mean, self.std),
                "mask": None if mask is None else torch.from_numpy(mask.astype(np.int64)),
                "name": self.source.name(index)}
