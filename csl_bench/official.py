"""What a user would write instead of csl_kernels: the official-style CSL selection and the UniMatch-style loss.

This follows Algorithm 1 of the CSL paper (not the authors' released code, whose rule differs: ``docs/selection.md``
Sec. 2b) in the style of UniMatch-family trainers: batched softmax features, then a Python loop over the images of the
batch with boolean indexing of the valid pixels and ``torch.linalg.svd`` of the 2 x N feature matrix, the cluster
statistics with ``Tensor.mean`` / ``Tensor.var`` and the Gaussian weights with the preservation rule. It computes the
same math as ``csl_kernels.pcos_weights`` (``docs/selection.md`` Sec. 1-2, ``confidence="prob"``, ``groups="image"``) so
the outputs can be compared, but for the spec's second rank-one cut (feature columns collinear to float32 resolution,
Sec. 2.3: the paper's SVD splits such a group by rounding); it does not guard against non-finite logits (the benchmark
inputs are finite). It is leaner than the released code's layout (NaN written into the invalid pixels, an int64
one-hot of the logits' size, a second argmax), so speed-ups over it understate the gain over the authors' code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from csl_kernels import IGNORE_INDEX

EPS = 1e-8
RANK_ONE_RTOL = 1e-12


def official_features(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched ``(pmax, residual dispersion, pseudo-label)`` from a float32 softmax, the eager way."""
    ncls = logits.shape[1]
    prob = torch.softmax(logits.float(), dim=1)
    conf, label = prob.max(dim=1)
    index = label.unsqueeze(1)
    residual = prob.scatter(1, index, 0.0)
    mass = residual.sum(dim=1)
    mean = mass / (ncls - 1)
    var = ((residual - mean.unsqueeze(1)) ** 2).scatter(1, index, 0.0).sum(dim=1) / (ncls - 1)
    penalty = (ncls - 1) ** 2 / (2.0 * (mass + EPS))
    return conf, -penalty * var, label


def official_pcos(logits: torch.Tensor, ignore: torch.Tensor | None = None, alpha: float = 8.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image PCOS with ``torch.linalg.svd``. Returns ``(weight, label, reliable)`` like the public API."""
    conf, disp, label = official_features(logits)
    valid = torch.ones_like(conf, dtype=torch.bool) if ignore is None else ignore != IGNORE_INDEX
    weight = torch.zeros_like(conf)
    for b in range(logits.shape[0]):
        keep = valid[b]
        feats = torch.stack((conf[b][keep], disp[b][keep]))  # 2 x N
        if feats.shape[1] == 0:
            continue
        _, sing, vh = torch.linalg.svd(feats, full_matrices=False)
        if sing.numel() < 2 or sing[1] <= RANK_ONE_RTOL * sing[0]:  # one valid pixel has one singular value
            cluster = torch.zeros(feats.shape[1], dtype=torch.long, device=feats.device)
        else:
            cluster = vh.abs().argmax(dim=0)
        mus, vars_, counts = [], [], []
        for c in (0, 1):
            members = feats[:, cluster == c]
            counts.append(members.shape[1])
            mus.append(members.mean(dim=1) if members.shape[1] > 0 else feats.new_zeros(2))
            vars_.append(members.var(dim=1) if members.shape[1] > 1 else feats.new_zeros(2))
        chosen = 1 if counts[1] > 0 and (counts[0] == 0 or mus[1][0] > mus[0][0]) else 0
        mu, var = mus[chosen], vars_[chosen]
        z = (feats - mu.unsqueeze(1)) / torch.sqrt(var + EPS).unsqueeze(1)
        w = torch.exp(-(z * z).sum(dim=0) / alpha)
        w[(feats[0] > mu[0]) | (feats[1] > mu[1])] = 1.0
        weight[b][keep] = w
    reliable = (weight == 1) & valid
    return weight, label, reliable


def official_trusted_mask(images: torch.Tensor, reliable: torch.Tensor, *, block: int = 32, rate: float = 0.7,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """TMP the eager way: a random cell grid, indexed with each pixel's cell, and a multiplication.

    Pixel (y, x) lies in cell ``(y * gh // H, x * gw // W)`` in integers (spec Sec. 4.2); ``F.interpolate(mode=
    "nearest")`` computes the cell in float32 and is a row or column off at some sizes (H = 122 with 32-pixel blocks).
    """
    bsz, _, height, width = images.shape
    gh, gw = max(1, int(height / block + 0.5)), max(1, int(width / block + 0.5))
    draw_device = generator.device if generator is not None else images.device
    cells = (torch.rand(bsz, gh, gw, generator=generator, device=draw_device) < rate).to(images.device)
    rows = torch.arange(height, device=images.device) * gh // height
    cols = torch.arange(width, device=images.device) * gw // width
    cover = cells[:, rows][:, :, cols] & reliable
    return images * (~cover).unsqueeze(1).to(images.dtype), cover


def unimatch_weighted_cross_entropy(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor,
                                    ignore: torch.Tensor | None = None) -> torch.Tensor:
    """UniMatch's unlabeled loss: ``CrossEntropyLoss(reduction='none') * w``, summed, over the valid-pixel count.

    Low-precision logits are upcast to float32 first, as ``torch.autocast`` does for ``cross_entropy``.
    """
    loss = F.cross_entropy(logits.float(), label, reduction="none")
    if ignore is None:
        return (loss * weight).sum() / label.numel()
    valid = ignore != IGNORE_INDEX
    return (loss * weight * valid).sum() / valid.sum().item()
