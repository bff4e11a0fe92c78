"""The ``fqgan`` task: the ``tokenizer`` task (pixel, perceptual, GAN and quantizer terms, with the
FQGAN model's disentanglement term among the quantizer's) plus FQGAN's representation alignment:

    representation = model.representation_weight * sum_i InfoNCE(head_i(codes_i), teacher_i(x))

(``models.fqgan``; FQGAN's 0.5 per head, summed). ``config.teachers`` maps a factor name with a
head (``sem``; ``sem_mid``, ``sem_high``) to its teacher: ``{"arch": "clip" | "dinov2" (default),
"model": kwargs of nets.clip.CLIPVisionTower | nets.dinov2.ViTFeatures, "weights": a .safetensors /
.npz of its params (titok-jax convert-clip | convert-dinov2), "allow_random": bool, "seed": int}``
(built and loaded by ``tasks.flextok.build_teacher`` / ``load_repa_teacher``). The target is the
teacher's CLS token ``[B, W]`` on the batch's images (resized and normalised by the teacher
module), frozen (a constant, no gradient): for CLIP the class token after the last block, before
``ln_post`` and without the projection (FQGAN's ``last_hidden_state[:, 0]``); for DINOv2 after
the final norm (``x_norm_clstoken``).

Both teacher architectures are exact (CLIP: QuickGELU, ``ln_pre``, LayerNorm 1e-5, no LayerScale;
``tests/test_clip.py``, ``tests/test_import_dinov2.py``), and with ``"resize": "nearest"`` (the
published configs) the 256 -> 224 teacher input is PyTorch's legacy ``F.interpolate`` nearest, as
FQGAN feeds it. Remaining gaps to the official recipe: the teachers run in float32 (FQGAN: under
bf16 autocast), and InfoNCE negatives are the global batch (FQGAN: each GPU's 32 images).
"""
from __future__ import annotations

from typing import Any

import jax

from titok_jax.tasks.base import register_task
from titok_jax.tasks.flextok import build_teacher, load_repa_teacher
from titok_jax.tasks.tokenizer import MODEL_COLLECTIONS, QUANTIZER_RNG, SAMPLE_RNG, TokenizerTask


@register_task("fqgan")
class FQGANTask(TokenizerTask):
    def __init__(self, config: Any, *, inference: bool = False):
        super().__init__(config, inference=inference)
        self.teachers: list[Any] = []       # per factor: (teacher module, its config entry) or None
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
            self.teachers.append((build_teacher(entry, f"teachers.{factor}"), entry))

    def constants(self) -> dict:
        """The tokenizer's frozen networks and each teacher's params (``teacher_{i}``; loaded
        here, not in ``__init__``: a plan of the train state never reads them)."""
        out = super().constants()
        for i, t in enumerate(self.teachers):
            if t is not None:
                where = f"teachers.{self.model.factors[i]}"
                out[f"teacher_{i}"] = load_repa_teacher(t[1], where)[1]
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
