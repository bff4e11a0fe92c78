"""MaskGIT-VQGAN: SAME conv, the official PyTorch model's outputs (tests/data/vqgan, made by
make_vectors.py from bytedance/1d-tokenizer@942a96f), the converter's name table against the
official state-dict names, the published sizes, and the `tiny` config through the trainer."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.convert.common import StateDictReader, read_state_dict
from titok_jax.convert.vqgan import (VQGAN_TORCH_DEFAULTS, codebook_from_state_dict,
                                     decoder_name_table, encoder_name_table, infer_vqgan_kwargs,
                                     maskgit_decoder_params_from_state_dict,
                                     vqgan_params_from_state_dict)
from titok_jax.models.registry import build_model
from titok_jax.nn import LOGICAL_AXES
from titok_jax.models.vqgan import MASKGIT_F16_256, MaskGITDecoder, MaskGITVQGAN
from titok_jax.nn.conv import conv2d_same, same_padding

from train_helpers import load_config_module

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "vqgan")
SMALL = dict(hidden_channels=32, channel_mult=(1, 2), num_res_blocks=1, z_channels=32,
             quantizer={"name": "vq", "codebook_size": 64})


@pytest.fixture(scope="module")
def official():
    sd = read_state_dict(os.path.join(DATA, "vqgan_state.safetensors"))
    with np.load(os.path.join(DATA, "vqgan_io.npz")) as f:
        io = {k: f[k] for k in f.files}
    return sd, io


@pytest.fixture(scope="module")
def official_keys():
    with open(os.path.join(DATA, "official_keys.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- SAME conv
@pytest.mark.parametrize("size,k,s,d,want", [
    (5, 4, 2, 1, (1, 2)),   # out 3: (3-1)*2 + 4 - 5 = 3 -> the odd pixel after
    (6, 4, 2, 1, (1, 1)),
    (7, 3, 1, 1, (1, 1)),
    (8, 2, 1, 1, (0, 1)),
    (8, 1, 1, 1, (0, 0)),
    (9, 3, 2, 1, (1, 1)),
    (8, 3, 2, 1, (0, 1)),
    (7, 3, 1, 2, (2, 2)),
])
def test_same_padding_is_tf_same(size, k, s, d, want):
    assert same_padding(size, k, s, d) == want


def _numpy_conv(x, w, b, stride, pads):
    """Direct loops: zero-pad, then cross-correlate [B,H,W,Ci] with [kh,kw,Ci,Co]."""
    x = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    kh, kw = w.shape[:2]
    oh = (x.shape[1] - kh) // stride + 1
    ow = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, w.shape[3]), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
            out[:, i, j] = np.einsum("bhwc,hwco->bo", patch, w)
    return out + b


@pytest.mark.parametrize("shape,k,s,pads", [((2, 7, 6, 3), 4, 2, ((1, 2), (1, 1))),
                                            ((1, 9, 9, 2), 3, 1, ((1, 1), (1, 1))),
                                            ((1, 5, 8, 2), 2, 1, ((0, 1), (0, 1)))])
def test_conv2d_same_matches_a_direct_numpy_convolution(shape, k, s, pads):
    rng = np.random.default_rng(0)
    x = rng.normal(size=shape).astype(np.float32)
    w = rng.normal(size=(k, k, shape[-1], 4)).astype(np.float32)
    b = rng.normal(size=(4,)).astype(np.float32)
    got = conv2d_same(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), stride=s,
                      precision=jax.lax.Precision.HIGHEST)
    want = _numpy_conv(x.astype(np.float64), w.astype(np.float64), b, s, pads)
    assert got.shape == want.shape == (shape[0], -(-shape[1] // s), -(-shape[2] // s), 4)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- official outputs
def test_converted_official_model_matches_latents_ids_loss_and_pixels(official):
    sd, io = official
    kwargs = infer_vqgan_kwargs(sd)
    assert kwargs == SMALL
    params = vqgan_params_from_state_dict(sd, dict(kwargs, image_size=32), source="vectors")
    model = MaskGITVQGAN(image_size=32, **kwargs)
    images = jnp.asarray(io["images"])
    latents = model.apply({"params": params}, images, method=lambda m, x: m.encoder(x))
    np.testing.assert_allclose(np.asarray(latents), io["latents"], atol=1e-4)

    codes, out = model.apply({"params": params}, images, method="encode")
    assert out.indices.dtype == jnp.int32 and out.indices.shape == (2, 256)
    ids = np.asarray(out.indices)
    clear = io["id_margin"] > 1e-3            # near ties may flip in float32
    assert clear.mean() > 0.98
    np.testing.assert_array_equal(ids[clear], io["ids"][clear])
    assert len(np.unique(io["ids"])) > 32      # the comparison covers many codes
    np.testing.assert_array_equal(np.asarray(codes), params["quantize"]["codebook"][ids])

    # The PyTorch port's VQ loss puts weight 1 on the encoder term and beta on the codebook term.
    swapped = MaskGITVQGAN(image_size=32, **dict(kwargs, quantizer={
        "name": "vq", "codebook_size": 64, "commitment_weight": 1.0, "codebook_weight": 0.25}))
    _, out2 = swapped.apply({"params": params}, images, method="encode")
    np.testing.assert_allclose(float(sum(out2.losses.values())), float(io["loss"]), rtol=1e-5)

    pixels = model.apply({"params": params}, jnp.asarray(io["decoded_ids"]),
                         method="decode_tokens")
    assert pixels.dtype == jnp.float32 and pixels.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(np.asarray(pixels), io["decoded"], atol=1e-4)
    assert np.abs(io["decoded"]).max() > 1.0   # unclamped, as the official decoder
    # [B, h, w] indices are the same tokens row-major
    grid = model.apply({"params": params}, jnp.asarray(io["decoded_ids"]).reshape(2, 16, 16),
                       method="decode_tokens")
    np.testing.assert_array_equal(np.asarray(grid), np.asarray(pixels))


def test_pixel_decoder_under_the_two_stage_prefix(official):
    sd, io = official
    renamed = {("pixel_" + k if k.startswith(("decoder.", "quantize.")) else k): v
               for k, v in sd.items() if not k.startswith("encoder.")}
    reader = StateDictReader(renamed, "two-stage")
    dec = maskgit_decoder_params_from_state_dict(reader, "pixel_decoder.", SMALL)
    book = codebook_from_state_dict(reader, "pixel_quantize.embedding.weight", SMALL)
    reader.finish()
    z = book[io["decoded_ids"]].reshape(2, 16, 16, 32)
    cnn = {k: v for k, v in SMALL.items() if k != "quantizer"}
    pixels = MaskGITDecoder(**cnn).apply({"params": dec}, jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(pixels), io["decoded"], atol=1e-4)


def test_converter_errors_name_the_tensor(official):
    sd, _ = official
    kw = dict(SMALL, image_size=32)
    missing = {k: v for k, v in sd.items() if k != "decoder.up.0.block.0.nin_shortcut.weight"}
    with pytest.raises(ValueError, match=r"missing tensor 'decoder\.up\.0\.block\.0\.nin_shortcut"):
        vqgan_params_from_state_dict(missing, kw)
    with pytest.raises(ValueError, match=r"unexpected tensor 'encoder\.extra\.weight'"):
        vqgan_params_from_state_dict({**sd, "encoder.extra.weight": np.zeros(3, np.float32)}, kw)
    bad = dict(sd, **{"encoder.conv_in.weight": np.zeros((32, 3, 5, 5), np.float32)})
    with pytest.raises(ValueError, match=r"'encoder\.conv_in\.weight' has shape \(32, 3, 5, 5\)"):
        vqgan_params_from_state_dict(bad, kw)
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        vqgan_params_from_state_dict(sd, dict(kw, quantizer={"name": "vq", "codebook_size": 128}))
    with pytest.raises(ValueError, match="not a MaskGIT-VQGAN decoder"):
        infer_vqgan_kwargs({"foo": np.zeros(1)})


# ----------------------------------------------------------------------------- name tables
def _zeros_like_shapes(shapes):
    return {k: np.broadcast_to(np.float32(0), tuple(s)) for k, s in shapes.items()}


@pytest.mark.parametrize("name,kwargs", [
    ("maskgit_f16_256", dict(VQGAN_TORCH_DEFAULTS)),
    ("h32_m122_r2_z16_k64", dict(hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                                 z_channels=16, quantizer={"name": "vq", "codebook_size": 64},
                                 image_size=32)),
])
def test_name_table_covers_the_official_state_dict_and_our_params(official_keys, name, kwargs):
    official = official_keys[name]
    rows = encoder_name_table("encoder.", kwargs) + decoder_name_table("decoder.", kwargs)
    table = {t: tuple(s) for t, _, s, _ in rows}
    table["quantize.embedding.weight"] = (kwargs["quantizer"]["codebook_size"], kwargs["z_channels"])
    assert table == {k: tuple(v) for k, v in official.items()}
    # infer_vqgan_kwargs reads the config back from the shapes alone
    sd = _zeros_like_shapes(official)
    inferred = infer_vqgan_kwargs(sd)
    assert inferred == {k: kwargs[k] for k in inferred}
    # our params, abstractly: every flax key of the table with the transposed shape, nothing else
    model = MaskGITVQGAN(**kwargs)
    s = model.image_size
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, 3)))["params"])
    ours = {jax.tree_util.keystr(p): tuple(v.shape)
            for p, v in jax.tree_util.tree_leaves_with_path(abstract)}
    want = {}
    for prefix, rows_ in (("encoder", encoder_name_table("encoder.", kwargs)),
                          ("decoder", decoder_name_table("decoder.", kwargs))):
        for _, f, shape, _ in rows_:
            parts = [prefix] + f.split("/")
            shape = (shape[2], shape[3], shape[1], shape[0]) if len(shape) == 4 else shape
            want["".join(f"['{p}']" for p in parts)] = shape
    want["['quantize']['codebook']"] = table["quantize.embedding.weight"]
    assert ours == want


def test_small_two_block_config_converts_end_to_end(official_keys):
    kwargs = dict(hidden_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, z_channels=16,
                  quantizer={"name": "vq", "codebook_size": 64}, image_size=32)
    sd = _zeros_like_shapes(official_keys["h32_m122_r2_z16_k64"])
    params = vqgan_params_from_state_dict(sd, kwargs)
    assert params["decoder"]["up_1"]["block_1"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
    assert "nin_shortcut" in params["encoder"]["down_1"]["block_0"]
    assert "nin_shortcut" not in params["encoder"]["down_1"]["block_1"]
    assert "upsample_conv" not in params["decoder"]["up_0"]


def test_published_decoder_param_count_matches_reference():
    """reference/titok.md 2.7: TiTok-L-32 holds 30.74M params of pixel decoder + its codebook."""
    cnn = {k: MASKGIT_F16_256[k] for k in ("hidden_channels", "channel_mult", "num_res_blocks",
                                           "z_channels")}
    shapes = jax.eval_shape(MaskGITDecoder(**cnn).init, jax.random.key(0),
                            jnp.zeros((1, 16, 16, 256)))
    n_dec = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes)))
    assert n_dec == 30_478_339
    assert round((n_dec + 1024 * 256) / 1e6, 2) == 30.74
    # reference 2.8: up.1.block.0 is 256 -> 128 with a [128,128,1,1] nin_shortcut on conv2's output
    up1 = nn.unbox(shapes)["params"]["up_1"]["block_0"]
    assert up1["conv1"]["kernel"].shape == (3, 3, 256, 128)
    assert up1["nin_shortcut"]["kernel"].shape == (1, 1, 128, 128)
    assert "bias" not in up1["conv1"] and "bias" not in up1["nin_shortcut"]


# ----------------------------------------------------------------------------- interface
def test_tokenizer_interface_and_errors():
    model = build_model({"name": "maskgit_vqgan", "image_size": 32, **dict(SMALL, channel_mult=[1, 2])})
    assert model.channel_mult == (1, 2)
    assert (model.num_latent_tokens, model.token_size, model.quantizer_name) == (256, 32, "vq")
    assert model.codebook_size == 64 and MaskGITVQGAN().codebook_size == 1024
    assert MaskGITVQGAN().num_latent_tokens == 256 and MaskGITVQGAN().grid_size == 16
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"expects images \[B, 32, 32, 3\]"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="multiple of 32"):
        jax.eval_shape(MaskGITVQGAN(image_size=32, hidden_channels=24, channel_mult=(1, 2)).init,
                       jax.random.key(0), x)
    # every param carries logical axis names from the package vocabulary
    boxed = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
    assert {n for a in leaves for n in a.names if n} <= LOGICAL_AXES
    with pytest.raises(ValueError, match="not a multiple of the downsampling factor"):
        jax.eval_shape(MaskGITVQGAN(image_size=33, **SMALL).init, jax.random.key(0),
                       jnp.zeros((1, 33, 33, 3)))


# ----------------------------------------------------------------------------- configs
CONFIGS = load_config_module("vqgan")


@pytest.mark.parametrize("variant", CONFIGS.VARIANTS)
def test_every_config_variant_initialises_abstractly(variant):
    from titok_jax.tasks import get_task
    from titok_jax.train import sharding as sharding_lib
    from titok_jax.train.optimizer import make_optimizer
    from titok_jax.train.state import abstract_and_shardings

    config = CONFIGS.get_config(variant)
    for key in ("seed", "total_steps", "batch_size", "data", "mesh", "checkpoint",
                "log_every_steps", "eval_every_steps"):
        assert key in config, key
    task = get_task(config)
    mesh = sharding_lib.make_mesh({"data": 4, "fsdp": 2})
    abstract, shardings, _ = abstract_and_shardings(task.init, lambda p: make_optimizer(config, p),
                                                    True, mesh, sharding_lib.DEFAULT_RULES)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params["model"]))
    if variant == "maskgit_f16_256":
        assert n == 54_515_587   # official state dict total (official_keys.json)
        disc = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params["disc"]))
        assert disc == 1_909_889
    else:
        assert n > 1e5
    assert jax.tree.structure(abstract.params) == jax.tree.structure(shardings.params)


def test_tiny_trains_three_steps_and_loads_as_a_tokenizer(tmp_path):
    import titok_jax
    from titok_jax.train.loop import train

    c = CONFIGS.get_config("tiny")
    c.data.image_size = c.model.image_size = 32
    c.batch_size, c.total_steps, c.log_every_steps, c.eval_every_steps = 8, 3, 1, 0
    c.checkpoint.every_steps, c.checkpoint.async_save = 3, False
    c.optimizer.warmup_steps = 1
    train(c, str(tmp_path), progress=False)
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert any(k.startswith("quantizer/commitment") for k in rows[0])
    tok = titok_jax.load_tokenizer(str(tmp_path))
    assert (tok.num_tokens, tok.codebook_size, tok.image_size) == (64, 256, 32)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    tokens = tok.encode(images)
    assert tokens.shape == (2, 64) and tokens.dtype == np.int32
    out = tok.decode(tokens)
    assert out.shape == (2, 32, 32, 3) and 0.0 <= out.min() and out.max() <= 1.0


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
