"""VQ-VAE (issue 17): the transposed conv and the residual block against float64 numpy, shapes and
the downsampling factor, the configs (the paper's recipe; `configs/vqgan.py:<variant>,quantizer=
NAME` for every quantizer name in both CNN families, each training two steps through the
tokenizer task), and `vqvae_tiny` through the CLI (its loss falls; tokenize / detokenize)."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax import cli
from titok_jax.models.registry import build_model
from titok_jax.models.vqvae import VQVAE, ResidualBlock
from titok_jax.nn import LOGICAL_AXES
from titok_jax.nn.conv import conv_transpose2d
from titok_jax.quantizers.factory import QUANTIZERS

from train_helpers import ROOT, fresh_state, load_config_module

CONFIGS = load_config_module("vqgan")
COMMON = load_config_module("common")


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """Every test here runs with XLA's heavy optimisation passes off (conftest ``fast_compile``)."""


# ----------------------------------------------------------------------------- layers vs numpy
def _numpy_conv_transpose(x, w, stride, padding):
    """The definition, scattered: input pixel (i, j) adds x[i, j] @ w[a, b] at
    (stride i + a - padding, stride j + b - padding); out-of-range positions are dropped."""
    b, h, wd, _ = x.shape
    k = w.shape[0]
    oh, ow = (h - 1) * stride - 2 * padding + k, (wd - 1) * stride - 2 * padding + k
    out = np.zeros((b, oh + 2 * k, ow + 2 * k, w.shape[3]))
    for i in range(h):
        for j in range(wd):
            for a in range(k):
                for c in range(k):
                    out[:, stride * i + a - padding + k, stride * j + c - padding + k] += x[:, i, j] @ w[a, c]
    return out[:, k:k + oh, k:k + ow]


@pytest.mark.parametrize("k,stride,padding", [(4, 2, 1),    # VQ-VAE's upsampler (sub-pixel path)
                                              (6, 3, 0),    # k - 2p = stride: sub-pixel path
                                              (3, 2, 1),    # odd output: the dilated form
                                              (4, 2, 0)])
def test_conv_transpose_matches_the_scatter_definition(k, stride, padding):
    rng = np.random.default_rng(0)
    x, w, bias = rng.normal(size=(2, 5, 4, 3)), rng.normal(size=(k, k, 3, 2)), rng.normal(size=2)
    got = conv_transpose2d(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                           jnp.asarray(bias, jnp.float32), stride, padding,
                           precision=jax.lax.Precision.HIGHEST)
    want = _numpy_conv_transpose(x, w, stride, padding) + bias
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def _numpy_same_conv(x, w, b):
    """Stride-1 conv with (k - 1) / 2 zeros each side (odd k), [B,H,W,Ci] * [k,k,Ci,Co]."""
    k = w.shape[0]
    p = (k - 1) // 2
    xp = np.pad(x, [(0, 0), (p, p), (p, p), (0, 0)])
    out = np.zeros(x.shape[:3] + (w.shape[3],))
    for a in range(k):
        for c in range(k):
            out += xp[:, a:a + x.shape[1], c:c + x.shape[2]] @ w[a, c]
    return out + b


