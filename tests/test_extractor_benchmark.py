"""benchmarks/extractor.py's linear probe and its data: the ridge classifier against a closed-form
numpy solve, its accuracy on separable and on label-shuffled data, and the labelled sets' shapes."""
import os
import sys

import numpy as np

from train_helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import extractor as bench  # noqa: E402


def test_ridge_fit_is_the_primal_ridge_solution():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 30)), rng.integers(0, 3, 12)
    lam = 0.7
    model = bench._ridge_fit(x, y, lam, 3)
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    t = 2.0 * np.eye(3)[y] - 1.0
    # dual alpha = (Z Z^T / d + lam / n I)^-1 T  <=>  primal W = Z^T alpha / d
    #            = (Z^T Z / d + lam / n I)^-1 Z^T T / d
    d, n = z.shape[1], z.shape[0]
    w = np.linalg.solve(z.T @ z / d + lam / n * np.eye(d), z.T @ t / d)
    xt = rng.normal(size=(5, 30))
    np.testing.assert_array_equal(bench._ridge_predict(model, xt),
                                  np.argmax(((xt - mean) / std) @ w, axis=1))


def test_probe_separates_separable_classes_and_not_shuffled_ones():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 40)) * 3
    y = np.repeat(np.arange(3), 40)
    x = centres[y] + rng.normal(size=(120, 40))
    order = rng.permutation(120)
    tr, te = order[:80], order[80:]
    assert bench.probe_accuracy(x[tr], y[tr], x[te], y[te]) == 1.0
    shuffled = rng.permutation(y)
    acc = bench.probe_accuracy(x[tr], shuffled[tr], x[te], shuffled[te])
    assert acc < 0.6, acc   # chance is 1/3


def test_labelled_sets_and_heldout_crops():
    crops = bench.heldout_crops()
    assert crops.shape == (15, 64, 64, 3) and crops.dtype == np.float32
    assert 0.0 <= crops.min() and crops.max() <= 1.0
    sets = bench.probe_sets()
    assert sorted(sets) == ["faces", "heldout", "textures"]
    assert len(sets["faces"]) == 5
    for folds in sets.values():
        for xtr, ytr, xte, yte in folds:
            assert xtr.shape[1:] == (64, 64, 3) and len(xtr) == len(ytr) and len(xte) == len(yte)
            assert set(np.unique(ytr)) == set(np.unique(yte))
    # the face folds partition the 200 images
    assert sum(len(f[2]) for f in sets["faces"]) == 200
