"""Quantizers: VQ, FSQ, LFQ (and BSQ), factorized (FQGAN) and residual; see ``base`` for the contract."""
from titok_jax.quantizers.base import QuantizerOutput, RNG, STATS  # noqa: F401
from titok_jax.quantizers.factorized import FactorizedQuantizer, disentanglement_loss  # noqa: F401
from titok_jax.quantizers.fsq import FSQ  # noqa: F401
from titok_jax.quantizers.lfq import LFQ  # noqa: F401
from titok_jax.quantizers.residual import ResidualQuantizer  # noqa: F401
from titok_jax.quantizers.vq import VectorQuantizer  # noqa: F401