def test_residual_block_matches_a_float64_numpy_reference():
    """x + conv_1x1(ReLU(conv_3x3(ReLU(x)))) on random weights (biases too)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 5, 8))
    block = ResidualBlock(residual_channels=4)
    params = nn.unbox(block.init(jax.random.key(0), jnp.zeros((1, 6, 5, 8))))["params"]
    params = jax.tree.map(lambda p: rng.normal(size=p.shape) * 0.5, params)
    got = block.apply({"params": jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)},
                      jnp.asarray(x, jnp.float32))
    relu = lambda a: np.maximum(a, 0.0)  # noqa: E731
    h = _numpy_same_conv(relu(x), params["conv_3x3"]["kernel"], params["conv_3x3"]["bias"])
    want = x + _numpy_same_conv(relu(h), params["conv_1x1"]["kernel"], params["conv_1x1"]["bias"])
    assert params["conv_3x3"]["kernel"].shape == (3, 3, 8, 4)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("n", [1, 2, 3])
def test_shapes_and_downsampling_factor(n):
    model = VQVAE(image_size=32, hidden_channels=16, residual_channels=8, num_res_blocks=1,
                  num_downsamples=n, z_channels=4, quantizer={"name": "vq", "codebook_size": 16})
    f, g = 2 ** n, 32 // 2 ** n
    assert (model.downsample_factor, model.grid_size, model.num_latent_tokens) == (f, g, g * g)
    assert (model.token_size, model.codebook_size, model.quantizer_name) == (4, 16, "vq")
    x = jnp.zeros((2, 32, 32, 3))
    boxed = jax.eval_shape(model.init, jax.random.key(0), x)
    latents = jax.eval_shape(lambda v: model.apply(v, x, method=lambda m, i: m.encoder(i)), boxed)
    assert latents.shape == (2, g, g, 4)
    (rec, out) = jax.eval_shape(model.apply, boxed, x)
    assert rec.shape == (2, 32, 32, 3) and rec.dtype == jnp.float32
    assert out.indices.shape == (2, g * g) and out.indices.dtype == jnp.int32
    # n strided convs down (widths 8 .. 8, 16) and n transposed convs up (8 .. 8, 3)
    params = nn.unbox(boxed)["params"]
    downs = [params["encoder"][f"down_{i}"]["kernel"].shape for i in range(n)]
    ups = [params["decoder"][f"up_{i}"]["kernel"].shape for i in range(n)]
    assert [d[-1] for d in downs] == [8] * (n - 1) + [16] and all(d[:2] == (4, 4) for d in downs)
    assert [u[-1] for u in ups] == [8] * (n - 1) + [3] and all(u[:2] == (4, 4) for u in ups)
    assert f"down_{n}" not in params["encoder"] and f"up_{n}" not in params["decoder"]
    # every param carries logical axis names from the package vocabulary
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)
    assert {name for a in leaves for name in a.names if name} <= LOGICAL_AXES


def test_errors():
    with pytest.raises(ValueError, match="not a multiple of the downsampling factor 4"):
        jax.eval_shape(VQVAE(image_size=30, hidden_channels=8).init, jax.random.key(0),
                       jnp.zeros((1, 30, 30, 3)))
    model = VQVAE(image_size=16, hidden_channels=8, residual_channels=8, z_channels=4)
    with pytest.raises(ValueError, match=r"VQ-VAE expects images \[B, 16, 16, 3\]"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="unknown quantizer name 'pq'"):
        VQVAE(quantizer={"name": "pq"})


# ----------------------------------------------------------------------------- configs
def test_vqvae_config_is_the_papers_shape_and_recipe():
    c = CONFIGS.get_config("vqvae")
    model = build_model(c.model)
    assert (model.image_size, model.hidden_channels, model.residual_channels,
            model.num_res_blocks) == (128, 256, 256, 2)
    assert (model.grid_size, model.codebook_size, model.quantizer_name) == (32, 512, "vq")
    assert dict(model.quantizer).get("commitment_weight", 0.25) == 0.25
    assert (c.batch_size, c.total_steps, c.compute_dtype) == (128, 250_000, "auto")
    o = c.optimizer
    assert (o.lr, o.end_lr, o.warmup_steps, o.weight_decay, o.grad_clip, o.ema_decay) == \
        (2e-4, 2e-4, 0, 0.0, 0.0, 0.0)
    assert c.losses.perceptual_weight == 0 and c.losses.gan_weight == 0   # pixel loss only
    tiny = CONFIGS.get_config("vqvae_tiny")
    assert tiny.model.image_size == tiny.data.image_size == 64 and tiny.compute_dtype == "float32"
    assert tiny.total_steps == 1500


def test_variant_options_and_their_errors():
    assert dict(CONFIGS.get_config("maskgit_f16_256,quantizer=fsq,bits=10").model.quantizer) == \
        {"name": "fsq", "levels": [8, 5, 5, 5]}
    assert CONFIGS.get_config("maskgit_f16_256,quantizer=fsq,bits=10").model.z_channels == 4
    assert CONFIGS.get_config("vqvae,bits=10").model.quantizer.codebook_size == 1024
    assert CONFIGS.get_config("vqvae_tiny,quantizer=lfq,bits=12").model.z_channels == 12
    with pytest.raises(ValueError, match="unknown vqgan config option"):
        CONFIGS.get_config("vqvae_tiny,codebook=3")
    with pytest.raises(ValueError, match="unknown quantizer 'xyz'"):
        CONFIGS.get_config("tiny,quantizer=xyz")
    with pytest.raises(ValueError, match="unknown vqgan variant 'vqvae_huge'"):
        CONFIGS.get_config("vqvae_huge")


# (variant, quantizer) -> (codebook size, code dim): the options keep about the same bits per token
EXPECTED = {("vqvae_tiny", "vq"): (512, 32), ("vqvae_tiny", "fsq"): (512, 3),
            ("vqvae_tiny", "lfq"): (512, 9), ("vqvae_tiny", "bsq"): (512, 9),
            ("vqvae_tiny", "vae"): (None, 32),
            # fq / rq: 2 codebooks of 2**ceil(bits / 2) codes each (codebook_size is per codebook)
            ("vqvae_tiny", "fq"): (32, 32), ("vqvae_tiny", "rq"): (32, 32),
            ("tiny", "fq"): (16, 32), ("tiny", "rq"): (16, 32),
            ("tiny", "vq"): (256, 32), ("tiny", "fsq"): (240, 3), ("tiny", "lfq"): (256, 8),
            ("tiny", "bsq"): (256, 8), ("tiny", "vae"): (None, 32)}


# Every name trains on the VQ-VAE; the MaskGIT-VQGAN (the same quantizer factory and option code,
# the option table above checked for every name) trains the two that change its code dim.
# `tiny,quantizer=vq` is `tiny` itself, which test_vqgan.py trains through the trainer and the API.
# fq / rq (ids [B, N, 2]) train in test_multi_index_quantizers.py.
TRAINED = sorted(k for k in EXPECTED if (k[0] == "vqvae_tiny" or k[1] in ("fsq", "lfq"))
                 and k[1] not in ("fq", "rq"))


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """Every test here runs with XLA's heavy optimisation passes off (conftest ``fast_compile``)."""


