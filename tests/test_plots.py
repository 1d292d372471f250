"""csl.plots: label maps in colour, ignored pixels told apart from every class."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest

from csl import plots
from csl.data.colors import palette
from csl.plots import colourize, ignored_colour


def test_ignored_pixels_get_a_colour_no_class_has():
    labels = np.array([[0, 1, 255], [2, 255, 0]])
    voc = palette(21)  # VOC: class 0 (background) is black
    rgb = colourize(labels, voc)
    assert (rgb[0, 0] == 0).all() and (rgb[0, 2] == (255, 255, 255)).all() and (rgb[1, 1] == rgb[0, 2]).all()
    assert (rgb[0, 1] == voc[1]).all() and (rgb[1, 2] == voc[0]).all()
    for colours in (palette(11, "camvid"), palette(19, "cityscapes"), palette(256), palette(300)):
        assert not (colours == ignored_colour(colours)).all(axis=1).any()
    taken = np.array([[255, 255, 255], [255, 0, 255]], dtype=np.uint8)  # the first choices taken by classes
    assert tuple(ignored_colour(taken)) == (0, 0, 0)
    assert (colourize(np.array([[7, -1]]), taken) == (0, 0, 0)).all()  # out of range: drawn as ignored


def test_the_ignore_value_is_ignored_also_with_a_palette_that_long():
    """255 is the ignore value even where the palette has a 256th colour; a label one past the palette's end is drawn
    as ignored too (not an index error)."""
    colours = palette(256)
    rgb = colourize(np.array([[255, 3, 256]]), colours)
    ignored = ignored_colour(colours)
    assert (rgb[0, 0] == ignored).all() and (rgb[0, 1] == colours[3]).all() and (rgb[0, 2] == ignored).all()


def test_the_ignored_colour_is_the_first_clear_of_white_magenta_black_grey_else_the_farthest():
    """A candidate near a class colour (5 apart: not told apart in a panel) is passed over like one equal to it."""
    near = {(255, 255, 255): (245, 245, 245), (255, 0, 255): (250, 10, 250), (0, 0, 0): (8, 8, 8),
            (128, 128, 128): (133, 128, 128)}
    taken = [(60, 40, 222)]
    for candidate, neighbour in near.items():
        assert tuple(ignored_colour(np.array(taken, dtype=np.uint8))) == candidate
        assert plots.colour_distance(np.array(candidate), np.array(neighbour)) < 6
        taken.append(neighbour)
    # none clear: the farthest from its nearest class colour: white (3.5 from its neighbour; magenta 2.6, black 2.2,
    # grey 2.0), magenta once white's neighbour is nearer (1.2)
    assert tuple(ignored_colour(np.array(taken, dtype=np.uint8))) == (255, 255, 255)
    taken[1] = (252, 252, 252)
    assert plots.colour_distance(np.array(taken[1]), np.array([255, 255, 255])) < 1.5
    assert tuple(ignored_colour(np.array(taken, dtype=np.uint8))) == (255, 0, 255)
    # the 256 VOC colours: white is 20 from class 255 (224, 224, 192), magenta 27 from (192, 0, 192)
    assert tuple(ignored_colour(palette(256))) == (255, 0, 255)


def test_colour_distance_is_cie76_in_lab():
    """Pure red is L*a*b* (53.24, 80.09, 67.20), black (0, 0, 0), white (100, 0, 0); CamVid's pole and VOC's border
    colour 21 apart."""
    red, black, white = np.array([255, 0, 0]), np.array([0, 0, 0]), np.array([255, 255, 255])
    assert plots.colour_distance(red, black) == pytest.approx(np.hypot(53.24, np.hypot(80.09, 67.20)), abs=0.05)
    assert plots.colour_distance(white, black) == pytest.approx(100, abs=0.01)
    pole, border = np.array([192, 192, 128]), np.array([224, 224, 192])
    assert plots.colour_distance(pole, border) == pytest.approx(21.0, abs=0.05) == plots.colour_distance(border, pole)
    np.testing.assert_allclose(plots.colour_distance(np.stack([red, white]), black), [117.32, 100], atol=0.05)


def test_the_ignored_colour_is_clear_of_every_class_colour_of_every_shipped_palette():
    """Every palette a shipped config draws with (csl/configs: CamVid, Cityscapes, Pascal VOC, COCO, the synthetic
    demo), the synthetic scenes' largest and the 256 VOC colours: the ignored colour lies at least 22 (CIE76) from
    each class colour, above the 21.0 at which CamVid's pole and VOC's border colour read as one."""
    from csl.config import CONFIG_DIR, load_config
    from csl.data.synthetic import MAX_CLASSES

    shipped = {}
    for name in sorted(n[: -len(".yaml")] for n in os.listdir(CONFIG_DIR) if n.endswith(".yaml")):
        data = load_config(name)["data"]
        shipped[name] = palette(data["num_classes"], data["dataset"])
    assert {"camvid", "cityscapes_801", "coco", "demo", "voc_321"} <= set(shipped)
    shipped |= {"synthetic": palette(MAX_CLASSES, "synthetic"), "256 VOC colours": palette(256)}
    for name, colours in shipped.items():
        nearest = plots.colour_distance(ignored_colour(colours)[None], colours).min()
        assert nearest >= 22, (name, tuple(ignored_colour(colours)), nearest)
    assert tuple(ignored_colour(shipped["camvid"])) == (255, 255, 255)  # blank, as on every <= 81-class palette


def test_weight_surface_is_the_gaussian_below_the_mean_and_one_above_either_feature():
    """w = exp(-(z0^2 + z1^2) / alpha) where both features lie at or below the reliable cluster's mean, 1 where
    either exceeds it (docs/selection.md Sec. 2, step 6)."""
    mu, var = np.array([0.5, 0.5]), np.array([0.01, 0.01])
    w = plots.weight_surface(np.array([0.4, 0.6, 0.4, 0.3]), np.array([0.4, 0.2, 0.7, 0.5]), mu, var, alpha=2.0)
    assert w == pytest.approx([np.exp(-1.0), 1.0, 1.0, np.exp(-2.0)], rel=1e-5)  # eps = 1e-8 beside var


def test_pcos_clusters_assign_each_pixel_to_its_dominant_direction():
    """Pixels along the larger singular direction are cluster 0, the one along the other cluster 1; a rank-one
    feature matrix is one cluster."""
    f0, f1 = np.array([1.0, 1.0, 1.0, 1.0, 0.1]), np.array([0.1, 0.1, 0.1, 0.1, 1.0])
    assert plots.pcos_clusters(f0, f1).tolist() == [0, 0, 0, 0, 1]
    assert plots.pcos_clusters(f0, 2 * f0).tolist() == [0] * 5


def test_pixel_counts_are_written_with_their_scale():
    assert [plots._count(n) for n in (950, 1000, 12_345, 4_560_000, 2e9)] == ["950", "1k", "12.3k", "4.56M", "2G"]


def test_method_colours_also_key_the_run_names():
    """A method's colour by its run name as by its label; a method without one takes the next other colour."""
    assert plots.method_colours(["csl", "threshold", "warmup", "mine"]) == {
        "csl": "#0072B2", "threshold": "#E69F00", "warmup": "#8C564B", "mine": plots._OTHER_COLOURS[0]}


