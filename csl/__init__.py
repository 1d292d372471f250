"""csl: a semi-supervised semantic segmentation trainer with CSL pseudo-label selection.

Sub-packages: ``csl.data`` (datasets, augmentation, embedded synthetic scenes), ``csl.model`` (DeepLabV3+),
``csl.evaluate`` (mIoU), and the training loop / CLI (``python -m csl``). Kept import-light on purpose: importing
``csl`` loads neither torch nor torchvision.
"""

__version__ = "0.1.0"
