"""Generators on tokenizer codes: MaskGIT (bidirectional transformer, training masks and loss,
parallel-decoding sampler with classifier-free guidance). Uses ``titok_jax.nn`` only."""
from titok_jax.generators.guidance import (GUIDANCE_SCHEDULES, apply_guidance, guidance_weight,
                                           needs_uncond)
from titok_jax.generators.maskgit import (GENERATOR_VARIANTS, SAMPLER_DEFAULTS, BertLayer,
                                          MaskGITTransformer, class_logits_fn, generate_tokens,
                                          generator_variant)
from titok_jax.generators.maskgit_sampling import mask_counts, maskgit_sample
from titok_jax.generators.masking import (SCHEDULES, apply_mask, drop_classes, mask_ratio,
                                          mask_ratio_np, maskgit_loss, num_masked, random_mask,
                                          training_mask)

__all__ = [
    "BertLayer", "GENERATOR_VARIANTS", "GUIDANCE_SCHEDULES", "MaskGITTransformer",
    "SAMPLER_DEFAULTS", "SCHEDULES", "apply_guidance", "apply_mask", "class_logits_fn",
    "drop_classes", "generate_tokens", "generator_variant", "guidance_weight", "mask_counts",
    "mask_ratio", "mask_ratio_np", "maskgit_loss", "maskgit_sample", "needs_uncond",
    "num_masked", "random_mask", "training_mask",
]
