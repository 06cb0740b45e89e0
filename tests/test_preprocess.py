"""Preprocessing as the official demo: detectron2 resize rule, Pillow bilinear, pad after norm."""
import numpy as np
import pytest
from PIL import Image

from dvis_trt.errors import InputError
from dvis_trt.runtime.preprocess import preprocess_frames, resize_shortest_edge_shape


@pytest.mark.parametrize("hw,expected", [
    ((360, 640), (480, 853)),     # the DESIGN.md example
    ((640, 360), (853, 480)),     # portrait
    ((333, 501), (480, 722)),     # 501 * 480 / 333 = 722.16
    ((100, 1000), (133, 1333)),   # capped by MAX_SIZE_TEST
])
def test_resize_rule(hw, expected):
    assert resize_shortest_edge_shape(*hw, 480, 1333) == expected


def test_normalise_then_zero_pad_and_bgr_models():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mean, std = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)
    images, (h, w) = preprocess_frames([frame], 40, 100, mean, std, 32)
    assert (h, w) == (40, 60) and images.shape == (1, 3, 64, 64)
    resized = np.asarray(Image.fromarray(frame).resize((60, 40), Image.BILINEAR)).astype(np.float32)
    ref = (resized - np.array(mean, np.float32)) / np.array(std, np.float32)
    np.testing.assert_array_equal(images[0, :, :40, :60], ref.transpose(2, 0, 1))
    assert not images[0, :, 40:].any() and not images[0, :, :, 60:].any()
    bgr, _ = preprocess_frames([frame], 40, 100, mean, std, 32, input_format="BGR")
    ref_bgr = (resized[:, :, ::-1] - np.array(mean, np.float32)) / np.array(std, np.float32)
    np.testing.assert_array_equal(bgr[0, :, :40, :60], ref_bgr.transpose(2, 0, 1))
    with pytest.raises(InputError):
        preprocess_frames([frame], 40, 100, mean, std, 32, input_format="YUV")
