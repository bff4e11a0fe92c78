"""The flowmo task: a train step of each stage, the encoder freeze, the post-training chain, the
configs, and load_tokenizer on a trained workdir."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.tasks import get_task
from titok_jax.tasks.flowmo import euler_chain, posttrain_times
from titok_jax.train.optimizer import make_optimizer
from titok_jax.train.state import TrainState
from titok_jax.train.step import build_step
from train_helpers import load_config_module

MICRO = dict(image_size=16, patch_size=4, code_length=4, token_bits=8, id_bits=8, entropy_group_bits=4,
             encoder_width=32, encoder_depth=1, encoder_heads=1, decoder_width=32, decoder_depth=1,
             decoder_heads=1)


def micro_config(variant="tiny", **flowmo):
    c = load_config_module("flowmo").get_config(variant)
    c.model.update(MICRO)
    c.data.image_size = 16
    c.batch_size = 8
    c.total_steps = 2
    c.log_every_steps = 1
    c.eval_every_steps = 0
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False
    c.flowmo.update(dict(eval_steps=2, post_steps=2, **flowmo))
    return c


def _run_steps(config, n):
    """``n`` jitted train steps on fixed random images; the params after each step."""
    task = get_task(config)
    opt = make_optimizer(config, nn.unbox(jax.eval_shape(task.init, jax.random.key(0))[0]))

    def make(k):
        params, mstate = nn.unbox(task.init(k))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params),
                          ema_params=None, model_state=mstate, rng=jax.random.key_data(k))

    state = jax.jit(make)(jax.random.key(0))
    step = build_step(task, opt, donate=False)
    images = jax.random.uniform(jax.random.key(3), (4, 16, 16, 3))
    history, metrics = [state.params["model"]], []
    for _ in range(n):
        state, m = step(state, {"image": images}, {})
        history.append(state.params["model"])
        metrics.append({k: float(v) for k, v in m.items()})
    return history, metrics


def _changed(a, b):
    return any(bool(jnp.any(x != y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_main_stage_steps_and_encoder_freeze():
    hist, metrics = _run_steps(micro_config(freeze_encoder_after=1), 3)
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["flow"]) for m in metrics)
    assert [m["encoder_frozen"] for m in metrics] == [0.0, 1.0, 1.0]
    assert metrics[0]["quantizer/entropy"] < 0 and metrics[0]["quantizer/commitment"] > 0
    # step 0 trains everything; from step 1 on the encoder stays put while the decoder moves
    assert _changed(hist[0]["encoder"], hist[1]["encoder"])
    for i in (1, 2):
        assert not _changed(hist[i]["encoder"], hist[i + 1]["encoder"])
        assert _changed(hist[i]["decoder"], hist[i + 1]["decoder"])


def test_post_stage_step_trains_decoder_only():
    hist, metrics = _run_steps(micro_config("tiny_post"), 1)
    m = metrics[0]
    assert np.isfinite(m["loss"]) and m["post/reward_distance"] > 0 and m["encoder_frozen"] == 1.0
    np.testing.assert_allclose(m["post/reward_distance"], m["post/l2"], rtol=1e-5)   # reward "l2"
    assert not _changed(hist[0]["encoder"], hist[1]["encoder"])
    assert _changed(hist[0]["decoder"], hist[1]["decoder"])


def test_posttrain_times_and_chain_gradient():
    t = np.asarray(posttrain_times(jax.random.key(0), 5, 8))
    assert t.shape == (5, 9)
    np.testing.assert_allclose(t[:, 0], 1.0)
    np.testing.assert_allclose(t[:, -1], 0.0, atol=1e-7)
    assert np.all(np.diff(t, axis=1) < 0) and not np.allclose(t[0], t[1])
    # z' = z - dt * v with v = a z + t: compare with a hand loop, values and gradients (remat on/off)
    times = jnp.asarray(t[:2, :4])
    noise = jax.random.normal(jax.random.key(1), (2, 2, 2, 1))

    def loss(a, remat):
        z = euler_chain(lambda z, tt: a * z + tt[:, None, None, None], noise, times, remat=remat)
        return jnp.sum(z ** 2)

    def hand(a):
        z = noise
        for j in range(3):
            z = z - (times[:, j] - times[:, j + 1])[:, None, None, None] * (a * z + times[:, j][:, None, None, None])
        return jnp.sum(z ** 2)

    np.testing.assert_allclose(loss(0.7, True), hand(0.7), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(loss)(0.7, True), jax.grad(hand)(0.7), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(loss)(0.7, False), jax.grad(hand)(0.7), rtol=1e-5)


def test_configs_and_validation():
    cm = load_config_module("flowmo")
    for v in cm.VARIANTS:
        c = cm.get_config(v)
        assert c.task.name == "flowmo" and c.flowmo.stage == ("post" if v.endswith("_post") else "main")
    lo = cm.get_config("lo")
    assert (lo.model.token_bits, lo.model.entropy_group_bits, lo.optimizer.b2, lo.optimizer.lr) == (18, 9, 0.95, 1e-4)
    assert (cm.get_config("hi").model.token_bits, cm.get_config("lo_post").optimizer.lr) == (56, 5e-5)
    lo.flowmo.freeze_encoder_after = 123          # the optimizer's freeze step follows
    assert lo.optimizer.frozen_from_step == 123
    with pytest.raises(ValueError, match="unknown flowmo variant"):
        cm.get_config("mid")
    c = micro_config()
    c.optimizer.frozen = ""
    with pytest.raises(ValueError, match="optimizer.frozen"):
        get_task(c)
    c = micro_config()
    c.flowmo.stage = "pre"
    with pytest.raises(ValueError, match="flowmo.stage"):
        get_task(c)
    c = micro_config("tiny_post", post_reward="lpips")
    with pytest.raises(ValueError, match="perceptual_weights"):
        get_task(c).constants()


def test_load_tokenizer_after_two_steps_and_post_init_from(tmp_path):
    import titok_jax
    from titok_jax.tasks.runs import restore_run
    from titok_jax.train.loop import train

    wd = str(tmp_path / "main")
    train(micro_config(), wd, progress=False)
    tok = titok_jax.load_tokenizer(wd)
    assert (tok.num_tokens, tok.codebook_size, tok.image_size, tok.flow_decoder) == (4, 256, 16, True)
    images = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float32)
    ids = tok.encode(images)
    assert ids.shape == (3, 4) and ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 256
    a, b = tok.decode(ids, steps=2, seed=1), tok.decode(ids, steps=2, seed=1)
    c = tok.decode(ids, steps=2, seed=2)
    assert a.shape == (3, 16, 16, 3) and a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-4
    # explicit pixel noise: the seeded decode is the decode of the noise it draws (one chunk)
    assert tok.noise_shape(3) == (3, 16, 16, 3)
    drawn = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(1), 0), (3, 16, 16, 3)))
    np.testing.assert_array_equal(tok.decode(ids, steps=2, seed=1, noise=drawn), a)
    with pytest.raises(ValueError, match="noise must be"):
        tok.decode(ids, steps=2, noise=drawn[:2])
    # guidance 1 (off) runs a program without the uncond half: half the FLOPs of the traced-scale
    # (guided) one, the same pixels as the guided one at scale 1
    args = (tok.params, tok.model_state, jnp.asarray(ids), jnp.asarray(drawn), 1.0)
    flops = {u: tok._decode_noise.lower(*args, steps=2, unguided=u).compile().cost_analysis()["flops"]
             for u in (False, True)}
    assert flops[True] < 0.6 * flops[False], flops
    compiled, calls = tok._decode_noise, []
    tok._decode_noise = lambda *a, **k: calls.append(k["unguided"]) or compiled(*a, **k)
    off = tok.decode(ids, steps=2, guidance=1.0, noise=drawn)
    tok.decode(ids, steps=2, guidance=2.0, noise=drawn)
    assert calls == [True, False]
    np.testing.assert_allclose(off, np.asarray(compiled(*args, steps=2, unguided=False)), atol=1e-5)
    # post-training starts from the main run's raw (non-EMA) params
    post = micro_config("tiny_post")
    post.init_from = wd
    params, _ = jax.jit(get_task(post).init)(jax.random.key(9))
    raw = restore_run(wd, expect_task="flowmo", ema=False, host=True).params
    for x, y in zip(jax.tree.leaves(nn.unbox(params)["model"]), jax.tree.leaves(raw)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """Every test here runs with XLA's heavy optimisation passes off (conftest ``fast_compile``)."""
