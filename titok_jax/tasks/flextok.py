"""The ``flextok`` task: FlexTok's encoder + rectified-flow decoder on the latents of a frozen KL-VAE.

Per batch (``FlexTok.flow_loss``; nested dropout and CFG register dropout are model settings)::

    loss = mean (v(x_t, t | registers) - (eps - z))^2                  t ~ config.flow.time_sampler
           + repa.weight * (-mean cos(projector(h_layer), teacher(img)))      (repa.weight > 0)

The VAE (``params["model"]["vae"]``) is frozen: its latents are ``stop_gradient``-ed and
``optimizer.frozen`` must match ``model/vae/`` (checked here), so it gets no update and no weight
decay. ``config.vae.weights`` is a workdir of a ``tokenizer`` run of model ``kl_vae``
(``configs/flextok.py:vae_*``; its EMA params when it kept them), a released diffusers VAE
(``diffusion_pytorch_model.safetensors`` of HF ``EPFL-VILAB/flextok_vae_c{4,8,16}``, converted by
``convert.kl_vae``; its shape must match ``model.vae_*``) or a ``.safetensors`` / ``.npz`` file of
the VAE's params keyed by the ``/``-joined param path (``encoder/conv_in/kernel``); empty is an
error unless ``vae.allow_random`` (tiny CPU runs; said loudly on stderr).

REPA teacher (``config.repa.teacher``): ``arch`` = ``"dinov2"`` (default) or ``"clip"``, ``model`` =
kwargs of ``nets.dinov2.ViTFeatures`` (DINOv2-L/14 at 224 px by default: LayerScale, the released
37 x 37 position table interpolated to 16 x 16 as the official code does) or of
``nets.clip.CLIPVisionTower`` and ``weights`` = a ``.safetensors`` / ``.npz`` of its params
(``titok-jax convert-dinov2 --input dinov2_vitl14_pretrain.pth --output FILE``, or ``convert-clip``);
empty is an error unless ``allow_random`` (tests and tiny runs). Its patch features are resized to
the decoder's patch grid (``losses.repa.match_grid``).

``reconstruct`` encodes, then decodes all ``R`` tokens with the sampler of ``config.sampler``
(``steps``, ``guidance``, ``seed``): a fixed key, so evaluation is deterministic. ``titok-jax
eval`` also decodes the first ``samples.num_images`` held-out images from their first 1, 2, 4, ...,
R tokens: ``samples/coarse_to_fine_*.png``, ``samples/psnr_vs_tokens_*.png``, ``psnr_tokens_{k}``.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from titok_jax.losses.repa import match_grid, repa_loss
from titok_jax.models.flextok_blocks import ViTFeatures
from titok_jax.nets.clip import CLIPVisionTower
from titok_jax.nets.files import load_frozen_params
from titok_jax.trees import check_tree_matches, flatten, unflatten
from titok_jax.models.registry import build_model
from titok_jax.tasks.base import EvalContext, EvalResult, register_task
from titok_jax.tasks.eval_reconstruction import evaluate_reconstruction
from titok_jax.tasks.flow_tokenizer import FlowTokenizerTask
from titok_jax.tasks.host_params import overwrite_from_host
from titok_jax.tasks.runs import restore_run
from titok_jax.tasks.titok_stages import random_params
from titok_jax.tasks.tokenizer import MODEL_COLLECTIONS

VAE_HINT = "titok-jax train --config configs/flextok.py:vae_c16 (or a converted diffusers VAE)"
TEACHER_HINT = "titok-jax convert-dinov2 --input dinov2_vitl14_pretrain.pth --output FILE"
# teacher "arch" -> (feature network, the command that makes its weights file)
TEACHER_ARCHS = {
    "dinov2": (ViTFeatures, TEACHER_HINT),
    "clip": (CLIPVisionTower, "titok-jax convert-clip --input ViT-L-14.pt --output FILE"),
}
VAE_PROBE = "model/vae/encoder/conv_in/kernel"   # a path optimizer.frozen must match


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr)


def load_vae_params(vae_config: Any, abstract: Any) -> dict | None:
    """Host numpy params of the frozen VAE (checked against ``abstract``), or None for a random one."""
    weights = str(vae_config.get("weights", "") or "")
    if not weights:
        if not vae_config.get("allow_random", False):
            raise ValueError("vae.weights is empty: set --config.vae.weights to a kl_vae workdir "
                             f"(train one: {VAE_HINT}) or to a .safetensors/.npz of its params")
        _say("[titok_jax] WARNING: vae.weights is empty: FlexTok's frozen VAE is RANDOMLY "
             "INITIALISED; its latents (and the tokens learnt on them) are meaningless outside tests")
        return None
    if not os.path.exists(weights):
        raise FileNotFoundError(f"vae.weights {weights} does not exist")
    if os.path.isdir(weights):
        run = restore_run(weights, host=True)
        params = run.params
        name = dict(run.config.get("model", {})).get("name")
        if name != "kl_vae":
            raise ValueError(f"vae.weights {weights} holds a {name!r} model, not kl_vae")
        flat = flatten(params)
        check_tree_matches(flat, abstract, source=f"vae.weights {weights}")
        return unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
    if weights.endswith(".safetensors"):   # a released diffusers AutoencoderKL (flextok_vae_c*)?
        from safetensors import safe_open
        from titok_jax.convert.kl_vae import DIFFUSERS_VAE_PROBE, diffusers_vae_params
        try:
            with safe_open(weights, "np") as f:
                diffusers = DIFFUSERS_VAE_PROBE in f.keys()
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"vae.weights {weights} is not a readable safetensors file: {e}") from None
        if diffusers:
            params = diffusers_vae_params(weights)
            check_tree_matches(flatten(params), abstract, source=f"vae.weights {weights}")
            return params
    params = load_frozen_params(weights, abstract, "KL-VAE", VAE_HINT)
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


def teacher_arch(teacher_config: Any) -> str:
    """A teacher entry's ``arch`` (``"dinov2"`` when unset or empty)."""
    return str(dict(teacher_config).get("arch", "dinov2") or "dinov2")


