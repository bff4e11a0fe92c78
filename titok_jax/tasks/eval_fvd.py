"""rFVD of a video tokenizer's evaluation: the Fréchet distance between the I3D features of the
held-out clips and of their reconstructions (``reconstruction_pass`` calls :class:`FVDEval`).

Configured like rFID (``config.eval``; a config without the key skips it, other metrics unchanged):

- ``eval.fvd_weights``: file from ``titok-jax convert-i3d`` ("" = no rFVD);
- ``eval.fvd_features``: ``logits`` (400-d, time-averaged; the standard FVD feature, default) or
  ``pool`` (the 1024-d pooled features);
- ``eval.fvd_bn_eps``: the BatchNorm epsilon the weights were trained for (``1e-5``: VideoGPT's
  ``i3d_pretrained_400.pt``, default; ``1e-3``: piergiaj's ``rgb_imagenet.pt``);
- ``eval.fid_method``: shared with rFID.

The features of both sets are accumulated in float64 (``evaluation.FeatureStats``) and compared with
the image FID's ``frechet_distance_stats``, so FVD and FID are one Fréchet computation. Clips are
rounded to the uint8 grid, resized to 224 x 224 and scaled to [-1, 1] (``nets.i3d.i3d_feature_fn``);
they need at least 9 frames (16 or 17 in the usual protocols). The numbers are comparable with
other pipelines only for the same weights, resize path, clip length and number of clips.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from titok_jax import evaluation as ev
from titok_jax.nets.i3d import BN_EPS, POOL_FEATURES, i3d_feature_fn, i3d_variant, load_i3d_params

_I3D_CACHE: dict = {}
FEATURES = ("logits", "pool")


def fvd_from_features(real: Any, fake: Any, method: str = "sqrtm") -> float:
    """FVD of two feature sets ``[N, D]``: their Gaussians compared by the image FID's code."""
    stats = []
    for f in (real, fake):
        f = np.asarray(f, np.float64)
        s = ev.FeatureStats(f.shape[-1])
        s.update(f.reshape((-1, f.shape[-1])))
        stats.append(s)
    return ev.frechet_distance_stats(stats[0], stats[1], method=method)


class FVDEval:
    """Accumulates I3D features of original and reconstructed clips; ``result()`` = ``{"rfvd"}``."""

    def __init__(self, params: Any, features: str = "logits", method: str = "sqrtm",
                 bn_eps: float = BN_EPS):
        self.params, self.key, self.method = params, features, method
        classes, div = i3d_variant(params)   # 400 for the Kinetics weights; any width (tests)
        self.features = i3d_feature_fn(bn_eps=float(bn_eps), num_classes=classes, channel_div=div)
        dim = classes if features == "logits" else POOL_FEATURES // div
        self.real, self.fake = ev.FeatureStats(dim), ev.FeatureStats(dim)

    @classmethod
    def from_config(cls, config: Any, mesh: Any) -> "FVDEval | None":
        """``None`` unless ``config.eval.fvd_weights`` is set. The weights are read once per
        (file, mesh) and replicated over the mesh."""
        ecfg = config.get("eval", None) or {}
        weights = str(ecfg.get("fvd_weights", "") or "")
        if not weights:
            return None
        features = str(ecfg.get("fvd_features", "logits") or "logits")
        if features not in FEATURES:
            raise ValueError(f"eval.fvd_features must be 'logits' or 'pool', got {features!r}")
        method = str(ecfg.get("fid_method", "sqrtm") or "sqrtm")
        if method not in ("sqrtm", "eigh"):
            raise ValueError(f"eval.fid_method must be 'sqrtm' or 'eigh', got {method!r}")
        bn_eps = float(ecfg.get("fvd_bn_eps", BN_EPS) or BN_EPS)
        key = (os.path.abspath(weights), os.path.getmtime(weights) if os.path.exists(weights) else 0,
               id(mesh))
        if key not in _I3D_CACHE:
            from jax.sharding import NamedSharding, PartitionSpec
            params = load_i3d_params(weights)
            _I3D_CACHE.clear()
            _I3D_CACHE[key] = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        return cls(_I3D_CACHE[key], features, method, bn_eps)

    def update(self, clips: Any, reconstructions: Any, mask: np.ndarray) -> None:
        """Add the rows of ``clips`` / ``reconstructions`` ``[B, T, H, W, 3]`` where ``mask``."""
        if clips.ndim != 5:
            raise ValueError(f"eval.fvd_weights is set but the evaluation data are not clips "
                             f"[B, T, H, W, 3] (got shape {tuple(clips.shape)}); FVD is for video "
                             "tokenizers")
        self.real.update(_gather(self.features(self.params, clips)[self.key]), mask)
        self.fake.update(_gather(self.features(self.params, reconstructions)[self.key]), mask)

    def result(self) -> dict[str, float]:
        return {"rfvd": ev.frechet_distance_stats(self.real, self.fake, method=self.method)}


def _gather(x: Any) -> np.ndarray:
    """The whole batch as NumPy (a global ``jax.Array`` may span other processes' devices)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
