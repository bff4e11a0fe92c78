"""The tokenizer task: a pixels-in, pixels-out tokenizer (single-stage TiTok; later the VQGAN)
trained with

    loss = w_rec * recon(x_hat, x) + quantizer terms (commitment/codebook or KL)
           + w_lpips * LPIPS(x_hat, x)                         (config.losses.perceptual_weight > 0)
           + w_cnx * MSE(ConvNeXtS(x_hat), ConvNeXtS(x))      (config.losses.convnext_weight > 0)
           + [step >= start] * w_gan * L_G(D(x_hat))         (config.losses.gan_weight > 0)

and, when the GAN term is on, the discriminator's own loss (hinge + w_lecam * LeCam) in the same
step: both gradients are returned as one tree ``{'model': ..., 'disc': ...}`` and every group is
updated by its own optimizer. Images are float32 in [0, 1].
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from titok_jax import losses as L
from titok_jax.models.discriminator import build_discriminator
from titok_jax.models.registry import build_model
from titok_jax.tasks.base import register_task

MODEL_COLLECTIONS = ("quantizer_stats",)
SAMPLE_RNG, QUANTIZER_RNG = "sample", "quantizer"


@register_task("tokenizer")
class TokenizerTask:
    def __init__(self, config: Any):
        self.config = config
        self.model = build_model(config.model, dtype=config.get("compute_dtype", "float32"))
        self.image_size = int(config.data.image_size)
        lc = config.losses
        self.recon_kind = lc.get("reconstruction", "l2")
        self.recon_weight = float(lc.get("reconstruction_weight", 1.0))
        self.lpips_weight = float(lc.get("perceptual_weight", 0.0))
        self.lpips_path = lc.get("perceptual_weights", "")
        self.convnext_weight = float(lc.get("convnext_weight", 0.0))
        self.convnext_path = lc.get("convnext_weights", "")
        self.gan_weight = float(lc.get("gan_weight", 0.0))
        self.gan_start = int(lc.get("gan_start_step", 0))
        self.gan_kind = lc.get("gan_loss", "hinge")
        self.lecam_weight = float(lc.get("lecam_weight", 0.0))
        self.lecam_decay = float(lc.get("lecam_decay", 0.999))
        # losses.discriminator.name: "patchgan" (default, NLayerDiscriminator) or "maskbit".
        self.disc = build_discriminator(lc.get("discriminator", {})) if self.gan_weight > 0 else None

    # ------------------------------------------------------------------ setup
    def _dummy(self) -> jax.Array:
        return jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)

    def init(self, key: jax.Array) -> tuple[dict, dict]:
        k_model, k_disc = jax.random.split(key)
        variables = self.model.init({"params": k_model, SAMPLE_RNG: k_model, QUANTIZER_RNG: k_model},
                                    self._dummy(), train=False)
        params = {"model": variables["params"]}
        state = {"model": {k: v for k, v in variables.items() if k != "params"}}
        if self.disc is not None:
            params["disc"] = self.disc.init(k_disc, self._dummy())["params"]
            state["lecam"] = L.lecam_init()
        return params, state

    def constants(self) -> dict:
        out = {}
        if self.lpips_weight > 0:
            if not self.lpips_path:
                raise ValueError("losses.perceptual_weight > 0 needs --config.losses.perceptual_weights="
                                 "FILE, made by `python -m titok_jax.convert.lpips` from VGG16 + LPIPS "
                                 "weights you have (nothing is downloaded); or set perceptual_weight=0")
            out["lpips"] = L.load_lpips_params(self.lpips_path)
        if self.convnext_weight > 0:
            if not self.convnext_path:
                raise ValueError("losses.convnext_weight > 0 needs --config.losses.convnext_weights=FILE, "
                                 "made by `python -m titok_jax.convert.convnext` from torchvision's "
                                 "convnext_small weights (nothing is downloaded); or set convnext_weight=0")
            out["convnext"] = L.load_convnext_params(self.convnext_path)
        return out

    # ------------------------------------------------------------------ training
    def grads(self, params: dict, state: dict, batch: dict, key: jax.Array, step: jax.Array,
              constants: dict) -> tuple[dict, dict, dict]:
        images = batch["image"].astype(jnp.float32)
        k_sample, k_quant = jax.random.split(key)
        rngs = {SAMPLE_RNG: k_sample, QUANTIZER_RNG: k_quant}
        gan_on = self.disc is not None

        def model_loss(model_params):
            variables = {"params": model_params, **state["model"]}
            (rec, qout), new_vars = self.model.apply(variables, images, train=True, rngs=rngs,
                                                     mutable=list(MODEL_COLLECTIONS))
            rec = rec.astype(jnp.float32)
            metrics = {"reconstruction": L.reconstruction_loss(rec, images, self.recon_kind)}
            total = self.recon_weight * metrics["reconstruction"]
            for name, value in qout.losses.items():
                metrics[f"quantizer/{name}"] = value
                total = total + value
            if self.lpips_weight > 0:
                metrics["perceptual"] = L.lpips_loss(constants["lpips"], rec, images)
                total = total + self.lpips_weight * metrics["perceptual"]
            if self.convnext_weight > 0:
                metrics["perceptual_convnext"] = L.convnext_loss(constants["convnext"], rec, images)
                total = total + self.convnext_weight * metrics["perceptual_convnext"]
            if gan_on:
                def generator_term(r):
                    return L.generator_loss(self.disc.apply({"params": params["disc"]}, r), self.gan_kind)

                # Before the start step the discriminator is not run at all (lax.cond), and the
                # metric reads 0.
                metrics["gan/generator"] = self._after_start(step, generator_term,
                                                             lambda r: jnp.zeros((), jnp.float32), rec)
                total = total + self.gan_weight * metrics["gan/generator"]
            for name, value in qout.metrics.items():
                metrics[f"quantizer/{name}"] = value
            metrics["loss"] = total
            return total, (dict(new_vars), metrics, rec)

        grads_model, (new_vars, metrics, rec) = jax.grad(model_loss, has_aux=True)(params["model"])
        grads = {"model": grads_model}
        new_state = dict(state, model={**state["model"], **new_vars})
        if gan_on:
            fake = jax.lax.stop_gradient(rec)

            def disc_loss(disc_params):
                real_logits = self.disc.apply({"params": disc_params}, images)
                fake_logits = self.disc.apply({"params": disc_params}, fake)
                d = L.discriminator_loss(real_logits, fake_logits, self.gan_kind)
                lecam, lecam_state = L.lecam_regularizer(real_logits, fake_logits, state["lecam"],
                                                         decay=self.lecam_decay)
                return d + self.lecam_weight * lecam, (d, lecam, lecam_state)

            def no_disc_update(disc_params):
                zero = jnp.zeros((), jnp.float32)
                return jax.tree.map(jnp.zeros_like, disc_params), (zero, zero, state["lecam"])

            # D trains (and its LeCam EMAs move) only from the start step on.
            grads["disc"], (d, lecam, lecam_state) = self._after_start(
                step, jax.grad(disc_loss, has_aux=True), no_disc_update, params["disc"])
            metrics.update({"gan/discriminator": d, "gan/lecam": lecam})
            new_state["lecam"] = lecam_state
        return grads, new_state, metrics

    def _after_start(self, step: jax.Array, on: Any, off: Any, operand: Any) -> Any:
        """``on(operand)`` once ``step >= gan_start_step``, else ``off(operand)``; only the chosen
        branch runs (``lax.cond``), so the GAN costs nothing before it starts."""
        if self.gan_start <= 0:
            return on(operand)
        return jax.lax.cond(jnp.asarray(step) >= self.gan_start, on, off, operand)

    # ------------------------------------------------------------------ evaluation
    def reconstruct(self, model_params: Any, state: dict, images: jax.Array) -> tuple[jax.Array, Any]:
        variables = {"params": model_params, **state["model"]}
        rec, out = self.model.apply(variables, images.astype(jnp.float32), train=False)
        return jnp.clip(rec.astype(jnp.float32), 0.0, 1.0), out.indices