def build_teacher(teacher_config: Any, where: str = "repa.teacher") -> nn.Module:
    """The frozen feature network of a teacher entry: ``TEACHER_ARCHS[entry["arch"]]`` (default
    ``"dinov2"``) built from ``entry["model"]``; ``where`` names the entry in errors."""
    tc = dict(teacher_config)
    arch = teacher_arch(tc)
    if arch not in TEACHER_ARCHS:
        raise ValueError(f"{where}.arch {arch!r} is not one of {sorted(TEACHER_ARCHS)}")
    kwargs = dict(tc.get("model", {}) or {})
    for key in ("mean", "std"):
        if key in kwargs:
            kwargs[key] = tuple(float(v) for v in kwargs[key])
    try:
        return TEACHER_ARCHS[arch][0](**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}.model: {e}") from None


def load_repa_teacher(teacher_config: Any, where: str = "repa.teacher") -> tuple[nn.Module, Any]:
    """``(feature network, params)`` of a teacher entry (``config.repa.teacher``, FQGAN's
    ``config.teachers.<factor>``; :func:`build_teacher`), random only when allowed."""
    tc = dict(teacher_config)
    teacher = build_teacher(tc, where)
    weights = str(tc.get("weights", "") or "")
    if not weights:
        if not tc.get("allow_random", False):
            off = "set repa.weight=0" if where == "repa.teacher" else f"remove {where}"
            raise ValueError(f"{where}.weights is empty: set it to a .safetensors/.npz of the "
                             f"teacher ViT's params, or {off}")
        seed = int(tc.get("seed", 0))
        _say(f"[titok_jax] WARNING: {where}.weights is empty: the teacher is RANDOMLY "
             f"INITIALISED (seed {seed}); the alignment target is meaningless outside tests")
        return teacher, random_params(teacher, teacher.image_size, seed)
    x = jax.ShapeDtypeStruct((1, teacher.image_size, teacher.image_size, 3), jnp.float32)
    abstract = nn.unbox(jax.eval_shape(teacher.init, jax.random.key(0), x)["params"])
    what = "REPA teacher" if where == "repa.teacher" else f"teacher {where}"
    return teacher, load_frozen_params(weights, abstract, what, TEACHER_ARCHS[teacher_arch(tc)][1])


