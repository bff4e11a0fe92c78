"""Any quantizer in any tokenizer (issue 17 §1), with the two multi-index quantizers: ``fq``
(FQGAN's factorized quantizer) and ``rq`` (residual) in the factory and the config options, their
ids ``[B, N, k]`` through the tokenizer task (per-factor codebook usage), ``tokenize`` shards,
``api.Tokenizer`` and the generators' refusal (MaskGIT; an AR model of one id per token, which
names its factorized head: tests/test_ar_multi_index.py).

Every quantizer name trains two steps through the tokenizer task in TiTok (``micro_config`` with
``quantizer_option``) and in the VQ-VAE (``configs/vqgan.py:vqvae_tiny,quantizer=NAME`` at 8 px),
with ids in range per factor and ``indices_to_codes`` / ``decode_tokens`` equal to the encoder's
quantized latent / its decode. Each trained model is built once (``_trained``) and reused by the
later tests."""
import functools
import os
import shutil
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from titok_jax import cli
from titok_jax.quantizers.factory import (QUANTIZERS, build_quantizer, freeze_spec, resolve_spec,
                                          spec_codebook_size, spec_num_codebooks)

from train_helpers import ROOT, fresh_state, load_config_module, micro_config, one_line_error

COMMON = load_config_module("common")
VQGAN = load_config_module("vqgan")
NAMES = ("vq", "fsq", "lfq", "bsq", "fq", "rq", "vae")
MULTI = ("fq", "rq")


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """Every test here runs with XLA's heavy optimisation passes off (conftest ``fast_compile``)."""


# ----------------------------------------------------------------------------- factory and options
def test_the_factory_and_the_options_know_every_name():
    assert set(NAMES) == set(QUANTIZERS) == set(COMMON.QUANTIZER_NAMES)
    fq = {"name": "fq", "codebook_size": 16, "disentanglement_weight": 0.2}
    assert (spec_codebook_size(fq), spec_num_codebooks(fq)) == (16, 2)
    rq = {"name": "rq", "num_levels": 3, "quantizer": {"name": "fsq", "levels": [5, 3]}}
    assert (spec_codebook_size(rq), spec_num_codebooks(rq)) == (15, 3)   # fsq implies its size
    assert spec_num_codebooks({"name": "vq", "codebook_size": 8}) == 1
    frozen = freeze_spec({"name": "rq", "codebook_size": 8, "quantizer": {"name": "vq",
                                                                          "l2_normalize": True}})
    assert hash(frozen) and freeze_spec(frozen) == frozen      # nested sub-config: hashable, stable
    assert resolve_spec(frozen)["quantizer"]["codebook_size"] == 8
    q = build_quantizer(fq, 4, dtype=jnp.float32, param_dtype=jnp.float32)
    assert q.num_factors == 2 and q.disentanglement_weight == 0.2 and q.codebook_size == (16, 16)


