"""The tokenizer task: a pixels-in, pixels-out tokenizer (single-stage TiTok; later the VQGAN)
trained with

    loss = w_rec * recon(x_hat, x) + quantizer terms (commitment/codebook or KL)
           + w_lpips * LPIPS(x_hat, x)                         (config.losses.perceptual_weight > 0)
           + w_cnx * MSE(ConvNeXtS(x_hat), ConvNeXtS(x))      (config.losses.convnext_weight > 0)
           + [step >= start] * w_gan * L_G(D(x_hat))         (config.losses.gan_weight > 0)

and, when the GAN term is on, the discriminator's own loss (hinge + w_lecam * LeCam) in the same
step, added to the objective with the reconstructions stop-gradiented (and the discriminator's
params stop-gradiented inside L_G), so that the one gradient the trainer takes is
``{'model': d(model loss), 'disc': d(discriminator loss)}``; every group is updated by its own
optimizer. The logged ``loss`` is the model's. Images are float32 in [0, 1].

Video tokenizers (``models.video_tokenizer.VideoTokenizer``: MAGVIT, MAGVIT-v2) train the same way
on clips ``[B, T, H, W, 3]`` (``T = data.num_frames``, default the model's ``num_frames``; the
init input is one such clip): the pixel loss is the mean over every frame, LPIPS and the ConvNeXt
loss are taken per frame (:func:`frames`), ``token_spec`` carries ``num_frames`` and the latent
grid ``(T', h, w)``, ``encode`` gives ids ``[B, T', h, w]``. Their GAN needs a 3-D discriminator
(``losses.discriminator.name``: ``"stylegan3d"``, MAGVIT v1's, or ``"patchgan3d"``, Open-MAGVIT2's;
``models.discriminator3d``), built on one clip; a 2-D one on clips (or a 3-D one on images) is a
one-line ``ValueError``.

``config.losses.r1_weight`` > 0 adds ``r1_weight * R1`` to the discriminator's loss (MAGVIT v1:
10; ``losses.gan.r1_penalty`` at the real batch, logged as ``gan/r1``); 0 (the default, and what
older configs read) computes nothing.

The model state is ``{"model": collections, "lecam": LeCam EMAs}`` and, for a discriminator with
non-param collections (the PatchGAN with ``norm="batch"``: taming's, Open-MAGVIT2's and FQGAN's),
``"disc": {"batch_stats": ...}``; such a discriminator runs in train mode in both passes, as
theirs do (``_disc``). Others add no entry, so their state and checkpoints are unchanged.

``config.losses.entropy_anneal_ratio`` r > 0 multiplies the quantizer's ``entropy`` term by
``1 + r max(0, 1 - step / entropy_anneal_steps)`` (Open-MAGVIT2's annealing,
``quantizers.lfq.entropy_anneal_factor``); ``lecam_per_sample`` picks LeCam's per-logit form.

With ``config.losses.adaptive_weight_layer`` a ``/``-path of a model param (taming's VQGAN:
``decoder/conv_out/kernel``), ``w_gan`` becomes taming's adaptive weight
``w_gan * clip(||dnll/dW|| / (||dL_G/dW|| + 1e-4), 0, 1e4)`` (no gradient through it;
``losses.gan.adaptive_weight``; logged as ``gan/weight``), where ``nll`` is the weighted pixel +
perceptual terms above and ``W`` that param: one VJP of the forward w.r.t. ``W`` alone turns the
two losses' gradients w.r.t. ``x_hat`` into theirs w.r.t. ``W``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from titok_jax import losses as L
from titok_jax.models.discriminator3d import VIDEO_DISCRIMINATORS
from titok_jax.models.discriminators import build_discriminator
from titok_jax.models.registry import build_model, resolve_compute_dtype
from titok_jax.models.video_tokenizer import VideoTokenizer
from titok_jax.quantizers.lfq import entropy_anneal_factor
from titok_jax.tasks.base import TokenizerTaskBase, TokenSpec, register_task
from titok_jax.tasks.host_params import overwrite_from_host

MODEL_COLLECTIONS = ("quantizer_stats",)
SAMPLE_RNG, QUANTIZER_RNG = "sample", "quantizer"


def model_token_spec(model: Any) -> TokenSpec:
    """The ``TokenSpec`` of a pixel tokenizer model with the tokenizer interface every tokenizer
    model has (``image_size``, ``num_latent_tokens``, ``token_size``, ``codebook_size``: None for
    continuous tokens, ``quantizer_name``, ``num_codebooks``: k ids per token for ``fq`` / ``rq``)."""
    k = model.codebook_size
    video = {}
    if isinstance(model, VideoTokenizer):   # clips in, ids [B, T', h, w] out
        video = dict(num_frames=int(model.num_frames),
                     latent_shape=tuple(int(d) for d in model.latent_shape))
    return TokenSpec(image_size=int(model.image_size), num_tokens=int(model.num_latent_tokens),
                     codebook_size=None if k is None else int(k),
                     token_dim=int(model.token_size) or None, quantizer=str(model.quantizer_name),
                     num_codebooks=int(model.num_codebooks), **video)


def frames(x: jax.Array) -> jax.Array:
    """Clips ``[B, T, H, W, C]`` -> frames ``[B T, H, W, C]`` (images unchanged): what the
    per-frame losses (LPIPS, ConvNeXt) see."""
    return x.reshape((-1, *x.shape[2:])) if x.ndim == 5 else x


@register_task("tokenizer")
class TokenizerTask(TokenizerTaskBase):
    def __init__(self, config: Any, *, inference: bool = False):
        super().__init__(config, inference=inference)
        self.model = build_model(config.model, dtype=config.compute_dtype)
        self.image_size = int(config.data.image_size)
        # a video tokenizer trains on clips [B, T, S, S, 3] (T = data.num_frames, default the
        # model's nominal clip length); 0 = images [B, S, S, 3]
        self.num_frames = 0
        if isinstance(self.model, VideoTokenizer):
            self.num_frames = int(config.data.get("num_frames", 0) or self.model.num_frames)
        self.disc = None
        if inference:  # the losses are training-only (an imported workdir carries none)
            return
        # init_from: a video tokenizer starts from an image model's (inflated) weights
        # (tasks.video_init); host arrays written into init. Subclasses (TiTok stage 2, ...) read
        # init_from themselves; the plain task refuses it for an image model.
        self._video_init = None
        init_from = str(config.get("init_from", "") or "")
        if init_from and self.num_frames:
            from titok_jax.tasks.video_init import load_video_init
            self._video_init = load_video_init(init_from, self.model, self.init)
        elif init_from and type(self) is TokenizerTask:
            raise ValueError(f"init_from={init_from!r}: the tokenizer task inflates an image model "
                             f"into a video tokenizer; {config.model.name!r} is an image model")
        lc = config.losses  # every key has its default in configs/common.py (TOKENIZER_LOSSES)
        self.recon_kind = lc.reconstruction
        self.recon_weight = float(lc.reconstruction_weight)
        self.lpips_weight = float(lc.perceptual_weight)
        self.lpips_path = lc.perceptual_weights
        self.convnext_weight = float(lc.convnext_weight)
        self.convnext_path = lc.convnext_weights
        # the frozen trunks run in the compute dtype
        self.perceptual_dtype = resolve_compute_dtype(config.compute_dtype)
        self.gan_weight = float(lc.gan_weight)
        self.gan_start = int(lc.gan_start_step)
        self.gan_kind = lc.gan_loss
        self.lecam_weight = float(lc.lecam_weight)
        self.lecam_decay = float(lc.lecam_decay)
        # keys older configs lack: they read the old behaviour
        self.lecam_per_sample = bool(lc.get("lecam_per_sample", False))
        self.entropy_anneal = (float(lc.get("entropy_anneal_ratio", 0.0) or 0.0),
                               int(lc.get("entropy_anneal_steps", 2000) or 2000))
        self.r1_weight = float(lc.get("r1_weight", 0.0) or 0.0)
        # losses.discriminator.name: "patchgan" (default, NLayerDiscriminator) or "maskbit";
        # for clips "stylegan3d" or "patchgan3d" (models.discriminator3d)
        if self.gan_weight > 0:
            name = (lc.discriminator or {}).get("name", "patchgan")
            if bool(self.num_frames) != (name in VIDEO_DISCRIMINATORS):
                want = (f"a 3D discriminator ({' or '.join(sorted(VIDEO_DISCRIMINATORS))})"
                        if self.num_frames else "a 2D discriminator (patchgan or maskbit)")
                raise ValueError(f"losses.discriminator.name={name!r} does not fit this "
                                 f"{'video' if self.num_frames else 'image'} tokenizer's GAN: "
                                 f"it needs {want}")
        self.disc = build_discriminator(lc.discriminator) if self.gan_weight > 0 else None
        # "" = the fixed gan_weight; "decoder/conv_out/kernel" = taming's adaptive weight on it
        # (a key older configs lack: they read "")
        layer = str(lc.get("adaptive_weight_layer", "") or "")
        self.adaptive_layer = tuple(p for p in layer.split("/") if p)

    # ------------------------------------------------------------------ setup
    def _dummy(self) -> jax.Array:
        if self.num_frames:   # one clip
            return jnp.zeros((1, self.num_frames, self.image_size, self.image_size, 3), jnp.float32)
        return jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)

    def init(self, key: jax.Array) -> tuple[dict, dict]:
        k_model, k_disc = jax.random.split(key)
        variables = self.model.init({"params": k_model, SAMPLE_RNG: k_model, QUANTIZER_RNG: k_model},
                                    self._dummy(), train=False)
        params = {"model": variables["params"]}
        state = {"model": {k: v for k, v in variables.items() if k != "params"}}
        if getattr(self, "_video_init", None) is not None:
            params["model"] = overwrite_from_host(params["model"], self._video_init[0])
            if self._video_init[1] is not None:
                state["model"] = overwrite_from_host(state["model"], self._video_init[1])
        if self.disc is not None:
            disc_vars = dict(self.disc.init(k_disc, self._dummy()))
            params["disc"] = disc_vars.pop("params")
            if disc_vars:   # a BatchNorm PatchGAN's running statistics ({"batch_stats": ...})
                state["disc"] = disc_vars
            state["lecam"] = L.lecam_init()
        return params, state

    def constants(self) -> dict:
        out = {}
        if self.lpips_weight > 0:
            if not self.lpips_path:
                raise ValueError("losses.perceptual_weight > 0 needs --config.losses.perceptual_weights="
                                 "FILE, made by `titok-jax convert-lpips` from VGG16 + LPIPS "
                                 "weights you have (nothing is downloaded); or set perceptual_weight=0")
            out["lpips"] = L.load_lpips_params(self.lpips_path)
        if self.convnext_weight > 0:
            if not self.convnext_path:
                raise ValueError("losses.convnext_weight > 0 needs --config.losses.convnext_weights=FILE, "
                                 "made by `titok-jax convert-convnext` from torchvision's "
                                 "convnext_small weights (nothing is downloaded); or set convnext_weight=0")
            out["convnext"] = L.load_convnext_params(self.convnext_path)
        return out

    # ------------------------------------------------------------------ training
    def forward(self, params: dict, state: dict, images: jax.Array, key: jax.Array,
                constants: dict) -> tuple[jax.Array, Any, Any, dict]:
        """The model's training forward: ``(reconstructions, QuantizerOutput, updated model
        collections, extra)``. ``extra`` (empty here) is how a family changes the objective:
        ``"reconstruction"`` (a scalar that replaces the plain pixel loss), ``"terms"`` (name ->
        ``(weight, scalar)``, added to the loss and logged) and ``"metrics"`` (logged)."""
        del constants
        k_sample, k_quant = jax.random.split(key)
        rngs = {SAMPLE_RNG: k_sample, QUANTIZER_RNG: k_quant}
        variables = {"params": params["model"], **state["model"]}
        (rec, qout), new_vars = self.model.apply(variables, images, train=True, rngs=rngs,
                                                 mutable=list(MODEL_COLLECTIONS))
        return rec, qout, new_vars, {}

    def _forward_last_layer(self, params: dict, state: dict, images: jax.Array, key: jax.Array,
                            constants: dict) -> tuple[jax.Array, Any, Any, dict, Any]:
        """:meth:`forward` as a function of the ``adaptive_weight_layer`` param alone (``jax.vjp``):
        ``(reconstructions, QuantizerOutput, collections, extra, vjp)``, where ``vjp(dx_hat)``
        is ``(dW,)``."""
        path, tree = self.adaptive_layer, params["model"]
        node = tree
        for part in path:
            if not hasattr(node, "keys") or part not in node:
                raise ValueError(f"losses.adaptive_weight_layer {'/'.join(path)!r} is not a param of "
                                 f"model {self.config.model.name!r}")
            node = node[part]

        def put(t: Any, rest: tuple[str, ...], w: jax.Array) -> Any:
            return w if not rest else {**dict(t), rest[0]: put(t[rest[0]], rest[1:], w)}

        def fwd(w):
            p = dict(params, model=put(tree, path, w))
            rec, qout, new_vars, extra = self.forward(p, state, images, key, constants)
            return rec.astype(jnp.float32), (qout, new_vars, extra)

        rec, vjp, (qout, new_vars, extra) = jax.vjp(fwd, node, has_aux=True)
        return rec, qout, new_vars, extra, vjp

    def _nll(self, rec: jax.Array, images: jax.Array, constants: dict, metrics: dict,
             recon: Any = None) -> jax.Array:
        """``w_rec * recon + w_lpips * LPIPS + w_cnx * ConvNeXt`` (taming's ``nll``); the unweighted
        terms go into ``metrics``."""
        metrics["reconstruction"] = (L.reconstruction_loss(rec, images, self.recon_kind)
                                     if recon is None else recon)
        total = self.recon_weight * metrics["reconstruction"]
        if self.lpips_weight > 0:
            metrics["perceptual"] = L.lpips_loss(constants["lpips"], frames(rec), frames(images),
                                                 dtype=self.perceptual_dtype)
            total = total + self.lpips_weight * metrics["perceptual"]
        if self.convnext_weight > 0:
            metrics["perceptual_convnext"] = L.convnext_loss(constants["convnext"], frames(rec),
                                                             frames(images),
                                                             dtype=self.perceptual_dtype)
            total = total + self.convnext_weight * metrics["perceptual_convnext"]
        return total

    def loss(self, params: dict, state: dict, batch: dict, key: jax.Array, step: jax.Array,
             constants: dict) -> tuple[jax.Array, tuple[dict, dict]]:
        images = batch["image"].astype(jnp.float32)
        adaptive = self.disc is not None and bool(self.adaptive_layer)
        if adaptive:
            rec, qout, new_vars, extra, vjp = self._forward_last_layer(params, state, images, key,
                                                                       constants)
            if extra.get("reconstruction") is not None:
                raise ValueError("losses.adaptive_weight_layer needs the pixel loss as a function "
                                 "of the reconstruction; this family replaces it")
        else:
            rec, qout, new_vars, extra = self.forward(params, state, images, key, constants)
            vjp = None
        rec = rec.astype(jnp.float32)
        metrics: dict = {}
        total = self._nll(rec, images, constants, metrics, extra.get("reconstruction"))
        for name, (weight, value) in extra.get("terms", {}).items():
            metrics[name] = value
            total = total + weight * value
        metrics.update(extra.get("metrics", {}))
        for name, value in qout.losses.items():
            if name == "entropy" and self.entropy_anneal[0] > 0:   # Open-MAGVIT2's annealing
                value = value * entropy_anneal_factor(step, *self.entropy_anneal)
            metrics[f"quantizer/{name}"] = value
            total = total + value
        new_state = dict(state, model={**state["model"], **dict(new_vars)})
        objective = total
        if self.disc is not None:
            nll_of = (lambda r: self._nll(r, images, constants, {})) if adaptive else None
            objective = objective + self._gan_terms(params["disc"], state["lecam"], images, rec, step,
                                                    metrics, new_state, vjp, nll_of)
            total = total + metrics["gan/weight"] * metrics["gan/generator"]
        for name, value in qout.metrics.items():
            metrics[f"quantizer/{name}"] = value
        metrics["loss"] = total
        return objective, (new_state, metrics)

    def _disc(self, params: Any, stats: Any, x: jax.Array) -> tuple[jax.Array, Any]:
        """``(D(x) logits, updated running statistics)``. ``stats`` is the discriminator's non-param
        state (``{"batch_stats": ...}`` of a BatchNorm PatchGAN) or None (GroupNorm / no norm /
        MaskBit: applied as always, no collection). With statistics D runs in train mode in the
        generator's pass as well as in its own: taming's ``VQLPIPSWithDiscriminator`` (and
        Open-MAGVIT2's, FQGAN's) calls ``self.discriminator(reconstructions)`` for L_G with the
        module in ``train()``, so L_G sees the fake batch's own statistics (and its gradient flows
        through them), never the running ones. Each call normalises with the statistics of its
        batch ``x`` and moves the running ones (momentum 0.9, PyTorch's 0.1). Under ``jit`` the
        batch is the global one, i.e. SyncBatchNorm; their DDP runs use each GPU's share. The
        running statistics are never read in training, only kept, as PyTorch keeps them."""
        if stats is None:
            return self.disc.apply({"params": params}, x), None
        logits, stats = self.disc.apply({"params": params, **stats}, x, train=True,
                                        mutable=list(stats))
        return logits, dict(stats)

    def _gan_terms(self, disc_params: Any, lecam_state: Any, images: jax.Array, rec: jax.Array,
                   step: jax.Array, metrics: dict, new_state: dict, vjp: Any = None,
                   nll_of: Any = None) -> jax.Array:
        """``w_gan * L_G(D_sg(rec)) + L_D(D(images), D(sg(rec))) + w_lecam * LeCam`` (``+ w_r1 *
        R1(images)`` when ``r1_weight > 0``): the first term moves only the model, the rest only
        the discriminator (``w_gan``: ``gan_weight``, or the
        adaptive weight from ``vjp`` and ``nll_of`` when given). Before ``gan_start_step`` neither
        runs (``lax.cond``): the terms read 0 and so do both gradients; the LeCam EMAs (and a
        BatchNorm discriminator's running statistics, ``new_state["disc"]``) stay.

        A BatchNorm discriminator (:meth:`_disc`) sees three batches a step, in taming's order:
        ``rec`` in the generator term, then ``images`` and ``sg(rec)`` separately (never
        concatenated: one batch's statistics would mix real and fake) in the discriminator's;
        each call's running-statistics update feeds the next and the last is kept."""
        frozen_disc = jax.lax.stop_gradient(disc_params)
        stats0 = new_state.get("disc")

        def g_loss(r):
            logits, stats = self._disc(frozen_disc, stats0, r)
            return L.generator_loss(logits, self.gan_kind), stats

        def generator_term(r):
            g, stats = g_loss(r)
            if vjp is None:
                return g, jnp.asarray(self.gan_weight, jnp.float32), stats
            r0 = jax.lax.stop_gradient(r)
            d_gan = jax.grad(lambda x: g_loss(x)[0])(r0)
            (d_nll,), (d_gan,) = vjp(jax.grad(nll_of)(r0)), vjp(d_gan)
            return g, L.adaptive_weight(d_nll, d_gan, disc_weight=self.gan_weight), stats

        zero = jnp.zeros((), jnp.float32)
        metrics["gan/generator"], metrics["gan/weight"], stats1 = self._after_start(
            step, generator_term, lambda r: (zero, zero, stats0), rec)
        fake = jax.lax.stop_gradient(rec)

        def disc_terms(p):
            real_logits, stats = self._disc(p, stats1, images)
            fake_logits, stats = self._disc(p, stats, fake)
            d = L.discriminator_loss(real_logits, fake_logits, self.gan_kind)
            lecam, lecam_next = L.lecam_regularizer(real_logits, fake_logits, lecam_state,
                                                    decay=self.lecam_decay,
                                                    per_sample=self.lecam_per_sample)
            r1 = jnp.zeros((), jnp.float32)
            if self.r1_weight > 0:   # at the real batch (a BatchNorm D: its batch statistics)
                r1 = L.r1_penalty(lambda x: self._disc(p, stats1, x)[0], images)
            return d, lecam, r1, lecam_next, stats

        def no_disc(p):
            zero = jnp.zeros((), jnp.float32)
            return zero, zero, zero, lecam_state, stats1

        d, lecam, r1, new_state["lecam"], stats2 = self._after_start(step, disc_terms, no_disc,
                                                                     disc_params)
        if stats2 is not None:
            new_state["disc"] = stats2
        metrics.update({"gan/discriminator": d, "gan/lecam": lecam})
        total = metrics["gan/weight"] * metrics["gan/generator"] + d + self.lecam_weight * lecam
        if self.r1_weight > 0:
            metrics["gan/r1"] = r1
            total = total + self.r1_weight * r1
        return total

    def _after_start(self, step: jax.Array, on: Any, off: Any, operand: Any) -> Any:
        """``on(operand)`` once ``step >= gan_start_step``, else ``off(operand)``; only the chosen
        branch runs (``lax.cond``), so the GAN costs nothing before it starts."""
        if self.gan_start <= 0:
            return on(operand)
        return jax.lax.cond(jnp.asarray(step) >= self.gan_start, on, off, operand)

    # ------------------------------------------------------------------ evaluation and inference
    @property
    def token_spec(self) -> TokenSpec:
        return model_token_spec(self.model)

    def _variables(self, model_params: Any, state: dict) -> dict:
        return {"params": model_params, **state}

    def reconstruct(self, model_params: Any, model_state: Any, images: jax.Array) -> tuple[jax.Array, Any]:
        rec, out = self.model.apply(self._variables(model_params, model_state),
                                    images.astype(jnp.float32), train=False)
        return jnp.clip(rec.astype(jnp.float32), 0.0, 1.0), out.indices

    def encode(self, model_params: Any, model_state: Any, images: jax.Array) -> jax.Array:
        codes, out = self.model.apply(self._variables(model_params, model_state),
                                      images.astype(jnp.float32), train=False, method="encode")
        if self.token_spec.continuous:
            return codes.astype(jnp.float32)
        return out.indices.astype(jnp.int32)

    def features(self, model_params: Any, model_state: Any, images: jax.Array) -> jax.Array:
        codes, _ = self.model.apply(self._variables(model_params, model_state),
                                    images.astype(jnp.float32), train=False, method="encode")
        if self.num_frames:   # a video tokenizer's code grid [B, T', h, w, C] -> [B, N, C]
            codes = codes.reshape((codes.shape[0], -1, codes.shape[-1]))
        return codes.astype(jnp.float32)

    def decode(self, model_params: Any, model_state: Any, tokens: jax.Array, *,
               key: jax.Array | None = None, steps: int | None = None,
               guidance: float | None = None, noise: jax.Array | None = None) -> jax.Array:
        del key  # a deterministic decoder
        if steps is not None or guidance is not None or noise is not None:
            raise ValueError("steps/guidance/noise apply to flow-decoder tokenizers (FlexTok, FlowMo) only")
        rec = self.model.apply(self._variables(model_params, model_state), tokens, method="decode_tokens")
        return jnp.clip(rec.astype(jnp.float32), 0.0, 1.0)
