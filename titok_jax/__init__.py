"""titok_jax: JAX/Flax image tokenizers, quantizers and generators.

Sub-packages (imports only go down): ``quantizers`` and ``nn`` are the floor every model stands on.
"""
__version__ = "0.1.0"


def load_tokenizer(*args, **kwargs):
    """The tokenizer of a workdir at its latest checkpoint; see ``titok_jax.api.load_tokenizer``."""
    from titok_jax.api import load_tokenizer as load
    return load(*args, **kwargs)


def load_generator(*args, **kwargs):
    """The token generator of a workdir; see ``titok_jax.generation.load_generator``."""
    from titok_jax.generation import load_generator as load
    return load(*args, **kwargs)


__all__ = ["load_tokenizer", "load_generator", "__version__"]