def test_every_method_colour_shows_as_a_line_on_white():
    """Each method's colour, named or taken in turn, stands off the white background: a contrast ratio (WCAG,
    relative luminance) of at least 1.5 against white, as the light grey of "supervised only" (2.8) and the sky blue
    of "CSL without TMP" (2.3) do; a pale yellow (1.3) is a faint line."""
    from matplotlib.colors import to_rgb

    def contrast_to_white(colour):
        c = np.array(to_rgb(colour))
        lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return 1.05 / (lin @ [0.2126, 0.7152, 0.0722] + 0.05)

    colours = [*plots.METHOD_COLOURS.values(), *plots._OTHER_COLOURS]
    assert min(contrast_to_white(c) for c in colours) >= 1.5
    assert contrast_to_white("#999999") == pytest.approx(2.85, abs=0.01)  # the scale: "supervised only"'s grey


def test_panels_show_the_threshold_mask_at_tau_and_the_classes_in_view(kept_figures, tmp_path):
    """The threshold column selects confidence >= tau (a pixel at exactly tau included); the legend names the
    classes of the masks and predictions shown, then the ignored colour."""
    ex = {"name": "a/b.png", "image": np.zeros((2, 2, 3), dtype=np.uint8), "target": np.array([[0, 1], [255, 1]]),
          "pred": np.array([[0, 2], [1, 1]]), "weight": np.full((2, 2), 0.5), "cover": np.zeros((2, 2), dtype=bool),
          "conf": np.array([[0.95, 0.94], [0.96, 1.0]], dtype=np.float32)}
    plots.plot_panels([ex], str(tmp_path), 4, None, tau=0.95, class_names=["road", "car", "sky", "tree"])
    (fig,) = kept_figures
    assert fig.axes[4].get_title() == "threshold 0.95"
    assert np.asarray(fig.axes[4].images[0].get_array()).tolist() == [[1, 0], [1, 1]]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["road", "car", "sky", "ignored (void / padding)"]
    # class maps and masks pixel for pixel (shrunk with a smoothing filter, two classes' edge is a third colour)
    assert [ax.images[0].get_interpolation() for ax in fig.axes[:6]] == [
        "antialiased", "nearest", "nearest", "antialiased", "nearest", "nearest"]


