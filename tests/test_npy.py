"""shards.npy: the fast header path agrees with numpy and never unpickles."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest

from shards.npy import load_npy


def _npy(arr: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("arr", [
    np.arange(144, dtype=np.float32).reshape(36, 4),
    np.random.default_rng(0).random((7, 9)).astype(np.float16),
    np.asfortranarray(np.arange(12, dtype=">i8").reshape(3, 4)),
    np.zeros((0, 4), np.float32),
    np.float32(3.5).reshape(()),
    np.arange(5, dtype=np.uint8),
    np.zeros(3, dtype=[("a", "<f4"), ("b", "<i2")]),  # structured: the np.load fallback
])
def test_matches_numpy(arr):
    got = load_npy(_npy(arr))
    assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got, arr)
    assert got.flags.writeable


def test_refuses_object_arrays_and_bad_sizes():
    data = _npy(np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_npy(data)
    good = _npy(np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="bytes"):
        load_npy(good[:-4])
    with pytest.raises(ValueError):
        load_npy(pickle.dumps(np.zeros(3)))