@pytest.mark.parametrize("spec,match", [
    ({"name": "fq", "codebook_size": 8, "factorz": 2}, r"quantizer 'fq': unknown argument 'factorz'"),
    ({"name": "rq"}, r"quantizer 'rq': set codebook_size"),
    ({"name": "fq", "codebook_size": 8, "factors": 0}, r"factors must be an integer >= 1"),
    ({"name": "rq", "codebook_size": 8, "quantizer": {"name": "vae"}}, r"each level must be one of"),
    ({"name": "rq", "codebook_size": 8, "quantizer": {"name": "vq", "codebook_sz": 3}},
     r"quantizer 'rq', each level: quantizer 'vq': unknown argument 'codebook_sz'"),
    ({"name": "fq", "codebook_size": 8, "quantizer": {"name": "fsq", "levels": [5, 3]}},
     r"codebook_size 8 but each factor's fsq has 15 codes"),
    ({"name": "rq", "codebook_size": 8, "scales": [1.0]}, r"scales must list one scale per level"),
])
def test_bad_arguments_are_one_line_errors(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        build_quantizer(spec, 4, dtype=jnp.float32, param_dtype=jnp.float32)
    assert "\n" not in str(e.value)


def test_the_options_split_the_bits_over_two_codebooks():
    for name, count in (("fq", "factors"), ("rq", "num_levels")):
        q = dict(VQGAN.get_config(f"vqvae_tiny,quantizer={name}").model.quantizer)
        # vqvae_tiny: 512 codes (9 bits) -> 2 x 2**5; the EMA / k-means VQ arguments carried over
        assert (q["name"], q[count], q["codebook_size"]) == (name, 2, 32)
        assert dict(q["quantizer"])["use_ema"] and "codebook_size" not in q["quantizer"]
        q = dict(VQGAN.get_config(f"tiny,quantizer={name},bits=12").model.quantizer)
        assert q["codebook_size"] == 64
    assert VQGAN.get_config("vqvae_tiny,quantizer=fq").model.quantizer.disentanglement_weight == 0.1
    assert VQGAN.get_config("vqvae_tiny,quantizer=fq").model.z_channels == 32   # code dim kept
    # bits alone keeps the multi-index quantizer (its current size: 2 x 32 codes = 10 bits)
    c = COMMON.quantizer_option({"quantizer": {"name": "fq", "codebook_size": 32}, "token_size": 8},
                                "fq")
    assert c["quantizer"]["codebook_size"] == 32


# ----------------------------------------------------------------------------- training
def _config(family: str, name: str) -> ml_collections.ConfigDict:
    """TiTok: ``micro_config`` (32 px, 8 tokens) with ``quantizer_option(name, bits=6)``; vqvae:
    ``configs/vqgan.py:vqvae_tiny,quantizer=NAME`` at 8 px (a 4 x 4 grid), narrow CNNs."""
    if family == "titok":
        c = micro_config()
        # a plain VQ to start from (the micro config's EMA k-means VQ costs seconds of compile per
        # codebook; vqvae_tiny's options below carry that VQ into fq / rq)
        model = dict(c.model.to_dict(), quantizer={"name": "vq", "codebook_size": 64})
        c.model = ml_collections.ConfigDict(COMMON.quantizer_option(model, name, bits=6))
        c.batch_size = 4
        c.optimizer.ema_decay = 0.0   # the workdir written below holds no EMA params
        return c
    c = VQGAN.get_config(f"vqvae_tiny,quantizer={name}")
    c.model.image_size = c.data.image_size = 8
    c.model.update(hidden_channels=8, residual_channels=4, num_res_blocks=1, num_downsamples=1)
    c.batch_size = 4
    c.optimizer.warmup_steps = 1
    return c


@functools.cache
def _trained(family: str, name: str):
    """Two trainer steps of ``_config(family, name)`` and, in the same jitted program, the
    encoder's codes / ids, their lookup and both decodes: ``(config, task, state, metrics,
    checks)``."""
    from titok_jax.train.step import make_train_step

    c = _config(family, name)
    task, state, optimizer, _, _ = fresh_state(c)
    model = task.model
    train_step = make_train_step(task.loss, optimizer)
    size = c.data.image_size

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
        return state, metrics, (codes, out.indices, looked_up, pixels,
                                model.apply(v, out.indices, method="decode_tokens"))

    images = jax.random.uniform(jax.random.key(0), (4, size, size, 3))
    for _ in range(2):
        state, metrics, checks = step_and_round_trip(state, images)
    return c, task, state, jax.device_get(metrics), jax.device_get(checks)


# TiTok: every name; the VQ-VAE: fq and rq (test_vqvae.py trains vqvae_tiny,quantizer=NAME for the
# other five through the same task with the same checks).
CASES = [("titok", n) for n in NAMES] + [("vqvae", n) for n in MULTI]


@pytest.mark.parametrize("family,name", CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_every_quantizer_trains_in_both_families_and_round_trips(family, name):
    c, task, _, metrics, (codes, ids, looked_up, pixels, from_tokens) = _trained(family, name)
    spec = task.token_spec
    assert spec.quantizer == name and np.isfinite(float(metrics["loss"])), metrics
    k = 2 if name in MULTI else 1
    assert spec.num_codebooks == k
    n = spec.num_tokens
    assert codes.shape == (4, n, spec.token_dim) and pixels.shape[1:] == (c.data.image_size,) * 2 + (3,)
    if name == "vae":
        assert ids is None and spec.codebook_size is None
    else:
        ids = np.asarray(ids)
        assert ids.shape == (4, n) + ((k,) if k > 1 else ()) and ids.dtype == np.int32
        for f in range(k):   # in range per factor / level
            sub = ids[..., f] if k > 1 else ids
            assert 0 <= sub.min() and sub.max() < spec.codebook_size, (f, sub)
    np.testing.assert_allclose(looked_up, codes, atol=1e-5)
    np.testing.assert_allclose(from_tokens, pixels, atol=1e-5)
    if k > 1:   # codebook usage per factor / level in the task's training metrics
        unit = "factor" if name == "fq" else "level"
        for f in range(k):
            assert 0 < float(metrics[f"quantizer/{unit}{f}/usage"]) <= 1
        assert name != "fq" or float(metrics["quantizer/disentanglement"]) >= 0


def test_grid_ids_decode_as_a_grid_and_bad_shapes_are_refused():
    _, task, state, _, (_, ids, _, _, from_tokens) = _trained("vqvae", "fq")
    v = {"params": state.params["model"], **state.model_state["model"]}
    grid = np.asarray(ids).reshape(4, 4, 4, 2)           # [B, h, w, k]
    got = task.model.apply(v, jnp.asarray(grid), method="decode_tokens")
    np.testing.assert_allclose(np.asarray(got), from_tokens, atol=1e-5)
    with pytest.raises(ValueError, match=r"expects indices \[B, N, 2\]"):
        task.model.apply(v, jnp.asarray(ids)[..., 0], method="decode_tokens")


def test_evaluation_reports_codebook_usage_per_factor():
    from titok_jax.tasks.base import EvalContext
    from titok_jax.train import sharding as sharding_lib
    c, task, state, _, _ = _trained("titok", "rq")
    c = c.copy_and_resolve_references()
    c.data.eval_batch_size = 4
    mesh = sharding_lib.make_mesh({"data": 1}, jax.devices()[:1])
    result = task.evaluate(state.params["model"], state.model_state["model"],
                           EvalContext(c, mesh, max_images=4))
    m = result.metrics
    for f in range(2):
        assert 0 < m[f"codebook_usage_{f}"] <= 1 and m[f"codebook_perplexity_{f}"] >= 1
    assert m["codebook_usage"] == pytest.approx((m["codebook_usage_0"] + m["codebook_usage_1"]) / 2)
    assert m["bits_per_image"] == pytest.approx(8 * 2 * 3)   # 8 tokens x 2 ids x log2(8)


# ----------------------------------------------------------------------------- shards, API, generators
@pytest.fixture(scope="module")
def fq_workdir(tmp_path_factory):
    """The trained TiTok fq model written as a workdir (``checkpoint.write_workdir``)."""
    from titok_jax.checkpoint import write_workdir
    c, _, state, _, _ = _trained("titok", "fq")
    workdir = str(tmp_path_factory.mktemp("fq") / "run")
    write_workdir(workdir, c.to_dict(), state, step=2)
    return workdir


@pytest.fixture(scope="module")
def fq_shards(fq_workdir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("fq_tokens") / "shards")
    assert cli.main(["tokenize", "--workdir", fq_workdir, "--data", "sample", "--augment=false",
                     "--batch_size", "4", "--shard_size", "5", "--output", out]) == 0
    return out


def test_tokenize_shards_and_the_api_carry_k_ids_per_token(fq_workdir, fq_shards):
    import titok_jax
    from titok_jax.data.tokens import TokenSource, image_batches_for_tokenizing, read_token_meta
    tok = titok_jax.load_tokenizer(fq_workdir, batch_size=4)
    assert (tok.num_tokens, tok.codebook_size, tok.num_codebooks, tok.quantizer) == (8, 8, 2, "fq")
    assert "num_codebooks=2" in repr(tok)
    meta = read_token_meta(fq_shards)
    assert (meta["num_codebooks"], meta["num_tokens"], meta["codebook_size"]) == (2, 8, 8)
    src = TokenSource(fq_shards)
    tokens = np.stack([src[i]["tokens"] for i in range(len(src))])
    assert tokens.shape == (len(src), 8, 2) and tokens.dtype == np.int32
    batches, _, _ = image_batches_for_tokenizing("sample", 32, 4, augment=False)
    images = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(tokens, tok.encode(images))      # the shards are encode's ids
    np.testing.assert_allclose(tok.decode(tokens), tok.reconstruct(images), atol=1e-6)
    with pytest.raises(ValueError, match=r"decode expects token ids \[B, 8, 2\] \(2 ids per token"):
        tok.decode(tokens[..., 0])
    bad = tokens.copy()
    bad[1, 3, 1] = 8
    with pytest.raises(ValueError, match=r"token id 8 at \[1, 3, 1\] is out of range"):
        tok.decode(bad)
    # a shard whose ids lost their k axis does not match meta.json
    broken = os.path.join(os.path.dirname(fq_shards), "broken")
    shutil.copytree(fq_shards, broken)
    first = os.path.join(broken, meta["shards"][0]["tokens"])
    np.save(first, np.load(first)[..., 0])
    with pytest.raises(ValueError, match=r"does not match meta.json \(5 rows of 8 tokens x 2 ids\)"):
        TokenSource(broken)


GEN_ARGS = ["--config.batch_size=4", "--config.total_steps=1", "--config.eval_every_steps=0",
            "--config.checkpoint.async_save=false", "--progress=false"]


@pytest.mark.parametrize("family", ["maskgit", "ar"])
def test_the_generators_refuse_multi_index_tokens_in_one_line(family, fq_workdir, fq_shards, tmp_path,
                                                              capsys):
    config = os.path.join(ROOT, "configs", f"{family}.py") + ":tiny"
    # pre-tokenized shards
    assert cli.main(["train", "--config", config, "--workdir", str(tmp_path / "a"), *GEN_ARGS,
                     f"--config.data.source=tokens:{fq_shards}"]) == 1
    err = one_line_error(capsys)
    assert "2 ids per token" in err and f"token data tokens:{fq_shards}" in err
    # the AR model takes them with its factorized head (tests/test_ar_multi_index.py): the line says how
    assert ("--config.model.num_codebooks=2" in err) == (family == "ar")
    # tokens on the fly from the tokenizer workdir
    assert cli.main(["train", "--config", config, "--workdir", str(tmp_path / "b"), *GEN_ARGS,
                     "--config.data.source=sample", f"--config.tokenizer.workdir={fq_workdir}"]) == 1
    assert "2 ids per token" in one_line_error(capsys)


def test_generate_refuses_a_multi_index_tokenizer(fq_workdir):
    import titok_jax
    from titok_jax.generation import check_tokenizer
    tok = titok_jax.load_tokenizer(fq_workdir)
    gen = types.SimpleNamespace(num_tokens=8, codebook_size=8)
    with pytest.raises(ValueError, match=r"the tokenizer X has 2 ids per token .* the generator "
                                         r"models one id per token"):
        check_tokenizer(gen, tok, "X")
