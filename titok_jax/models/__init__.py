"""Models: tokenizers built from ``titok_jax.nn`` layers and ``titok_jax.quantizers``."""
from titok_jax.models.titok import TiTok, TiTokDecoder, TiTokEncoder  # noqa: F401
from titok_jax.models.titok_variants import TITOK_VARIANTS, titok_variant  # noqa: F401
