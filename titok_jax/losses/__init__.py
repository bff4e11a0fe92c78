"""Training losses, all pure functions: pixel reconstruction, LPIPS-VGG and ConvNeXt-S perceptual
distances (frozen params loaded from converted files), adversarial (hinge / non-saturating), LeCam,
the R1 gradient penalty, the VQGAN adaptive weight and the start-step gate.
"""
from titok_jax.losses.gan import (GAN_LOSSES, LeCamState, adaptive_weight, discriminator_loss,
                                  gated_weight, generator_loss, global_norm, hinge_d_loss,
                                  hinge_g_loss, lecam_init, lecam_loss, lecam_regularizer,
                                  lecam_update, non_saturating_d_loss, non_saturating_g_loss,
                                  r1_penalty, start_gate)
from titok_jax.losses.perceptual import (LPIPS, LPIPS_SCALE, LPIPS_SHIFT, convnext_logits,
                                         convnext_loss, load_convnext_params, load_lpips_params,
                                         lpips_distance, lpips_loss, lpips_param_shapes)
from titok_jax.losses.reconstruction import (RECONSTRUCTION_LOSSES, l1_loss, l2_loss,
                                             reconstruction_loss)

__all__ = [
    "GAN_LOSSES", "LPIPS", "LPIPS_SCALE", "LPIPS_SHIFT", "LeCamState", "RECONSTRUCTION_LOSSES",
    "adaptive_weight", "convnext_logits", "convnext_loss", "load_convnext_params", "discriminator_loss", "gated_weight", "generator_loss", "global_norm",
    "hinge_d_loss", "hinge_g_loss", "l1_loss", "l2_loss", "lecam_init", "lecam_loss",
    "lecam_regularizer", "lecam_update", "load_lpips_params", "lpips_distance", "lpips_loss",
    "lpips_param_shapes", "non_saturating_d_loss", "non_saturating_g_loss",
    "r1_penalty", "reconstruction_loss", "start_gate",
]
