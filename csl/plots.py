"""Pictures of ``csl analyze`` and of the experiment reports (matplotlib, written as PNG without a display)."""

from __future__ import annotations

import itertools
import os
import textwrap

import numpy as np

from csl_kernels import IGNORE_INDEX

from .analyze import baseline_row
from .files import atomic_open


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str) -> str:
    """Write ``fig`` as a PNG at ``path`` (its folder created) whole or not at all: a kill while it is written
    leaves the earlier picture or none, never a cut-short PNG. Close it, return the path."""
    try:
        with atomic_open(path, binary=True) as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return path


def _save(fig, out_dir: str, name: str) -> str:
    return _save_figure(fig, os.path.join(out_dir, name))


# One colour per method in every picture (Okabe-Ito, safe for colour-blind readers: threshold orange, CSL blue),
# keyed by the method's run name; methods without one take the other colours in turn.
METHOD_COLOURS = {"threshold": "#E69F00", "csl": "#0072B2", "supervised": "#999999", "csl_no_tmp": "#56B4E9",
                  "csl_class": "#009E73", "confidence_share": "#CC79A7", "csl_released": "#D55E00",
                  "oracle": "#000000", "warmup": "#8C564B"}
# Okabe-Ito's yellow (#F0E442) is left out: a line in it hardly shows on the white background.
_OTHER_COLOURS = ("#882255", "#17BECF", "#BCBD22", "#7F7F7F", "#9467BD", "#E377C2")
# CSL's soft weights in a lighter blue beside its reliable pixels' METHOD_COLOURS["csl"].
CSL_WEIGHTED_COLOUR = "#56B4E9"


# ---------------------------------------------------------------------------------------------------------------
# csl analyze


def _num(value: float | None) -> float:
    """A ratio or an mIoU for plotting: None (no pixel to take it over) is a gap."""
    return float("nan") if value is None else value


def _point_label(label: str, quality: dict) -> str:
    """The legend entry of one rule's point, saying why it is not in the plane where its accuracy or recall is None."""
    if quality["accuracy"] is None:
        return f"{label}: not drawn, nothing selected"
    if quality["recall"] is None:
        return f"{label}: not drawn, no correct pseudo-label"
    return label


