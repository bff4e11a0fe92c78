"""The extractor task and its config (tasks/extractor.py, configs/extractor.py): REPA against a numpy
cosine on the kept patches, the masked pixel loss, one compiled step for every ratio bucket, config
errors and variants, and the CLI: `train` of a micro `tiny` (its loss falls), then prefix decodes,
completion from tokens and `features` (shapes, determinism) on the workdir."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.losses.repa import match_grid
from titok_jax.models import extractor_masking as M

from train_helpers import ROOT, load_config_module

CONFIG = os.path.join(ROOT, "configs", "extractor.py")
# configs/extractor.py:tiny shrunk: 32 px, 8 px patches (P = 16), width 32, 4 tokens, a 16-d teacher
MICRO = {"data.image_size": 32, "model.image_size": 32, "model.encoder_width": 32,
         "model.decoder_width": 32, "model.encoder_depth": 2, "model.decoder_depth": 1,
         "model.encoder_heads": 2, "model.decoder_heads": 2, "model.num_latent_tokens": 4,
         "model.repa_dim": 16, "model.repa_hidden_dim": 32, "repa.teacher.model.image_size": 32,
         "repa.teacher.model.width": 16, "repa.teacher.model.num_heads": 1, "batch_size": 8}


def micro_config(**overrides):
    c = load_config_module("extractor").get_config("tiny")
    for key, value in {**MICRO, **overrides}.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def _step_inputs(task, seed=0):
    import flax.linen as nn
    params, state = nn.unbox(jax.jit(task.init)(jax.random.key(seed)))
    images = jax.random.uniform(jax.random.key(seed + 1), (4, 32, 32, 3))
    return params, state, {"image": images}


def test_repa_matches_a_numpy_cosine_on_the_kept_patches(fast_compile, capsys):
    from titok_jax.tasks import get_task
    task = get_task(micro_config(**{"masking.encoder_ratios": [0.5], "masking.encoder_probs": [],
                                    "model.quantizer.saturation_weight": 0.0}))
    assert "RANDOMLY INITIALISED" in capsys.readouterr().err       # the random teacher says so
    params, state, batch = _step_inputs(task)
    consts = task.constants()
    key = jax.random.key(7)
    loss, (_, metrics) = jax.jit(task.loss)(params, state, batch, key, jnp.zeros((), jnp.int32), consts)
    # the same draws, by hand: kept patches, projected encoder features, the teacher on the grid
    mk = task.masks(jax.random.split(key, 3)[0], 4)
    keep = M.random_keep_indices(mk["keep_key"], 4, 16, 8)
    _, _, feats, _ = jax.jit(lambda v, x, k: task.model.apply(v, x, keep=k, method="forward"))(
        {"params": params["model"], **state["model"]}, batch["image"], keep)
    teacher, tparams = task._teacher
    target = match_grid(jax.jit(teacher.apply)({"params": tparams}, batch["image"]), 16)
    h = np.asarray(feats, np.float64)
    y = np.take_along_axis(np.asarray(target, np.float64), np.asarray(keep)[..., None], 1)
    want = -np.mean(np.sum(h * y, -1) / (np.linalg.norm(h, axis=-1) * np.linalg.norm(y, axis=-1)))
    assert feats.shape == (4, 8, 16)
    np.testing.assert_allclose(float(metrics["repa"]), want, rtol=1e-4)
    # FSQ adds no loss term: reconstruction + repa.weight * repa
    np.testing.assert_allclose(float(loss), float(metrics["reconstruction"]) + 0.5 * want, rtol=1e-4)
    assert float(metrics["encoder_mask_ratio"]) == 0.5


def test_masked_reconstruction_is_the_mean_over_masked_pixels():
    from titok_jax.tasks import get_task
    task = get_task(micro_config(**{"repa.weight": 0.0}))
    rng = np.random.default_rng(0)
    rec, img = rng.uniform(size=(2, 32, 32, 3)), rng.uniform(size=(2, 32, 32, 3))
    masked = np.zeros((2, 16), bool)
    masked[0, [0, 5]] = True
    masked[1, 15] = True
    got = float(task.masked_reconstruction(jnp.asarray(rec, jnp.float32), jnp.asarray(img, jnp.float32),
                                           jnp.asarray(masked)))
    err = []
    for b in range(2):
        for i in np.flatnonzero(masked[b]):
            r, c = divmod(i, 4)
            rows, cols = slice(r * 8, (r + 1) * 8), slice(c * 8, (c + 1) * 8)
            err.append((rec[b, rows, cols] - img[b, rows, cols]) ** 2)
    np.testing.assert_allclose(got, np.mean(err), rtol=1e-5)


def test_one_compiled_step_serves_every_ratio_bucket(fast_compile):
    """The loss is jitted once; keys that pick different buckets reuse it (static shapes), and the
    program holds one branch per ratio."""
    from titok_jax.tasks import get_task
    task = get_task(micro_config(**{"repa.weight": 0.0}))
    assert task.encoder_keep == (16, 12, 8, 4, 0)
    params, state, batch = _step_inputs(task)
    loss = jax.jit(lambda p, s, b, k: task.loss(p, s, b, k, jnp.zeros((), jnp.int32), {}))
    hlo = loss.lower(params, state, batch, jax.random.key(0)).as_text()
    assert "case" in hlo or "conditional" in hlo
    seen = set()
    for i in range(12):
        value, (_, metrics) = loss(params, state, batch, jax.random.key(i))
        assert np.isfinite(float(value))
        seen.add(round(float(metrics["encoder_mask_ratio"]), 2))
    assert loss._cache_size() == 1
    assert len(seen) >= 3, seen


def test_step_draws_follow_the_config(fast_compile):
    """A step's masks (``ExtractorTask.masks``): nested-dropout lengths over FlexTok's supports,
    decoder ratios from their set with exact visible counts, encoder buckets by their probabilities."""
    from titok_jax.tasks import get_task
    keys = jax.random.split(jax.random.key(0), 600)
    for mode, support in (("uniform", {1, 2, 3, 4}), ("pow2", {1, 2, 4})):
        task = get_task(micro_config(**{"masking.nested_dropout": mode, "repa.weight": 0.0}))
        draws = jax.jit(task.masks, static_argnums=1)(keys[0], 2000)
        assert set(np.asarray(draws["keep_k"]).tolist()) == support
    task = get_task(micro_config(**{"repa.weight": 0.0, "masking.encoder_probs": (0.6, 0.4, 0, 0, 0),
                                    "masking.decoder_ratios": (0.25, 1.0)}))
    mk = jax.jit(task.masks, static_argnums=1)(keys[0], 1000)
    ratio, visible = np.asarray(mk["decoder_ratio"]), np.asarray(mk["visible"])
    assert set(ratio.tolist()) == {0.25, 1.0}
    np.testing.assert_array_equal(visible.sum(1), np.where(ratio == 1.0, 0, 12))
    buckets = np.asarray(jax.jit(jax.vmap(lambda k: task.masks(k, 1)["bucket"]))(keys))
    assert set(buckets.tolist()) == {0, 1} and abs(np.mean(buckets == 0) - 0.6) < 0.07


def test_config_variants_and_errors():
    from titok_jax.tasks import get_task
    mod = load_config_module("extractor")
    for arg in ("tiny", "bl128", "tiny,quantizer=vae", "tiny,quantizer=vq,bits=8"):
        c = mod.get_config(arg)
        assert c.task.name == "extractor" and c.model.name == "extractor"
    assert mod.get_config("bl128").model.scan_layers is True
    assert mod.get_config("tiny,quantizer=vae").model.quantizer.name == "vae"
    with pytest.raises(ValueError, match="unknown extractor variant"):
        mod.get_config("huge")
    with pytest.raises(ValueError, match="summing to 1"):
        get_task(micro_config(**{"masking.encoder_probs": [0.5, 0.5]}))
    with pytest.raises(ValueError, match="teacher's width"):
        get_task(micro_config(**{"model.repa_dim": 8}))
    with pytest.raises(ValueError, match="nested_dropout"):
        get_task(micro_config(**{"masking.nested_dropout": "random"}))
    with pytest.raises(ValueError, match="teacher.weights is empty"):
        get_task(micro_config(**{"repa.teacher.allow_random": False}))


def test_cli_train_then_decode_complete_and_features(tmp_path, fast_compile, capsys):
    """The one CLI smoke run: `titok-jax train` of a micro tiny (three ratio buckets, set from the
    command line; REPA on a random teacher) - its loss falls; then the workdir as a tokenizer and
    `titok-jax features`."""
    from titok_jax import cli
    from titok_jax.api import load_tokenizer
    workdir = str(tmp_path / "run")
    flags = [f"--config.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in MICRO.items()]
    assert cli.main(["train", "--config", CONFIG + ":tiny", "--workdir", workdir, *flags,
                     "--config.masking.encoder_ratios=(0.0, 0.5, 1.0)",
                     "--config.total_steps=30", "--config.log_every_steps=1",
                     "--config.eval_every_steps=0", "--config.checkpoint.every_steps=30",
                     "--config.checkpoint.async_save=false", "--config.optimizer.warmup_steps=5",
                     "--progress=false"]) == 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, 31))
    loss = np.array([r["reconstruction"] for r in rows])
    assert np.isfinite(loss).all() and loss[-5:].mean() < 0.5 * loss[:5].mean(), loss
    assert {round(r["encoder_mask_ratio"], 2) for r in rows} == {0.0, 0.5, 1.0}
    tok = load_tokenizer(workdir)
    assert tok.num_tokens == 4 and tok.variable_length and tok.codebook_size == 64_000
    images = np.asarray(jax.random.uniform(jax.random.key(3), (3, 32, 32, 3)))
    ids = tok.encode(images)
    assert ids.shape == (3, 4) and ids.dtype == np.int32
    for k in (1, 4):
        out = tok.decode(ids[:, :k])
        assert out.shape == (3, 32, 32, 3) and 0 <= out.min() and out.max() <= 1
    # completion: the visible patches change the decode, the masked ones do not
    mask = np.zeros((3, 4, 4), bool)
    mask[:, :2] = True
    done = tok.decode(ids, visible=images, visible_mask=mask)
    other = images.copy()
    other[:, 16:] = 0.0
    np.testing.assert_allclose(tok.decode(ids, visible=other, visible_mask=mask), done, atol=1e-6)
    assert np.abs(done - tok.decode(ids)).max() > 1e-4
    with pytest.raises(ValueError, match="visible_mask"):
        tok.decode(ids, visible=images)
    # features: pre-quantisation tokens, deterministic, prefix k, pooled = their mean
    t, pooled = tok.features(images, num_tokens=2)
    t2, _ = tok.features(images, num_tokens=2)
    assert t.shape == (3, 2, 6) and pooled.shape == (3, 6) and t.dtype == np.float32
    np.testing.assert_array_equal(t, t2)
    np.testing.assert_allclose(pooled, t.mean(1), rtol=1e-6)
    full, _ = tok.features(images)
    np.testing.assert_array_equal(full[:, :2], t)
    capsys.readouterr()
    photo = os.path.join(tmp_path, "photo.png")
    from titok_jax.evaluation.images import save_png
    save_png(photo, images[0])
    out = str(tmp_path / "feats.npz")
    assert cli.main(["features", "--workdir", workdir, "--input", photo, "--output", out,
                     "--num_tokens", "3"]) == 0
    with np.load(out) as f:
        assert f["tokens"].shape == (1, 3, 6) and f["pooled"].shape == (1, 6)
        assert list(f["files"]) == ["photo.png"]
        np.testing.assert_allclose(f["pooled"], f["tokens"].mean(1), rtol=1e-6)
