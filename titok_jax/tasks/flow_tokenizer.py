"""What the flow-decoder tokenizers (FlexTok, FlowMo, the extractor's ``decoder_head="flow"``)
share: the token spec and the inference side.

Their models expose ``encode(images) -> (codes, QuantizerOutput)`` and
``decode_tokens(ids, key=, noise=, steps=, guidance_scale=)`` (a rectified-flow sampler), plus
``default_steps`` / ``default_guidance`` and ``noise_shape(B)``; ``variable_length`` tokenizers
decode any prefix. :func:`flow_token_spec` and :func:`flow_decode` are the two pieces a task whose
decoder is a flow only by config (the extractor) uses without being a ``FlowTokenizerTask``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from titok_jax.tasks.base import TokenizerTaskBase, TokenSpec


def flow_token_spec(spec: TokenSpec, model: Any) -> TokenSpec:
    """``spec`` for a flow decoder: ``flow_decoder``, the model's ``default_steps`` /
    ``default_guidance`` and one example's initial noise shape ``model.noise_shape(1)[1:]``."""
    return dataclasses.replace(spec, flow_decoder=True, default_steps=int(model.default_steps),
                               default_guidance=float(model.default_guidance),
                               noise_shape=tuple(int(d) for d in model.noise_shape(1)[1:]))


def flow_decode(model: Any, variables: dict, tokens: jax.Array, spec: TokenSpec, *,
                key: jax.Array | None = None, steps: int | None = None,
                guidance: float | None = None, noise: jax.Array | None = None,
                **model_kwargs: Any) -> jax.Array:
    """Tokens -> images in [0, 1] with the model's flow sampler (``decode_tokens``): ``steps`` /
    ``guidance`` default to the spec's (the model's published sampler); the start is ``noise``
    ``(B, *spec.noise_shape)``, else noise drawn with ``key`` (default ``key(0)``).
    ``model_kwargs`` go to ``decode_tokens`` as they are (the extractor's visible patches)."""
    if noise is None and key is None:
        key = jax.random.key(0)
    rec = model.apply(variables, tokens, key=key, noise=noise,
                      steps=int(spec.default_steps if steps is None else steps),
                      guidance_scale=spec.default_guidance if guidance is None else guidance,
                      method="decode_tokens", **model_kwargs)
    return jnp.clip(rec.astype(jnp.float32), 0.0, 1.0)


class FlowTokenizerTask(TokenizerTaskBase):
    """``encode`` / ``features`` / ``decode`` / ``token_spec`` of a flow-decoder tokenizer whose
    module is ``self.model``; subclasses give training, ``reconstruct`` and ``variable_length``."""

    variable_length: ClassVar[bool] = False
    model: Any

    @property
    def token_spec(self) -> TokenSpec:
        m = self.model
        return flow_token_spec(TokenSpec(image_size=int(m.image_size),
                                         num_tokens=int(m.num_latent_tokens),
                                         codebook_size=int(m.codebook_size),
                                         token_dim=int(m.token_size),
                                         quantizer=str(m.quantizer_name),
                                         variable_length=self.variable_length), m)

    def _encode(self, model_params: Any, model_state: Any, images: jax.Array) -> tuple[jax.Array, Any]:
        return self.model.apply({"params": model_params, **model_state}, images.astype(jnp.float32),
                                method="encode")

    def encode(self, model_params: Any, model_state: Any, images: jax.Array) -> jax.Array:
        return self._encode(model_params, model_state, images)[1].indices.astype(jnp.int32)

    def features(self, model_params: Any, model_state: Any, images: jax.Array) -> jax.Array:
        return self._encode(model_params, model_state, images)[0].astype(jnp.float32)

    def decode(self, model_params: Any, model_state: Any, tokens: jax.Array, *,
               key: jax.Array | None = None, steps: int | None = None,
               guidance: float | None = None, noise: jax.Array | None = None) -> jax.Array:
        """Integer ids (any prefix ``[B, k]`` when ``variable_length``) -> images in [0, 1] with the
        flow sampler (default: the model's published ``steps`` / ``guidance``) from ``noise``
        ``(B, *token_spec.noise_shape)``, else from noise drawn with ``key`` (default ``key(0)``)."""
        return flow_decode(self.model, {"params": model_params, **model_state}, tokens,
                           self.token_spec, key=key, steps=steps, guidance=guidance, noise=noise)