def plot_accuracy_recall(result: dict, out_dir: str, tau: float = 0.95, title: str | None = None) -> str:
    """Accuracy against recall of the selected pseudo-labels: the threshold sweep, the entropy and margin sweeps,
    and the CSL points (hard and weighted, per image and per class)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    th = result["threshold"]
    mc = METHOD_COLOURS  # the methods' colours of the report pictures: threshold orange, CSL blue
    ax.plot([_num(r["recall"]) for r in th], [_num(r["accuracy"]) for r in th], "o-", color=mc["threshold"],
            label="confidence threshold sweep")
    for r in th:
        if r["accuracy"] is not None and r["recall"] is not None:  # None: nothing selected / nothing correct
            ax.annotate(f"{r['tau']:g}", (r["recall"], r["accuracy"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=mc["threshold"])
    base = baseline_row(result, tau)
    if base:
        ax.plot(_num(base["recall"]), _num(base["accuracy"]), "s", ms=10, mfc="none", mec=mc["threshold"], mew=2,
                label=_point_label(f"threshold {tau:g} (UniMatch)", base))
    styles = {"entropy": ("v--", "tab:gray"), "margin": ("^--", "tab:purple")}
    for name, sweep in result["sweeps"].items():
        marker, colour = styles.get(name, (".--", "black"))
        ax.plot([_num(r["recall"]) for r in sweep], [_num(r["accuracy"]) for r in sweep], marker, color=colour, ms=4,
                label=f"{name} (share sweep)")
    points = [("csl", "hard", "*", "CSL per image: reliable (w = 1)"),
              ("csl", "weighted", "P", "CSL per image: weighted"),
              ("csl_class", "hard", "*", "CSL per class: reliable"),
              ("csl_class", "weighted", "P", "CSL per class: weighted"),
              ("csl_released", "hard", "*", "CSL, released code's rule: reliable"),
              ("csl_released", "weighted", "P", "CSL, released code's rule: weighted")]
    for rule, kind, marker, label in points:
        if rule not in result:  # analyses written before the released rule was analysed
            continue
        r = result[rule][kind]
        ax.plot(_num(r["recall"]), _num(r["accuracy"]), marker, ms=13 if marker == "*" else 10, color=mc[rule],
                label=_point_label(label, r), mec="black", mew=0.5)
    ax.set_xlabel("recall of the correct pseudo-labels")
    ax.set_ylabel("accuracy of the selected pseudo-labels")
    ax.grid(alpha=0.3)
    _legend_outside(ax)  # a weak model's points reach the lower left, where a legend inside would sit
    ax.set_title(title or f"selection on {result.get('images', '?')} images ({result.get('split', '')})", fontsize=9)
    return _save(fig, out_dir, "accuracy_recall.png")


def weight_surface(f0: np.ndarray, f1: np.ndarray, mu: np.ndarray, var: np.ndarray, alpha: float,
                   eps: float = 1e-8) -> np.ndarray:
    """The PCOS weight as a function of the two features (docs/selection.md Sec. 2, step 6): the Gaussian of the
    reliable cluster, 1 where either feature exceeds the cluster mean."""
    z0 = (f0 - mu[0]) / np.sqrt(var[0] + eps)
    z1 = (f1 - mu[1]) / np.sqrt(var[1] + eps)
    w = np.exp(-(z0 ** 2 + z1 ** 2) / alpha)
    return np.where((f0 > mu[0]) | (f1 > mu[1]), 1.0, w)


def pcos_clusters(f0: np.ndarray, f1: np.ndarray) -> np.ndarray:
    """The PCOS assignment of each pixel (argmax of the absolute right singular vector of the 2 x N features)."""
    phi = np.stack([f0, f1], axis=1).astype(np.float64)
    lam, u = np.linalg.eigh(phi.T @ phi)
    lam, u = lam[::-1], u[:, ::-1]
    s = np.sqrt(np.maximum(lam, 0))
    if s[1] <= 1e-12 * s[0]:
        return np.zeros(len(f0), dtype=np.int64)
    v = np.abs(phi @ u) / s
    return np.argmax(v, axis=1)


def plot_feature_plane(example: dict, out_dir: str, alpha: float, tau: float = 0.95, max_points: int = 6000,
                       confidence: str = "prob") -> str:
    """One image's pixels in the (confidence, residual dispersion) plane: left coloured by the PCOS cluster with
    the Gaussian weight contours of the reliable cluster and the threshold line, right by whether the
    pseudo-label is correct."""
    plt = _pyplot()
    f0, f1 = example["f0"].reshape(-1), example["dispersion"].reshape(-1)
    correct = (example["pred"] == example["target"]).reshape(-1)
    valid = (example["target"] != example.get("ignore_index", IGNORE_INDEX)).reshape(-1)
    cluster = pcos_clusters(f0, f1)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(f0))[:max_points]
    mu, var, chosen = example["mu"][example["chosen"]], example["var"][example["chosen"]], example["chosen"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    pad0, pad1 = 0.05 * (f0.max() - f0.min() + 1e-6), 0.05 * (f1.max() - f1.min() + 1e-6)
    g0 = np.linspace(f0.min() - pad0, f0.max() + pad0, 300)
    g1 = np.linspace(f1.min() - pad1, f1.max() + pad1, 300)
    G0, G1 = np.meshgrid(g0, g1)
    # The weight is 1 wherever either feature exceeds the mean: contoured there, every level would run along that
    # region's edge with its label stacked on the others'. The Gaussian's levels are drawn below both means, the
    # edge once as its own line.
    W = np.ma.masked_where((G0 > mu[0]) | (G1 > mu[1]), weight_surface(G0, G1, mu, var, alpha))
    thr = np.log(tau) if confidence == "log" else tau
    contours = []
    for ax in axes:
        contours.append(ax.contour(G0, G1, W, levels=[0.1, 0.5, 0.9], colors="black", linewidths=0.8))
        ax.plot([g0[0], mu[0], mu[0]], [mu[1], mu[1], g1[0]], color="black", lw=1.8,
                label="w = 1 above or right of this edge")
        ax.axvline(thr, color="tab:blue", ls="--", lw=1.2, label=f"threshold {tau:g}")
        ax.plot(mu[0], mu[1], "kx", ms=6, mew=2, label="reliable cluster mean")
        ax.set_xlabel("max confidence" + (" (log)" if confidence == "log" else ""))
        ax.grid(alpha=0.2)
    sel = idx[cluster[idx] == chosen]
    oth = idx[cluster[idx] != chosen]
    axes[0].scatter(f0[oth], f1[oth], s=3, c="tab:orange", alpha=0.5, label="other cluster")
    axes[0].scatter(f0[sel], f1[sel], s=3, c="tab:green", alpha=0.5, label="reliable cluster (c*)")
    axes[0].set_ylabel("residual dispersion v")
    axes[0].set_title("PCOS clusters and Gaussian weight contours", fontsize=9)
    ok, bad = idx[correct[idx] & valid[idx]], idx[~correct[idx] & valid[idx]]
    axes[1].scatter(f0[ok], f1[ok], s=3, c="tab:gray", alpha=0.4, label="correct pseudo-label")
    axes[1].scatter(f0[bad], f1[bad], s=4, c="tab:red", alpha=0.6, label="wrong pseudo-label")
    axes[1].set_title("correct vs wrong pseudo-labels (ground truth)", fontsize=9)
    for ax in axes:  # below the axes: the pixels fill any corner of the plane, a legend inside would hide some
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, markerscale=1.5,
                  frameon=False)
    for ax, cs in zip(axes, contours, strict=True):  # the axes' limits are final: every artist is drawn
        _label_contours_below_the_mean(ax, cs, mu)
    fig.suptitle(f"{example['name']}: {len(f0)} pixels, {int(valid.sum())} with ground truth ({len(idx)} shown "
                 f"left, {len(ok) + len(bad)} of them with ground truth right)", fontsize=9)
    return _save(fig, out_dir, "feature_plane.png")


def _label_contours_below_the_mean(ax, cs, mu: np.ndarray, fontsize: float = 7) -> None:
    """Label each Gaussian level of ``cs`` at the point of its drawn contour farthest inside the region below both
    means (from the w = 1 edge through ``mu``, and from the axes' left and bottom), clear of the labels placed
    before it. A label may turn with its contour: it is kept a circle of its box's half diagonal clear. A level
    whose contour has no such point (too short, or hugging the edge) is left unlabelled; matplotlib's own placement
    put such a label across the edge."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    edge = to_px(np.asarray(mu[:2], dtype=np.float64).reshape(1, 2))[0]
    box = ax.get_window_extent(renderer)
    placed, positions, levels = [], [], []
    for level, segments in zip(cs.levels, cs.allsegs, strict=True):
        points = np.concatenate([seg for seg in segments if len(seg)] or [np.zeros((0, 2))])
        if not len(points):
            continue
        probe = ax.text(0, 0, f"w={level:.2g}", fontsize=fontsize)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        radius = np.hypot(extent.width, extent.height) / 2 + 1  # a pixel of paper around the text
        px = to_px(points)
        clearance = np.min([edge[0] - px[:, 0], edge[1] - px[:, 1], px[:, 0] - box.x0, px[:, 1] - box.y0], axis=0)
        for i in np.argsort(-clearance):
            if clearance[i] < radius:
                break
            if all(np.hypot(*(px[i] - q)) >= radius + r for q, r in placed):
                placed.append((px[i], radius))
                positions.append(tuple(points[i]))
                levels.append(level)
                break
    if levels:
        ax.clabel(cs, levels=levels, manual=positions, fmt=lambda v: f"w={v:.2g}", fontsize=fontsize)


def colour_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """CIE76 colour difference (Euclidean distance in CIELAB, D65 white) of sRGB colours ``a`` and ``b`` (``... x 3``
    uint8, broadcast against each other): about 2 is just noticeable side by side, 100 is black to white."""

    def lab(rgb: np.ndarray) -> np.ndarray:
        c = np.asarray(rgb, dtype=np.float64) / 255
        c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)  # sRGB to linear
        xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
        t = xyz / np.array([0.95047, 1.0, 1.08883])
        f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
        return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)

    return np.linalg.norm(lab(a) - lab(b), axis=-1)


