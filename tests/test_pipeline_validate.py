"""Image checks of the labeling job (pipeline/validate.py) on real encoded images."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.validate import ValidationConfig, check_image, verify_image
from shards.errors import SampleError


def _encode(fmt: str, width: int = 203, height: int = 131) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_verify_gives_the_full_size_of_a_good_image(fmt):
    data = _encode(fmt)
    array = check_image("k", "success", data, None, ValidationConfig())
    assert verify_image("k", "success", data, None, ValidationConfig()) == (203, 131) == array.shape[1::-1]


@pytest.mark.parametrize("cut", [0.3, 0.9, 0.999])
def test_verify_rejects_a_truncated_jpeg_like_a_full_decode(cut):
    data = _encode("JPEG")
    data = data[: int(len(data) * cut)]
    for check in (check_image, verify_image):
        with pytest.raises(SampleError) as err:
            check("k", "success", data, None, ValidationConfig())
        assert err.value.stage == "image" and "corrupt" in err.value.reason


def test_verify_rejects_garbage_missing_bytes_failed_rows_and_bombs():
    config = ValidationConfig(max_image_pixels=100 * 100)
    cases = {b"not an image at all": "corrupt", None: "missing", _encode("JPEG"): "too large"}
    for data, reason in cases.items():
        with pytest.raises(SampleError) as err:
            verify_image("k", "success", data, None, config)
        assert err.value.stage == "image" and reason in err.value.reason
    with pytest.raises(SampleError) as err:
        verify_image("k", "failed_to_download", _encode("JPEG"), "timeout", ValidationConfig())
    assert "failed_to_download" in err.value.reason and "timeout" in err.value.reason
