"""csl.plots: label maps in colour, ignored pixels told apart from every class."""

from __future__ import annotations

import numpy as np

from csl.data.colors import palette
from csl.plots import colourize, ignored_colour


def test_ignored_pixels_get_a_colour_no_class_has():
    labels = np.array([[0, 1, 255], [2, 255, 0]])
    voc = palette(21)  # VOC: class 0 (background) is black
    rgb = colourize(labels, voc)
    assert (rgb[0, 0] == 0).all() and (rgb[0, 2] == (224, 224, 192)).all() and (rgb[1, 1] == rgb[0, 2]).all()
    assert (rgb[0, 1] == voc[1]).all() and (rgb[1, 2] == voc[0]).all()
    for colours in (palette(11, "camvid"), palette(19, "cityscapes"), palette(256), palette(300)):
        assert not (colours == ignored_colour(colours)).all(axis=1).any()
    taken = np.array([[224, 224, 192], [255, 255, 255]], dtype=np.uint8)  # the first choices taken by classes
    assert tuple(ignored_colour(taken)) == (128, 128, 128)
    assert (colourize(np.array([[7, -1]]), taken) == (128, 128, 128)).all()  # out of range: drawn as ignored