# Ignored pixels are white, blank paper, where white is at least this far (CIE76) from every class colour: two colours
# 21 apart, such as CamVid's pole (192, 192, 128) and VOC's border colour (224, 224, 192), read as one in a panel.
# White lies 37-46 from every colour of the Cityscapes, CamVid and Pascal VOC palettes and 22.3 from COCO's 81 VOC
# colours (class 63's light grey (192, 192, 192)); no colour lies much farther from all 81 (about 32 at most, a
# saturated blue that would read as a class).
IGNORED_MIN_DISTANCE = 22.0
_IGNORED_CANDIDATES = ((255, 255, 255), (255, 0, 255), (0, 0, 0), (128, 128, 128))


def ignored_colour(colours: np.ndarray) -> np.ndarray:
    """The colour of ignored pixels beside the class ``colours``: white where it is at least
    :data:`IGNORED_MIN_DISTANCE` from every class colour, else the first of magenta, black, mid grey that is; where none
    is (a palette that crowded: the 256 VOC colours), the one of them farthest from its nearest class colour."""
    candidates = np.array(_IGNORED_CANDIDATES, dtype=np.uint8)
    nearest = colour_distance(candidates[:, None], np.asarray(colours, dtype=np.uint8)[None]).min(axis=1)
    clear = np.flatnonzero(nearest >= IGNORED_MIN_DISTANCE)
    return candidates[clear[0] if len(clear) else int(np.argmax(nearest))].copy()