@register_task("flextok")
class FlexTokTask(FlowTokenizerTask):
    variable_length = True

    def __init__(self, config: Any, *, inference: bool = False):
        super().__init__(config, inference=inference)
        self.model = build_model(config.model, dtype=config.compute_dtype)
        if not getattr(self.model, "variable_length", False) or not hasattr(self.model, "flow_loss"):
            raise ValueError("the flextok task trains model 'flextok'")
        self.image_size = int(config.data.image_size)
        if self.image_size != self.model.image_size:
            raise ValueError(f"data.image_size {self.image_size} != model.image_size "
                             f"{self.model.image_size}")
        self._vae, self._teacher = None, None
        # evaluation's sampler (configs/flextok.py; imported workdirs carry the official one)
        sampler = config.get("sampler", {}) or {}
        self.steps = int(sampler.get("steps", self.model.default_steps))
        self.guidance = float(sampler.get("guidance", self.model.default_guidance))
        self.eval_seed = int(sampler.get("seed", 0))
        if inference:  # the run's own checkpoint holds every weight; the recipe is training-only
            return
        frozen = str(config.optimizer.frozen or "")
        if not (frozen and re.search(frozen, VAE_PROBE)):
            raise ValueError(f"optimizer.frozen ({frozen!r}) must match the VAE's params "
                             f"('{VAE_PROBE}'), e.g. '^model/vae/': FlexTok's VAE is frozen")
        # every key below has its default in configs/flextok.py
        self.time_sampler = config.flow.time_sampler
        self.time_params = dict(config.flow.time_params or {})
        repa = config.repa
        self.repa_weight = float(repa.weight)
        # Errors about missing files come now, before any training work.
        vae_abstract = self._abstract()[0]["vae"]
        self._vae = load_vae_params(config.vae, vae_abstract)
        if self.repa_weight > 0:
            if not self.model.repa_dim:
                raise ValueError("repa.weight > 0 needs model.repa_dim > 0 (the teacher's width)")
            self._teacher = load_repa_teacher(repa.teacher)
            if self._teacher[0].width != self.model.repa_dim:
                raise ValueError(f"the REPA teacher's width {self._teacher[0].width} != "
                                 f"model.repa_dim {self.model.repa_dim}")

    def _dummy(self) -> jax.Array:
        return jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)

    def _init_variables(self, key: jax.Array) -> Any:
        return self.model.init({"params": key}, self._dummy(), train=False)

    def _abstract(self) -> tuple[Any, Any]:
        v = nn.unbox(jax.eval_shape(self._init_variables, jax.random.key(0)))
        return v["params"], {k: x for k, x in v.items() if k != "params"}

    # ------------------------------------------------------------------ setup
    def init(self, key: jax.Array) -> tuple[dict, dict]:
        variables = self._init_variables(key)
        params = dict(variables["params"])
        if self._vae is not None:
            params["vae"] = overwrite_from_host(params["vae"], self._vae)
        return ({"model": params}, {"model": {k: v for k, v in variables.items() if k != "params"}})

    def constants(self) -> dict:
        return {"teacher": self._teacher[1]} if self._teacher is not None else {}

    # ------------------------------------------------------------------ training
    def loss(self, params: dict, state: dict, batch: dict, key: jax.Array, step: jax.Array,
             constants: dict) -> tuple[jax.Array, tuple[dict, dict]]:
        images = batch["image"].astype(jnp.float32)
        (flow, aux), new_vars = self.model.apply(
            {"params": params["model"], **state["model"]}, images, key, method="flow_loss",
            time_sampler=self.time_sampler, time_params=self.time_params,
            mutable=list(MODEL_COLLECTIONS))
        metrics = {"flow": flow, "keep_k_mean": jnp.mean(aux["keep_k"].astype(jnp.float32)),
                   "cfg_null_fraction": 1.0 - jnp.mean(aux["cond"].astype(jnp.float32))}
        total = flow
        if self._teacher is not None:
            target = jax.lax.stop_gradient(self._teacher[0].apply({"params": constants["teacher"]}, images))
            feats = aux["repa"]
            metrics["repa"] = repa_loss(feats, match_grid(target, feats.shape[1]))
            total = total + self.repa_weight * metrics["repa"]
        for name, value in aux["quantizer"].metrics.items():
            metrics[f"quantizer/{name}"] = value
        metrics["loss"] = total
        return total, (dict(state, model={**state["model"], **dict(new_vars)}), metrics)

    # ------------------------------------------------------------------ evaluation
    def reconstruct(self, model_params: Any, model_state: Any, images: jax.Array) -> tuple[jax.Array, Any]:
        """Encode, then decode all tokens with ``config.sampler`` from its fixed seed (deterministic)."""
        ids = self.encode(model_params, model_state, images)
        return self.eval_decode(model_params, model_state, ids), ids

    def eval_decode(self, model_params: Any, model_state: Any, ids: jax.Array) -> jax.Array:
        """Any prefix ``[B, k]`` of ids -> images, with evaluation's sampler (``config.sampler``)
        from its fixed seed: ``reconstruct``'s decode."""
        return self.decode(model_params, model_state, ids, key=jax.random.key(self.eval_seed),
                           steps=self.steps, guidance=self.guidance)

    def evaluate(self, model_params: Any, model_state: Any, ctx: EvalContext) -> EvalResult:
        """``evaluate_reconstruction``; a task built for inference (``titok-jax eval``) adds the
        coarse-to-fine strip, the PSNR-vs-tokens plot and ``psnr_tokens_{k}`` (their decodes from
        1, 2, 4, ..., K tokens are extra work that training's evaluations skip)."""
        return evaluate_reconstruction(self, model_params, model_state, ctx,
                                       prefix_decode=self.eval_decode if self.inference else None)
