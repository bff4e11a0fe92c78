"""Open-MAGVIT2 (issue 17): the import against the OFFICIAL PyTorch model's outputs
(tests/data/magvit2, made by make_vectors.py from TencentARC/SEED-Voken@b9a17ea8: encoder, LFQ indices and loss terms,
decoder), the EMA / raw choice of a Lightning ``.ckpt``, the name table against the published
models' state-dict names, ``import-torch`` -> ``load_tokenizer``, the pieces (depth-to-space,
AdaGN, the LFQ entropy options, the GAN loss), the configs (published shapes by
``jax.eval_shape`` only) and ``tiny`` training through the trainer."""
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import titok_jax
from titok_jax import cli
from titok_jax.convert.common import read_state_dict
from titok_jax.convert.magvit2 import (ema_key, infer_magvit2_kwargs, is_magvit2,
                                       magvit2_name_table, magvit2_params_from_state_dict)
from titok_jax.models.magvit2 import OPEN_MAGVIT2_128, OPEN_MAGVIT2_256, AdaptiveGroupNorm
from titok_jax.models.registry import build_model
from titok_jax.nn.conv import depth_to_space

from train_helpers import load_config_module

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "magvit2")
CKPT = os.path.join(DATA, "om2_tiny.ckpt")                  # raw + model_ema.* + loss.* (torch)
STATE = os.path.join(DATA, "om2_tiny_ema.safetensors")      # its EMA weights, raw names (no torch)
# make_vectors.py: ddconfig ch 32, ch_mult (1, 1), 1 block, z 18; 16 px images -> 8x8 tokens
SMALL = dict(image_size=16, ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=18)
EMA_CHANGED = ("encoder.conv_out.weight", "encoder.conv_out.bias", "decoder.conv_out.bias",
               "decoder.adaptive.1.gamma.bias", "decoder.norm_out.weight")
CONFIGS = load_config_module("magvit2")


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """Every test here runs with XLA's heavy optimisation passes off (conftest ``fast_compile``)."""