def colourize(labels: np.ndarray, colours: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """RGB of a label map: class k in ``colours[k]``, ignored and out-of-range pixels in :func:`ignored_colour`."""
    out = np.full((*labels.shape, 3), ignored_colour(colours), dtype=np.uint8)
    ok = (labels >= 0) & (labels < len(colours)) & (labels != ignore_index)
    out[ok] = colours[labels[ok]]
    return out


def plot_panels(examples: list[dict], out_dir: str, num_classes: int, dataset: str | None, tau: float = 0.95,
                class_names: list[str] | None = None) -> str:
    """A row per image: image, ground truth, prediction, CSL weight, threshold mask, TMP cover; below, the colour
    of each class that appears in the masks or predictions shown, and the scale of the weight / mask columns."""
    from matplotlib.patches import Patch

    from .data.colors import palette

    plt = _pyplot()
    colours = palette(num_classes, dataset)
    cols = ["image", "ground truth", "prediction", "CSL weight", f"threshold {tau:g}", "TMP cover"]
    fig, axes = plt.subplots(len(examples), len(cols), figsize=(2.6 * len(cols), 2.1 * len(examples)),
                             squeeze=False)
    for r, (row, ex) in enumerate(zip(axes, examples, strict=True)):
        pics = [ex["image"], colourize(ex["target"], colours), colourize(ex["pred"], colours), ex["weight"],
                (ex["conf"] >= tau).astype(np.float32), ex["cover"].astype(np.float32)]
        for c, (ax, pic, col) in enumerate(zip(row, pics, cols, strict=True)):
            # Class maps and masks drawn pixel for pixel: a smoothing filter, shrinking them, mixes two classes'
            # colours at every edge into a colour of no class.
            interpolation = "nearest" if c in (1, 2, 4, 5) else "antialiased"
            if pic.ndim == 2:
                ax.imshow(pic, cmap="viridis", vmin=0, vmax=1, interpolation=interpolation)
            else:
                ax.imshow(pic, interpolation=interpolation)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col, fontsize=9)
        row[0].set_ylabel(os.path.basename(ex["name"]), fontsize=7)
    shown = sorted({int(c) for ex in examples for m in (ex["target"], ex["pred"]) for c in np.unique(m)
                    if 0 <= c < num_classes})
    names = class_names or [str(c) for c in range(num_classes)]
    handles = [Patch(facecolor=colours[c] / 255.0, edgecolor="black", linewidth=0.3, label=names[c]) for c in shown]
    handles.append(Patch(facecolor=ignored_colour(colours) / 255.0, edgecolor="black", linewidth=0.3,
                         label="ignored (void / padding)"))
    # Below the figure's bottom edge (the saved picture grows to hold it): the images keep their size whatever the
    # number of classes in view.
    fig.subplots_adjust(bottom=0.1 / len(examples))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 8), fontsize=7,
               frameon=False, title="classes (ground truth, prediction); weight and masks: yellow = 1 / selected / "
                                    "hidden, dark = 0", title_fontsize=7)
    return _save(fig, out_dir, "panels.png")