def test_miou_curves_and_the_seed_picture_draw_percent_per_iteration_and_seed(kept_figures):
    """The curves: mIoU in percent at each evaluation's iteration (None a gap). The seed picture: one line per seed
    over the methods, and the mean of the seeds only for a method run on every seed."""
    plots.plot_miou_curves({"csl": [{"iter": 10, "miou": 0.4}, {"iter": 20, "miou": None}, {"iter": 30,
                                                                                           "miou": 0.45}]}, "c.png")
    (line,) = kept_figures[0].axes[0].get_lines()
    assert line.get_xdata().tolist() == [10, 20, 30]
    assert line.get_ydata()[[0, 2]].tolist() == pytest.approx([40, 45]) and np.isnan(line.get_ydata()[1])
    plots.plot_miou_by_seed({"a": {0: 0.3, 1: 0.5}, "b": {0: 0.4, 1: 0.6}, "c": {1: 0.2}}, "s.png")
    lines = {ln.get_label(): ln.get_ydata() for ln in kept_figures[1].axes[0].get_lines()}
    assert lines["seed 0"][:2].tolist() == pytest.approx([30, 40]) and np.isnan(lines["seed 0"][2])
    assert lines["seed 1"].tolist() == pytest.approx([50, 60, 20])
    means = lines["mean of the seeds"]
    assert means[:2].tolist() == pytest.approx([40, 50]) and np.isnan(means[2])


def test_pseudo_label_curves_draw_each_panels_quantity_solid_and_weighted_dashed(kept_figures):
    """Each panel: the reliable pixels' (w = 1) share, accuracy, recall solid, the soft weights' dashed, as the
    suptitle says (the first panel drew CSL's mask ratio, its mean weight, solid: read as the share of its reliable
    pixels, 0.9 where they were 0.45)."""
    records = [{"iter": 10, "mask_ratio": 0.9, "sampling_rate": 0.45, "accuracy": 0.8, "recall": 0.7,
                "weighted_share": 0.88, "weighted_accuracy": 0.6, "weighted_recall": 0.5}]
    plots.plot_pseudo_label_curves({"CSL": records}, "p.png")
    fig = kept_figures[0]
    drawn = [[(ln.get_linestyle(), ln.get_ydata().tolist()) for ln in ax.get_lines()] for ax in fig.axes[:3]]
    assert drawn == [[("-", [0.45]), ("--", [0.88])], [("-", [0.8]), ("--", [0.6])], [("-", [0.7]), ("--", [0.5])]]
    assert fig._suptitle.get_text() == "solid: the reliable pixels (w = 1); dashed: the soft weights"


