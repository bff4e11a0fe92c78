"""FID reference statistics (``mu``, ``sigma``) of a data split, as an ``.npz``; the command line is::

    titok-jax fid-reference --data folder:/data/imagenet/val --image_size 256 \\
        --inception_weights inception_fid.safetensors --output imagenet_val_256.npz

Images are read and centre-cropped to ``--image_size`` by the evaluation pipeline
(``titok_jax.data.make_eval_iterator``), rounded to uint8 and passed through pytorch-fid's
InceptionV3 (:func:`titok_jax.nets.inception.inception_feature_fn`); the 2048-d pool features are
accumulated in float64 (:class:`titok_jax.evaluation.fid.FeatureStats`) by :func:`reference_stats`,
which takes any iterable of eval batches. The result is what ``config.eval.fid_reference`` reads.
Only the command (``titok_jax.commands.convert.fid_reference``) reads data.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from titok_jax.evaluation.fid import FeatureStats
from titok_jax.nets.inception import POOL_FEATURES, inception_feature_fn


def reference_stats(batches: Iterable[Mapping[str, Any]], params: Any, max_images: int = 0
                    ) -> FeatureStats:
    """Inception pool-feature statistics of ``batches`` (``{"image": uint8 [B, S, S, 3], "mask":
    bool [B]}``, padded rows masked out), the first ``max_images`` real images (0 = all)."""
    features = inception_feature_fn()
    stats = FeatureStats(POOL_FEATURES)
    for batch in batches:
        mask = np.asarray(batch["mask"], bool)
        if max_images:
            mask &= np.cumsum(mask) + stats.n <= max_images
        stats.update(np.asarray(features(params, batch["image"])["pool"]), mask)
        if max_images and stats.n >= max_images:
            break
    return stats
