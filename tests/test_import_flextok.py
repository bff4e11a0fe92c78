"""FlexTok import (titok_jax.convert.flextok) against the OFFICIAL code: tests/data/flextok/<name>/
was made by make_vectors.py from apple/ml-flextok, instantiated from a release-shaped Hydra config
(stored in the safetensors metadata as in the released model.safetensors), every tensor perturbed.
Three models differ where releases may: the null condition (learned / single token / zeros),
max_timestep (1 / 1000), the patch head's adaLN, the VAE scaling factor and posterior sampling.
Our import must give the official token ids, VAE latents and decodes from the same noise (1 and 4
steps, APG guidance, prefixes of 3 and 1 tokens)."""
import os
import shutil

import numpy as np
import pytest

from titok_jax.convert import flextok as ft
from titok_jax.convert.workdir import import_torch

DATA = os.path.join(os.path.dirname(__file__), "data", "flextok")
MODELS = ("learned", "single", "zeros")
EXPECTED = {   # what make_vectors.py configured, read back from the metadata / tensors
    "learned": dict(null_cond="learned", max_timestep=1.0, head_adaln=True,
                    vae_scaling_factor=0.7, vae_sample_posterior=False),
    "single": dict(null_cond="single_token", max_timestep=1000.0, head_adaln=False,
                   vae_scaling_factor=1.3, vae_sample_posterior=False),
    "zeros": dict(null_cond="zeros", max_timestep=1.0, head_adaln=True,
                  vae_scaling_factor=1.0, vae_sample_posterior=True),
}
DECODES = (("dec_s1", None, 1, 1.0), ("dec_s4_apg", None, 4, 7.5), ("prefix3_s2_apg", 3, 2, 3.0),
           ("prefix1_s2", 1, 2, 1.0))


WORKDIRS: dict[str, str] = {}


def _nhwc(x):
    return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from titok_jax import load_tokenizer
    out = {}
    for name in MODELS:
        tmp = tmp_path_factory.mktemp(f"flextok_{name}")
        (tmp / "in").mkdir()
        shutil.copy(os.path.join(DATA, name, "model.safetensors"), tmp / "in" / "model.safetensors")
        summary = import_torch(str(tmp / "in"), str(tmp / "wd"))
        assert summary["model"].startswith("flextok")
        with np.load(os.path.join(DATA, name, "vectors.npz")) as d:
            vec = {k: d[k] for k in d.files}
        out[name] = (load_tokenizer(str(tmp / "wd")), vec)
        WORKDIRS[name] = str(tmp / "wd")
    return out


@pytest.mark.parametrize("name", MODELS)
def test_release_config_is_read(name):
    path = os.path.join(DATA, name, "model.safetensors")
    sd, cfg = ft.read_release(path)
    kw, _ = ft.flextok_kwargs_from_release(cfg, sd, source=path)
    for key, value in EXPECTED[name].items():
        assert kw[key] == value, key
    # the VAE's shape comes from its tensors (2 levels of 32 channels, 1 resnet, 4 latent channels)
    assert (kw["vae_base_channels"], kw["vae_channel_mult"], kw["vae_num_res_blocks"],
            kw["vae_latent_channels"]) == (32, [1, 1], 1, 4)
    assert (kw["image_size"], kw["num_registers"], kw["fsq_levels"], kw["nested_dropout"]) == \
        (32, 8, [8, 5, 5, 5], "pow2")
    assert (kw["encoder_width"], kw["decoder_width"], kw["head_dim"]) == (64, 48, 16)