def test_pseudo_label_curves_without_ground_truth_draw_the_mask_ratio_and_name_every_method(kept_figures):
    """Records without the unlabeled ground truth hold the mask ratio alone: drawn solid in the first panel, and the
    method named in the legend though it has no line in the last panel."""
    plots.plot_pseudo_label_curves({"CSL": [{"iter": 10, "mask_ratio": 0.9}],
                                    "threshold": [{"iter": 10, "mask_ratio": 0.5, "sampling_rate": 0.5,
                                                   "accuracy": 0.9, "recall": 0.6, "weighted_share": 0.5,
                                                   "weighted_accuracy": 0.9, "weighted_recall": 0.6}]}, "p.png")
    fig = kept_figures[0]
    assert [(ln.get_linestyle(), ln.get_ydata().tolist()) for ln in fig.axes[0].get_lines()] == [
        ("-", [0.9]), ("-", [0.5])]
    assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == ["CSL", "threshold"]
    assert fig._suptitle is None



def test_pseudo_label_curves_of_records_before_the_weighted_figures_draw_the_mask_ratio_dashed(kept_figures):
    """Records written before the soft weights' figures (docs/results/camvid's first runs) hold the reliable share
    and the mask ratio, the mean weight: both drawn in the first panel, solid and dashed (the mask ratio was left
    out, and with it CSL's 77 % mean weight that the document's tables give beside the picture)."""
    records = [{"iter": 10, "mask_ratio": 0.77, "sampling_rate": 0.66, "accuracy": 0.97, "recall": 0.73}]
    plots.plot_pseudo_label_curves({"CSL": records}, "p.png")
    fig = kept_figures[0]
    drawn = [[(ln.get_linestyle(), ln.get_ydata().tolist()) for ln in ax.get_lines()] for ax in fig.axes[:3]]
    assert drawn == [[("-", [0.66]), ("--", [0.77])], [("-", [0.97])], [("-", [0.73])]]
    assert fig._suptitle.get_text() == ("solid: the reliable pixels (w = 1); dashed: the mask ratio (the mean weight "
                                        "over every non-padded pixel, void included)")


def test_pseudo_label_curves_leave_out_soft_curves_equal_to_the_reliable_ones(kept_figures):
    """The threshold's weights are 0 or 1: its weighted accuracy and recall are the reliable pixels' own, a dashed
    line hidden under the solid one; not drawn, and no title about dashed lines none of which would show."""
    records = [{"iter": 10, "mask_ratio": 0.6, "sampling_rate": 0.6, "accuracy": 0.98, "recall": 0.7,
                "weighted_share": 0.6, "weighted_accuracy": 0.98, "weighted_recall": 0.7},
               {"iter": 20, "mask_ratio": 0.6, "sampling_rate": 0.6, "accuracy": None, "recall": 0.72,
                "weighted_share": 0.6, "weighted_accuracy": None, "weighted_recall": 0.72}]
    plots.plot_pseudo_label_curves({"threshold": records}, "p.png")
    fig = kept_figures[0]
    assert [[ln.get_linestyle() for ln in ax.get_lines()] for ax in fig.axes[:3]] == [["-"], ["-"], ["-"]]
    assert fig._suptitle is None and fig.axes[0].get_ylabel() == "fraction of the unlabeled pixels"


