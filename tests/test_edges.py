"""Edge agreement (eval/edges.py): F1 of edge pixels matched within a tolerance, by hand-made
maps whose precision and recall are known, and on images through Canny."""

import numpy as np
import pytest

from diffusion_jax.eval.edges import edge_agreement, edge_f1


def square(side=16, lo=4, hi=11):
    edges = np.zeros((side, side), bool)
    edges[lo, lo:hi + 1] = edges[hi, lo:hi + 1] = True
    edges[lo:hi + 1, lo] = edges[lo:hi + 1, hi] = True
    return edges


def test_identical_maps_agree_and_disjoint_ones_do_not():
    assert edge_f1(square(), square()) == 1.0
    far = np.zeros((16, 16), bool)
    far[0, 0] = far[15, 15] = True
    assert edge_f1(square(), far) == 0.0
    empty = np.zeros((16, 16), bool)
    assert edge_f1(empty, empty) == 1.0 and edge_f1(square(), empty) == 0.0


def test_a_one_pixel_shift_matches_within_the_tolerance_only():
    shifted = np.roll(square(), 1, axis=1)
    assert edge_f1(square(), shifted, tolerance=1) == 1.0
    # Without tolerance the two vertical sides miss; the horizontal ones overlap on 7 of 8.
    control, sample = square(), shifted
    hits = np.sum(control & sample)
    precision, recall = hits / sample.sum(), hits / control.sum()
    assert edge_f1(control, sample, tolerance=0) == pytest.approx(
        2 * precision * recall / (precision + recall))
    assert 0 < edge_f1(control, sample, tolerance=0) < 1


def test_precision_and_recall_from_counts():
    """The sample finds half the control's 4 pixels and adds 2 far away: P = R = 1/2."""
    control = np.zeros((20, 20), bool)
    control[2, 2] = control[2, 10] = control[10, 2] = control[10, 10] = True
    sample = np.zeros((20, 20), bool)
    sample[2, 2] = sample[10, 10] = sample[18, 5] = sample[5, 18] = True
    assert edge_f1(control, sample, tolerance=1) == pytest.approx(0.5)
    sample[18, 5] = sample[5, 18] = False  # P = 1, R = 1/2
    assert edge_f1(control, sample, tolerance=1) == pytest.approx(2 * 0.5 / 1.5)


def test_edge_agreement_of_images_through_canny():
    pytest.importorskip("cv2", reason="opencv-python-headless is not installed")
    image = np.zeros((1, 32, 32, 3), np.float32)
    image[0, 8:24, 8:24] = 1.0  # a white square: its outline is the edge map
    from diffusion_jax.data.conditions import canny_edges

    control = canny_edges(np.uint8(image[0] * 255), 100, 200)[None] / 255.0
    assert control.any()
    assert edge_agreement(control, image) == 1.0
    assert edge_agreement(control, np.zeros_like(image)) == 0.0
    moved = np.roll(image, 6, axis=2)
    assert 0 < edge_agreement(control, moved) < 0.6


def test_errors_name_the_shapes():
    with pytest.raises(ValueError, match="one shape"):
        edge_f1(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="tolerance=-1"):
        edge_f1(np.zeros((4, 4)), np.zeros((4, 4)), tolerance=-1)
    with pytest.raises(ValueError, match="must have one shape"):
        edge_agreement(np.zeros((1, 4, 4, 3)), np.zeros((2, 4, 4, 3)))
