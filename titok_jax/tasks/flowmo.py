"""The FlowMo task (``task.name = "flowmo"``): mode-matching pre-training and mode-seeking
post-training of ``models/flowmo.py``, picked by ``config.flowmo.stage``.

Data space: images ``y`` in [0, 1] become ``x = 2 y - 1``; noise ``eps ~ N(0, I)``; t = 1 is noise.

Stage ``"main"`` (FlowMo stage 1A)::

    codes, q  = LFQ(encoder(x))                        q: entropy + commitment, already weighted
    keep_b    = [u_b >= cfg_dropout]                   (p = 0.1: the whole condition is zeroed)
    t ~ 0.9 logit-normal(0, 1) + 0.1 U(0, 1),  x_t = (1 - t) x + t eps
    loss      = mean (v(x_t, t | keep * codes) - (eps - x))^2 + q
                + w_lpips * LPIPS(x_t - t v, x)        (losses.perceptual_weight > 0; one-step x0)

From step ``flowmo.freeze_encoder_after`` on (0 = never) the encoder is frozen: its forward runs
under ``lax.cond(step >= N, stop_gradient . enc, enc)`` (its backward no longer runs, its gradient
is exactly zero) and the optimizer gives it no update (``optimizer.frozen`` matching
``model/encoder/`` with ``optimizer.frozen_from_step = N``; the config ties the two).

Stage ``"post"`` (FlowMo stage 1B; start it with ``config.init_from = MAIN_WORKDIR``: that run's raw,
non-EMA params, its blocks scanned or unrolled whatever this run's ``model.scan_layers``; the
optimizer and EMA start afresh). The encoder is frozen throughout. Besides the
main stage's loss, a ``k``-step Euler chain runs from noise with random per-sample times
(``s_0 = 0, s_j = s_{j-1} + U(0, 1)``, ``t_j = 1 - s_j / s_k``: ``1 = t_0 > ... > t_k = 0``)::

    z_0 = eps';  z_{j+1} = z_j - (t_j - t_{j+1}) v(z_j, t_j | codes)      (no CFG in the chain)
    loss += post_reward_weight * d(z_k, x)

back-propagated through every step, each decoder call rematerialised (``jax.checkpoint``).
``d`` is ``flowmo.post_reward``: ``"lpips"`` (LPIPS-VGG), ``"convnext"`` (ConvNeXt-S logit MSE; the
nearest frozen classifier here to FlowMo's ResNet-50 logit MSE) or ``"l2"`` (pixel MSE in [-1, 1]).

Evaluation (``reconstruct``) decodes with ``flowmo.eval_steps`` / ``eval_guidance`` from the fixed
key ``flowmo.eval_seed`` (deterministic), and returns the integer ids of ``models/flowmo.py``.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from titok_jax import losses as L
from titok_jax.flow import rectified_flow_loss, time_sampler_preset
from titok_jax.models.registry import build_model, resolve_compute_dtype
from titok_jax.nn.scan import match_layers
from titok_jax.tasks.base import register_task
from titok_jax.tasks.flow_tokenizer import FlowTokenizerTask
from titok_jax.tasks.host_params import overwrite_from_host

MODEL_COLLECTIONS = ("quantizer_stats",)
STAGES = ("main", "post")
REWARDS = ("lpips", "convnext", "l2")
ENCODER_PATTERN = "model/encoder/"


def posttrain_times(key: jax.Array, batch: int, k: int) -> jax.Array:
    """Random decreasing chains ``[batch, k + 1]`` from 1 to 0 (module docstring)."""
    s = jnp.cumsum(jax.random.uniform(key, (batch, k + 1), jnp.float32), axis=1)
    s = s - s[:, :1]
    return 1.0 - s / s[:, -1:]


def euler_chain(velocity_fn: Any, noise: jax.Array, times: jax.Array, remat: bool = True) -> jax.Array:
    """``z <- z - (t_j - t_{j+1}) v(z, t_j)`` over per-sample ``times [B, k+1]`` as one ``lax.scan``;
    ``velocity_fn(z, t [B])`` is rematerialised in the backward pass when ``remat``."""
    fn = jax.checkpoint(velocity_fn) if remat else velocity_fn

    def step(z, ts):
        t, t_next = ts
        dt = (t - t_next)[:, None, None, None]
        return z - dt * fn(z, t).astype(z.dtype), None

    z, _ = lax.scan(step, noise, (times[:, :-1].T, times[:, 1:].T))
    return z


@register_task("flowmo")
class FlowMoTask(FlowTokenizerTask):
    def __init__(self, config: Any, *, inference: bool = False):
        super().__init__(config, inference=inference)
        self.model = build_model(config.model, dtype=config.compute_dtype)
        self.image_size = int(config.data.image_size)
        if self.image_size != self.model.image_size:
            raise ValueError(f"data.image_size {self.image_size} != model.image_size {self.model.image_size}")
        self._loaded: tuple[Any, Any] | None = None
        # the frozen trunks run in the compute dtype
        self.perceptual_dtype = resolve_compute_dtype(config.compute_dtype)
        if inference:  # the run's own checkpoint holds every weight; the recipe is training-only
            return
        fc = config.flowmo  # every key has its default in configs/flowmo.py
        self.stage = str(fc.stage)
        if self.stage not in STAGES:
            raise ValueError(f"flowmo.stage must be one of {STAGES}, got {self.stage!r}")
        self.freeze_after = int(fc.freeze_encoder_after or 0)
        self.cfg_dropout = float(fc.cfg_dropout)
        ts = time_sampler_preset(str(fc.time_sampler))
        self.time_kind = ts.pop("kind")
        self.time_params = ts
        self.eval_steps = int(fc.eval_steps)
        self.eval_guidance = float(fc.eval_guidance)
        self.eval_seed = int(fc.eval_seed)
        self.post_k = int(fc.post_steps)
        self.post_reward = str(fc.post_reward)
        self.post_weight = float(fc.post_reward_weight)
        if self.post_reward not in REWARDS:
            raise ValueError(f"flowmo.post_reward must be one of {REWARDS}, got {self.post_reward!r}")
        lc = config.losses
        self.lpips_weight = float(lc.perceptual_weight)
        self.lpips_path = lc.perceptual_weights
        self.convnext_path = lc.convnext_weights
        self.init_from = str(config.init_from or "")
        self._check_freeze(config)
        if self.stage == "post":
            self._load_init_from()

    # ------------------------------------------------------------------ setup
    def _check_freeze(self, config: Any) -> None:
        """The encoder freeze needs the optimizer to freeze the same parameters from the same step."""
        if self.stage == "main" and self.freeze_after < 1:
            raise ValueError(f"flowmo.freeze_encoder_after must be a step >= 1 (one past total_steps never "
                             f"freezes the encoder), got {self.freeze_after}")
        opt = config.optimizer
        frozen, start = str(opt.get("frozen", "") or ""), int(opt.get("frozen_from_step", 0) or 0)
        want = self.freeze_after if self.stage == "main" else 0
        if not frozen or not re.search(frozen, ENCODER_PATTERN + "x") or re.search(frozen, "model/decoder/x") \
                or start != want:
            what = "flowmo.freeze_encoder_after" if self.stage == "main" else "flowmo.stage='post'"
            raise ValueError(f"{what} needs optimizer.frozen matching the encoder only (e.g. "
                             f"'^model/encoder/') and optimizer.frozen_from_step={want}; got "
                             f"frozen={frozen!r}, frozen_from_step={start}")

    def _load_init_from(self) -> None:
        if not self.init_from:
            print("[titok_jax] WARNING: flowmo.stage='post' without init_from: post-training starts "
                  "from a RANDOM model (set --config.init_from=MAIN_STAGE_WORKDIR)", file=sys.stderr)
            return
        from titok_jax.trees import check_tree_matches
        from titok_jax.tasks.runs import restore_run
        if not os.path.isfile(os.path.join(self.init_from, "config.json")):
            raise FileNotFoundError(f"init_from {self.init_from} is not a titok_jax workdir (no config.json)")
        run = restore_run(self.init_from, expect_task="flowmo", ema=False, host=True)
        fresh_params, fresh_state = nn.unbox(jax.eval_shape(self._fresh_init, jax.random.key(0)))
        # the main run may hold its blocks in the other layer layout (model.scan_layers): ours
        params = match_layers(run.params, fresh_params["model"])
        state = match_layers(run.model_state, fresh_state["model"])
        check_tree_matches(params, fresh_params["model"], source=f"init_from {self.init_from}")
        check_tree_matches(state, fresh_state["model"], source=f"init_from {self.init_from} (model state)")
        self._loaded = (params, state)

    def _fresh_init(self, key: jax.Array) -> tuple[dict, dict]:
        x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        variables = self.model.init({"params": key, "sample": key, "quantizer": key}, x, train=False)
        return ({"model": variables["params"]},
                {"model": {k: v for k, v in variables.items() if k != "params"}})

    def init(self, key: jax.Array) -> tuple[dict, dict]:
        params, state = self._fresh_init(key)
        if self._loaded is not None:
            params["model"] = overwrite_from_host(params["model"], self._loaded[0])
            state["model"] = overwrite_from_host(state["model"], self._loaded[1])
        return params, state

    def constants(self) -> dict:
        out = {}
        need_lpips = self.lpips_weight > 0 or (self.stage == "post" and self.post_reward == "lpips")
        if need_lpips:
            if not self.lpips_path:
                raise ValueError("the FlowMo perceptual term needs --config.losses.perceptual_weights=FILE "
                                 "(made by `titok-jax convert-lpips`); or set "
                                 "losses.perceptual_weight=0 and flowmo.post_reward='l2'")
            out["lpips"] = L.load_lpips_params(self.lpips_path)
        if self.stage == "post" and self.post_reward == "convnext":
            if not self.convnext_path:
                raise ValueError("flowmo.post_reward='convnext' needs --config.losses.convnext_weights=FILE "
                                 "(made by `titok-jax convert-convnext`)")
            out["convnext"] = L.load_convnext_params(self.convnext_path)
        return out

    # ------------------------------------------------------------------ training
    def _reward(self, constants: dict, sample: jax.Array, x: jax.Array) -> jax.Array:
        if self.post_reward == "lpips":
            return L.lpips_loss(constants["lpips"], sample, x, input_range=(-1.0, 1.0),
                                dtype=self.perceptual_dtype)
        if self.post_reward == "convnext":
            return L.convnext_loss(constants["convnext"], sample, x, input_range=(-1.0, 1.0),
                                   dtype=self.perceptual_dtype)
        return jnp.mean(jnp.square(sample - x))

    def loss(self, params: dict, state: dict, batch: dict, key: jax.Array, step: jax.Array,
             constants: dict) -> tuple[jax.Array, tuple[dict, dict]]:
        images = batch["image"].astype(jnp.float32)
        x = 2.0 * images - 1.0
        b = x.shape[0]
        k_quant, k_drop, k_flow, k_times, k_noise = jax.random.split(key, 5)
        model, mvars = self.model, state["model"]

        def encode(p):
            (codes, qout), new_vars = model.apply({"params": p, **mvars}, images, train=True,
                                                  rngs={"quantizer": k_quant}, mutable=list(MODEL_COLLECTIONS),
                                                  method="encode")
            return codes, qout, dict(new_vars)

        def encode_frozen(p):
            return encode(jax.tree.map(lax.stop_gradient, p))

        frozen = jnp.asarray(True) if self.stage == "post" else jnp.asarray(step) >= self.freeze_after

        def loss_fn(mp):  # the objective of the model params
            if self.stage == "post":
                codes, qout, new_vars = encode_frozen(mp)
            else:   # only the chosen branch (and its backward) runs
                codes, qout, new_vars = lax.cond(frozen, encode_frozen, encode, mp)
            keep = jax.random.uniform(k_drop, (b,)) >= self.cfg_dropout

            def velocity(x_t, t, c=codes, keep=keep):
                return model.apply({"params": mp}, x_t, t, c, keep, method="velocity")

            flow, aux = rectified_flow_loss(velocity, x, k_flow, time_sampler=self.time_kind,
                                            time_params=self.time_params)
            metrics = {"flow": flow}
            total = flow
            for name, value in qout.losses.items():
                metrics[f"quantizer/{name}"] = value
                total = total + value
            if self.lpips_weight > 0:
                metrics["perceptual"] = L.lpips_loss(constants["lpips"], aux.x0_pred, x,
                                                     input_range=(-1.0, 1.0),
                                                     dtype=self.perceptual_dtype)
                total = total + self.lpips_weight * metrics["perceptual"]
            if self.stage == "post":
                times = posttrain_times(k_times, b, self.post_k)
                noise = jax.random.normal(k_noise, x.shape, jnp.float32)
                sample = euler_chain(lambda z, t: velocity(z, t, codes, None), noise, times)
                metrics["post/reward_distance"] = self._reward(constants, sample, x)
                metrics["post/l2"] = jnp.mean(jnp.square(lax.stop_gradient(sample) - x))
                total = total + self.post_weight * metrics["post/reward_distance"]
            for name, value in qout.metrics.items():
                metrics[f"quantizer/{name}"] = value
            metrics["encoder_frozen"] = frozen.astype(jnp.float32)
            metrics["loss"] = total
            return total, (new_vars, metrics)

        total, (new_vars, metrics) = loss_fn(params["model"])
        return total, (dict(state, model={**state["model"], **new_vars}), metrics)

    # ------------------------------------------------------------------ evaluation
    def reconstruct(self, model_params: Any, model_state: Any, images: jax.Array) -> tuple[jax.Array, Any]:
        """Encode, then decode the codes with the eval sampler from the fixed key ``flowmo.eval_seed``."""
        codes, out = self._encode(model_params, model_state, images)
        rec = self.model.apply({"params": model_params, **model_state}, codes,
                               key=jax.random.key(self.eval_seed), steps=self.eval_steps,
                               guidance_scale=self.eval_guidance, method="decode_codes")
        return jnp.clip(rec.astype(jnp.float32), 0.0, 1.0), out.indices