def test_per_class_bars_give_each_rules_value_and_mark_the_undefined(kept_figures, tmp_path):
    """Per class, one bar per rule (threshold 0.95, CSL reliable, CSL weighted) of its accuracy (top) and recall
    (bottom); an undefined ratio is no bar but "n/a"."""
    def rule(acc, rec):
        return {"per_class": {"accuracy": acc, "recall": rec}}

    result = {"class_names": ["road", "car"], "threshold": [{"tau": 0.95, **rule([0.9, None], [0.3, 0.4])}],
              "csl": {"hard": rule([0.8, 0.7], [0.5, 0.6]), "weighted": rule([0.6, 0.5], [0.7, 0.8])}}
    plots.plot_per_class(result, str(tmp_path))
    top, bottom = kept_figures[0].axes[:2]
    heights = {c.get_label(): [p.get_height() for p in c] for c in top.containers}
    assert list(heights) == ["threshold 0.95", "CSL reliable", "CSL weighted"]
    assert heights["threshold 0.95"][0] == 0.9 and np.isnan(heights["threshold 0.95"][1])
    assert heights["CSL reliable"] == [0.8, 0.7] and heights["CSL weighted"] == [0.6, 0.5]
    assert [p.get_height() for c in bottom.containers for p in c] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    assert [t.get_text() for t in top.texts] == ["n/a"] and not bottom.texts
    # No pixel counts in this analysis (written before they were recorded): neither in the labels nor the title.
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["road", "car"] and "brackets" not in top.get_title()
    assert bottom.get_xlim() == (-0.6, 1.6)  # the bars to the edges, no 5 % margin (inches with 150 classes)
    result["csl"]["weighted"]["per_class"]["pixels_predicted"] = [1200, 5]
    plots.plot_per_class(result, str(tmp_path))
    top, bottom = kept_figures[1].axes[:2]
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["road (1.2k)", "car (5)"]
    assert top.get_title().endswith("(pixels predicted as the class in brackets)")


def test_feature_plane_splits_pixels_by_cluster_and_leaves_ignored_ones_out_of_the_truth(kept_figures, tmp_path):
    """Left: the pixels of the reliable cluster c* and the others; right: correct and wrong pseudo-labels among the
    pixels with a mask (ignored ones left out)."""
    rng = np.random.default_rng(0)
    f0 = np.concatenate([rng.uniform(0.8, 1.0, 30), rng.uniform(0.0, 0.2, 10)])
    f1 = np.concatenate([rng.uniform(0.0, 0.1, 30), rng.uniform(0.5, 1.0, 10)])
    target = np.where(np.arange(40) % 5 == 0, 255, np.arange(40) % 3)
    pred = np.where(np.arange(40) % 2 == 0, np.arange(40) % 3, 0)
    example = {"name": "x", "f0": f0, "dispersion": f1, "pred": pred, "target": target, "chosen": 1,
               "mu": np.array([[0.9, 0.05], [0.1, 0.7]]), "var": np.array([[0.01, 0.01], [0.01, 0.01]])}
    plots.plot_feature_plane(example, str(tmp_path), alpha=8.0)
    left, right = kept_figures[0].axes[:2]
    count = {c.get_label(): len(c.get_offsets()) for ax in (left, right) for c in ax.collections
             if not c.get_label().startswith("_")}
    cluster = plots.pcos_clusters(f0, f1)
    valid = target != 255
    assert count["reliable cluster (c*)"] == (cluster == 1).sum() and count["other cluster"] == (cluster != 1).sum()
    assert count["correct pseudo-label"] == ((pred == target) & valid).sum()
    assert count["wrong pseudo-label"] == ((pred != target) & valid).sum()
    # the title counts what each side shows: the right leaves the ignored pixels out
    assert kept_figures[0]._suptitle.get_text() == (f"x: 40 pixels, {valid.sum()} with ground truth (40 shown left, "
                                                    f"{valid.sum()} of them with ground truth right)")


def _extent(artist):
    """``artist``'s box in display pixels of its drawn figure."""
    return artist.get_window_extent(artist.figure.canvas.get_renderer())


