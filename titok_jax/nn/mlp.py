"""Transformer MLPs.

- ``"gelu"``:      ``y = fc_out(gelu(fc_in(x)))``, ``gelu(u) = u/2 * (1 + erf(u/sqrt(2)))`` (exact;
                   PyTorch ``nn.GELU()``, TiTok/open_clip ``c_fc``/``c_proj``).
- ``"gelu_tanh"``: same with ``gelu(u) = u/2 * (1 + tanh(sqrt(2/pi) * (u + 0.044715 u^3)))``
                   (FlowMo/Flux, DiT).
- ``"quick_gelu"``: same with ``u * sigmoid(1.702 u)`` (OpenAI CLIP's ``QuickGELU``).
- ``"swiglu"``:    ``y = fc_out(silu(gate(x)) * value(x))``, ``silu(u) = u * sigmoid(u)``
                   (FlexTok ``GatedMlp``; its hidden width is ``int(2/3 * 4 * dim)``, pass it as
                   ``hidden_dim``).
Kernels are named ``("embed", "mlp")`` in and ``("mlp", "embed")`` out; biases ``("mlp",)`` /
``("embed",)``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from titok_jax.nn.dropout import Dropout
from titok_jax.nn.initializers import Initializer, boxed, default_kernel_init, zeros_init

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "swiglu")


class MLP(nn.Module):
    """Two-layer (or gated three-matrix) MLP ``[..., D] -> [..., out_dim or D]``."""

    hidden_dim: int
    out_dim: int | None = None
    activation: str = "gelu"
    use_bias: bool = True
    dropout_rate: float = 0.0
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = zeros_init
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None

    def _dense(self, features: int, names: tuple[str, str], name: str) -> nn.Dense:
        return nn.Dense(features, use_bias=self.use_bias, dtype=self.dtype,
                        param_dtype=self.param_dtype, precision=self.precision,
                        kernel_init=boxed(self.kernel_init, names),
                        bias_init=boxed(self.bias_init, names[1:]), name=name)

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        out_dim = self.out_dim or x.shape[-1]
        if self.activation == "gelu":
            h = nn.gelu(self._dense(self.hidden_dim, ("embed", "mlp"), "fc_in")(x),
                        approximate=False)
        elif self.activation == "gelu_tanh":
            h = nn.gelu(self._dense(self.hidden_dim, ("embed", "mlp"), "fc_in")(x),
                        approximate=True)
        elif self.activation == "quick_gelu":
            h = self._dense(self.hidden_dim, ("embed", "mlp"), "fc_in")(x)
            h = h * nn.sigmoid(1.702 * h)
        elif self.activation == "swiglu":
            gate = self._dense(self.hidden_dim, ("embed", "mlp"), "gate")(x)
            value = self._dense(self.hidden_dim, ("embed", "mlp"), "value")(x)
            h = nn.silu(gate) * value
        else:
            raise ValueError(f"unknown activation {self.activation!r}; expected {ACTIVATIONS}")
        h = Dropout(self.dropout_rate)(h, deterministic=deterministic)
        return self._dense(out_dim, ("mlp", "embed"), "fc_out")(h)