def close(got, want, rel=1e-5):
    """float32 round-off: |got - want| <= rel * max|want| everywhere."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= rel * scale, f"max error {err:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def official():
    sd = read_state_dict(STATE)
    with np.load(os.path.join(DATA, "io.npz")) as f:
        io = {k: f[k] for k in f.files}
    return sd, io


@pytest.fixture(scope="module")
def converted(official):
    sd, _ = official
    kwargs = infer_magvit2_kwargs(sd, image_size=16, source="om2_tiny_ema.safetensors")
    return kwargs, magvit2_params_from_state_dict(sd, kwargs, source="om2_tiny_ema.safetensors")


# ----------------------------------------------------------------------------- official vectors
def test_import_reproduces_the_official_encoder_lfq_and_decoder(official, converted):
    _, io = official
    kwargs, params = converted
    assert {k: v for k, v in kwargs.items() if k != "quantizer"} == SMALL   # read from the tensors
    assert kwargs["quantizer"]["bits"] == 18 and kwargs["quantizer"]["batch_entropy_eps"] == 1e-5
    model = build_model({"name": "magvit2", **kwargs})
    assert (model.grid_size, model.codebook_size) == (8, 2 ** 18)

    def run(p, x, ids):
        v = {"params": p}
        (_, out_train), _ = model.apply(v, x, train=True, method="encode",
                                        mutable=["quantizer_stats"])
        return (model.apply(v, x, method="pre_quant"), model.apply(v, x, method="encode"),
                model.apply(v, x), out_train, model.apply(v, ids, method="decode_tokens"))

    h, (codes, out), (rec, _), out_train, pixels = jax.jit(run)(
        params, jnp.asarray(io["images"]), jnp.asarray(io["decoded_ids"]))
    close(h, io["h"])                                           # encoder(2x - 1)
    # exact indices: every |h| is far above the float32 error (min 7.6e-5 of a 1.4 scale)
    assert np.abs(io["h"]).min() > 50 * 1e-6 * np.abs(io["h"]).max()
    np.testing.assert_array_equal(np.asarray(out.indices), io["ids"])
    assert len(np.unique(io["ids"])) > 100                      # LSB-first: channel 0 = bit 0
    np.testing.assert_array_equal(np.asarray(codes),
                                  np.where(io["h"] > 0, 1.0, -1.0).reshape(2, 64, 18))
    close(2.0 * np.asarray(rec) - 1.0, io["decoded"])          # decoder(quant), [-1, 1] units
    assert np.abs(io["decoded"]).max() > 1.0                   # unclamped, as the official one
    close(2.0 * np.asarray(pixels) - 1.0, io["decoded_from_ids"])   # get_codebook_entry order
    # OM2's loss: 0.1 x (per-sample - codebook entropy) and 0.25 x commitment
    m = out_train.metrics
    np.testing.assert_allclose(float(m["per_sample_entropy"]), io["per_sample_entropy"], rtol=1e-4)
    np.testing.assert_allclose(float(m["batch_entropy"]), io["codebook_entropy"], rtol=1e-5)
    np.testing.assert_allclose(float(out_train.losses["entropy"]), 0.1 * io["entropy_aux_loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(float(out_train.losses["commitment"]), 0.25 * io["commitment"],
                               rtol=1e-5)


def test_the_lfq_options_are_what_matches_the_official_codebook_entropy(official):
    """OM2's codebook entropy is -sum P log(P + 1e-5) over the exact 2^18 mixture: LFQ's default
    (two 9-bit groups, no eps) or the exact one without eps are each a different number."""
    from titok_jax.quantizers.lfq import LFQ
    _, io = official
    h = jnp.asarray(io["h"]).reshape(-1, 18)
    got = {}
    for name, kw in {"om2": dict(batch_entropy_group_size=18, batch_entropy_eps=1e-5),
                     "exact": dict(batch_entropy_group_size=18), "default": {}}.items():
        got[name] = float(LFQ(bits=18, **kw).entropy_terms(h)[1])
    np.testing.assert_allclose(got["om2"], io["codebook_entropy"], rtol=1e-5)
    # 128 tokens spread over ~127 codes: the eps moves the entropy by 2.6e-3, 50x the tolerance
    assert abs(got["exact"] - got["om2"]) > 1e-3 and abs(got["default"] - got["om2"]) > 1e-3
    with pytest.raises(ValueError, match="batch_entropy_eps"):
        LFQ(bits=4, batch_entropy_eps=-1.0)


# ----------------------------------------------------------------------------- the checkpoint
def _with_ema(sd, raw_offset=0.5):
    """A Lightning-style state dict built from the bare EMA weights: raw tensors (shifted: wrong),
    their ``model_ema.`` copies (right), EMA bookkeeping and ``loss.*`` (dropped)."""
    out = {k: np.asarray(v, np.float32) + raw_offset for k, v in sd.items()}
    out.update({ema_key(k): v for k, v in sd.items()})
    out.update({"model_ema.decay": np.float32(0.999), "model_ema.num_updates": np.int32(-1),
                "loss.discriminator.main.0.weight": np.zeros((4, 3, 4, 4), np.float32),
                "model_ema.lossdiscriminatormain0weight": np.zeros((4, 3, 4, 4), np.float32)})
    return out


def test_ema_weights_are_taken_when_present_and_the_rest_is_dropped(official, converted):
    sd, _ = official
    kwargs, want = converted
    full = _with_ema(sd)
    assert is_magvit2(full) and is_magvit2({k: v for k, v in full.items() if k.startswith("model_")})
    for weights in ("auto", "ema"):
        got = magvit2_params_from_state_dict(full, kwargs, source="x.ckpt", weights=weights)
        jax.tree.map(np.testing.assert_array_equal, got, want)
    raw = magvit2_params_from_state_dict(full, kwargs, source="x.ckpt", weights="raw")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b + 0.5), raw, want)
    ema_only = {k: v for k, v in full.items() if k.startswith(("model_ema.", "loss."))}
    assert infer_magvit2_kwargs(ema_only, 16) == kwargs     # shapes from the EMA names too
    partial = dict(full)
    del partial[ema_key("decoder.up.1.upsample.conv1.bias")]
    with pytest.raises(ValueError, match="missing tensor 'model_ema.decoderup1upsampleconv1bias'"):
        magvit2_params_from_state_dict(partial, kwargs, source="x.ckpt")


@pytest.mark.parametrize("edit, message", [
    (lambda sd: {k: v for k, v in sd.items() if k != "decoder.adaptive.0.beta.bias"},
     "missing tensor 'decoder.adaptive.0.beta.bias'"),
    (lambda sd: {**sd, "decoder.extra.weight": np.zeros(2, np.float32)},
     "unexpected tensor 'decoder.extra.weight'"),
    (lambda sd: {**sd, "encoder.conv_out.bias": np.zeros(9, np.float32)},
     "tensor 'encoder.conv_out.bias' has shape (9,), expected (18,)"),
])
def test_converter_errors_name_the_tensor(official, edit, message):
    sd, _ = official
    with pytest.raises(ValueError) as e:
        magvit2_params_from_state_dict(edit(dict(sd)), SMALL, source="x.ckpt")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_lightning_ckpt_holds_the_raw_and_ema_weights():
    """om2_tiny.ckpt (made by the official modules + LitEma) reads weights-only; its EMA copies
    are the safetensors' weights, its raw weights differ where make_vectors changed the EMA, and
    the importer takes the EMA ones."""
    pytest.importorskip("torch")
    ckpt, bare = read_state_dict(CKPT), read_state_dict(STATE)
    assert "model_ema.decay" in ckpt and any(k.startswith("loss.discriminator.") for k in ckpt)
    for k, v in bare.items():
        np.testing.assert_array_equal(ckpt[ema_key(k)], v, err_msg=k)
        assert np.array_equal(ckpt[k], v) == (k not in EMA_CHANGED), k
    kwargs = infer_magvit2_kwargs(ckpt, 16, source="om2_tiny.ckpt")
    got = magvit2_params_from_state_dict(ckpt, kwargs, source="om2_tiny.ckpt")
    want = magvit2_params_from_state_dict(bare, kwargs, source="om2_tiny_ema.safetensors")
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_published_name_tables_match_the_official_state_dicts_and_our_models():
    with open(os.path.join(DATA, "official_keys.json")) as f:
        official = json.load(f)
    for name, kw, count in (("imagenet_128_L", OPEN_MAGVIT2_128, 112_021_653),
                            ("imagenet_256_L", OPEN_MAGVIT2_256, 115_127_829)):
        rows = magvit2_name_table(kw)
        assert {r[0]: list(r[2]) for r in rows} == official[name] and len(rows) == len(official[name])
        model = build_model({"name": "magvit2", **kw})
        s = kw["image_size"]
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, 3)))
        ours = {"/".join(k): v.shape for k, v in flatten_dict(nn.unbox(shapes["params"])).items()}
        assert sorted(r[1] for r in rows) == sorted(ours)
        assert sum(int(np.prod(s)) for s in ours.values()) == count
        assert (model.grid_size, model.num_latent_tokens, model.codebook_size) == (16, 256, 2 ** 18)


def test_import_torch_workdir_loads_as_a_tokenizer(tmp_path, official):
    _, io = official
    src = tmp_path / "release"
    src.mkdir()
    shutil.copy(STATE, src / "om2_tiny_ema.safetensors")
    out = str(tmp_path / "w")
    assert cli.main(["import-torch", "--input", str(src), "--output", out, "--image_size", "16"]) == 0
    tok = titok_jax.load_tokenizer(out, batch_size=2)
    assert (tok.image_size, tok.num_tokens, tok.codebook_size) == (16, 64, 2 ** 18)
    np.testing.assert_array_equal(tok.encode(io["images"]), io["ids"])
    want = np.clip((io["decoded_from_ids"] + 1.0) / 2.0, 0.0, 1.0)
    np.testing.assert_allclose(tok.decode(io["decoded_ids"]), want, atol=1e-5)


# ----------------------------------------------------------------------------- the pieces
def test_depth_to_space_is_the_dcr_order():
    """Output (2h + i, 2w + j, c) is input channel (2i + j) C + c at (h, w) (OM2's depth_to_space),
    not pixel_shuffle's c * 4 + 2i + j."""
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 4 * 6)).astype(np.float32)
    y = np.asarray(depth_to_space(jnp.asarray(x), 2))
    assert y.shape == (2, 6, 10, 6)
    for i in range(2):
        for j in range(2):
            c = (2 * i + j) * 6
            np.testing.assert_array_equal(y[:, i::2, j::2, :], x[..., c:c + 6])


