"""Quantizers: VQ, FSQ, LFQ (and BSQ), factorized (FQGAN), residual and the Gaussian (VAE) bottleneck;
see ``base`` for the contract."""
from titok_jax.quantizers.base import QuantizerOutput, RNG, STATS  # noqa: F401
from titok_jax.quantizers.factorized import FactorizedQuantizer, disentanglement_loss  # noqa: F401
from titok_jax.quantizers.factory import (QUANTIZERS, QuantizedModel, build_quantizer,  # noqa: F401
                                          freeze_spec, spec_dict)
from titok_jax.quantizers.fsq import FSQ  # noqa: F401
from titok_jax.quantizers.gaussian import GaussianPosterior, gaussian_posterior  # noqa: F401
from titok_jax.quantizers.lfq import LFQ  # noqa: F401
from titok_jax.quantizers.residual import ResidualQuantizer  # noqa: F401
from titok_jax.quantizers.vq import (VectorQuantizer, default_codebook_init,  # noqa: F401
                                     uniform_codebook_init)
