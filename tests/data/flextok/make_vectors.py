"""Regenerate the FlexTok release-format references in tests/data/flextok/ from the OFFICIAL code.

apple/ml-flextok (commit 87d00cc8babf4a25ffce0f3f0c4d8b529d3d6abf), run unchanged on CPU:

    FLEXTOK_REPO=/path/to/ml-flextok PYTHONPATH=<hydra-core, diffusers, einops, mup, omegaconf> \
        .venv/bin/python tests/data/flextok/make_vectors.py

Nothing of the official code is copied here; it is imported from ``FLEXTOK_REPO``. The models are
built exactly as the release loads them: ``hydra.utils.instantiate(config)`` of a config shaped like
the released ones (``FlexTokFromHub``'s keys: vae / encoder / decoder / regularizer /
flow_matching_noise_module / pipeline, each a ``SequentialModuleDictWrapper`` of official modules),
then saved with the official ``flextok.utils.checkpoint.save_safetensors`` - the config goes into the
safetensors metadata, as in the released ``model.safetensors``.

In-process patches (none changes the maths; the official notes name each as the way to run on CPU):
- ``torchvision`` is stubbed: ``flextok/utils/__init__.py`` imports the demo helpers (URL loading,
  PIL conversion), unused here.
- ``vae_wrapper.VAE_BASE_CFG`` (the SD-VAE shape, a constant of the official code) is replaced by a
  tiny one (2 levels of 32 channels, 1 resnet per level, 32 groups) - the release format stores
  only the latent channels and the scaling factor, so the importer reads the VAE shape from tensors.
- Every attention module gets ``use_flex_attention = False`` (the official SDPA fallback; its
  constructor flag is not exposed through the blocks) and the sequence packers are built with
  ``return_materialized_mask=True`` (a config argument).

Three models, each with every tensor moved off its default (+ N(0, 0.05); zero-initialised gates
and heads become non-zero), differing where the released configs may differ:

==========  ============  ===============  ==============  ================  ===============
name        null cond     max_timestep     head adaLN      VAE scaling       posterior
==========  ============  ===============  ==============  ================  ===============
learned     learned       1.0              yes             0.7               mode (False)
single      single token  1000.0           no              1.3               mode (False)
zeros       zeros         1.0              yes             1.0               sample (True)
==========  ============  ===============  ==============  ================  ===============

Per model ``<name>/model.safetensors`` and ``<name>/vectors.npz`` (NCHW as the official code):
``images`` [2, 3, 32, 32] in [-1, 1]; ``latents`` (scaled VAE latents: the posterior mode, for the
``zeros`` model - whose config samples the posterior - computed with ``sample_posterior`` switched
off so they are comparable); ``tokens`` [2, 8] int (from those latents); ``noise`` [2, C, h, w]
(the pipeline's own draw, ``torch.Generator().manual_seed(7)``, per image in list order);
``dec_s1`` (1 step, no guidance), ``dec_s4_apg`` (4 steps, APG 7.5), ``prefix3_s2_apg`` (tokens cut
to 3, 2 steps, APG 3.0), ``prefix1_s2`` (tokens cut to 1, 2 steps, CFG off): decoded *latents* from
the stored noise; ``img_s4_apg``: the VAE decode of ``dec_s4_apg`` in [-1, 1].
"""
from __future__ import annotations

import os
import sys
import types

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("FLEXTOK_REPO", "/tmp/flextok_src"))

from diffusers.models import AutoencoderKL  # noqa: E402,F401  (before the stub: diffusers probes torchvision)

tv = types.ModuleType("torchvision")
tv.transforms = types.ModuleType("torchvision.transforms")
tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
for name, mod in (("torchvision", tv), ("torchvision.transforms", tv.transforms),
                  ("torchvision.transforms.functional", tv.transforms.functional)):
    sys.modules[name] = mod

from hydra.utils import instantiate  # noqa: E402
from flextok import vae_wrapper  # noqa: E402
from flextok.utils.checkpoint import save_safetensors  # noqa: E402

vae_wrapper.VAE_BASE_CFG = {**vae_wrapper.VAE_BASE_CFG,
                            "block_out_channels": [32, 32],
                            "down_block_types": ["DownEncoderBlock2D"] * 2,
                            "up_block_types": ["UpDecoderBlock2D"] * 2,
                            "layers_per_block": 1}

