"""Image checks of the labeling job (pipeline/validate.py) on real encoded images."""

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from pipeline.validate import ValidationConfig, check_image, decode_rgb, verify_image
from shards.errors import SampleError


def _encode(fmt: str, width: int = 203, height: int = 131, mode: str = "RGB", **options) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert(mode).save(
        buf, format=fmt, **options)
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


def _pil_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("mode,options", [("RGB", {}), ("RGB", {"subsampling": 0}),
                                          ("RGB", {"progressive": True}), ("L", {}), ("CMYK", {})])
def test_decoded_pixels_are_pil_s(mode, options):
    """libjpeg-turbo called directly (plain JPEGs) or PIL (the rest): the pixels are PIL's either way."""
    data = _encode("JPEG", mode=mode, **options)
    assert np.array_equal(check_image("k", "success", data, None, ValidationConfig()), _pil_rgb(data))
    assert np.array_equal(decode_rgb(data), _pil_rgb(data))


def test_damaged_jpeg_is_judged_by_pil():
    """Zeroed scan bytes make libjpeg warn; PIL decodes such a file anyway, and so the check accepts it."""
    data = bytearray(_encode("JPEG"))
    data[len(data) // 2: len(data) // 2 + 40] = bytes(40)
    data = bytes(data)
    with pytest.raises(ValueError):
        simplejpeg.decode_jpeg(data)       # the fast path refuses it; PIL takes it
    assert np.array_equal(check_image("k", "success", data, None, ValidationConfig()), _pil_rgb(data))
