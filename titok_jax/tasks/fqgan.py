"""The ``fqgan`` task: the ``tokenizer`` task (pixel, perceptual, GAN and quantizer terms, with the
FQGAN model's disentanglement term among the quantizer's) plus FQGAN's representation alignment:

    representation = model.representation_weight * sum_i InfoNCE(head_i(codes_i), teacher_i(x))

(``models.fqgan``; FQGAN's 0.5 per head, summed). ``config.teachers`` maps a factor name with a
head (``sem``; ``sem_mid``, ``sem_high``) to its teacher: ``{"model": kwargs of
nets.dinov2.ViTFeatures, "weights": a .safetensors / .npz of its params (titok-jax convert-dinov2),
"allow_random": bool, "seed": int}`` (loaded by ``tasks.flextok.load_repa_teacher``). The target
is the teacher's CLS token ``[B, W]`` on the batch's images (resized and normalised by the
teacher module), frozen (a constant, no gradient). A factor without a teacher (``teachers={}``:
all) has no representation term (its head then gets no gradient).

Gaps to the official recipe: FQGAN feeds its teachers a torch-``nearest`` 224-px resize (here
the teacher's bilinear resize) and its Dual / Triple-high teacher is CLIP's ViT (QuickGELU, CLS
before ``post_layernorm``), which ``ViTFeatures`` (the DINOv2 architecture) does not reproduce;
the DINOv2-S teacher of Triple-mid is exact up to the resize. InfoNCE negatives are the global
batch (FQGAN: each GPU's 32 images).
"""
from __future__ import annotations

from typing import Any

import jax

from titok_jax.nets.dinov2 import ViTFeatures
from titok_jax.tasks.base import register_task
from titok_jax.tasks.flextok import load_repa_teacher
from titok_jax.tasks.tokenizer import MODEL_COLLECTIONS, QUANTIZER_RNG, SAMPLE_RNG, TokenizerTask


@register_task("fqgan")
class FQGANTask(TokenizerTask):
    def __init__(self, config: Any, *, inference: bool = False):
        super().__init__(config, inference=inference)
        self.teachers: list[Any] = []       # per factor: (ViTFeatures, its config entry) or None
        if inference:
            return
        entries = dict(config.get("teachers", None) or {})
        factors = list(self.model.factors)
        unknown = sorted(set(entries) - set(factors))
        if unknown:
            raise ValueError(f"teachers: {unknown} are not factors of the model {factors}")
        for i, factor in enumerate(factors):
            entry = entries.get(factor)
            if not entry:
                self.teachers.append(None)
                continue
            if not self.model.head_widths[i]:
                raise ValueError(f"teachers.{factor}: the factor has no representation head "
                                 f"(model.head_widths[{i}] = 0)")
            kwargs = dict(dict(entry).get("model", {}) or {})
            for key in ("mean", "std"):
                if key in kwargs:
                    kwargs[key] = tuple(float(v) for v in kwargs[key])
            try:
                self.teachers.append((ViTFeatures(**kwargs), entry))
            except TypeError as e:
                raise ValueError(f"teachers.{factor}.model: {e}") from None

    def constants(self) -> dict:
        """The tokenizer's frozen networks and each teacher's params (``teacher_{i}``; loaded
        here, not in ``__init__``: a plan of the train state never reads them)."""
        out = super().constants()
        for i, t in enumerate(self.teachers):
            if t is not None:
                out[f"teacher_{i}"] = load_repa_teacher(t[1])[1]
        return out

    def forward(self, params: dict, state: dict, images: jax.Array, key: jax.Array,
                constants: dict) -> tuple[jax.Array, Any, Any, dict]:
        """The tokenizer forward with the teachers' CLS features as the heads' targets."""
        targets = None
        if any(t is not None for t in self.teachers):
            targets = [None if t is None else jax.lax.stop_gradient(
                t[0].apply({"params": constants[f"teacher_{i}"]}, images, all_tokens=True)["cls"])
                for i, t in enumerate(self.teachers)]
        k_sample, k_quant = jax.random.split(key)
        rngs = {SAMPLE_RNG: k_sample, QUANTIZER_RNG: k_quant}
        variables = {"params": params["model"], **state["model"]}
        (rec, qout), new_vars = self.model.apply(variables, images, train=True, rngs=rngs,
                                                 representation_targets=targets,
                                                 mutable=list(MODEL_COLLECTIONS))
        return rec, qout, new_vars, {}
