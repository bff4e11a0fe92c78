"""The flextok task: REPA loss against numpy, a train step (finite, moves the model, not the frozen
VAE), config errors, and load_tokenizer on a 2-step tiny workdir decoding prefixes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.losses.repa import match_grid, repa_loss

from train_helpers import load_config_module


def micro_flextok(**overrides):
    c = load_config_module("flextok").get_config("tiny")
    c.model.update(dict(image_size=32, encoder_width=32, encoder_depth=1, decoder_width=32,
                        decoder_depth=1, head_dim=16, num_registers=4, repa_dim=16,
                        repa_hidden_dim=32))
    c.repa.teacher.model.update(dict(image_size=32, width=16, num_heads=1))
    c.data.image_size = 32
    c.batch_size = 8
    c.total_steps = 2
    c.log_every_steps = 1
    c.eval_every_steps = 0
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False
    c.sampler.steps = 2
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def test_repa_loss_matches_numpy_cosine():
    rng = np.random.default_rng(0)
    h, y = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
    want = -np.mean(np.sum(h * y, -1) / (np.linalg.norm(h, axis=-1) * np.linalg.norm(y, axis=-1)))
    got = float(repa_loss(jnp.asarray(h, jnp.float32), jnp.asarray(y, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(repa_loss(jnp.asarray(h, jnp.float32), 3.0 * jnp.asarray(h, jnp.float32))) == pytest.approx(-1.0)
    g = jax.grad(lambda t: repa_loss(jnp.asarray(h, jnp.float32), t))(jnp.asarray(y, jnp.float32))
    assert float(jnp.abs(g).max()) == 0.0          # the teacher side carries no gradient
    # teacher grid 4x4 -> model grid 2x2: a constant field stays constant; same size is identity
    const = jnp.ones((1, 16, 3)) * jnp.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(np.asarray(match_grid(const, 4)), np.asarray(const[:, :4]), atol=1e-6)
    assert match_grid(const, 16) is const
    with pytest.raises(ValueError, match="differ in shape"):
        repa_loss(jnp.zeros((1, 4, 3)), jnp.zeros((1, 4, 5)))


def test_config_errors():
    from titok_jax.tasks import get_task
    with pytest.raises(ValueError, match="optimizer.frozen"):
        get_task(micro_flextok(**{"optimizer.frozen": ""}))
    with pytest.raises(ValueError, match="vae.weights is empty"):
        get_task(micro_flextok(**{"vae.allow_random": False}))
    with pytest.raises(ValueError, match="teacher's width"):
        get_task(micro_flextok(**{"model.repa_dim": 8}))
    for v in ("tiny", "d12_d12", "d18_d18", "d18_d28", "vae_tiny", "vae_c16"):
        assert load_config_module("flextok").get_config(v).variant == v


def test_optimizer_freezes_the_vae():
    from titok_jax.tasks import get_task
    from titok_jax.train.optimizer import make_optimizer
    config = micro_flextok(**{"optimizer.warmup_steps": 0})
    params = {"model": jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), get_task(config)._abstract()[0])}
    grads = jax.tree.map(jnp.ones_like, params)
    opt = make_optimizer(config, params)
    updates, _ = jax.jit(lambda g, p: opt.update(g, opt.init(p), p))(grads, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates["model"]["vae"]))
    assert all(float(jnp.abs(u).max()) > 0.0 for u in jax.tree.leaves(updates["model"]["decoder"]))


def test_train_then_load_tokenizer_decodes_prefixes(tmp_path, fast_compile):
    """3 steps of the trainer (finite losses, or it raises), then the API on the workdir."""
    import json
    from titok_jax.api import load_tokenizer
    from titok_jax.train.loop import train

    config = micro_flextok(**{"total_steps": 3, "checkpoint.every_steps": 3,
                              "optimizer.ema_decay": 0.0, "optimizer.warmup_steps": 1})
    workdir = str(tmp_path / "run")
    train(config, workdir, progress=False)
    with open(f"{workdir}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["repa"]) and np.isfinite(r["flow"]) for r in rows)
    tok = load_tokenizer(workdir)
    assert (tok.num_tokens, tok.codebook_size, tok.image_size) == (4, 64_000, 32)
    # trained: the zero-initialised velocity head has moved
    assert float(np.abs(np.asarray(tok.params["decoder"]["head"]["kernel"])).max()) > 0
    images = np.asarray(jax.random.uniform(jax.random.key(2), (2, 32, 32, 3)))
    ids = tok.encode(images)
    assert ids.shape == (2, 4) and ids.dtype == np.int32
    a = tok.decode(ids[:, :1], steps=2, guidance=1.5, seed=3)
    b = tok.decode(ids[:, :1], steps=2, guidance=1.5, seed=3)
    full = tok.decode(ids, steps=2, guidance=1.5, seed=3)
    assert a.shape == full.shape == (2, 32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    with pytest.raises(ValueError, match="1 <= k <= 4"):
        tok.decode(np.zeros((1, 5), np.int32))
    # explicit noise on the VAE-latent grid: the seeded decode is the decode of the noise it draws
    # (one chunk: fold_in(key(seed), 0)), and other noise gives other pixels
    shape = tok.noise_shape(2)
    assert shape == (2, 4, 4, 4)                      # 32 px / VAE f8, micro VAE latent channels
    drawn = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(3), 0), shape))
    # (another compiled program than the seeded one: equal to float32 round-off)
    np.testing.assert_allclose(tok.decode(ids[:, :1], steps=2, guidance=1.5, noise=drawn), a,
                               rtol=0, atol=2e-5)
    other = tok.decode(ids[:, :1], steps=2, guidance=1.5, noise=drawn[::-1].copy())
    assert np.abs(other - a).max() > 1e-4
    with pytest.raises(ValueError, match="noise must be"):
        tok.decode(ids, steps=2, noise=drawn[:, :2])