IMAGE, C, PATCH, R = 32, 4, 2, 8
LEVELS = [8, 5, 5, 5]
ENC_D, DEC_D, HEAD_DIM = 64, 48, 16
GRID = IMAGE // 2 // PATCH          # f = 2 for the tiny VAE -> 16 x 16 latents -> 8 x 8 patches
P = "flextok.model.preprocessors."
U = "flextok.model.utils."


def t(name: str, **kw) -> dict:
    return {"_target_": name, **kw}


def to_last(read: str, write: str) -> dict:
    return t(U + "dict_ops.PerSampleOp", read_key=read, write_key=write,
             per_sample_op=t(U + "dict_ops.channels_first_to_last", _partial_=True))


def config(null: str, max_timestep: float, head_adaln: bool, scaling: float, sample: bool) -> dict:
    encoder = {
        "enc_to_last": to_last("vae_latents", "enc_latents_last"),
        "enc_patches": t(P + "patching.PatchEmbedder", input_tensor_list_read_key="enc_latents_last",
                         patches_list_write_key="enc_patches", n_patches_write_key="enc_n_patches",
                         patch_sizes=[PATCH, PATCH], channels_in=C, dim=ENC_D,
                         flatten_patches=False),
        "enc_posemb": t(U + "posembs.PositionalEmbeddingAdder", read_key="enc_patches",
                        write_key="enc_patches", dim=ENC_D, max_sizes=[GRID, GRID],
                        posemb_type="sincos", posemb_scaling="absolute"),
        "enc_register_module": t(P + "registers.Registers1D",
                                 input_tensor_list_read_key="enc_patches",
                                 register_sizes_read_write_key="enc_register_sizes",
                                 registers_write_key="enc_registers", dim=ENC_D, n_min=R, n_max=R),
        "enc_packer": t(P + "flex_seq_packing.BlockWiseSequencePacker",
                        input_list_read_keys=["enc_patches", "enc_registers"],
                        packed_seq_write_key="enc_packed", block_mask_write_key="enc_mask",
                        inner_packed_shapes_write_key="enc_inner_ps",
                        outer_packed_shapes_write_key="enc_outer_ps", mask_mode="causal_last",
                        pad_to_multiple=128, return_materialized_mask=True),
        "enc_transformer": t("flextok.model.trunks.transformers.FlexTransformer",
                             input_seq_read_key="enc_packed", output_seq_write_key="enc_out",
                             dim=ENC_D, depth=2, head_dim=HEAD_DIM, block_mask_read_key="enc_mask"),
        "enc_unpacker": t("flextok.model.postprocessors.seq_unpacking.SequenceUnpacker",
                          packed_seq_read_key="enc_out",
                          inner_seq_write_keys=["enc_patches_out", "enc_registers_out"],
                          inner_packed_shapes_read_key="enc_inner_ps",
                          outer_packed_shapes_read_key="enc_outer_ps"),
        "enc_to_latents": t("flextok.model.postprocessors.heads.LinearHead",
                            read_key="enc_registers_out", write_key="enc_register_latents",
                            dim=ENC_D, dim_out=len(LEVELS), use_mup_readout=False,
                            weight_init_style="xavier"),
    }
    nullcond = (t(P + "nullcond.ZeroNullCond", read_write_key="dec_registers") if null == "zeros"
                else t(P + "nullcond.LearnedNullCond", read_write_key="dec_registers", dim=DEC_D,
                       dropout_prob=0.1, replace_with_single_token=null == "single"))
    head_adaln = {"adaLN_emb_read_key": "dec_temb"} if head_adaln else {}
    decoder = {
        "dec_from_latents": t(P + "linear.LinearLayer", read_key="quants", write_key="dec_registers",
                              dim_in=len(LEVELS), dim=DEC_D),
        "dec_register_posemb": t(U + "posembs.PositionalEmbeddingAdder", read_key="dec_registers",
                                 write_key="dec_registers", dim=DEC_D, max_sizes=[R],
                                 posemb_type="learnable_sum", posemb_scaling="absolute"),
        "dec_nested_dropout": t(P + "token_dropout.MaskedNestedDropout",
                                read_write_key="dec_registers", dim=DEC_D,
                                size_sampling_mode="pow2"),
        "dec_nullcond": nullcond,
        "dec_to_last": to_last("vae_latents_noised", "dec_noised_last"),
        "dec_patches": t(P + "patching.PatchEmbedder", input_tensor_list_read_key="dec_noised_last",
                         patches_list_write_key="dec_patches", n_patches_write_key="dec_n_patches",
                         patch_sizes=[PATCH, PATCH], channels_in=C, dim=DEC_D,
                         flatten_patches=False),
        "dec_posemb": t(U + "posembs.PositionalEmbeddingAdder", read_key="dec_patches",
                        write_key="dec_patches", dim=DEC_D, max_sizes=[GRID, GRID],
                        posemb_type="sincos", posemb_scaling="absolute"),
        "dec_time_embedder": t(P + "time_embedding.TimestepEmbedder", timesteps_read_key="timesteps",
                               time_embedding_write_key="dec_temb", dim=DEC_D,
                               max_timestep=max_timestep),
        "dec_packer": t(P + "flex_seq_packing.BlockWiseSequencePacker",
                        input_list_read_keys=["dec_patches", "dec_registers"],
                        packed_seq_write_key="dec_packed", block_mask_write_key="dec_mask",
                        inner_packed_shapes_write_key="dec_inner_ps",
                        outer_packed_shapes_write_key="dec_outer_ps", mask_mode="full",
                        pad_to_multiple=128, emb_packing_fn_write_key="dec_adaln_packing",
                        per_subseq_embs=True, return_materialized_mask=True),
        "dec_transformer": t("flextok.model.trunks.transformers.FlexTransformer",
                             input_seq_read_key="dec_packed", output_seq_write_key="dec_out",
                             dim=DEC_D, depth=2, head_dim=HEAD_DIM, block_mask_read_key="dec_mask",
                             adaLN_emb_read_key="dec_temb",
                             adaLN_packing_fn_read_key="dec_adaln_packing", adaLN_expansion=2,
                             intermediate_layer_write_key="dec_repa_feats",
                             intermediate_layers=[0]),
        "dec_unpacker": t("flextok.model.postprocessors.seq_unpacking.SequenceUnpacker",
                          packed_seq_read_key="dec_out",
                          inner_seq_write_keys=["dec_patches_out", "dec_registers_out"],
                          inner_packed_shapes_read_key="dec_inner_ps",
                          outer_packed_shapes_read_key="dec_outer_ps"),
        "dec_to_patches": t("flextok.model.postprocessors.heads.ToPatchesLinearHead",
                            read_key="dec_patches_out", write_key="dec_velocity_last", dim=DEC_D,
                            channels_out=C, patch_sizes=[PATCH, PATCH], use_mup_readout=False,
                            **head_adaln),
        "dec_to_first": t(U + "dict_ops.PerSampleOp", read_key="dec_velocity_last",
                          write_key="vae_latents_reconst",
                          per_sample_op=t(U + "dict_ops.channels_last_to_first", _partial_=True)),
    }
    wrap = "flextok.model.utils.wrappers.SequentialModuleDictWrapper"
    return {
        "_target_": "flextok.flextok_wrapper.FlexTok",
        "vae": t("flextok.vae_wrapper.StableDiffusionVAE", images_read_key="rgb",
                 vae_latents_read_key="vae_latents_reconst", vae_latents_write_key="vae_latents",
                 images_reconst_write_key="rgb_reconst", vae_kl_loss_write_key="vae_kl",
                 latent_channels=C, scaling_factor=scaling, sample_posterior=sample, frozen=True),
        "encoder": t(wrap, module_dict=encoder),
        "decoder": t(wrap, module_dict=decoder),
        "regularizer": t("flextok.regularizers.quantize_fsq.FSQ",
                         latents_read_key="enc_register_latents", quants_write_key="quants",
                         tokens_write_key="tokens", levels=LEVELS),
        "flow_matching_noise_module": t("flextok.flow_matching.noise_modules.MinRFNoiseModule",
                                        clean_images_read_key="vae_latents",
                                        noised_images_write_key="vae_latents_noised",
                                        timesteps_write_key="timesteps", sigmas_write_key="sigmas"),
        "pipeline": t("flextok.flow_matching.pipelines.MinRFPipeline", _partial_=True,
                      target_sizes_read_key=None, latents_read_key="quants",
                      timesteps_read_key="timesteps", noised_images_read_key="vae_latents_noised",
                      reconst_write_key="vae_latents_reconst", out_channels=C),
    }


