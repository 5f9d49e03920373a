"""Box encodings of the student's visual tokens (student/spatial.py)."""

import math

import pytest
import torch

from student.spatial import IMAGE_BOX, box_feature5, normalize_boxes, sine_box_encoding

torch.set_num_threads(1)


def test_normalize_boxes_divides_by_image_size_and_clamps():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 60.0], [-3.0, 0.0, 210.0, 100.0]])
    out = normalize_boxes(boxes, 200, 100)
    assert torch.allclose(out[0], torch.tensor([0.05, 0.2, 0.25, 0.6]))
    assert torch.allclose(out[1], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # spills past the border are clamped


def test_normalize_boxes_uses_each_images_own_size_in_a_batch():
    boxes = torch.tensor([[[10.0, 10.0, 20.0, 20.0]], [[10.0, 10.0, 20.0, 20.0]]])   # [B=2, R=1, 4]
    out = normalize_boxes(boxes, torch.tensor([[100.0], [20.0]]), torch.tensor([[50.0], [40.0]]))
    assert torch.allclose(out[0, 0], torch.tensor([0.1, 0.2, 0.2, 0.4]))
    assert torch.allclose(out[1, 0], torch.tensor([0.5, 0.25, 1.0, 0.5]))


def test_box_feature5_is_vilberts_location_vector():
    W, H = 640.0, 480.0
    px = torch.tensor([[64.0, 48.0, 320.0, 240.0]])
    feat = box_feature5(normalize_boxes(px, W, H))
    area = (320 - 64) * (240 - 48) / (W * H)
    assert torch.allclose(feat, torch.tensor([[0.1, 0.1, 0.5, 0.5, area]]))


def test_box_feature5_of_the_image_box_and_of_a_degenerate_box():
    assert box_feature5(torch.tensor(IMAGE_BOX)).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    flipped = torch.tensor([0.6, 0.5, 0.4, 0.7])                        # x2 < x1: no negative area
    assert box_feature5(flipped)[4].item() == 0.0


def test_sine_encoding_matches_the_documented_formula():
    box = torch.tensor([0.1, 0.2, 0.5, 0.8])
    dim, s, T = 16, 100.0, 1000.0
    enc = sine_box_encoding(box, dim, scale=s, temperature=T)
    m = dim // 8
    coords = [0.3, 0.5, 0.4, 0.6]                                        # cx, cy, w, h
    expected = []
    for c in coords:
        angles = [s * c * T ** (-k / m) for k in range(m)]
        expected += [math.sin(a) for a in angles] + [math.cos(a) for a in angles]
    assert enc.shape == (dim,)
    assert torch.allclose(enc, torch.tensor(expected), atol=1e-5)


def test_sine_encoding_shapes_range_and_unit_pairs():
    boxes = torch.rand(3, 5, 4)
    enc = sine_box_encoding(boxes, 32)
    assert enc.shape == (3, 5, 32) and enc.dtype == boxes.dtype
    pairs = enc.view(3, 5, 4, 2, 4)                                      # [.., coord, sin|cos, freq]
    assert torch.allclose(pairs[..., 0, :] ** 2 + pairs[..., 1, :] ** 2, torch.ones(3, 5, 4, 4), atol=1e-5)


def test_sine_encoding_separates_nearby_boxes_more_than_identical_ones():
    a = torch.tensor([0.10, 0.10, 0.30, 0.30])
    near = torch.tensor([0.11, 0.10, 0.31, 0.30])
    far = torch.tensor([0.60, 0.55, 0.90, 0.95])
    ea, en, ef = (sine_box_encoding(b, 64) for b in (a, near, far))
    assert torch.equal(sine_box_encoding(a.clone(), 64), ea)
    assert 0 < (ea - en).norm() < (ea - ef).norm()


@pytest.mark.parametrize("dim", [0, 12, -8])
def test_sine_encoding_rejects_widths_that_are_not_multiples_of_8(dim):
    with pytest.raises(ValueError, match="multiple of 8"):
        sine_box_encoding(torch.zeros(4), dim)