def _count(n: float) -> str:
    """A pixel count in three significant figures: 950, 12.3k, 4.56M."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


def plot_per_class(result: dict, out_dir: str, tau: float = 0.95) -> str:
    """Per-class accuracy and recall of the threshold baseline and of CSL (hard and weighted)."""
    plt = _pyplot()
    names = result["class_names"]
    base = baseline_row(result, tau)
    # The report pictures' colours: threshold orange, CSL blue (its weights a lighter blue).
    rules = ([(f"threshold {tau:g}", base, METHOD_COLOURS["threshold"])] if base else []) + [
        ("CSL reliable", result["csl"]["hard"], METHOD_COLOURS["csl"]),
        ("CSL weighted", result["csl"]["weighted"], CSL_WEIGHTED_COLOUR)]
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.7 * len(names) + 2), 6), sharex=True)
    x = np.arange(len(names))
    width = 0.8 / len(rules)
    for ax, metric in zip(axes, ("accuracy", "recall"), strict=True):
        for j, (label, r, colour) in enumerate(rules):
            vals = [np.nan if v is None else v for v in r["per_class"][metric]]
            offset = x + (j - (len(rules) - 1) / 2) * width
            ax.bar(offset, vals, width, label=label, color=colour)
            for xi, v in zip(offset, vals, strict=True):  # undefined (no pixel) told apart from a bar of height 0
                if v != v:
                    ax.text(xi, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color="0.4")
        ax.set_ylabel(metric)
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
    _legend_outside(axes[0])  # right of the bars: a class near 1 under it would be hidden
    axes[1].set_xticks(x)
    axes[1].set_xlim(-0.6, len(names) - 0.4)  # the bars to the edges: a 5 % margin is inches with 150 classes
    predicted = result["csl"]["weighted"]["per_class"].get("pixels_predicted")  # absent in older analyses
    if predicted:  # how many pixels a class's accuracy stands on: a ratio of a handful is told apart
        names = [f"{n} ({_count(c)})" for n, c in zip(names, predicted, strict=True)]
    axes[1].set_xticklabels(names, rotation=40, ha="right", fontsize=8)
    axes[0].set_title("per class: accuracy by pseudo-label class, recall by true class"
                      + (" (pixels predicted as the class in brackets)" if predicted else ""), fontsize=9)
    return _save(fig, out_dir, "per_class.png")


def plot_analysis(result: dict, examples: list[dict], out_dir: str, *, alpha: float, tau: float = 0.95,
                  dataset: str | None = None, panels: bool = True) -> list[str]:
    """Every picture of ``csl analyze``; returns their paths. ``examples[0]`` is drawn in the feature plane, and
    ``panels`` draws every example in ``panels.png``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [plot_accuracy_recall(result, out_dir, tau), plot_per_class(result, out_dir, tau)]
    if examples:
        paths.append(plot_feature_plane(examples[0], out_dir, alpha, tau, confidence=result.get("confidence",
                                                                                                   "prob")))
    if examples and panels:
        paths.append(plot_panels(examples, out_dir, result["num_classes"], dataset, tau, result.get("class_names")))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Experiment reports

