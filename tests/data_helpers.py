"""Helpers the data-pipeline tests share (images: test_data_pipeline.py, clips: test_video_data.py)."""
import numpy as np

SINGLE = dict(process_index=0, process_count=1)  # one process, whatever JAX reports


def take(it, k):
    """The next ``k`` batches of an iterator."""
    return [next(it) for _ in range(k)]


def assert_batches_equal(xs, ys):
    """Two lists of batches (dicts of arrays) hold the same keys and bit-identical arrays."""
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