def test_per_class_legend_covers_no_bar(kept_figures, tmp_path):
    """Bars up to 1 in every class (a well-predicted class anywhere, the last included): the legend lies clear of
    each of them."""
    full = {"per_class": {"accuracy": [0.99, 0.98, 0.97], "recall": [0.9, 0.9, 0.9]}}
    result = {"class_names": ["road", "car", "sky"], "threshold": [{"tau": 0.95, **full}],
              "csl": {"hard": full, "weighted": full}}
    plots.plot_per_class(result, str(tmp_path))
    fig = kept_figures[0]
    fig.canvas.draw()
    (legend,) = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + fig.legends
    box = _extent(legend)
    bars = [p for ax in fig.axes for c in ax.containers for p in c]
    assert len(bars) == 18 and not [p for p in bars if box.overlaps(_extent(p))]


def test_feature_plane_labels_the_gaussian_levels_inside_below_the_mean_apart_from_each_other(kept_figures, tmp_path):
    """The weight is 1 wherever either feature exceeds the reliable cluster's mean, so that region's edge is one line
    of the legend; each contour label of the Gaussian sits below both means (not stacked on that edge), clear of the
    other labels; the legend is outside the plane the pixels fill."""
    rng = np.random.default_rng(0)
    f0, f1 = rng.uniform(0.0, 1.0, 2000), rng.uniform(0.0, 1.0, 2000)
    mu = np.array([[0.6, 0.5], [0.2, 0.2]])
    example = {"name": "x", "f0": f0, "dispersion": f1, "pred": np.zeros(2000, dtype=np.int64),
               "target": np.zeros(2000, dtype=np.int64), "chosen": 0, "mu": mu, "var": np.full((2, 2), 0.04)}
    plots.plot_feature_plane(example, str(tmp_path), alpha=8.0)
    fig = kept_figures[0]
    fig.canvas.draw()
    for ax in fig.axes[:2]:
        labels = [t for t in ax.texts if t.get_text().startswith("w=")]
        assert labels and {t.get_text() for t in labels} <= {"w=0.1", "w=0.5", "w=0.9"}
        assert all(x < 0.6 - 0.02 and y < 0.5 - 0.02 for x, y in (t.get_position() for t in labels))
        boxes = [_extent(t) for t in labels]
        assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
        (edge,) = [ln for ln in ax.get_lines() if ln.get_label() == "w = 1 above or right of this edge"]
        assert edge.get_xydata()[1:].tolist() == [[0.6, 0.5], [0.6, edge.get_ydata()[2]]]
        # The pixels can fill every corner of the plane: the legend lies outside it, below the axis label.
        assert not _extent(ax.get_legend()).overlaps(ax.get_window_extent())
    assert not _extent(fig.axes[0].get_legend()).overlaps(_extent(fig.axes[1].get_legend()))


@pytest.mark.parametrize("mu, var", [((0.86, 0.1), (0.02, 0.01)), ((0.6, 0.5), (0.04, 0.04)),
                                     ((0.5, 0.5), (0.01, 0.01)), ((0.9, 0.3), (0.05, 0.02))])
def test_feature_plane_labels_sit_clear_of_the_w_1_edge(kept_figures, tmp_path, mu, var):
    """Each Gaussian level's label, as drawn (turned with its contour), lies wholly below and left of the w = 1 edge
    through the reliable cluster's mean and inside the axes, on a contour drawn there: matplotlib's own placement put
    "w=0.9" (and "w=0.1") across the edge of a mean near the bottom right (the first case)."""
    rng = np.random.default_rng(0)
    f0, f1 = rng.uniform(0.0, 1.0, 2000), rng.uniform(0.0, 1.0, 2000)
    example = {"name": "x", "f0": f0, "dispersion": f1, "pred": np.zeros(2000, dtype=np.int64),
               "target": np.zeros(2000, dtype=np.int64), "chosen": 0, "mu": np.array([mu, (0.2, 0.2)]),
               "var": np.array([var, (0.04, 0.04)])}
    plots.plot_feature_plane(example, str(tmp_path), alpha=8.0)
    fig = kept_figures[0]
    fig.canvas.draw()
    for ax in fig.axes[:2]:
        labels = [t for t in ax.texts if t.get_text().startswith("w=")]
        assert len(labels) >= 2
        edge_x, edge_y = ax.transData.transform([mu])[0]
        frame = _extent(ax)
        for box in map(_extent, labels):
            assert box.x1 < edge_x and box.y1 < edge_y and box.x0 > frame.x0 and box.y0 > frame.y0
        boxes = [_extent(t) for t in labels]
        assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]


