"""Models: tokenizers built from ``titok_jax.nn`` layers and ``titok_jax.quantizers``."""
from titok_jax.models.titok import (TITOK_VARIANTS, TiTok, TiTokDecoder, TiTokEncoder,  # noqa: F401
                                    gaussian_posterior, titok_variant, uniform_codebook_init)
