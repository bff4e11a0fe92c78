"""Evaluation: pure functions for reconstruction metrics, codebook statistics and image grids.

- ``metrics``: ``psnr``, ``ssim`` (per image, ``[B, H, W, C]`` in ``[0, max_val]``, jit-able).
- ``codebook``: counts accumulated over a held-out set -> usage, entropy (bits), perplexity.
- ``fid``: ``frechet_distance``, ``FeatureStats`` (streaming float64 mean / covariance), reference
  statistics ``.npz`` (``mu``, ``sigma``), ``inception_score``.
- ``images``: ``to_uint8``, ``make_grid`` (originals above reconstructions), PNG and TensorBoard.
"""
from titok_jax.evaluation.codebook import (
    CodebookCounter,
    codebook_entropy,
    codebook_metrics,
    codebook_perplexity,
    codebook_usage,
    init_counts,
    update_counts,
)
from titok_jax.evaluation.fid import (
    FeatureStats,
    frechet_distance,
    frechet_distance_stats,
    inception_score,
    load_reference_stats,
    save_reference_stats,
)
from titok_jax.evaluation.images import (
    load_png,
    log_image,
    log_reconstructions,
    make_grid,
    save_png,
    save_reconstruction_grid,
    to_uint8,
)
from titok_jax.evaluation.metrics import mean_psnr, mean_ssim, mse, psnr, ssim, ssim_window

__all__ = [
    "CodebookCounter", "codebook_entropy", "codebook_metrics", "codebook_perplexity",
    "codebook_usage", "init_counts", "update_counts",
    "FeatureStats", "frechet_distance", "frechet_distance_stats", "inception_score",
    "load_reference_stats", "save_reference_stats",
    "load_png", "log_image", "log_reconstructions", "make_grid", "save_png",
    "save_reconstruction_grid", "to_uint8",
    "mean_psnr", "mean_ssim", "mse", "psnr", "ssim", "ssim_window",
]