MODELS = {
    "learned": dict(null="learned", max_timestep=1.0, head_adaln=True, scaling=0.7, sample=False),
    "single": dict(null="single", max_timestep=1000.0, head_adaln=False, scaling=1.3, sample=False),
    "zeros": dict(null="zeros", max_timestep=1.0, head_adaln=True, scaling=1.0, sample=True),
}


def build(cfg: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = instantiate(cfg).eval()
    for m in model.modules():
        if hasattr(m, "use_flex_attention"):
            m.use_flex_attention = False
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def decode(model, quants: list, keep: list, steps: int, guidance: float, noise: torch.Tensor):
    dd = {"quants": [q.clone() for q in quants], "eval_keep_k": keep,
          "vae_latents_noised": [n[None].clone() for n in noise]}
    g = torch.Generator().manual_seed(7)
    out = model.pipeline(dd, generator=g, timesteps=steps, vae_image_sizes=IMAGE // 2,
                         verbose=False, guidance_scale=guidance,
                         perform_norm_guidance=guidance != 1.0)
    return torch.cat(out["vae_latents_reconst"], 0)


def main() -> None:
    for i, (name, spec) in enumerate(MODELS.items()):
        cfg = config(**spec)
        model = build(cfg, seed=10 + i)
        out_dir = os.path.join(HERE, name)
        os.makedirs(out_dir, exist_ok=True)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        save_safetensors(sd, os.path.join(out_dir, "model.safetensors"), metadata_dict=cfg)
        images = torch.rand(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3)) * 2 - 1
        with torch.no_grad():
            model.vae.sample_posterior = False          # comparable, deterministic latents
            dd = model.encode({"rgb": list(images.split(1))})
            model.vae.sample_posterior = spec["sample"]
            latents = torch.cat(dd["vae_latents"], 0)
            tokens = torch.cat(dd["tokens"], 0)
            quants = dd["quants"]
            # the pipeline's own noise draw (MinRFPipeline: randn((1, C, h, w)) per image, in order)
            g = torch.Generator().manual_seed(7)
            noise = torch.cat([torch.randn((1, C, IMAGE // 2, IMAGE // 2), generator=g)
                               for _ in range(2)])
            vec = {"images": images, "latents": latents, "tokens": tokens, "noise": noise}
            pipe = model.pipeline
            pipe.noise_read_key = "vae_latents_noised"  # decode from the stored noise
            full = [R, R]
            vec["dec_s1"] = decode(model, quants, full, 1, 1.0, noise)
            vec["dec_s4_apg"] = decode(model, quants, full, 4, 7.5, noise)
            cut3 = [model.regularizer.indices_to_embedding(
                torch.cat([tok[:, :3], torch.zeros_like(tok[:, 3:])], 1)) for tok in dd["tokens"]]
            vec["prefix3_s2_apg"] = decode(model, cut3, [3, 3], 2, 3.0, noise)
            cut1 = [model.regularizer.indices_to_embedding(
                torch.cat([tok[:, :1], torch.zeros_like(tok[:, 1:])], 1)) for tok in dd["tokens"]]
            vec["prefix1_s2"] = decode(model, cut1, [1, 1], 2, 1.0, noise)
            # the same through the official public API (detokenize pads with id 0): must agree
            pipe.noise_read_key = None
            api = model.detokenize([tok[:, :3] for tok in dd["tokens"]], vae_image_sizes=IMAGE // 2,
                                   timesteps=2, generator=torch.Generator().manual_seed(7),
                                   verbose=False, guidance_scale=3.0, perform_norm_guidance=True)
            img = model.vae.decode({"vae_latents_reconst": vec["prefix3_s2_apg"]})["rgb_reconst"]
            assert torch.allclose(api, img, atol=1e-5), float((api - img).abs().max())
            vec["img_s4_apg"] = model.vae.decode(
                {"vae_latents_reconst": vec["dec_s4_apg"]})["rgb_reconst"]
        np.savez(os.path.join(out_dir, "vectors.npz"),
                 **{k: v.detach().cpu().numpy() for k, v in vec.items()})
        print(name, {k: tuple(v.shape) for k, v in vec.items()},
              "tokens", tokens.tolist())


if __name__ == "__main__":
    main()