def test_the_option_table_covers_every_quantizer():
    assert set(COMMON.QUANTIZER_NAMES) == set(QUANTIZERS)
    assert {q for _, q in EXPECTED} == set(QUANTIZERS)
    for variant in ("tiny", "vqvae_tiny"):   # vq keeps the variant's own sub-config
        assert CONFIGS.get_config(f"{variant},quantizer=vq") == CONFIGS.get_config(variant)
    assert CONFIGS.get_config("tiny,quantizer=vq").model.quantizer.use_ema
    from titok_jax.models.registry import build_model
    for (variant, name), (codes_k, dim) in EXPECTED.items():   # trained or not, each one builds
        model = build_model(CONFIGS.get_config(f"{variant},quantizer={name}").model)
        assert (model.quantizer_name, model.codebook_size, model.token_size) == (name, codes_k, dim)


def _micro(variant, name):
    """``configs/vqgan.py:<variant>,quantizer=<name>`` at 8 px (f2: a 4x4 grid), one residual
    block per stage: compiles in a second or two."""
    c = CONFIGS.get_config(f"{variant},quantizer={name}")
    c.model.image_size = c.data.image_size = 8
    if variant == "tiny":
        c.model.update(hidden_channels=32, channel_mult=(1, 1), num_res_blocks=1)
    else:
        c.model.update(hidden_channels=8, residual_channels=4, num_res_blocks=1, num_downsamples=1)
    c.batch_size = 4
    c.optimizer.warmup_steps = 1
    return c


