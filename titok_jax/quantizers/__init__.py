"""Quantizers: VQ, FSQ, LFQ (and BSQ), factorized (FQGAN) and residual; see ``base`` for the contract."""
from titok_jax.quantizers.base import QuantizerOutput, RNG, STATS  # noqa: F401