def test_adaptive_group_norm_uses_the_unbiased_std_of_the_codes():
    rng = np.random.default_rng(1)
    x, q = rng.normal(size=(2, 4, 4, 64)), np.sign(rng.normal(size=(2, 3, 3, 5)))
    layer = AdaptiveGroupNorm()
    params = nn.unbox(layer.init(jax.random.key(0), jnp.zeros((1, 4, 4, 64)), jnp.zeros((1, 3, 3, 5))))
    got = np.asarray(layer.apply(params, jnp.asarray(x, jnp.float32), jnp.asarray(q, jnp.float32)))
    g = x.reshape(2, 16, 32, 2)
    gn = ((g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-6))
    p = params["params"]
    qs = q.reshape(2, 9, 5)
    scale = np.sqrt(qs.var(1, ddof=1) + 1e-6) @ p["gamma"]["kernel"] + p["gamma"]["bias"]
    bias = qs.mean(1) @ p["beta"]["kernel"] + p["beta"]["bias"]
    want = gn.reshape(2, 4, 4, 64) * scale[:, None, None] + bias[:, None, None]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert "scale" not in p and "gn" not in p                 # GroupNorm without affine


def test_entropy_annealing_and_the_sample_mean_generator_loss():
    from titok_jax import losses as L
    from titok_jax.quantizers.lfq import entropy_anneal_factor
    got = [float(entropy_anneal_factor(s, 3.0, 2000)) for s in (0, 500, 2000, 5000)]
    np.testing.assert_allclose(got, [4.0, 3.25, 1.0, 1.0])
    f = np.random.default_rng(2).normal(size=(3, 4, 4, 1))
    want = np.mean(np.log1p(np.exp(-f.reshape(3, -1).mean(1))))   # OM2's non_saturate_gen_loss
    f, r = jnp.asarray(f), jnp.asarray(np.random.default_rng(3).normal(size=(3, 4, 4, 1)))
    np.testing.assert_allclose(float(L.generator_loss(f, "hinge_nonsat")), want, rtol=1e-5)
    np.testing.assert_allclose(float(L.discriminator_loss(r, f, "hinge_nonsat")),
                               float(L.discriminator_loss(r, f, "hinge")))   # D: hinge


