"""Adversarial losses, LeCam regularisation, the VQGAN adaptive weight and the start-step gate.

All pure functions on logits (any shape, e.g. PatchGAN maps ``[B, h, w, 1]``), reduced in float32.

Discriminator / generator losses (``r`` = D(real) logits, ``f`` = D(fake) logits)::

    hinge:           L_D = 0.5 * (mean(relu(1 - r)) + mean(relu(1 + f)))     L_G = -mean(f)
    non_saturating:  L_D = 0.5 * (mean(softplus(-r)) + mean(softplus(f)))
                     L_G = mean(softplus(-f))
    hinge_nonsat:    L_D = hinge's,  L_G = mean_b softplus(-mean_hw f_b)   (Open-MAGVIT2: the
                     non-saturating loss of each sample's mean PatchGAN logit)

(``0.5`` as in taming-transformers / MaskBit / TiTok.) TiTok stage 2 uses hinge with a fixed
generator weight 0.01 from step 20k; the single-stage (TA-TiTok) recipe uses weight 0.1 from step
200k; both add LeCam with weight 0.001 and EMA decay 0.999.

LeCam (Tseng et al. 2021), with EMAs ``a_R``, ``a_F`` of the mean real / fake logits (state
:class:`LeCamState`, zeros at start, carried explicitly)::

    per_sample=False (TiTok / MaskBit): R = relu(mean(r) - a_F)**2 + relu(a_R - mean(f))**2
    per_sample=True  (LeCam paper code): R = mean(relu(r - a_F)**2) + mean(relu(a_R - f)**2)
    then  a_R <- decay * a_R + (1 - decay) * mean(r),  a_F likewise  (the loss uses the old EMAs)

Adaptive weight (Esser et al. 2021, VQGAN), from gradients of the reconstruction (nll) loss and
the generator loss w.r.t. the decoder's last layer::

    w = clip(||g_rec|| / (||g_gan|| + 1e-4), 0, 1e4) * disc_weight      (no gradient through w)

Start gate: ``gated_weight(w, step, start) = w * (step >= start)``.

R1 gradient penalty (Mescheder et al. 2018; MAGVIT v1's ``r1_gradient_penalty``, weight 10 there)
on real inputs ``x_b`` of a discriminator ``D`` whose logits for sample ``b`` depend on ``x_b``
alone (no BatchNorm)::

    R1 = mean_b sum_i (d sum(D(x_b)) / d x_{b,i})**2          (no 1/2, as MAGVIT v1)
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

GAN_LOSSES = ("hinge", "non_saturating", "hinge_nonsat")


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """``0.5 * (mean(relu(1 - r)) + mean(relu(1 + f)))``."""
    loss_real = jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
    loss_fake = jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake)))
    return 0.5 * (loss_real + loss_fake)


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
    """``-mean(f)``."""
    return -jnp.mean(_f32(logits_fake))


def non_saturating_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """``0.5 * (mean(softplus(-r)) + mean(softplus(f)))`` (= BCE with labels 1 / 0, halved)."""
    loss_real = jnp.mean(jax.nn.softplus(-_f32(logits_real)))
    loss_fake = jnp.mean(jax.nn.softplus(_f32(logits_fake)))
    return 0.5 * (loss_real + loss_fake)


def non_saturating_g_loss(logits_fake: jax.Array) -> jax.Array:
    """``mean(softplus(-f))`` (= BCE of fake logits with label 1)."""
    return jnp.mean(jax.nn.softplus(-_f32(logits_fake)))


def sample_mean_non_saturating_g_loss(logits_fake: jax.Array) -> jax.Array:
    """``mean_b softplus(-mean(f_b))``: the non-saturating loss of each sample's mean logit
    (Open-MAGVIT2's ``non_saturate_gen_loss``; ``logits_fake [B, ...]``)."""
    f = _f32(logits_fake)
    return jnp.mean(jax.nn.softplus(-jnp.mean(f.reshape(f.shape[0], -1), axis=1)))


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array,
                       kind: str = "hinge") -> jax.Array:
    """:func:`hinge_d_loss` (``hinge``, ``hinge_nonsat``) or :func:`non_saturating_d_loss` by name."""
    if kind in ("hinge", "hinge_nonsat"):
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "non_saturating":
        return non_saturating_d_loss(logits_real, logits_fake)
    raise ValueError(f"unknown GAN loss {kind!r}; expected one of {GAN_LOSSES}")


def generator_loss(logits_fake: jax.Array, kind: str = "hinge") -> jax.Array:
    """:func:`hinge_g_loss`, :func:`non_saturating_g_loss` or (``hinge_nonsat``)
    :func:`sample_mean_non_saturating_g_loss` by name."""
    if kind == "hinge":
        return hinge_g_loss(logits_fake)
    if kind == "hinge_nonsat":
        return sample_mean_non_saturating_g_loss(logits_fake)
    if kind == "non_saturating":
        return non_saturating_g_loss(logits_fake)
    raise ValueError(f"unknown GAN loss {kind!r}; expected one of {GAN_LOSSES}")


