"""FQGAN (issue 17): the import against the OFFICIAL PyTorch model's outputs (tests/data/fqgan,
made by make_vectors.py from showlab/FQGAN's own code), the released models' state-dict names,
the disentanglement loss against numpy, the published shapes (``jax.eval_shape`` only) and the
tiny config's training -> ``load_tokenizer`` round trip."""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import titok_jax
from titok_jax.convert.common import read_state_dict
from titok_jax.convert.fqgan import (fqgan_model_section, fqgan_name_table,
                                     fqgan_params_from_state_dict, fqgan_variant,
                                     infer_fqgan_kwargs)
from titok_jax.models.fqgan import (DUAL, FQGAN_DUAL_DS8, FQGAN_DUAL_DS16, FQGAN_TRIPLE_DS8,
                                    FQGAN_TRIPLE_DS16, TRIPLE)
from titok_jax.models.registry import build_model
from titok_jax.quantizers.factorized import disentanglement_loss

from train_helpers import ROOT, load_config_module

DATA = os.path.join(os.path.dirname(__file__), "data", "fqgan")
CONFIGS = load_config_module("fqgan")
# what the tiny official models change that the tensors cannot tell (make_vectors.py's patch)
TINY_OVERRIDES = dict(norm_groups=4, adapter_heads=2, head_heads=2)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """Every test here runs with XLA's heavy optimisation passes off (conftest ``fast_compile``)."""


def _convert(sd):
    kw = {**infer_fqgan_kwargs(sd, source="tiny"), **TINY_OVERRIDES}
    return kw, fqgan_params_from_state_dict(sd, kw, source="tiny")


@pytest.fixture(scope="module", params=["dual", "triple"])
def official(request):
    sd = read_state_dict(os.path.join(DATA, f"{request.param}_tiny.safetensors"))
    io = dict(np.load(os.path.join(DATA, f"{request.param}_io.npz")))
    return request.param, sd, io


def test_import_reproduces_the_official_encoder_quantizers_heads_and_decoder(official):
    variant, sd, io = official
    kw, params = _convert(sd)
    assert kw["factors"] == (DUAL if variant == "dual" else TRIPLE)
    assert (kw["image_size"], kw["ch"], kw["ch_mult"], kw["embed_dim"]) == (32, 8, (1, 1, 1, 1), 4)
    model = build_model(fqgan_model_section(kw))
    v = {"params": params}
    h = model.apply(v, io["images"], method=model.pre_quant)
    want_h = np.concatenate([io[f"h_{f}"] for f in model.factors], -1)
    np.testing.assert_allclose(h, want_h, atol=1e-5)
    rec, out = model.apply(v, io["images"])
    ids = np.stack([io[f"ids_{f}"] for f in model.factors], -1)
    assert out.indices.shape == (2, 16, len(model.factors))
    np.testing.assert_array_equal(out.indices, ids)              # identical per factor
    for i, f in enumerate(model.factors):
        np.testing.assert_allclose(out.aux[f"codes_{i}"], io[f"quant_{f}"].reshape(2, 16, -1),
                                   atol=1e-6)
        if f"feat_{f}" in io:
            np.testing.assert_allclose(out.aux[f"representation_{i}"], io[f"feat_{f}"], atol=1e-5)
    np.testing.assert_allclose(2 * np.asarray(rec) - 1, io["decoded"], atol=2e-5)
    from_ids = model.apply(v, ids, method=model.decode_tokens)
    np.testing.assert_allclose(2 * np.asarray(from_ids) - 1, io["decoded"], atol=2e-5)
    codes = [out.aux[f"codes_{i}"] for i in range(len(model.factors))]
    np.testing.assert_allclose(disentanglement_loss(codes), io["disentangle"], rtol=1e-5)


