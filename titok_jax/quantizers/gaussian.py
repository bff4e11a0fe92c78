"""The diagonal Gaussian bottleneck of the VAE tokenizers (TiTok-VAE, the KL-VAE under FlexTok).

``moments [B, ..., 2C]`` are split into ``mean, logvar`` (``logvar`` clipped to ``[-30, 20]``);
``z = mean + exp(logvar / 2) * eps`` when sampling (rng stream :data:`SAMPLE_RNG`, training only),
else ``z = mean``; ``KL = 0.5 * sum_{n,c} (mean^2 + var - 1 - logvar)`` per image, averaged over the
batch. The result is a :class:`~titok_jax.quantizers.base.QuantizerOutput` with ``indices=None``, so
continuous and discrete bottlenecks reach the trainer the same way.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.quantizers.base import QuantizerOutput

SAMPLE_RNG = "sample"          # rng stream of the posterior sample (train only)
LOGVAR_RANGE = (-30.0, 20.0)


def gaussian_posterior(moments: jax.Array, *, sample_key: jax.Array | None, kl_weight: float
                       ) -> tuple[jax.Array, QuantizerOutput]:
    """Diagonal Gaussian bottleneck on ``moments [B, N, 2C]`` (mean = first ``C`` channels).

    Returns ``z`` (``mean + std * eps`` when ``sample_key`` is given, else ``mean``) and a record
    with ``indices=None``, ``losses={"kl": kl_weight * mean_b sum_{n,c} KL}``, ``metrics={"kl":
    unweighted per-image KL, "posterior_std": mean std}`` and ``aux={"mean", "logvar"}``.
    """
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    logvar = jnp.clip(logvar, *LOGVAR_RANGE)
    std = jnp.exp(0.5 * logvar)
    z = mean if sample_key is None else mean + std * jax.random.normal(sample_key, mean.shape)
    kl_tokens = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1)
    kl = jnp.mean(jnp.sum(kl_tokens.reshape(kl_tokens.shape[0], -1), axis=-1))
    return z, QuantizerOutput(indices=None, losses={"kl": kl_weight * kl},
                              metrics={"kl": kl, "posterior_std": jnp.mean(std)},
                              aux={"mean": mean, "logvar": logvar})


class GaussianPosterior(nn.Module):
    """:func:`gaussian_posterior` as a quantizer module (no params): ``q(moments [..., 2C],
    train)`` samples with the :data:`SAMPLE_RNG` stream when ``train``, else returns the mean."""

    kl_weight: float = 1e-6

    def __call__(self, moments: jax.Array, train: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        key = self.make_rng(SAMPLE_RNG) if train else None
        return gaussian_posterior(moments, sample_key=key, kl_weight=self.kl_weight)
