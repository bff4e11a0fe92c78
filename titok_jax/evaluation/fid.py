"""Fréchet Inception Distance and Inception Score (NumPy / SciPy, float64).

For Gaussians ``N(mu1, S1)`` and ``N(mu2, S2)`` fitted to two sets of Inception pool3 features::

    FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr( (S1 S2)^(1/2) )

``(S1 S2)^(1/2)`` is ``scipy.linalg.sqrtm``; if it is not finite (a near-singular product), both
covariances get ``eps * I`` added and it is recomputed; an imaginary part above 1e-3 on the
diagonal is an error, a smaller one is dropped (pytorch-fid's conventions). rFID is the FID between
the features of a held-out split's originals and of their reconstructions. For fewer images than
feature dimensions, :func:`frechet_distance_stats` computes the same trace in the span of the
features (exact, and seconds instead of minutes on a CPU).

Inception Score of ``N`` images with class posteriors ``p(y|x_i) = softmax(logits_i)``, per split::

    IS = exp( mean_i KL(p(y|x_i) || p(y)) ),  p(y) = mean_i p(y|x_i)

returned as (mean, std) over ``splits`` equal chunks.

Reference statistics are ``.npz`` files with ``mu`` ``[D]`` and ``sigma`` ``[D, D]`` (the format of
pytorch-fid's ``--save-stats`` and of the ADM evaluator's reference batches). Write them from a data
split with::

    titok-jax fid-reference --data folder:/data/imagenet/val --image_size 256 \\
        --inception_weights inception_fid.safetensors --output imagenet_val_256.npz

(images are centre-cropped to ``--image_size`` exactly as the evaluation pipeline does, and quantised
to uint8 like saved PNGs).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6,
                     method: str = "sqrtm") -> float:
    """FID between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` in float64 (formula in the module doc).

    ``method="sqrtm"`` (default) is pytorch-fid's computation. ``method="eigh"`` uses that
    ``S1 S2`` is similar to the PSD ``M = S1^(1/2) S2 S1^(1/2)``, so
    ``tr (S1 S2)^(1/2) = sum_k sqrt(max(lambda_k(M), 0))`` with two symmetric eigendecompositions:
    the same value up to rounding, several times faster for D = 2048 on a CPU.
    Raises ``ValueError`` on mismatched shapes or a significantly complex ``sqrtm``.
    """
    from scipy import linalg

    if method not in ("sqrtm", "eigh"):
        raise ValueError(f"frechet_distance: method must be 'sqrtm' or 'eigh', got {method!r}")

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"FID statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        w, v = linalg.eigh((s1 + s1.T) / 2)
        root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        lam = linalg.eigvalsh(root @ ((s2 + s2.T) / 2) @ root)
        tr_covmean = float(np.sum(np.sqrt(np.clip(lam, 0.0, None))))
        return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component of "
                             f"{np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


class FeatureStats:
    """Streaming mean and covariance of feature vectors, accumulated in float64.

    Keeps ``n``, ``s = sum_i f_i`` and ``ss = sum_i f_i f_i^T``; then ``mu = s / n`` and the unbiased
    ``sigma = (ss - n mu mu^T) / (n - 1)`` (``np.cov``'s normalisation). While ``n <= keep_rows``
    (default: ``dim``) the rows are kept too, so :meth:`factor` can give ``A`` with
    ``sigma = A A^T`` (``A = (F - mu)^T / sqrt(n - 1)``, ``[dim, n]``); :func:`frechet_distance_stats`
    then avoids ``dim x dim`` decompositions for small evaluation sets.
    """

    def __init__(self, dim: int, keep_rows: int | None = None):
        self.dim = int(dim)
        self.keep_rows = self.dim if keep_rows is None else int(keep_rows)
        self.n = 0
        self.sum = np.zeros((self.dim,), np.float64)
        self.sum_sq = np.zeros((self.dim, self.dim), np.float64)
        self._rows: list[np.ndarray] | None = []

    def update(self, features: Any, mask: Any = None) -> None:
        """Add the rows of ``features`` ``[N, dim]`` (only those where ``mask`` ``[N]`` is True)."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features of shape [N, {self.dim}], got {f.shape}")
        if mask is not None:
            f = f[np.asarray(mask, bool)]
        self.n += f.shape[0]
        self.sum += f.sum(axis=0)
        self.sum_sq += f.T @ f
        if self._rows is not None:
            self._rows = self._rows + [f] if self.n <= self.keep_rows else None

    def mean(self) -> np.ndarray:
        if self.n < 1:
            raise ValueError("FeatureStats: no features were added")
        return self.sum / self.n

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"FeatureStats: a covariance needs at least 2 feature vectors, got {self.n}")
        mu = self.mean()
        return (self.sum_sq - self.n * np.outer(mu, mu)) / (self.n - 1)

    def factor(self) -> np.ndarray | None:
        """``A [dim, n]`` with ``cov() == A @ A.T`` while the rows are kept, else ``None``."""
        if self._rows is None or self.n < 2:
            return None
        rows = np.concatenate(self._rows, axis=0)
        return (rows - rows.mean(axis=0)).T / np.sqrt(self.n - 1)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu [dim], sigma [dim, dim])``."""
        return self.mean(), self.cov()


def frechet_distance_stats(a: "FeatureStats | tuple", b: "FeatureStats | tuple",
                           method: str = "sqrtm") -> float:
    """FID between two :class:`FeatureStats` (or ``(mu, sigma)`` pairs).

    When a side has a low-rank factor ``S = A A^T`` (few rows, see :meth:`FeatureStats.factor`) the
    trace term is computed exactly in the small space: ``tr (S1 S2)^(1/2)`` is the nuclear norm of
    ``A1^T A2`` when both have factors, else ``sum sqrt(eig(A^T S_other A))``; otherwise this is
    :func:`frechet_distance` with ``method``.
    """
    def unpack(x):
        if isinstance(x, FeatureStats):
            return x.mean(), x.cov(), x.factor()
        return np.asarray(x[0], np.float64), np.asarray(x[1], np.float64), None

    (mu1, s1, a1), (mu2, s2, a2) = unpack(a), unpack(b)
    if a1 is None and a2 is None:
        return frechet_distance(mu1, s1, mu2, s2, method=method)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"FID statistics differ in shape: mu {mu1.shape} vs {mu2.shape}")
    if a1 is not None and a2 is not None:
        tr_covmean = float(np.sum(np.linalg.svd(a1.T @ a2, compute_uv=False)))
    else:
        f, other = (a1, s2) if a1 is not None else (a2, s1)
        lam = np.linalg.eigvalsh(f.T @ other @ f)
        tr_covmean = float(np.sum(np.sqrt(np.clip(lam, 0.0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def save_reference_stats(path: str | os.PathLike, mu: Any, sigma: Any, **extra: Any) -> None:
    """Write ``mu`` / ``sigma`` (float64) to an ``.npz`` (readable by pytorch-fid as well)."""
    np.savez(os.fspath(path), mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
             **{k: np.asarray(v) for k, v in extra.items()})


def load_reference_stats(path: str | os.PathLike, dim: int | None = None
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` from an ``.npz`` holding ``mu`` ``[D]`` and ``sigma`` ``[D, D]``; checked."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"FID reference statistics not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "mu" not in data.files or "sigma" not in data.files:
                raise ValueError(f"{path}: FID reference statistics need arrays 'mu' and 'sigma', "
                                 f"found {sorted(data.files)}")
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is not a readable .npz file: {e}") from None
    d = mu.shape[0] if mu.ndim == 1 else -1
    if mu.ndim != 1 or sigma.shape != (d, d) or (dim is not None and d != dim):
        raise ValueError(f"{path}: mu {mu.shape} / sigma {sigma.shape} are not [D] / [D, D]"
                         + (f" with D = {dim}" if dim is not None else ""))
    return mu, sigma


def inception_score(logits: Any, splits: int = 1) -> tuple[float, float]:
    """Inception Score ``(mean, std)`` over ``splits`` chunks of ``logits`` ``[N, K]`` (float64).

    Uses ``log_softmax`` directly (no epsilon); with ``splits=1`` the std is 0.
    """
    from scipy.special import log_softmax

    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[0] < 1:
        raise ValueError(f"inception_score expects logits [N, K] with N >= 1, got {z.shape}")
    if not 1 <= splits <= z.shape[0]:
        raise ValueError(f"inception_score: splits must be in [1, {z.shape[0]}], got {splits}")
    scores = []
    for part in np.array_split(z, splits):
        logp = log_softmax(part, axis=1)
        p = np.exp(logp)
        log_py = np.log(np.mean(p, axis=0))
        kl = np.sum(p * (logp - log_py[None]), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))
