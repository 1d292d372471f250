"""csl_kernels: fast, exact CSL pseudo-label selection (Confidence Separable Learning, ICCV 2025).

Every op has a float64-capable pure-PyTorch reference and fused backends (Triton, C++ CPU, CUDA) selected with
``backend="auto" | "reference" | "triton" | "cpu" | "cuda"``. The math is specified in ``docs/selection.md``.
"""

from ._backends import BACKENDS, is_available, unavailable_reason
from ._backends import log_choices_again as log_backend_choices_again
from ._checks import IGNORE_INDEX
from .confusion_matrix import confusion_matrix, iou_from_confusion
from .metrics import metrics_from_counts, pseudo_label_counts, pseudo_label_metrics
from .pcos_weights import PCOSResult, PCOSStats, pcos_weights
from .residual_features import ResidualFeatures, residual_features
from .threshold_weights import selection_scores, threshold_weights
from .trusted_mask import TrustedMask, trusted_mask
from .weighted_cross_entropy import weighted_cross_entropy

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
    "PCOSResult",
    "PCOSStats",
    "ResidualFeatures",
    "TrustedMask",
    "confusion_matrix",
    "iou_from_confusion",
    "is_available",
    "log_backend_choices_again",
    "metrics_from_counts",
    "pcos_weights",
    "pseudo_label_counts",
    "pseudo_label_metrics",
    "residual_features",
    "selection_scores",
    "threshold_weights",
    "trusted_mask",
    "unavailable_reason",
    "weighted_cross_entropy",
]
