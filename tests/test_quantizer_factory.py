"""The quantizer sub-config (``model.quantizer``): the factory table, its errors, the frozen form,
the translation of workdirs written with flat VQ knobs, the tokenizer interface every model shows,
and a command-line override of one quantizer argument."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from titok_jax.models.registry import build_model, resolved_quantizer, translate_legacy_quantizer
from titok_jax.models.titok_variants import titok_variant
from titok_jax.quantizers import GaussianPosterior, VectorQuantizer, uniform_codebook_init
from titok_jax.quantizers.factory import (QUANTIZERS, build_quantizer, freeze_spec, input_dim,
                                          spec_codebook_size)

from train_helpers import ROOT


# ----------------------------------------------------------------------------- the factory
def test_vq_builds_a_vector_quantizer_with_the_given_arguments():
    spec = {"name": "vq", "codebook_size": 16, "l2_normalize": True, "commitment_weight": 0.5,
            "use_ema": True, "ema_decay": 0.9, "dead_code_threshold": 1.0}
    q = build_quantizer(spec, 4, dtype=jnp.float32, param_dtype=jnp.float32)
    assert isinstance(q, VectorQuantizer)
    assert (q.codebook_size, q.dim, q.l2_normalize, q.commitment_weight, q.use_ema, q.ema_decay,
            q.dead_code_threshold) == (16, 4, True, 0.5, True, 0.9, 1.0)
    assert q.codebook_init is uniform_codebook_init and q.dtype == jnp.float32   # the models' own
    assert spec_codebook_size(spec) == 16 and input_dim(spec, 4) == 4
    other = build_quantizer({"name": "vq", "codebook_size": 8, "codebook_init": "variance_scaling"},
                            3, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert other.codebook_init is not uniform_codebook_init and other.dtype == jnp.bfloat16


def test_vae_builds_the_gaussian_posterior():
    q = build_quantizer({"name": "vae", "kl_weight": 0.5}, 4, dtype=jnp.float32,
                        param_dtype=jnp.float32)
    assert isinstance(q, GaussianPosterior) and q.kl_weight == 0.5
    assert spec_codebook_size({"name": "vae"}) is None and input_dim({"name": "vae"}, 4) == 8
    moments = jnp.concatenate([jnp.ones((2, 3, 4)), jnp.zeros((2, 3, 4))], -1)
    z, out = q.apply({}, moments)                                   # eval: the mean, no rng
    np.testing.assert_array_equal(z, jnp.ones((2, 3, 4)))
    assert out.indices is None and float(out.losses["kl"]) == pytest.approx(0.5 * 0.5 * 12)


@pytest.mark.parametrize("spec,match", [
    ({"name": "vqq"}, r"unknown quantizer name 'vqq'; known: \['bsq', 'fq', 'fsq', 'lfq', 'rq', 'vae', 'vq'\]"),
    ({"codebook_size": 8}, r"unknown quantizer name None"),
    ({"name": "vq", "codebook_size": 8, "use_l2_norm": True},
     r"quantizer 'vq': unknown argument 'use_l2_norm'; known: \[.*'l2_normalize'"),
    ({"name": "vae", "codebook_size": 8}, r"quantizer 'vae': unknown argument 'codebook_size'; "
                                          r"known: \['kl_weight'\]"),
    ({"name": "vq"}, r"quantizer 'vq': missing argument\(s\) \['codebook_size'\]"),
    ({"name": "vq", "codebook_size": 8, "codebook_init": "zeros"}, r"codebook_init must be one of"),
])
def test_unknown_names_and_arguments_are_one_line_errors(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        build_quantizer(spec, 4, dtype=jnp.float32, param_dtype=jnp.float32)
    assert "\n" not in str(e.value)


def test_every_entry_of_the_table_builds():
    args = {"vq": {"codebook_size": 8}, "vae": {}, "fsq": {"levels": [5, 5, 4, 3]},
            "lfq": {"bits": 4}, "bsq": {"bits": 4}, "fq": {"codebook_size": 8},
            "rq": {"codebook_size": 8}}
    assert set(QUANTIZERS) == set(args)       # a new entry needs a line here (and in the models)
    for name, kw in args.items():
        q = build_quantizer({"name": name, **kw}, 4, dtype=jnp.float32, param_dtype=jnp.float32)
        z = jnp.ones((2, 3, input_dim({"name": name, **kw}, 4)))
        (zq, out), _ = q.init_with_output(jax.random.key(0), z)
        assert zq.shape == (2, 3, 4)


def test_frozen_form_is_hashable_and_accepts_configdicts_and_json_lists():
    frozen = freeze_spec({"name": "vq", "codebook_size": 8, "l2_normalize": True})
    assert frozen == (("name", "vq"), ("codebook_size", 8), ("l2_normalize", True)) and hash(frozen)
    assert freeze_spec(ml_collections.ConfigDict(dict(frozen))) == frozen
    assert freeze_spec(json.loads(json.dumps(dict(frozen)))) == frozen == freeze_spec(frozen)
    model = build_model({"name": "titok", **titok_variant("tiny")})
    assert model.quantizer == (("name", "vq"), ("codebook_size", 64), ("l2_normalize", False))
    assert hash(model) and hash(titok_model_from_dict())


def titok_model_from_dict():
    from titok_jax.models.titok import TiTok
    return TiTok(**titok_variant("tiny"))      # a plain dict field is frozen at construction


# ----------------------------------------------------------------------------- legacy workdirs
TINY = {k: v for k, v in titok_variant("tiny").items() if k != "quantizer"}
LEGACY = [  # (old flat model section, its new form)
    ({"name": "titok", **TINY, "quantizer": "vq", "codebook_size": 64, "use_l2_norm": True,
      "commitment_cost": 0.5, "ema_codebook": True, "ema_decay": 0.9, "kmeans_init": True,
      "dead_code_threshold": 0.5, "kl_weight": 1e-6},
     {"name": "titok", **TINY, "quantizer": {
         "name": "vq", "codebook_size": 64, "l2_normalize": True, "commitment_weight": 0.5,
         "use_ema": True, "ema_decay": 0.9, "kmeans_init": True, "dead_code_threshold": 0.5}}),
    ({"name": "titok", **TINY, "quantizer": "vae", "codebook_size": 8192, "use_l2_norm": False,
      "kl_weight": 0.01},
     {"name": "titok", **TINY, "quantizer": {"name": "vae", "kl_weight": 0.01}}),
    ({"name": "maskgit_vqgan", "image_size": 32, "hidden_channels": 32, "channel_mult": [1, 2],
      "num_res_blocks": 1, "z_channels": 16, "codebook_size": 32, "commitment_cost": 1.0,
      "codebook_weight": 0.25},
     {"name": "maskgit_vqgan", "image_size": 32, "hidden_channels": 32, "channel_mult": [1, 2],
      "num_res_blocks": 1, "z_channels": 16, "quantizer": {
          "name": "vq", "codebook_size": 32, "commitment_weight": 1.0, "codebook_weight": 0.25}}),
]


@pytest.mark.parametrize("old,new", LEGACY, ids=["titok_vq_ema", "titok_vae", "vqgan"])
def test_a_legacy_flat_section_builds_the_same_model_as_its_new_form(old, new):
    assert translate_legacy_quantizer(old) == new
    assert translate_legacy_quantizer(new) == new                 # the new form passes through
    a, b = build_model(old), build_model(new)
    assert a == b and a.quantizer == b.quantizer
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)), jnp.float32)
    rngs = {"params": jax.random.key(0), "sample": jax.random.key(1), "quantizer": jax.random.key(2)}
    va, vb = jax.jit(a.init)(rngs, x), jax.jit(b.init)(rngs, x)   # jitted: eager took 15-20 s
    assert jax.tree.structure(va) == jax.tree.structure(vb)
    jax.tree.map(np.testing.assert_array_equal, va, vb)

    def forward(model, v):
        return jax.jit(lambda v, x, rngs: model.apply(v, x, train=True, rngs=rngs,
                                                      mutable=["quantizer_stats"]))(v, x, rngs)

    (ra, oa), _ = forward(a, va)
    (rb, ob), _ = forward(b, vb)
    np.testing.assert_array_equal(ra, rb)
    jax.tree.map(np.testing.assert_array_equal, oa.losses, ob.losses)


def test_legacy_defaults_are_each_models_old_defaults():
    two_stage = translate_legacy_quantizer({"name": "titok_two_stage", "codebook_size": 64})
    assert two_stage["quantizer"] == {"name": "vq", "codebook_size": 64, "l2_normalize": True}
    vqgan = translate_legacy_quantizer({"name": "maskgit_vqgan", "ema_codebook": True})
    assert vqgan["quantizer"] == {"name": "vq", "codebook_size": 1024, "use_ema": True}
    titok = translate_legacy_quantizer({"name": "titok", "quantizer": "vq"})
    assert titok["quantizer"] == {"name": "vq", "codebook_size": 8192}
    other = {"name": "kl_vae", "kl_weight": 0.1}                    # a field of its own: untouched
    assert translate_legacy_quantizer(other) == other
    with pytest.raises(ValueError, match="model.quantizer 'fsq'"):
        translate_legacy_quantizer({"name": "titok", "quantizer": "fsq"})
    # two-stage runs compare the quantizer in full: old and new forms of one quantizer agree
    assert (resolved_quantizer({"name": "titok_two_stage", "codebook_size": 64, "use_l2_norm": True})
            == resolved_quantizer({"name": "titok_two_stage",
                                   "quantizer": {"name": "vq", "codebook_size": 64,
                                                 "l2_normalize": True, "commitment_weight": 0.25}}))


# ----------------------------------------------------------------------------- models
def test_every_tokenizer_model_shows_the_same_interface():
    from titok_jax.models.flextok import FlexTok
    from titok_jax.models.flowmo import FlowMo
    from titok_jax.models.kl_vae import KLVAE
    from titok_jax.models.titok import TiTok
    from titok_jax.models.titok_two_stage import TiTokTwoStage
    from titok_jax.models.vqgan import MaskGITVQGAN
    want = {TiTok(): ("vq", 8192), TiTok(quantizer={"name": "vae"}): ("vae", None),
            TiTokTwoStage(): ("vq", 4096), MaskGITVQGAN(): ("vq", 1024), KLVAE(): ("vae", None),
            FlowMo(): ("lfq", 2 ** 18), FlexTok(): ("fsq", 64_000)}
    for model, (name, k) in want.items():
        assert (model.quantizer_name, model.codebook_size) == (name, k), type(model).__name__
        assert int(model.token_size) > 0 and int(model.num_latent_tokens) > 0
        assert int(model.image_size) == 256


def test_the_vqgan_takes_a_gaussian_bottleneck():
    model = build_model({"name": "maskgit_vqgan", "image_size": 32, "hidden_channels": 32,
                         "channel_mult": [1, 2], "num_res_blocks": 1, "z_channels": 16,
                         "quantizer": {"name": "vae", "kl_weight": 0.1}})
    x = jnp.zeros((1, 32, 32, 3))
    params = nn.unbox(model.init(jax.random.key(0), x))["params"]
    assert "quantize" not in params and params["encoder"]["conv_out"]["kernel"].shape[-1] == 32
    codes, out = model.apply({"params": params}, x, method="encode")
    assert codes.shape == (1, 256, 16) and out.indices is None and set(out.losses) == {"kl"}
    pixels = model.apply({"params": params}, codes, method="decode_tokens")
    assert pixels.shape == (1, 32, 32, 3)


def test_two_stage_refuses_a_continuous_bottleneck():
    from titok_jax.models.titok_two_stage import TiTokTwoStage
    model = TiTokTwoStage(**titok_variant("tiny_two_stage", quantizer={"name": "vae"}))
    with pytest.raises(ValueError, match="needs a discrete quantizer"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("family", ["titok", "vqgan"])
def test_a_quantizer_argument_is_set_from_the_command_line(family):
    from absl import flags
    from ml_collections import config_flags
    path = os.path.join(ROOT, "configs", f"{family}.py") + (":tiny_vq" if family == "titok" else ":tiny")
    argv = ["prog", f"--config={path}", "--config.model.quantizer.codebook_size=32",
            "--config.model.quantizer.use_ema=False", "--config.model.quantizer.kmeans_init=False",
            "--config.model.quantizer.dead_code_threshold=0.0"]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    model = build_model(fv.config.model)
    assert model.codebook_size == 32 and model.quantizer_name == "vq"
    assert dict(model.quantizer)["use_ema"] is False


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """Every test here runs with XLA's heavy optimisation passes off (conftest ``fast_compile``)."""