# ----------------------------------------------------------------------------- configs
def test_published_configs_are_the_releases_shape_and_recipe():
    for variant, model_kw, epochs, lecam in (("open_magvit2_128", OPEN_MAGVIT2_128, 350, 0.01),
                                             ("open_magvit2_256", OPEN_MAGVIT2_256, 270, 0.05)):
        c = CONFIGS.get_config(variant)
        model = build_model(c.model)
        keys = ("image_size", "ch", "ch_mult", "num_res_blocks", "z_channels")
        assert tuple(getattr(model, k) for k in keys) == tuple(model_kw[k] for k in keys)
        assert dict(model.quantizer) == model_kw["quantizer"]
        assert (c.batch_size, c.total_steps, c.compute_dtype) == (256, epochs * 5005, "auto")
        o = c.optimizer
        assert (o.lr, o.end_lr, o.b1, o.b2, o.weight_decay, o.grad_clip, o.ema_decay) == \
            (1e-4, 1e-4, 0.5, 0.9, 0.0, 0.0, 0.999)
        lc = c.losses
        assert (lc.reconstruction, lc.reconstruction_weight, lc.perceptual_weight, lc.gan_weight,
                lc.gan_start_step, lc.gan_loss, lc.lecam_weight, lc.lecam_per_sample) == \
            ("l1", 2.0, 1.0, 0.1, 0, "hinge_nonsat", lecam, True)
        assert lc.entropy_anneal_ratio == 0.0                   # off in the released configs


def test_variant_options():
    assert dict(CONFIGS.get_config("open_magvit2_128,quantizer=fsq").model.quantizer)["name"] == "fsq"
    fsq = build_model(CONFIGS.get_config("open_magvit2_128,quantizer=fsq").model)
    assert fsq.codebook_size == 64_000                     # 2^16: FSQ's largest recommended
    lfq16 = CONFIGS.get_config("open_magvit2_128,bits=16").model
    q16 = lfq16.quantizer
    assert (lfq16.z_channels, q16.bits, q16.batch_entropy_eps, q16.entropy_weight) == \
        (16, 16, 1e-5, 0.1)
    assert CONFIGS.get_config("tiny,quantizer=lfq") == CONFIGS.get_config("tiny")
    with pytest.raises(ValueError, match="unknown magvit2 config option"):
        CONFIGS.get_config("tiny,codebook=3")
    with pytest.raises(ValueError, match="unknown magvit2 variant"):
        CONFIGS.get_config("huge")


def test_tiny_trains_three_steps_and_loads_as_a_tokenizer(tmp_path):
    from titok_jax.train.loop import train

    c = CONFIGS.get_config("tiny")
    assert (c.model.image_size, c.model.z_channels, c.data.source) == (64, 10, "sample")
    c.data.image_size = c.model.image_size = 16                   # f4: a 4x4 grid
    c.batch_size, c.total_steps, c.log_every_steps, c.eval_every_steps = 8, 3, 1, 0
    c.checkpoint.every_steps, c.checkpoint.async_save = 3, False
    c.optimizer.warmup_steps = 1
    c.losses.entropy_anneal_ratio = 3.0                           # annealing through the task
    train(c, str(tmp_path), progress=False)
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert rows[0]["quantizer/entropy"] < 0 and "quantizer/commitment" in rows[0]
    tok = titok_jax.load_tokenizer(str(tmp_path))
    assert (tok.num_tokens, tok.codebook_size, tok.image_size) == (16, 1024, 16)
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    tokens = tok.encode(images)
    assert tokens.shape == (2, 16) and tokens.dtype == np.int32 and tokens.max() < 1024
    out = tok.decode(tokens)
    assert out.shape == (2, 16, 16, 3) and 0.0 <= out.min() and out.max() <= 1.0
