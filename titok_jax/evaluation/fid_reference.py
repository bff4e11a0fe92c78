"""Command line: FID reference statistics (``mu``, ``sigma``) of a data split, as an ``.npz``::

    python -m titok_jax.evaluation.fid_reference --data folder:/data/imagenet/val --image-size 256 \\
        --inception-weights inception_fid.safetensors --output imagenet_val_256.npz

Images are read and centre-cropped to ``--image-size`` by the evaluation pipeline
(``titok_jax.data.make_eval_iterator``), rounded to uint8 and passed through pytorch-fid's
InceptionV3 (:func:`titok_jax.models.inception.inception_feature_fn`); the 2048-d pool features are
accumulated in float64 (:class:`titok_jax.evaluation.fid.FeatureStats`). The result is what
``config.eval.fid_reference`` reads. This module sits on top of data and models (it is a command,
not part of the ``titok_jax.evaluation`` package namespace).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import numpy as np

from titok_jax.data import make_eval_iterator
from titok_jax.evaluation.fid import FeatureStats, save_reference_stats
from titok_jax.models.inception import POOL_FEATURES, inception_feature_fn, load_inception_params


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m titok_jax.evaluation.fid_reference --data SOURCE --inception-weights FILE
    --output ref.npz``; 0 on success, 1 with one line on stderr on bad input.
    """
    parser = argparse.ArgumentParser(prog="python -m titok_jax.evaluation.fid_reference",
                                     description="Write FID reference statistics (mu, sigma) of a "
                                                 "data split.")
    parser.add_argument("--data", required=True, help="data source: sample, folder:PATH or tfds:NAME")
    parser.add_argument("--split", default="eval", help="split name (default: eval)")
    parser.add_argument("--data-dir", default=None, help="TFDS data_dir")
    parser.add_argument("--image-size", type=int, default=256, help="centre-crop size (default 256)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--max-images", type=int, default=0, help="0 = the whole split")
    parser.add_argument("--inception-weights", required=True,
                        help="file from `python -m titok_jax.convert.inception`")
    parser.add_argument("--output", required=True, help="output .npz (mu, sigma)")
    args = parser.parse_args(argv)
    try:
        params = load_inception_params(args.inception_weights)
        features = inception_feature_fn()
        stats = FeatureStats(POOL_FEATURES)
        it = make_eval_iterator(args.data, args.image_size, args.batch_size, split=args.split,
                                data_dir=args.data_dir, process_index=0, process_count=1)
        for batch in it:
            mask = np.asarray(batch["mask"], bool)
            if args.max_images:
                mask &= np.cumsum(mask) + stats.n <= args.max_images
            stats.update(np.asarray(features(params, batch["image"])["pool"]), mask)
            if args.max_images and stats.n >= args.max_images:
                break
        mu, sigma = stats.result()
        save_reference_stats(args.output, mu, sigma, num_images=stats.n)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}: mu {mu.shape}, sigma {sigma.shape} from {stats.n} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
