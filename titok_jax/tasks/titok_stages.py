"""Two-stage TiTok training (reference/titok.md 3.1, 3.2): tasks ``titok_stage1`` / ``titok_stage2``.

Stage 1 (``titok_stage1``; model ``titok_two_stage`` with ``finetune_decoder=False``): a frozen
MaskGIT-VQGAN teacher turns each image into ``g x g`` proxy codes ``c`` (its own tokens); TiTok's
decoder predicts logits ``l [B, g, g, K]`` over them::

    loss = mean_{b, cell} CE(l, c) + quantizer_weight * (commitment + codebook)

Evaluation reconstructs through ``argmax`` proxy codes and the teacher's decoder.

Stage 2 (``titok_stage2``; ``finetune_decoder=True``): initialised from a stage-1 workdir
(``config.init_from``: its EMA params when it kept them; its blocks scanned or unrolled, whatever
this run's ``model.scan_layers``: ``nn.scan.match_layers``) plus the teacher's codebook and decoder
as ``pixel_quantize`` / ``pixel_decoder``; the encoder, quantizer and latent tokens are frozen (the
model stops their gradients; ``optimizer.frozen`` keeps weight decay off them too). The loss on
pixels through the soft code mixture is the tokenizer task's (L2, perceptual, GAN + LeCam), reused
by subclassing it.

The teacher (``config.teacher``): ``weights`` is a workdir written by ``titok-jax import-torch``
from ``maskgit-vqgan-imagenet-f16-256.bin``, or that official state dict itself (``.bin`` needs
torch, ``.safetensors`` not); ``model`` its ``maskgit_vqgan`` kwargs (a workdir's own model section
wins). ``weights=""`` is an error unless ``allow_random`` (the CPU ``tiny`` recipes): then the
teacher is randomly initialised from ``teacher.seed``, said loudly on stderr. Stage 2 uses the
stage-1 run's teacher section unless its own ``teacher.weights`` is set.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from titok_jax.trees import check_tree_matches
from titok_jax.models.registry import build_model, resolved_quantizer
from titok_jax.nn.scan import match_layers
from titok_jax.tasks.base import TokenizerTaskBase, TokenSpec, register_task
from titok_jax.tasks.host_params import overwrite_from_host
from titok_jax.tasks.runs import read_run_config, restore_run
from titok_jax.tasks.tokenizer import (MODEL_COLLECTIONS, QUANTIZER_RNG, SAMPLE_RNG, TokenizerTask,
                                       model_token_spec)


# ----------------------------------------------------------------------------- teacher
def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr)


def random_params(model: Any, image_size: int, seed: int) -> dict:
    """Seeded random params for ``model`` drawn on the host from its abstract tree (no compile):
    kernels ``N(0, 1/fan_in)``, norm scales 1, biases 0, codebooks ``N(0, 1)``."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    rng = np.random.default_rng(seed)

    def draw(path, a):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "scale":
            return np.ones(a.shape, np.float32)
        if name == "bias":
            return np.zeros(a.shape, np.float32)
        std = 1.0 if name == "codebook" else 1.0 / np.sqrt(max(1, int(np.prod(a.shape[:-1]))))
        return (std * rng.standard_normal(a.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def load_teacher(teacher_config: Mapping[str, Any], image_size: int) -> tuple[Any, dict]:
    """``(MaskGITVQGAN module, params)`` of ``teacher_config`` (see the module docstring)."""
    tc = dict(teacher_config)
    weights = str(tc.get("weights", "") or "")
    model_cfg = dict(tc.get("model", {}) or {"name": "maskgit_vqgan"})
    if not weights:
        if not tc.get("allow_random", False):
            raise ValueError("teacher.weights is empty: set --config.teacher.weights to a workdir made "
                             "by `titok-jax import-torch` from maskgit-vqgan-imagenet-f16-256.bin (or "
                             "to that file)")
        model = build_model({**model_cfg, "image_size": image_size})
        seed = int(tc.get("seed", 0))
        _say(f"[titok_jax] WARNING: teacher.weights is empty: the MaskGIT-VQGAN teacher is RANDOMLY "
             f"INITIALISED (seed {seed}); its proxy codes are meaningless outside tests")
        return model, random_params(model, image_size, seed)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"teacher.weights {weights} does not exist (make it with `titok-jax "
                                "import-torch --input DIR_WITH_THE_MASKGIT_BIN --output DIR`)")
    if os.path.isdir(weights):
        run = restore_run(weights, host=True)
        section = dict(run.config.get("model", {}))
        if section.get("name") != "maskgit_vqgan":
            raise ValueError(f"teacher.weights {weights} holds a {section.get('name')!r} model, not "
                             "maskgit_vqgan")
        return build_model({**section, "image_size": image_size}), run.params
    from titok_jax.convert.common import read_state_dict
    from titok_jax.convert.vqgan import infer_vqgan_kwargs, vqgan_params_from_state_dict
    sd = read_state_dict(weights)
    kw = {**infer_vqgan_kwargs(sd, source=weights), "image_size": image_size}
    params = vqgan_params_from_state_dict(sd, kw, source=weights)
    return build_model({"name": "maskgit_vqgan", **kw}), params


def _check_teacher(teacher: Any, model: Any) -> None:
    g = model.image_size // model.patch_size
    if teacher.codebook_size != model.proxy_codebook_size:
        raise ValueError(f"the teacher has {teacher.codebook_size} codes but the TiTok head predicts "
                         f"{model.proxy_codebook_size} (model.proxy_codebook_size)")
    if teacher.grid_size != g:
        raise ValueError(f"the teacher's code grid is {teacher.grid_size}x{teacher.grid_size} but "
                         f"TiTok's decoder grid is {g}x{g} (image_size / patch_size)")


# ----------------------------------------------------------------------------- stage 1
@register_task("titok_stage1")
class TiTokStage1Task(TokenizerTaskBase):
    """Proxy-code training of a ``titok_two_stage`` model (``finetune_decoder=False``). Its tokens
    decode through the teacher's decoder, which is not part of the run: the inference API refuses
    the run (``inference_refusal``); evaluation and ``decode`` read the teacher of the config."""

    inference_refusal = ("a TiTok stage-1 run: it predicts MaskGIT proxy codes and does not decode "
                         "pixels on its own; train stage 2 from it (configs/titok.py:*_stage2)")

    def __init__(self, config: Any, *, inference: bool = False):
        super().__init__(config, inference=inference)
        self.model = build_model(config.model, dtype=config.compute_dtype)
        if getattr(self.model, "finetune_decoder", True):
            raise ValueError("titok_stage1 trains model titok_two_stage with finetune_decoder=False")
        self.image_size = int(config.data.image_size)
        self.quantizer_weight = float(config.losses.quantizer_weight)
        self._teacher: tuple[Any, Any] | None = None
        # The weights are read (and checked) on first use: ``constants()``, before the first step.
        # A random teacher is built from teacher.model, which can be checked now.
        if not config.teacher.get("weights") and not inference:
            _check_teacher(build_model({**dict(config.teacher.model),
                                        "image_size": self.image_size}), self.model)

    def teacher(self) -> tuple[Any, Any]:
        """The frozen teacher ``(module, params)``, loaded once."""
        if self._teacher is None:
            model, params = load_teacher(self.config.teacher, self.image_size)
            _check_teacher(model, self.model)
            self._teacher = (model, params)
        return self._teacher

    def init(self, key: jax.Array) -> tuple[dict, dict]:
        x = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
        variables = self.model.init({"params": key, SAMPLE_RNG: key, QUANTIZER_RNG: key}, x, train=False)
        return ({"model": variables["params"]},
                {"model": {k: v for k, v in variables.items() if k != "params"}})

    def constants(self) -> dict:
        return {"teacher": self.teacher()[1]}

    def proxy_codes(self, teacher_params: Any, images: jax.Array) -> jax.Array:
        """The teacher's codes ``[B, g*g]`` of ``images`` (no gradient)."""
        teacher = self.teacher()[0]
        _, out = teacher.apply({"params": teacher_params}, images, train=False, method="encode")
        return jax.lax.stop_gradient(out.indices)

    def loss(self, params: dict, state: dict, batch: dict, key: jax.Array, step: jax.Array,
             constants: dict) -> tuple[jax.Array, tuple[dict, dict]]:
        images = batch["image"].astype(jnp.float32)
        codes = self.proxy_codes(constants["teacher"], images)
        k_sample, k_quant = jax.random.split(key)
        variables = {"params": params["model"], **state["model"]}
        (logits, qout), new_vars = self.model.apply(
            variables, images, train=True, rngs={SAMPLE_RNG: k_sample, QUANTIZER_RNG: k_quant},
            mutable=list(MODEL_COLLECTIONS))
        logits = logits.reshape(logits.shape[0], -1, logits.shape[-1]).astype(jnp.float32)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, codes))
        metrics = {"proxy_ce": ce,
                   "proxy_accuracy": jnp.mean((jnp.argmax(logits, -1) == codes).astype(jnp.float32))}
        total = ce
        for name, value in qout.losses.items():
            metrics[f"quantizer/{name}"] = value
            total = total + self.quantizer_weight * value
        for name, value in qout.metrics.items():
            metrics[f"quantizer/{name}"] = value
        metrics["loss"] = total
        return total, (dict(state, model={**state["model"], **dict(new_vars)}), metrics)

    # ------------------------------------------------------------------ evaluation and inference
    @property
    def token_spec(self) -> TokenSpec:
        return model_token_spec(self.model)

    def _proxy_decode(self, logits: jax.Array) -> jax.Array:
        """argmax proxy codes -> the teacher's decoder (its params are closed over)."""
        teacher, teacher_params = self.teacher()
        codes = jnp.argmax(logits.reshape(logits.shape[0], -1, logits.shape[-1]), -1)
        rec = teacher.apply({"params": teacher_params}, codes, method="decode_tokens")
        return jnp.clip(rec.astype(jnp.float32), 0.0, 1.0)

    def reconstruct(self, model_params: Any, model_state: Any, images: jax.Array) -> tuple[jax.Array, Any]:
        logits, out = self.model.apply({"params": model_params, **model_state},
                                       images.astype(jnp.float32), train=False)
        return self._proxy_decode(logits), out.indices

    def encode(self, model_params: Any, model_state: Any, images: jax.Array) -> jax.Array:
        _, out = self.model.apply({"params": model_params, **model_state}, images.astype(jnp.float32),
                                  train=False, method="encode")
        return out.indices.astype(jnp.int32)

    def features(self, model_params: Any, model_state: Any, images: jax.Array) -> jax.Array:
        codes, _ = self.model.apply({"params": model_params, **model_state}, images.astype(jnp.float32),
                                    train=False, method="encode")
        return codes.astype(jnp.float32)

    def decode(self, model_params: Any, model_state: Any, tokens: jax.Array, *,
               key: jax.Array | None = None, steps: int | None = None,
               guidance: float | None = None, noise: jax.Array | None = None) -> jax.Array:
        if steps is not None or guidance is not None or noise is not None:
            raise ValueError("steps/guidance/noise apply to flow-decoder tokenizers (FlexTok, FlowMo) only")
        def proxy_logits(model: Any, ids: jax.Array) -> jax.Array:
            lead = ids.ndim - (1 if model.num_codebooks > 1 else 0)
            ids = ids[:, 0] if lead == 3 and ids.shape[1] == 1 else ids
            return model.decode_logits(model.quantize.indices_to_codes(ids, dtype=jnp.float32))

        logits = self.model.apply({"params": model_params, **model_state}, tokens, method=proxy_logits)
        return self._proxy_decode(logits)