@pytest.mark.parametrize("name", MODELS)
def test_ids_and_latents_match_official(imported, name):
    import jax.numpy as jnp
    tok, vec = imported[name]
    images = (_nhwc(vec["images"]) + 1.0) / 2.0
    np.testing.assert_array_equal(tok.encode(images), vec["tokens"])
    m = tok.model
    lat = m.apply({"params": tok.params, **tok.model_state}, jnp.asarray(images, jnp.float32),
                  method="vae_latents")
    np.testing.assert_allclose(np.asarray(lat), _nhwc(vec["latents"]), atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_decodes_match_official(imported, name):
    import jax.numpy as jnp
    tok, vec = imported[name]
    m, var = tok.model, {"params": tok.params, **tok.model_state}
    noise = jnp.asarray(_nhwc(vec["noise"]))
    for key, k, steps, guidance in DECODES:
        tokens = jnp.asarray(vec["tokens"][:, :k] if k else vec["tokens"])
        got = m.apply(var, tokens, method="decode_latents", noise=noise, steps=steps,
                      guidance_scale=guidance)
        want = _nhwc(vec[key])
        assert np.abs(want).max() > 1.0   # decodes of a few units: the tolerance below is tight
        np.testing.assert_allclose(np.asarray(got), want, atol=3e-5, err_msg=key)


def test_public_decode_matches_official_pixels(imported):
    tok, vec = imported["learned"]
    px = tok.decode(vec["tokens"], steps=4, guidance=7.5, noise=_nhwc(vec["noise"]))
    want = np.clip((_nhwc(vec["img_s4_apg"]) + 1.0) / 2.0, 0.0, 1.0)   # the API clips to [0, 1]
    np.testing.assert_allclose(px, want, atol=3e-5)


# ----------------------------------------------------------------------------- refusals
def _rewrite(tmp_path, name, edit_sd=None, edit_cfg=None, keep_metadata=True):
    from safetensors import safe_open
    from safetensors.numpy import save_file
    src = os.path.join(DATA, name, "model.safetensors")
    with safe_open(src, "np") as f:
        meta = dict(f.metadata())
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if edit_sd:
        edit_sd(sd)
    if edit_cfg:
        cfg = {k: ft.read_metadata(src)[k] for k in meta}
        edit_cfg(cfg)
        meta = {k: str(v) for k, v in cfg.items()}
    d = tmp_path / "in"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"), metadata=meta if keep_metadata else None)
    return d


def _refused(tmp_path, d, match):
    with pytest.raises(ValueError, match=match):
        import_torch(str(d), str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_refuses_missing_config(tmp_path):
    _refused(tmp_path, _rewrite(tmp_path, "learned", keep_metadata=False),
             "config is missing from the safetensors metadata")


def test_refuses_other_register_order(tmp_path):
    def swap(cfg):   # nested dropout before the register position embedding
        md = cfg["decoder"]["module_dict"]
        names = list(md)
        i, j = names.index("dec_register_posemb"), names.index("dec_nested_dropout")
        names[i], names[j] = names[j], names[i]
        cfg["decoder"]["module_dict"] = {n: md[n] for n in names}
    _refused(tmp_path, _rewrite(tmp_path, "learned", edit_cfg=swap), "before")


def test_names_missing_and_unexpected_tensors(tmp_path):
    key = "decoder.module_dict.dec_nested_dropout.dropout_mask_token"
    _refused(tmp_path, _rewrite(tmp_path, "learned", edit_sd=lambda sd: sd.pop(key)),
             f"missing tensor '{key}'")
    extra = tmp_path / "x"
    extra.mkdir()
    _refused(extra, _rewrite(extra, "learned",
                             edit_sd=lambda sd: sd.update({"decoder.module_dict.extra.w": np.ones(3, np.float32)})),
             "unexpected tensor 'decoder.module_dict.extra.w'")


def test_refuses_a_position_table_we_do_not_compute(tmp_path):
    key = "encoder.module_dict.enc_posemb.posembs"

    def transpose(sd):   # a column-first table: the layout titok_jax had before
        sd[key] = np.ascontiguousarray(sd[key].transpose(0, 1, 3, 2))
    _refused(tmp_path, _rewrite(tmp_path, "learned", edit_sd=transpose), "sin-cos table")


def test_refuses_unimplemented_trunk_setting(tmp_path):
    def bias(cfg):
        cfg["decoder"]["module_dict"]["dec_transformer"]["qkv_bias"] = True
    _refused(tmp_path, _rewrite(tmp_path, "single", edit_cfg=bias), "qkv_bias")


def test_released_diffusers_vae_loads_as_vae_weights(imported, tmp_path):
    """vae.weights may be a released diffusers VAE (flextok_vae_c*): here the VAE tensors of the
    official model, without their prefix; they must load as the imported FlexTok's VAE."""
    import jax
    from safetensors import safe_open
    from safetensors.numpy import save_file
    from titok_jax.tasks.flextok import load_vae_params
    tok, _ = imported["learned"]
    with safe_open(os.path.join(DATA, "learned", "model.safetensors"), "np") as f:
        sd = {k[len(ft.VAE_PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(ft.VAE_PREFIX)}
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    save_file(sd, path)
    want = tok.params["vae"]
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.float32), want)
    got = load_vae_params({"weights": path}, abstract)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
    sd.pop("decoder.conv_out.bias")
    save_file(sd, path)
    with pytest.raises(ValueError, match="missing tensor 'decoder.conv_out.bias'"):
        load_vae_params({"weights": path}, abstract)


def test_eval_runs_on_an_imported_workdir(imported, capsys):
    """`eval` reads only the checkpoint (no vae.weights / teacher files: the task is built for
    inference) and decodes with the imported sampler."""
    import json
    from titok_jax import cli
    assert "single" in imported
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", WORKDIRS["single"]]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["step"] == 0 and np.isfinite(metrics["psnr"]) and metrics["num_images"] == 3


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
