"""titok_jax: JAX/Flax image tokenizers, quantizers and generators.

Sub-packages (imports only go down): ``quantizers`` and ``nn`` are the floor every model stands on.
"""
__version__ = "0.1.0"