def test_the_official_checkpoint_format_reads_like_the_safetensors():
    """``dual_tiny.pt`` is ``{"model": state_dict}`` (the releases' layout); import-torch's
    reader takes ``ema``, then ``model``, then ``state_dict``."""
    pytest.importorskip("torch")
    from titok_jax.convert.workdir import read_input
    sd_pt = read_state_dict(os.path.join(DATA, "dual_tiny.pt"), state_keys=("ema", "model"))
    sd_st = read_state_dict(os.path.join(DATA, "dual_tiny.safetensors"))
    assert sorted(sd_pt) == sorted(sd_st)
    for k in sd_st:
        np.testing.assert_array_equal(sd_pt[k], sd_st[k])
    assert fqgan_variant(sd_pt) == DUAL
    assert callable(read_input)


def test_usage_buffers_are_dropped_and_left_overs_named(official):
    _, sd, _ = official
    kw = {**infer_fqgan_kwargs(sd), **TINY_OVERRIDES}
    extra = {**sd, "quantize_vis.codebook_used": np.zeros(65536, np.float32)}
    fqgan_params_from_state_dict(extra, kw)
    with pytest.raises(ValueError, match="unexpected tensor 'decoder.extra'"):
        fqgan_params_from_state_dict({**sd, "decoder.extra": np.zeros(1, np.float32)}, kw)
    bad = dict(sd)
    del bad["post_quant_conv.bias"]
    with pytest.raises(ValueError, match="post_quant_conv.bias"):
        fqgan_params_from_state_dict(bad, kw)


def test_published_name_tables_match_the_official_state_dicts_and_our_models():
    with open(os.path.join(DATA, "official_keys.json")) as f:
        official = json.load(f)
    for name, kw in (("fqgan_dual_ds16", FQGAN_DUAL_DS16), ("fqgan_triple_ds16", FQGAN_TRIPLE_DS16),
                     ("fqgan_dual_ds8", FQGAN_DUAL_DS8), ("fqgan_triple_ds8", FQGAN_TRIPLE_DS8)):
        want = {k: v for k, v in official[name].items() if not k.endswith("codebook_used")}
        rows = fqgan_name_table(kw)
        assert {r[0]: list(r[2]) for r in rows} == want and len(rows) == len(want)
        model = build_model({"name": "fqgan", **kw})
        s = kw["image_size"]
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, 3)))
        ours = {"/".join(k): v.shape for k, v in flatten_dict(nn.unbox(shapes["params"])).items()}
        assert sorted(r[1] for r in rows) == sorted(ours)
        assert sum(int(np.prod(v)) for v in ours.values()) == sum(
            int(np.prod(v)) for v in want.values())
        k = len(kw["factors"])
        g = s // model.downsample_factor
        out = jax.eval_shape(lambda v, x: model.apply(v, x, method=model.encode), shapes,
                             jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32))
        assert out[0].shape == (2, g * g, 8 * k) and out[1].indices.shape == (2, g * g, k)
        assert (model.codebook_size, model.num_codebooks) == (16384, k)


def test_disentanglement_loss_matches_numpy():
    rng = np.random.default_rng(0)
    codes = [rng.normal(size=(2, 5, 8)).astype(np.float32) for _ in range(3)]

    def ref(a, b):   # vq_model_dual.py compute_disentangle_loss at ratio 1
        a, b = a.reshape(-1, 8), b.reshape(-1, 8)
        a = a / np.linalg.norm(a, axis=-1, keepdims=True)
        b = b / np.linalg.norm(b, axis=-1, keepdims=True)
        return np.mean(np.sum(a * b, -1) ** 2)
    np.testing.assert_allclose(disentanglement_loss(codes[:2]), ref(*codes[:2]), rtol=1e-5)
    triple = (ref(codes[0], codes[1]) + ref(codes[0], codes[2]) + ref(codes[1], codes[2])) / 3
    np.testing.assert_allclose(disentanglement_loss(codes), triple, rtol=1e-5)


def test_published_configs_are_the_releases_shape():
    for variant, kw in (("dual", FQGAN_DUAL_DS16), ("triple", FQGAN_TRIPLE_DS16),
                        ("dual_ds8", FQGAN_DUAL_DS8), ("triple_ds8", FQGAN_TRIPLE_DS8)):
        c = CONFIGS.get_config(variant)
        assert c.task.name == "fqgan" and c.model.name == "fqgan"
        assert tuple(c.model.ch_mult) == kw["ch_mult"] and tuple(c.model.factors) == kw["factors"]
        assert sorted(c.teachers) == sorted(f for f in kw["factors"] if f != "vis")
        assert (c.optimizer.lr, c.optimizer.b2, c.batch_size) == (2e-4, 0.95, 256)
    with pytest.raises(ValueError, match="unknown fqgan variant"):
        CONFIGS.get_config("huge")