def test_analysis_pictures_give_threshold_and_csl_the_report_pictures_colours(kept_figures, tmp_path):
    """Threshold orange, CSL blue as in every report picture (not the other way round): the sweep, its 0.95 square
    and the CSL points of accuracy_recall.png, the bars of per_class.png."""
    from matplotlib.colors import same_color

    def rule(value):
        return {"accuracy": value, "recall": value, "per_class": {"accuracy": [value], "recall": [value]}}

    result = {"class_names": ["road"], "threshold": [{"tau": 0.95, **rule(0.9)}], "sweeps": {},
              "csl": {"hard": rule(0.8), "weighted": rule(0.7)}}
    plots.plot_accuracy_recall(result, str(tmp_path))
    plots.plot_per_class(result, str(tmp_path))
    lines = {ln.get_label(): ln for ln in kept_figures[0].axes[0].get_lines()}
    assert same_color(lines["confidence threshold sweep"].get_color(), plots.METHOD_COLOURS["threshold"])
    assert same_color(lines["threshold 0.95 (UniMatch)"].get_markeredgecolor(), plots.METHOD_COLOURS["threshold"])
    assert same_color(lines["CSL per image: weighted"].get_color(), plots.METHOD_COLOURS["csl"])
    bars = {c.get_label(): c.patches[0].get_facecolor() for c in kept_figures[1].axes[0].containers}
    assert same_color(bars["threshold 0.95"], plots.METHOD_COLOURS["threshold"])
    assert same_color(bars["CSL reliable"], plots.METHOD_COLOURS["csl"])
    assert not same_color(bars["CSL weighted"], plots.METHOD_COLOURS["threshold"])


def test_accuracy_recall_legend_lies_beside_the_axes(kept_figures, tmp_path):
    """A weak model's points reach every corner of the accuracy-recall plane (recall 0.1 at accuracy 0.5 here, in the
    lower left): the legend is outside the axes."""
    def rule(acc, rec):
        return {"accuracy": acc, "recall": rec}

    result = {"threshold": [{"tau": 0.5, **rule(0.5, 0.1)}, {"tau": 0.95, **rule(0.9, 0.05)}], "sweeps": {},
              "csl": {"hard": rule(0.6, 0.9), "weighted": rule(0.55, 0.95)}}
    plots.plot_accuracy_recall(result, str(tmp_path))
    ax = kept_figures[0].axes[0]
    ax.figure.canvas.draw()
    assert not _extent(ax.get_legend()).overlaps(ax.get_window_extent())