def method_colours(labels) -> dict[str, str]:
    """``{label: colour}`` for the methods' labels (``csl.report.LABELS``' values or the run names themselves)."""
    from .report import LABELS

    by_label = {LABELS.get(name, name): colour for name, colour in METHOD_COLOURS.items()}
    by_label.update(METHOD_COLOURS)
    others = itertools.cycle(_OTHER_COLOURS)
    return {label: by_label.get(label) or next(others) for label in labels}


def _legend_outside(ax, *handles_and_labels, **kwargs) -> None:
    """The legend right of the axes, where it covers no line (the saved figure grows to hold it); ``ax.legend``'s
    arguments."""
    ax.legend(*handles_and_labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              **kwargs)


def _iteration_axis(ax) -> None:
    """The x axis of iterations, ticked at whole ones only (two evaluations 20 apart were ticked 22.5, 27.5, ...)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


def plot_pseudo_label_curves(curves: dict[str, list[dict]], out_path: str) -> str:
    """Per-epoch share, accuracy and recall of each method's pseudo-labels (``pseudo_labels`` records of
    metrics.jsonl): solid for the reliable pixels (w = 1), dashed for the soft weights where recorded (their share is
    the mean weight; records written before the soft weights' figures give it as the mask ratio, over every
    non-padded pixel); a method recorded without the unlabeled ground truth has its mask ratio alone, drawn solid."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    panels = [("share selected (soft weights: the mean weight)", "sampling_rate", "weighted_share"),
              ("accuracy", "accuracy", "weighted_accuracy"),
              ("recall of the correct pseudo-labels", "recall", "weighted_recall")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colours = method_colours(list(curves))
    dashed = set()  # what the dashed lines drawn are: the soft weights' figures, or older records' mask ratio
    for method, records in curves.items():
        its = [r["iter"] for r in records]
        if not any(r.get("sampling_rate") is not None for r in records):  # no unlabeled ground truth
            shares = ("mask_ratio", None)
        elif any(r.get("weighted_share") is not None for r in records):
            shares = panels[0][1:]
        else:  # recorded before the soft weights' figures: their mean weight is the mask ratio
            shares = ("sampling_rate", "mask_ratio")
        for ax, (_, key, weighted_key) in zip(axes, [(panels[0][0], *shares), *panels[1:]], strict=True):
            solid = [r.get(key) for r in records]
            for k, style in ((key, "o-"), (weighted_key, "s--")):
                vals = [r.get(k) for r in records] if k else []
                # Weights of 0 and 1 only (the threshold's): the soft curve is the solid one, not drawn again
                # (hidden under it, a dashed line the title names would not be seen).
                if style == "s--" and k and np.allclose(np.array(vals, dtype=float), np.array(solid, dtype=float),
                                                        equal_nan=True):
                    continue
                if any(v is not None for v in vals):
                    ax.plot(its, [np.nan if v is None else v for v in vals], style, ms=3, color=colours[method],
                            label=method if style == "o-" else None)
                    if style == "s--":
                        dashed.add("mask ratio" if k == "mask_ratio" else "soft weights")
    mask_ratio = "the mask ratio (the mean weight over every non-padded pixel, void included)"
    said = {frozenset({"soft weights"}): "the soft weights", frozenset({"mask ratio"}): mask_ratio,
            frozenset({"soft weights", "mask ratio"}): f"the soft weights; for runs recorded before their figures, "
                                                       f"{mask_ratio}"}
    if dashed:
        fig.suptitle(f"solid: the reliable pixels (w = 1); dashed: {said[frozenset(dashed)]}", fontsize=9, y=1.03)
    for ax, (title, _, _) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=9)
        _iteration_axis(ax)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of the unlabeled pixels" if not dashed else "fraction")
    # One entry per method, whichever panels it has lines in.
    _legend_outside(axes[-1], [Line2D([], [], marker="o", ms=3, color=colours[m]) for m in curves], list(curves))
    return _save_figure(fig, out_path)