def test_tiny_dual_trains_and_loads_as_a_tokenizer(tmp_path):
    from titok_jax.train.loop import train

    c = CONFIGS.get_config("tiny_dual")
    assert c.data.source == "sample" and c.teachers.sem.allow_random
    c.data.image_size = c.model.image_size = 8                    # f1: an 8x8 grid ...
    c.model.ch_mult, c.model.z_channels = [1], 32                 # ... of a one-level CNN
    c.teachers.sem.model.image_size, c.teachers.sem.model.patch_size = 8, 4
    c.batch_size, c.total_steps, c.log_every_steps, c.eval_every_steps = 8, 2, 1, 0
    c.checkpoint.every_steps, c.checkpoint.async_save = 2, False
    c.optimizer.warmup_steps = 1
    train(c, str(tmp_path), progress=False)
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows)
    for key in ("disentanglement", "representation", "commitment", "codebook"):
        assert f"quantizer/{key}" in rows[0]
    tok = titok_jax.load_tokenizer(str(tmp_path))
    assert (tok.num_tokens, tok.codebook_size, tok.image_size) == (64, 512, 8)
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    tokens = tok.encode(images)
    assert tokens.shape == (2, 64, 2) and tokens.dtype == np.int32 and tokens.max() < 512
    out = tok.decode(tokens)
    assert out.shape == (2, 8, 8, 3)
    _factorized_ar_generates_from(str(tmp_path), tmp_path / "far", tokens)


def _factorized_ar_generates_from(fqgan: str, root, tokens: np.ndarray) -> None:
    """Issue 17's end to end: the FQGAN's ids [N, 64, 2] as token shards, FQGAN's factorized AR
    head (configs/ar.py:tiny_factorized, 2 factors of 512 codes) trained on them through the CLI,
    and `generate` decoding its samples with the FQGAN into images."""
    from titok_jax import cli
    shards, ar, out = str(root / "shards"), str(root / "ar"), str(root / "gen")
    assert cli.main(["tokenize", "--workdir", fqgan, "--data", "sample", "--output", shards]) == 0
    shard_ids = np.load(os.path.join(shards, sorted(f for f in os.listdir(shards)
                                                     if f.startswith("tokens_"))[0]))
    assert shard_ids.shape[1:] == (64, 2) and shard_ids.max() < 512
    assert cli.main([
        "train", "--config", os.path.join(ROOT, "configs", "ar.py") + ":tiny_factorized",
        "--workdir", ar, f"--config.data.source=tokens:{shards}",
        "--config.model.codebook_size=512", "--config.model.num_tokens=64",
        "--config.model.width=32", "--config.model.depth=1", "--config.model.num_heads=2",
        "--config.batch_size=8", "--config.total_steps=2", "--config.log_every_steps=1",
        "--config.eval_every_steps=0", "--config.checkpoint.every_steps=2",
        "--config.checkpoint.async_save=false", "--config.optimizer.warmup_steps=1",
        "--config.data.eval_batch_size=8", "--config.samples.num_images=2",
        "--progress=false"]) == 0
    with open(os.path.join(ar, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2] and {"nll_0", "nll_1"} <= set(rows[-1])
    assert cli.main(["generate", "--workdir", ar, "--tokenizer", fqgan, "--output", out,
                     "--num", "2", "--seed", "0"]) == 0
    ids = np.load(os.path.join(out, "tokens.npz"))["tokens"]
    assert ids.shape == (2, 64, 2) and ids.min() >= 0 and ids.max() < 512
    images = [f for f in os.listdir(out) if f.endswith(".png") and f != "grid.png"]
    assert len(images) == 2
    from PIL import Image
    with Image.open(os.path.join(out, sorted(images)[0])) as im:
        assert im.size == (8, 8)