class LeCamState(NamedTuple):
    """EMAs of the mean real / fake discriminator logits (float32 scalars)."""

    ema_real: jax.Array
    ema_fake: jax.Array


def lecam_init() -> LeCamState:
    """Zero EMAs (as TiTok's registered buffers)."""
    return LeCamState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


def lecam_loss(logits_real: jax.Array, logits_fake: jax.Array, state: LeCamState, *,
               per_sample: bool = False) -> jax.Array:
    """LeCam regulariser against the EMAs in ``state`` (unweighted; see the module docstring)."""
    r, f = _f32(logits_real), _f32(logits_fake)
    ema_real = jax.lax.stop_gradient(_f32(state.ema_real))
    ema_fake = jax.lax.stop_gradient(_f32(state.ema_fake))
    if not per_sample:
        r, f = jnp.mean(r), jnp.mean(f)
    return (jnp.mean(jnp.square(jax.nn.relu(r - ema_fake)))
            + jnp.mean(jnp.square(jax.nn.relu(ema_real - f))))


def lecam_update(state: LeCamState, logits_real: jax.Array, logits_fake: jax.Array,
                 decay: float = 0.999) -> LeCamState:
    """``ema <- decay * ema + (1 - decay) * mean(logits)`` for real and fake (no gradient)."""
    mean_r = jax.lax.stop_gradient(jnp.mean(_f32(logits_real)))
    mean_f = jax.lax.stop_gradient(jnp.mean(_f32(logits_fake)))
    return LeCamState(decay * _f32(state.ema_real) + (1.0 - decay) * mean_r,
                      decay * _f32(state.ema_fake) + (1.0 - decay) * mean_f)


def lecam_regularizer(logits_real: jax.Array, logits_fake: jax.Array, state: LeCamState, *,
                      decay: float = 0.999, per_sample: bool = False
                      ) -> tuple[jax.Array, LeCamState]:
    """``(lecam_loss(old state), lecam_update(state))``, the order TiTok uses in its D step."""
    loss = lecam_loss(logits_real, logits_fake, state, per_sample=per_sample)
    return loss, lecam_update(state, logits_real, logits_fake, decay)


def global_norm(tree: Any) -> jax.Array:
    """L2 norm over every element of every leaf of a pytree (or of one array), in float32."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("global_norm of an empty pytree")
    return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(x))) for x in leaves))


def adaptive_weight(rec_grads: Any, gan_grads: Any, *, disc_weight: float = 1.0,
                    eps: float = 1e-4, max_weight: float = 1e4) -> jax.Array:
    """VQGAN adaptive generator weight ``clip(||rec|| / (||gan|| + eps), 0, max) * disc_weight``.

    ``rec_grads`` / ``gan_grads``: gradients (arrays or pytrees of the same last-layer params) of
    the reconstruction loss and of the generator loss, e.g.
    ``jax.grad(lambda w: rec_loss(decode(w)))(last_layer)``. The result is ``stop_gradient``-ed.
    """
    ratio = global_norm(rec_grads) / (global_norm(gan_grads) + eps)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_weight) * disc_weight)


def start_gate(step: jax.Array | int, start: int) -> jax.Array:
    """``1.0`` once ``step >= start``, else ``0.0`` (float32; ``step`` may be traced)."""
    return (jnp.asarray(step) >= start).astype(jnp.float32)


def gated_weight(weight: jax.Array | float, step: jax.Array | int, start: int) -> jax.Array:
    """``weight * (step >= start)``: taming's ``adopt_weight``; TiTok's discriminator start step."""
    return _f32(weight) * start_gate(step, start)


def r1_penalty(disc_apply: Callable[[jax.Array], jax.Array], real: jax.Array) -> jax.Array:
    """R1 penalty ``mean_b ||d sum(D(x_b)) / d x_b||^2`` (module docstring) of ``disc_apply`` (the
    discriminator as a function of its input, params closed over: differentiable w.r.t. them, so
    the penalty trains D) at the real inputs ``real [B, ...]``; float32. The gradient is the VJP of
    D's logits with ones (MAGVIT v1's ``gradient_penalty_without_bn``): each sample's gradient is
    its own only when D has no cross-sample statistics."""
    def total(x):
        return jnp.sum(_f32(disc_apply(x)))

    grads = _f32(jax.grad(total)(real))
    return jnp.mean(jnp.sum(jnp.square(grads.reshape(grads.shape[0], -1)), axis=1))