def _panel_example(classes: int, height: int = 30, width: int = 40, seed: int = 0) -> dict:
    """One row of panels.png whose ground truth and prediction hold every one of ``classes`` classes."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(height * width) % classes).reshape(height, width)
    return {"name": "a.png", "image": np.zeros((height, width, 3), dtype=np.uint8), "target": labels,
            "pred": labels[::-1], "weight": np.full((height, width), 0.5), "cover": np.zeros((height, width), bool),
            "conf": np.full((height, width), 0.9, dtype=np.float32)}


@pytest.mark.parametrize("classes", [40, 60, 150])
def test_panels_keep_their_size_below_a_legend_of_many_classes(kept_figures, tmp_path, classes):
    """A weak model on COCO or ADE20K puts dozens of classes in one image: with one row of panels (--panels 1), the
    legend of 60 classes raised the axes' bottom past their top (ValueError: bottom cannot be >= top, after the whole
    analysis ran), and one of 40 shrank the images to a strip. The images keep the size they have with a few classes;
    the legend lies below them, clear of every image and its column title."""
    plots.plot_panels([_panel_example(3)], str(tmp_path), classes, None)
    plots.plot_panels([_panel_example(classes)], str(tmp_path), classes, None)
    few, many = kept_figures
    for fig in (few, many):
        fig.canvas.draw()
    assert len(many.legends[0].get_texts()) == classes + 1
    for small, big in zip(few.axes, many.axes, strict=True):
        assert _extent(big).height == pytest.approx(_extent(small).height, rel=0.01)
    legend = _extent(many.legends[0])
    assert not [ax for ax in many.axes if legend.overlaps(_extent(ax)) or legend.overlaps(_extent(ax.title))]


def test_seed_picture_names_each_method_apart_and_tells_each_seed_apart(kept_figures):
    """Every method of a report (the demo's seven, the warm-up and the released rule): no tick label runs into its
    neighbour ("CSL's share by confidence", "CSL, released code's rule" and a long run name were drawn one line
    wide, over the next); twelve seeds: no two drawn alike (the colour cycle has ten, seed 10 was seed 0's line)."""
    from csl.report import LABELS

    methods = [*LABELS.values(), "my_own_run_with_a_long_name_and_no_space"]
    assert "warm-up" in methods
    plots.plot_miou_by_seed({m: {seed: 0.4 + 0.01 * seed for seed in range(12)} for m in methods}, "s.png")
    ax = kept_figures[0].axes[0]
    ax.figure.canvas.draw()
    boxes = [_extent(t) for t in ax.get_xticklabels()]
    assert len(boxes) == len(methods)
    assert not [(a, b) for a, b in itertools.pairwise(boxes) if a.x1 > b.x0]
    looks = [(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in ax.get_lines()
             if ln.get_label().startswith("seed ")]
    assert len(looks) == 12 == len(set(looks))


def test_curves_mark_whole_iterations_only(kept_figures):
    """Two evaluations, at iterations 20 and 40 (a short run): the iteration axis of the mIoU and pseudo-label
    curves was ticked 22.5, 27.5, ..., iterations that do not exist; it holds whole numbers only."""
    records = [{"iter": it, "miou": 0.3, "sampling_rate": 0.5, "accuracy": 0.9, "recall": 0.6} for it in (20, 40)]
    plots.plot_miou_curves({"csl": records}, "c.png")
    plots.plot_pseudo_label_curves({"csl": records}, "p.png")
    for fig in kept_figures:
        fig.canvas.draw()
        for ax in fig.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks


def test_accuracy_recall_legend_says_which_point_is_not_drawn(kept_figures, tmp_path):
    """A weak model selects no pixel at 0.95 (accuracy undefined): the UniMatch square has no place in the plane, and
    its legend entry said so nowhere (a reader looked for it); one CSL point without a correct pixel likewise."""
    def rule(acc, rec):
        return {"accuracy": acc, "recall": rec}

    result = {"threshold": [{"tau": 0.9, **rule(0.95, 0.1)}, {"tau": 0.95, **rule(None, 0.0)}], "sweeps": {},
              "csl": {"hard": rule(0.0, None), "weighted": rule(0.6, 0.8)}}
    plots.plot_accuracy_recall(result, str(tmp_path))
    texts = [t.get_text() for t in kept_figures[0].axes[0].get_legend().get_texts()]
    assert texts == ["confidence threshold sweep", "threshold 0.95 (UniMatch): not drawn, nothing selected",
                     "CSL per image: reliable (w = 1): not drawn, no correct pseudo-label", "CSL per image: weighted"]
