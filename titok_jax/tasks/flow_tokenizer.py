"""What the flow-decoder tokenizers (FlexTok, FlowMo) share: the token spec and the inference side.

Their models expose ``encode(images) -> (codes, QuantizerOutput)`` and
``decode_tokens(ids, key=, steps=, guidance_scale=)`` (a rectified-flow sampler), plus
``default_steps`` / ``default_guidance``; ``variable_length`` tokenizers decode any prefix.
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from titok_jax.tasks.base import TokenizerTaskBase, TokenSpec


class FlowTokenizerTask(TokenizerTaskBase):
    """``encode`` / ``features`` / ``decode`` / ``token_spec`` of a flow-decoder tokenizer whose
    module is ``self.model``; subclasses give training, ``reconstruct`` and ``variable_length``."""

    variable_length: ClassVar[bool] = False
    model: Any

    @property
    def token_spec(self) -> TokenSpec:
        m = self.model
        return TokenSpec(image_size=int(m.image_size), num_tokens=int(m.num_latent_tokens),
                         codebook_size=int(m.codebook_size), token_dim=int(m.token_size),
                         quantizer=str(m.quantizer_name), flow_decoder=True,
                         variable_length=self.variable_length, default_steps=int(m.default_steps),
                         default_guidance=float(m.default_guidance), noise_shape=m.noise_shape(1)[1:])

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
        spec = self.token_spec
        if noise is None and key is None:
            key = jax.random.key(0)
        rec = self.model.apply({"params": model_params, **model_state}, tokens, key=key, noise=noise,
                               steps=int(spec.default_steps if steps is None else steps),
                               guidance_scale=spec.default_guidance if guidance is None else guidance,
                               method="decode_tokens")
        return jnp.clip(rec.astype(jnp.float32), 0.0, 1.0)