def plot_miou_curves(curves: dict[str, list[dict]], out_path: str) -> str:
    """Validation mIoU per evaluation of each method (``eval`` records of metrics.jsonl)."""
    return plot_miou_panels({"": curves}, out_path)


def plot_miou_panels(panels: dict[str, dict[str, list[dict]]], out_path: str) -> str:
    """:func:`plot_miou_curves` side by side, one panel per title (e.g. one per schedule), on one mIoU scale; a
    method has the same colour in every panel."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 3.8), sharey=True, squeeze=False)
    colours = method_colours(list(dict.fromkeys(m for curves in panels.values() for m in curves)))
    for ax, (title, curves) in zip(axes[0], panels.items(), strict=True):
        for method, records in curves.items():
            ax.plot([r["iter"] for r in records], [100 * _num(r["miou"]) for r in records], "o-", ms=3,
                    color=colours[method], label=method)
        ax.set_title(title, fontsize=10)
        _iteration_axis(ax)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("val mIoU (%)")
    handles = {label: h for ax in axes[0] for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    _legend_outside(axes[0][-1], handles.values(), handles.keys())  # one legend for every panel, right of them
    return _save_figure(fig, out_path)


def _wrap(label: str, width: int = 16) -> str:
    """``label`` in lines of at most ``width`` characters (a word longer than that cut), its bracket on a line of its
    own: a tick label as wide as the space of one method on the seed picture."""
    return "\n".join(textwrap.fill(part, width) for part in label.replace(" (", "\n(").split("\n"))


def plot_miou_by_seed(finals: dict[str, dict], out_path: str) -> str:
    """Final val mIoU of each method (``finals[method][seed]``, 0-1), one line per seed across the methods: the
    levels move with the seed, the paired differences between methods are the lines' shape."""
    plt = _pyplot()
    methods = list(finals)
    seeds = list(dict.fromkeys(seed for per_seed in finals.values() for seed in per_seed))
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(methods), 3.8))
    for i, seed in enumerate(seeds):
        ys = [100 * _num(finals[m].get(seed)) for m in methods]
        # The colour cycle's ten colours, then again with another line style: no two seeds drawn alike.
        ax.plot(range(len(methods)), ys, marker="os^D"[i // 10 % 4], ls=("-", "--", ":", "-.")[i // 10 % 4], ms=5,
                label=f"seed {seed}")
    # The mean only over every seed: a method run on fewer seeds would be compared on other levels.
    means = [100 * np.mean([_num(finals[m][seed]) for seed in seeds]) if len(finals[m]) == len(seeds) else np.nan
             for m in methods]
    ax.plot(range(len(methods)), means, "_", ms=28, mew=2.5, color="black", label="mean of the seeds")
    ax.set_xticks(range(len(methods)), [_wrap(m) for m in methods], fontsize=8)
    ax.set_ylabel("final val mIoU (%)")
    ax.grid(axis="y", alpha=0.3)
    _legend_outside(ax, markerscale=0.5, handlelength=2.5)  # the mean's wide bar, shrunk to fit beside its label
    return _save_figure(fig, out_path)


__all__ = ["METHOD_COLOURS", "colour_distance", "colourize", "ignored_colour", "method_colours", "pcos_clusters",
           "plot_accuracy_recall", "plot_analysis", "plot_feature_plane", "plot_miou_by_seed", "plot_miou_curves",
           "plot_miou_panels", "plot_panels", "plot_per_class", "plot_pseudo_label_curves", "weight_surface"]
