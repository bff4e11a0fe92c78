"""The ``extractor`` task: the tokenizer task's objective (``tasks.tokenizer``: pixel loss, quantizer
terms, optional LPIPS / ConvNeXt / GAN) on the extractor's masked training forward, plus REPA::

    loss = w_rec * mean_{masked pixels} recon(x_hat, x) + quantizer terms + perceptual / GAN terms
           + repa.weight * (-mean cos(projector(h_layer[keep]), teacher(x)[keep]))

Per step (``models.extractor_masking``): ONE encoder masking ratio ``r`` is drawn from
``masking.encoder_ratios`` / ``encoder_probs`` and the step runs that ratio's branch of a
``lax.switch`` (one branch per ratio, each with its static number of kept patches, so the encoder
costs less as ``r`` grows; every branch is compiled once); the kept patches themselves, the
nested-dropout lengths (``masking.nested_dropout``) and the decoder masking ratio ``m``
(``masking.decoder_ratios`` / ``decoder_probs``) are drawn per example. With
``masking.loss_on_masked_only`` the pixel loss is averaged over the patches the decoder did not see
(all of them where ``m = 1``); the perceptual and GAN terms always see whole images.

The REPA teacher (``config.repa.teacher``, as FlexTok's: ``nets.dinov2.ViTFeatures`` kwargs and a
``.safetensors`` / ``.npz`` from ``titok-jax convert-dinov2``; a seeded random one only with
``allow_random``, said loudly) runs on the whole image; its patch features are resized to the
model's patch grid (``losses.repa.match_grid``) and the kept patches' rows are aligned with the
projected encoder features of block ``model.repa_layer``. A step whose ratio removes every patch
has no REPA term (0).

Decoder REPA (``repa.decoder_weight > 0``, default 0): the projected grid slots of decoder block
``model.decoder_repa_layer`` (every patch position, ``decoder_repa_projector``) are aligned with the
same teacher features on all ``P`` patches: ``+ repa.decoder_weight * (-mean cos(...))``, logged
as ``repa_decoder``.

The flow head (``model.decoder_head = "flow"``, ``models.extractor``): in the data space
``x = 2 img - 1``, per example ``t ~ config.flow`` (``time_sampler`` / ``time_params``,
``flow.sample_time``; default FlowMo's 0.9 logit-normal(0, 1) + 0.1 U(0, 1)) and ``eps ~ N(0, I)``;
the decoder reads ``x_t = (1 - t) x + t eps`` in its masked grid slots (visible ones: the clean
patches, as the pixel head) and predicts ``v``; the pixel loss is replaced by the rectified-flow
velocity MSE::

    flow = sum w (v - (eps - x))^2 / sum w        w = 1 on the decoder-masked pixels with
                                                  ``masking.loss_on_masked_only``, else 1 everywhere

logged as ``reconstruction``. Perceptual / GAN terms (off in ``tiny``) see the one-step estimate
``(x_t - t v + 1) / 2`` with the visible patches pasted in (FlowMo's LPIPS input).
``masking.cfg_dropout`` (default 0) nulls a fraction of the examples' tokens (``keep_k = 0``:
every slot the dropped code), the null condition of CFG at decode time. Evaluation
(``reconstruct``) decodes with ``config.sampler`` (``steps``, ``guidance``, ``seed``: a fixed key,
deterministic); ``decode`` is ``tasks.flow_tokenizer.flow_decode`` (``steps`` / ``guidance`` /
``noise`` / ``key``, visible patches too) and the token spec says ``flow_decoder``.

Inference (``encode`` / ``decode`` / ``reconstruct``) runs without masking; ``decode`` takes any
prefix ``[B, k]`` of the ids, and ``visible`` images with a ``visible_mask`` (bool ``[B, P]`` or
``[B, g, g]``) for completion from tokens; ``features`` are the pre-quantisation tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from titok_jax import losses as L
from titok_jax.flow import interpolate, sample_time, velocity_target, x0_from_velocity
from titok_jax.losses.repa import match_grid, repa_loss
from titok_jax.models import extractor_masking as masking
from titok_jax.models.flextok_blocks import NESTED_MODES, keep_lengths
from titok_jax.tasks.base import EvalContext, EvalResult, TokenSpec, register_task
from titok_jax.tasks.eval_reconstruction import evaluate_reconstruction
from titok_jax.tasks.flextok import load_repa_teacher
from titok_jax.tasks.flow_tokenizer import flow_decode, flow_token_spec
from titok_jax.tasks.tokenizer import MODEL_COLLECTIONS, QUANTIZER_RNG, SAMPLE_RNG, TokenizerTask

# config.masking keys and their defaults (configs/extractor.py sets them all)
MASKING_DEFAULTS = {
    "encoder_ratios": (0.0, 0.25, 0.5, 0.75, 1.0), "encoder_probs": (),   # () = uniform
    "decoder_ratios": (0.5, 0.75, 1.0), "decoder_probs": (),
    "loss_on_masked_only": True, "nested_dropout": "uniform", "cfg_dropout": 0.0,
}
# the flow head's training times and evaluation sampler (configs/extractor.py sets them; older
# workdirs lack them): FlowMo's pixel-space time sampler, 25 Euler steps, no guidance
FLOW_DEFAULTS = {"time_sampler": "mixture",
                 "time_params": {"loc": 0.0, "scale": 1.0, "uniform_prob": 0.1}}
SAMPLER_DEFAULTS = {"steps": 25, "guidance": 1.0, "seed": 0}
FLOW_RNG_SALT = 3   # the flow's (t, eps) stream: fold_in(step key, 3), apart from the masks' split


@register_task("extractor")
class ExtractorTask(TokenizerTask):
    """The extractor (``models.extractor.Extractor``) trained as in the module docstring."""

    def __init__(self, config: Any, *, inference: bool = False):
        super().__init__(config, inference=inference)
        if not hasattr(self.model, "pad_codes"):
            raise ValueError("the extractor task trains model 'extractor'")
        if self.image_size != self.model.image_size:
            raise ValueError(f"data.image_size {self.image_size} != model.image_size "
                             f"{self.model.image_size}")
        self._teacher = None
        self.flow = bool(self.model.flow)
        sampler = {**SAMPLER_DEFAULTS, **dict(config.get("sampler", {}) or {})}
        self.eval_steps, self.eval_guidance = int(sampler["steps"]), float(sampler["guidance"])
        self.eval_seed = int(sampler["seed"])
        if inference:   # the masks and the teacher are training-only
            return
        fc = {**FLOW_DEFAULTS, **dict(config.get("flow", {}) or {})}
        self.time_sampler, self.time_params = str(fc["time_sampler"]), dict(fc["time_params"] or {})
        if self.flow:
            sample_time(jax.random.key(0), 1, self.time_sampler, **self.time_params)   # checks
        mc = {**MASKING_DEFAULTS, **dict(config.get("masking", {}) or {})}
        unknown = set(mc) - set(MASKING_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown masking keys {sorted(unknown)}; known: {sorted(MASKING_DEFAULTS)}")
        p = self.model.num_patches
        ratios, self.encoder_probs = masking.check_ratios(mc["encoder_ratios"], mc["encoder_probs"],
                                                          "masking.encoder")
        self.encoder_keep = masking.keep_counts(ratios, p)
        self.decoder_ratios, self.decoder_probs = masking.check_ratios(
            mc["decoder_ratios"], mc["decoder_probs"], "masking.decoder")
        self.masked_only = bool(mc["loss_on_masked_only"])
        self.nested = str(mc["nested_dropout"])
        if self.nested not in NESTED_MODES:
            raise ValueError(f"masking.nested_dropout must be one of {', '.join(NESTED_MODES)}, "
                             f"got {self.nested!r}")
        keep_lengths(jax.random.key(0), 1, self.model.num_latent_tokens, self.nested)   # checks N
        self.cfg_dropout = float(mc["cfg_dropout"])
        if not 0.0 <= self.cfg_dropout < 1.0 or (self.cfg_dropout > 0 and not self.flow):
            raise ValueError(f"masking.cfg_dropout must be in [0, 1) and > 0 only with "
                             f"model.decoder_head='flow' (the CFG null condition), got "
                             f"{self.cfg_dropout} with decoder_head={self.model.decoder_head!r}")
        repa = config.get("repa", {}) or {}
        self.repa_weight = float(repa.get("weight", 0.0))
        self.decoder_repa_weight = float(repa.get("decoder_weight", 0.0))
        if self.repa_weight > 0 and not self.model.repa:
            raise ValueError("repa.weight > 0 needs model.repa_dim > 0 (the teacher's width) "
                             "and model.repa_layer >= 0")
        if self.decoder_repa_weight > 0 and not self.model.decoder_repa:
            raise ValueError("repa.decoder_weight > 0 needs model.repa_dim > 0 (the teacher's "
                             "width) and model.decoder_repa_layer >= 0")
        if self.repa_weight > 0 or self.decoder_repa_weight > 0:
            self._teacher = load_repa_teacher(repa["teacher"])
            if self._teacher[0].width != self.model.repa_dim:
                raise ValueError(f"the REPA teacher's width {self._teacher[0].width} != "
                                 f"model.repa_dim {self.model.repa_dim}")

    # ------------------------------------------------------------------ setup
    def constants(self) -> dict:
        out = super().constants()
        if self._teacher is not None:
            out["teacher"] = self._teacher[1]
        return out

    # ------------------------------------------------------------------ training
    def forward(self, params: dict, state: dict, images: jax.Array, key: jax.Array,
                constants: dict) -> tuple[jax.Array, Any, Any, dict]:
        """The masked forward (module docstring): ``(rec, QuantizerOutput, new collections, extra)``."""
        model = self.model
        b, p = images.shape[0], model.num_patches
        k_masks, k_sample, k_quant = jax.random.split(key, 3)
        mk = self.masks(k_masks, b)
        keep_k, visible, k_keep = mk["keep_k"], mk["visible"], mk["keep_key"]
        target = None
        if self._teacher is not None:
            target = jax.lax.stop_gradient(self._teacher[0].apply({"params": constants["teacher"]},
                                                                  images))
            target = match_grid(target, p)
        flow: dict = {}
        if self.flow:
            x, (k_t, k_noise) = model.flow_data(images), jax.random.split(
                jax.random.fold_in(key, FLOW_RNG_SALT))
            t = sample_time(k_t, b, self.time_sampler, **self.time_params)
            noise = jax.random.normal(k_noise, x.shape, jnp.float32)
            flow = {"x_t": interpolate(x, noise, t), "t": t}
        variables = {"params": params["model"], **state["model"]}
        rngs = {SAMPLE_RNG: k_sample, QUANTIZER_RNG: k_quant}
        zero = jnp.zeros((), jnp.float32)

        def branch(num_keep: int):
            def run(_):
                keep = (None if num_keep == p else
                        masking.random_keep_indices(k_keep, b, p, num_keep))
                (out, qout, feats, dec_feats), new_vars = model.apply(
                    variables, images, keep=keep, keep_k=keep_k, visible=visible, train=True,
                    rngs=rngs, mutable=list(MODEL_COLLECTIONS), method="forward", **flow)
                repa = zero
                if self.repa_weight > 0 and num_keep > 0:
                    kept = target if keep is None else jnp.take_along_axis(target, keep[..., None], 1)
                    repa = repa_loss(feats, kept)
                repa_dec = repa_loss(dec_feats, target) if self.decoder_repa_weight > 0 else zero
                return out.astype(jnp.float32), qout, new_vars, repa, repa_dec
            return run

        branches = [branch(k) for k in self.encoder_keep]
        bucket = mk["bucket"]
        if len(branches) == 1:
            out, qout, new_vars, repa, repa_dec = branches[0](None)
        else:
            out, qout, new_vars, repa, repa_dec = jax.lax.switch(bucket, branches, None)
        extra: dict = {"metrics": {
            "encoder_mask_ratio": 1.0 - jnp.asarray(self.encoder_keep, jnp.float32)[bucket] / p,
            "decoder_mask_ratio": jnp.mean(mk["decoder_ratio"]),
            "keep_k_mean": jnp.mean(keep_k.astype(jnp.float32))}, "terms": {}}
        rec = out
        if self.flow:
            x = model.flow_data(images)
            extra["reconstruction"] = self.flow_loss(out, velocity_target(x, noise),
                                                     ~visible if self.masked_only else None)
            seen = masking.pixel_weights(visible, model.patch_size, model.image_size) > 0
            rec = jnp.where(seen, images, (x0_from_velocity(flow["x_t"], out, t) + 1.0) / 2.0)
            extra["metrics"]["cfg_null_fraction"] = jnp.mean((keep_k == 0).astype(jnp.float32))
        elif self.masked_only:
            extra["reconstruction"] = self.masked_reconstruction(out, images, ~visible)
        if self.repa_weight > 0:
            extra["terms"]["repa"] = (self.repa_weight, repa)
        if self.decoder_repa_weight > 0:
            extra["terms"]["repa_decoder"] = (self.decoder_repa_weight, repa_dec)
        return rec, qout, new_vars, extra

    def flow_loss(self, v: jax.Array, target: jax.Array, masked: jax.Array | None) -> jax.Array:
        """The flow head's velocity MSE ``sum w (v - target)^2 / sum w`` over ``[B, H, W, 3]``,
        ``w`` 1 on the patches ``masked [B, P]`` (None: everywhere)."""
        err = jnp.square(v.astype(jnp.float32) - target.astype(jnp.float32))
        if masked is None:
            return jnp.mean(err)
        w = masking.pixel_weights(masked, self.model.patch_size, self.model.image_size)
        total = jnp.sum(w) * err.shape[-1]
        return jnp.where(total > 0, jnp.sum(w * err) / jnp.maximum(total, 1.0), 0.0)

    def masks(self, key: jax.Array, batch: int) -> dict:
        """One step's draws: ``bucket`` (int32 index into ``encoder_keep``, the static kept-patch
        counts), ``keep_key`` (the kept patches are ``random_keep_indices(keep_key, batch, P,
        encoder_keep[bucket])``), ``keep_k [B]`` (nested dropout), ``visible [B, P]`` and
        ``decoder_ratio [B]`` (decoder masking)."""
        k_bucket, k_keep, k_nest, k_dec = jax.random.split(key, 4)
        p, n = self.model.num_patches, self.model.num_latent_tokens
        bucket = (jnp.zeros((), jnp.int32) if len(self.encoder_keep) == 1 else
                  masking.choose_bucket(k_bucket, self.encoder_probs))
        visible, ratio = masking.decoder_visible(k_dec, batch, p, self.decoder_ratios,
                                                 self.decoder_probs)
        keep_k = keep_lengths(k_nest, batch, n, self.nested)
        if self.cfg_dropout > 0:   # the CFG null condition: no tokens (every slot dropped)
            null = jax.random.uniform(jax.random.fold_in(k_nest, 1), (batch,)) < self.cfg_dropout
            keep_k = jnp.where(null, 0, keep_k)
        return {"bucket": bucket, "keep_key": k_keep, "keep_k": keep_k,
                "visible": visible, "decoder_ratio": ratio}

    def masked_reconstruction(self, rec: jax.Array, images: jax.Array, masked: jax.Array) -> jax.Array:
        """The pixel loss (``losses.reconstruction``) averaged over the patches ``masked [B, P]``
        only: with 0/1 weights ``w``, ``recon(w x_hat, w x) * (all elements / weighted ones)``."""
        w = masking.pixel_weights(masked, self.model.patch_size, self.model.image_size)
        full = L.reconstruction_loss(rec * w, images * w, self.recon_kind)
        frac = jnp.mean(w)
        return jnp.where(frac > 0, full / jnp.maximum(frac, 1e-12), 0.0)

    # ------------------------------------------------------------------ inference
    @property
    def token_spec(self) -> TokenSpec:
        spec = dataclasses.replace(super().token_spec, variable_length=True, decoder_visible=True)
        return flow_token_spec(spec, self.model) if self.flow else spec

    def features(self, model_params: Any, model_state: Any, images: jax.Array) -> jax.Array:
        """The pre-quantisation tokens ``[B, N, C]`` f32 (a VAE bottleneck: posterior means)."""
        z = self.model.apply({"params": model_params, **model_state}, images.astype(jnp.float32),
                             method="latents")
        return z.astype(jnp.float32)

    def decode(self, model_params: Any, model_state: Any, tokens: jax.Array, *,
               key: jax.Array | None = None, steps: int | None = None,
               guidance: float | None = None, noise: jax.Array | None = None,
               visible: jax.Array | None = None, visible_mask: jax.Array | None = None) -> jax.Array:
        """Ids ``[B, k]`` (any prefix; a VAE: codes ``[B, k, C]``) -> images in [0, 1]; with
        ``visible`` images and ``visible_mask`` (bool ``[B, P]`` or ``[B, g, g]``) those patches
        are given to the decoder (completion), else every patch is masked. The flow head samples
        (``flow_decode``: ``steps`` / ``guidance`` / ``noise`` or ``key``, default ``key(0)``)."""
        if visible_mask is not None:
            visible_mask = masking.visible_mask_array(visible_mask, tokens.shape[0],
                                                      self.model.grid_size)
        if visible is not None:
            visible = jnp.asarray(visible, jnp.float32)
        variables = {"params": model_params, **model_state}
        if self.flow:
            return flow_decode(self.model, variables, tokens, self.token_spec, key=key, steps=steps,
                               guidance=guidance, noise=noise, visible=visible,
                               visible_mask=visible_mask)
        del key
        if steps is not None or guidance is not None or noise is not None:
            raise ValueError("steps/guidance/noise apply to flow-decoder tokenizers (FlexTok, FlowMo, "
                             "the extractor with model.decoder_head='flow') only")
        rec = self.model.apply(variables, tokens, visible, visible_mask, method="decode_tokens")
        return jnp.clip(rec.astype(jnp.float32), 0.0, 1.0)

    def eval_decode(self, model_params: Any, model_state: Any, ids: jax.Array) -> jax.Array:
        """Any prefix ``[B, k]`` of ids -> images: the pixel head's decode, or the flow head's with
        evaluation's sampler (``config.sampler``) from its fixed seed (``reconstruct``'s)."""
        if not self.flow:
            return self.decode(model_params, model_state, ids)
        return self.decode(model_params, model_state, ids, key=jax.random.key(self.eval_seed),
                           steps=self.eval_steps, guidance=self.eval_guidance)

    def reconstruct(self, model_params: Any, model_state: Any, images: jax.Array) -> tuple[jax.Array, Any]:
        """No masking; the flow head: encode, then sample with ``config.sampler`` (deterministic)."""
        if not self.flow:
            return super().reconstruct(model_params, model_state, images)
        ids = self.encode(model_params, model_state, images)
        return self.eval_decode(model_params, model_state, ids), None if self.token_spec.continuous else ids

    def evaluate(self, model_params: Any, model_state: Any, ctx: EvalContext) -> EvalResult:
        """``evaluate_reconstruction``; ``titok-jax eval`` (a task built for inference) adds the
        coarse-to-fine strip and ``psnr_tokens_{k}`` (decodes from 1, 2, 4, ..., N tokens)."""
        return evaluate_reconstruction(self, model_params, model_state, ctx,
                                       prefix_decode=self.eval_decode if self.inference else None)