# ----------------------------------------------------------------------------- stage 2
SHARED_KEYS = ("image_size", "patch_size", "encoder_width", "encoder_depth", "encoder_heads",
               "decoder_width", "decoder_depth", "decoder_heads", "num_latent_tokens", "token_size",
               "quantizer", "is_legacy", "proxy_codebook_size")


@register_task("titok_stage2")
class TiTokStage2Task(TokenizerTask):
    """Decoder fine-tuning of a ``titok_two_stage`` model (``finetune_decoder=True``)."""

    def __init__(self, config: Any, *, inference: bool = False):
        super().__init__(config, inference=inference)
        if not getattr(self.model, "finetune_decoder", False) or not hasattr(self.model, "pixel_z_channels"):
            raise ValueError("titok_stage2 trains model titok_two_stage with finetune_decoder=True")
        self.init_from = str(config.init_from or "")
        self._loaded: tuple[dict, dict] | None = None
        if inference:  # the run's own checkpoint holds every weight
            return
        if not self.init_from:
            raise ValueError("titok_stage2 needs --config.init_from=STAGE1_WORKDIR (a titok_stage1 run)")
        if not os.path.isfile(os.path.join(self.init_from, "config.json")):
            raise FileNotFoundError(f"init_from {self.init_from} is not a titok_jax workdir (no "
                                    "config.json); the stage-1 workdir must stay available")
        # one-line errors for a config.json that is not a JSON object
        self.stage1_config = read_run_config(self.init_from).to_dict()
        if self.stage1_config.get("task", {}).get("name") != "titok_stage1":
            raise ValueError(f"init_from {self.init_from} is a "
                             f"{self.stage1_config.get('task', {}).get('name')!r} run, not titok_stage1")
        m1, m2 = self.stage1_config.get("model", {}), dict(config.model)
        # The quantizer sub-configs compared in full (defaults filled; legacy flat runs translated).
        m1, m2 = ({**m, "quantizer": resolved_quantizer(m)} for m in (m1, m2))
        for key in SHARED_KEYS:
            if key in m1 and key in m2 and m1[key] != m2[key]:
                raise ValueError(f"init_from {self.init_from}: stage 1 has model.{key}={m1[key]!r}, "
                                 f"this config {m2[key]!r}")
        # Read now, outside any trace: the init reads these host arrays through callbacks. Stage 1
        # may hold its blocks in the other layer layout (``model.scan_layers``): put them in ours.
        params, state = self.loaded()
        fresh_params, fresh_state = nn.unbox(jax.eval_shape(super().init, jax.random.key(0)))
        params = match_layers(params, fresh_params["model"])
        state = match_layers(state, fresh_state["model"])
        self._loaded = (params, state)
        source = f"init_from {self.init_from} + teacher"
        check_tree_matches(params, fresh_params["model"], source=source)
        check_tree_matches(state, fresh_state["model"], source=f"{source} (model state)")

    def loaded(self) -> tuple[dict, dict]:
        """``(model params, model state)`` to start from: stage 1 + the teacher's decoder (host
        numpy, read once)."""
        if self._loaded is None:
            run = restore_run(self.init_from, expect_task="titok_stage1", host=True)
            params, state = run.params, run.model_state
            teacher_cfg = self.config.get("teacher", {})
            if not (teacher_cfg and teacher_cfg.get("weights")):
                teacher_cfg = self.stage1_config.get("teacher", {})
            teacher, tparams = load_teacher(teacher_cfg, self.image_size)
            _check_teacher(teacher, self.model)
            if (teacher.z_channels, tuple(teacher.channel_mult)) != (
                    self.model.pixel_z_channels, tuple(self.model.pixel_channel_mult)):
                raise ValueError("the teacher's decoder does not match model.pixel_* "
                                 f"(z {teacher.z_channels}, channel_mult {tuple(teacher.channel_mult)})")
            params = {**params, "pixel_quantize": {"codebook": tparams["quantize"]["codebook"]},
                      "pixel_decoder": tparams["decoder"]}
            self._loaded = (params, state)
        return self._loaded

    def _fetch(self, which: int):
        def get(path: tuple[str, ...]) -> np.ndarray:
            node = self.loaded()[which]
            for k in path:
                node = node[k]
            return node
        return get

    def init(self, key: jax.Array) -> tuple[dict, dict]:
        """A fresh init whose model params (and model state) come from stage 1 + the teacher
        (training only: for inference the run's own checkpoint is read over a fresh init)."""
        params, state = super().init(key)
        if self.inference:
            return params, state
        params["model"] = overwrite_from_host(params["model"], self._fetch(0))
        state["model"] = overwrite_from_host(state["model"], self._fetch(1))
        return params, state