@pytest.mark.parametrize("variant,name", TRAINED, ids=[f"{v}-{q}" for v, q in TRAINED])
def test_every_quantizer_trains_two_steps_and_round_trips(variant, name):
    """Two trainer steps (``train.step.make_train_step`` on the tokenizer task's loss), then ids in
    range and ``indices_to_codes`` / ``decode_tokens`` consistent with ``encode`` / ``decode``
    (one jitted program: the step and the checks)."""
    from titok_jax.train.step import make_train_step

    codes_k, dim = EXPECTED[variant, name]
    c = _micro(variant, name)
    assert c.model.quantizer.name == name and c.model.z_channels == dim
    task, state, optimizer, _, _ = fresh_state(c)
    model = task.model
    assert (model.codebook_size, model.token_size, model.num_latent_tokens) == (codes_k, dim, 16)
    train_step = make_train_step(task.loss, optimizer)

    @jax.jit
    def step_and_round_trip(state, x):
        state, metrics = train_step(state, {"image": x}, {})
        v = {"params": state.params["model"], **state.model_state["model"]}
        codes, out = model.apply(v, x, method="encode")
        pixels = model.apply(v, codes, method="decode")
        if model.continuous:
            return state, metrics, (codes, out.indices, codes, pixels,
                                    model.apply(v, codes, method="decode_tokens"))
        looked_up = model.apply(v, out.indices, method=lambda m, i: m.quantize.indices_to_codes(
            i, dtype=jnp.float32))
        grid = out.indices.reshape(x.shape[0], 4, 4)     # [B, h, w] ids decode the same
        return state, metrics, (codes, out.indices, looked_up, pixels,
                                model.apply(v, grid, method="decode_tokens"))

    images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
    before = state.params["model"]["encoder"]
    for _ in range(2):
        state, metrics, checks = step_and_round_trip(state, images)
        assert np.isfinite(float(metrics["loss"])), metrics
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()),
                                         state.params["model"]["encoder"], before))
    assert min(moved) > 0   # every encoder param got a gradient (straight through the quantizer)
    codes, ids, looked_up, pixels, from_tokens = checks
    assert codes.shape == (4, 16, dim) and pixels.shape == (4, 8, 8, 3)
    if codes_k is None:
        assert ids is None
    else:
        ids = np.asarray(ids)
        assert ids.shape == (4, 16) and ids.dtype == np.int32
        assert ids.min() >= 0 and ids.max() < codes_k
    np.testing.assert_allclose(np.asarray(looked_up), np.asarray(codes), atol=1e-5)
    np.testing.assert_allclose(np.asarray(from_tokens), np.asarray(pixels), atol=1e-5)


# ----------------------------------------------------------------------------- the CLI
CLI_ARGS = ["--config.data.image_size=32", "--config.model.image_size=32",
            "--config.model.hidden_channels=16", "--config.model.residual_channels=8",
            "--config.model.num_res_blocks=1",
            "--config.optimizer.lr=3e-3", "--config.optimizer.end_lr=3e-3",
            "--config.batch_size=8", "--config.total_steps=40", "--config.log_every_steps=1",
            "--config.eval_every_steps=0", "--config.checkpoint.every_steps=40",
            "--config.checkpoint.async_save=false", "--config.data.eval_batch_size=8",
            "--progress=false"]


def test_vqvae_tiny_trains_through_the_cli_and_tokenizes(tmp_path):
    import titok_jax
    from titok_jax.evaluation.images import to_uint8
    workdir = str(tmp_path / "run")
    config = os.path.join(ROOT, "configs", "vqgan.py") + ":vqvae_tiny"
    assert cli.main(["train", "--config", config, "--workdir", workdir, *CLI_ARGS]) == 0
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, 41))
    losses = [r["reconstruction"] for r in rows]
    assert all(np.isfinite(r["loss"]) for r in rows)
    # the pixel loss falls (batches of random crops: noisy, so the mean of five steps; the last
    # five over the first five were 0.45 / 0.60 / 0.66 from seeds 0 / 1 / 2)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    tok = titok_jax.load_tokenizer(workdir)
    assert (tok.num_tokens, tok.codebook_size, tok.image_size, tok.quantizer) == (64, 512, 32, "vq")
    from PIL import Image
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(photos / name)
    out = str(tmp_path / "tokens.npz")
    assert cli.main(["tokenize", "--workdir", workdir, "--input", str(photos), "--output", out]) == 0
    ids = np.load(out)["tokens"]
    assert ids.dtype == np.int32 and ids.shape == (2, 64) and 0 <= ids.min() and ids.max() < 512
    assert cli.main(["detokenize", "--workdir", workdir, "--input", out,
                     "--output", str(tmp_path / "dec")]) == 0
    decoded = np.asarray(Image.open(tmp_path / "dec" / "a.png"))
    assert decoded.shape == (32, 32, 3)
    np.testing.assert_array_equal(decoded, to_uint8(tok.decode(ids[:1]))[0])
