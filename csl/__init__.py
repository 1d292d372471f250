"""csl: a semi-supervised semantic segmentation trainer with CSL pseudo-label selection.

Sub-packages: ``csl.data`` (datasets, augmentation, embedded synthetic scenes), ``csl.model`` (DeepLabV3+),
``csl.evaluate`` (mIoU), ``csl.step`` (one training step), ``csl.trainer`` (the loop) and the CLI (``python -m csl``).
Kept import-light on purpose: importing ``csl`` loads neither torch nor torchvision.
"""

__version__ = "0.1.0"
