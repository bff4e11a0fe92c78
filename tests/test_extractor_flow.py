"""The extractor's rectified-flow decoder head and decoder REPA (models/extractor.py,
tasks/extractor.py): the training loss against a float64 numpy computation (velocity MSE over the
decoder-masked pixels, decoder REPA cosine over every patch position), the sampler's decode
(given noise: deterministic, depends on the steps; CFG against the all-dropped null condition;
visible patches), and `tiny,head=flow` trained through the CLI then decoded / reconstructed /
evaluated through titok_jax.api."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.losses.repa import match_grid
from titok_jax.tasks.extractor import FLOW_RNG_SALT

from test_extractor_task import CONFIG, MICRO, micro_config

FLOW = {"model.decoder_head": "flow", "masking.encoder_ratios": [0.0], "masking.encoder_probs": [],
        "model.quantizer.saturation_weight": 0.0}


@pytest.fixture(scope="module")
def flow_task(fast_compile):
    """A micro flow-head task with decoder REPA on block 0 (no encoder REPA) and its params."""
    from titok_jax.tasks import get_task
    task = get_task(micro_config(**FLOW, **{"repa.weight": 0.0, "repa.decoder_weight": 0.5,
                                            "model.decoder_repa_layer": 0,
                                            "masking.cfg_dropout": 0.25}))
    params, state = nn.unbox(jax.jit(task.init)(jax.random.key(0)))
    return task, params, state


def test_flow_loss_and_decoder_repa_match_float64_numpy(flow_task):
    """loss = sum_w (v(x_t, t) - (eps - x))^2 / sum_w over the decoder-masked pixels (x = 2 img - 1,
    x_t = (1 - t) x + t eps) + decoder_weight * -mean cos(projector(decoder block 0 slots),
    teacher) over all 16 patch positions."""
    task, params, state = flow_task
    assert task.flow and task.masked_only
    images = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
    key = jax.random.key(7)
    loss, (_, metrics) = jax.jit(task.loss)(params, state, {"image": images}, key,
                                            jnp.zeros((), jnp.int32), task.constants())
    # the step's draws, by hand
    mk = task.masks(jax.random.split(key, 3)[0], 4)
    k_t, k_noise = jax.random.split(jax.random.fold_in(key, FLOW_RNG_SALT))
    from titok_jax.flow import sample_time
    t = np.asarray(sample_time(k_t, 4, task.time_sampler, **task.time_params), np.float64)
    noise = np.asarray(jax.random.normal(k_noise, (4, 32, 32, 3)), np.float64)
    x = 2.0 * np.asarray(images, np.float64) - 1.0
    x_t = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * noise
    v, _, _, dec = jax.jit(lambda v_, *a: task.model.apply(v_, images, keep_k=a[0], visible=a[1],
                                                           x_t=a[2], t=a[3], method="forward"))(
        {"params": params["model"], **state["model"]}, mk["keep_k"], mk["visible"],
        jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.float32))
    masked = ~np.asarray(mk["visible"])
    assert masked.any() and (~masked).any()                  # decoder ratios 0.5 / 0.75 / 1
    w = np.repeat(np.repeat(masked.reshape(4, 4, 4), 8, 1), 8, 2)[..., None] * np.ones(3)
    err = (np.asarray(v, np.float64) - (noise - x)) ** 2
    want_flow = np.sum(w * err) / np.sum(w)
    np.testing.assert_allclose(float(metrics["reconstruction"]), want_flow, rtol=1e-4)
    assert abs(np.mean(err) - want_flow) > 1e-3 * want_flow  # the visible pixels are left out
    teacher, tparams = task._teacher
    y = np.asarray(match_grid(teacher.apply({"params": tparams}, images), 16), np.float64)
    h = np.asarray(dec, np.float64)
    assert h.shape == (4, 16, 16)
    want_repa = -np.mean(np.sum(h * y, -1) / (np.linalg.norm(h, axis=-1) * np.linalg.norm(y, axis=-1)))
    np.testing.assert_allclose(float(metrics["repa_decoder"]), want_repa, rtol=1e-4)
    assert "repa" not in metrics                             # the encoder term is off
    np.testing.assert_allclose(float(loss), want_flow + 0.5 * want_repa, rtol=1e-4)
    # cfg_dropout: a quarter of the examples decode from no tokens (keep_k = 0)
    keep_k = np.asarray(jax.jit(task.masks, static_argnums=1)(key, 4000)["keep_k"])
    assert abs(np.mean(keep_k == 0) - 0.25) < 0.03 and keep_k.max() == 4


def test_flow_decode_noise_steps_guidance_and_visible(flow_task):
    task, params, state = flow_task
    spec = task.token_spec
    assert spec.flow_decoder and spec.noise_shape == (32, 32, 3) and spec.default_steps == 25
    assert spec.default_guidance == 1.0 and spec.variable_length
    m, variables = task.model, {"params": params["model"], **state["model"]}
    images = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
    ids = jax.jit(task.encode)(params["model"], state["model"], images)
    noise = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
    decode = jax.jit(task.decode, static_argnames=("steps",))
    a = decode(params["model"], state["model"], ids[:, :2], noise=noise, steps=2)
    np.testing.assert_array_equal(np.asarray(decode(params["model"], state["model"], ids[:, :2],
                                                    noise=noise, steps=2)), np.asarray(a))
    b = decode(params["model"], state["model"], ids[:, :2], noise=noise, steps=3)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
    np.testing.assert_allclose(decode(params["model"], state["model"], ids[:, :2],
                                      key=jax.random.key(5), steps=2), a, atol=1e-6)  # key -> noise
    # one Euler step (t: 1 -> 0) with CFG weight w: x_0 = eps - (u + w (c - u)), u from no tokens
    sample = jax.jit(lambda g: m.apply(variables, ids, method="decode_tokens", noise=noise, steps=1,
                                       guidance_scale=g))
    velocity = jax.jit(lambda k: m.apply(variables, m.apply(variables, images, method="encode")[0],
                                         keep_k=k, x_t=noise, t=jnp.ones((2,)), method="decode"))
    c, u = velocity(jnp.full((2,), 4)), velocity(jnp.zeros((2,), jnp.int32))
    assert np.abs(np.asarray(c - u)).max() > 1e-4
    np.testing.assert_allclose(sample(3.0), (noise - (u + 3.0 * (c - u)) + 1) / 2, atol=1e-5)
    np.testing.assert_allclose(sample(1.0), (noise - c + 1) / 2, atol=1e-5)   # traced w = 1: none
    # flow_prediction="x" (same params): the network's output is x_hat, v = (x_t - x_hat) / max(t, .05)
    t = jnp.array([0.02, 0.6])
    raw, v_x = (jax.jit(lambda: mod.apply(variables, m.apply(variables, images, method="encode")[0],
                                          x_t=noise, t=t, method="decode"))()
                for mod in (m, m.clone(flow_prediction="x")))
    np.testing.assert_allclose(v_x, (noise - raw) / np.array([0.05, 0.6])[:, None, None, None],
                               rtol=1e-5, atol=1e-5)
    # completion: visible pixels pasted, masked ones sampled from the tokens
    mask = np.zeros((2, 4, 4), bool)
    mask[:, :2] = True
    done = np.asarray(jax.jit(lambda im, mk: task.decode(params["model"], state["model"], ids,
                                                         noise=noise, steps=2, visible=im,
                                                         visible_mask=mk))(images, mask))
    np.testing.assert_allclose(done[:, :16], np.asarray(images)[:, :16], atol=1e-6)
    assert np.abs(done[:, 16:] - np.asarray(decode(params["model"], state["model"], ids, noise=noise,
                                                   steps=2))[:, 16:]).max() > 1e-4


def test_tiny_flow_head_trains_then_decodes_reconstructs_and_evaluates(tmp_path, fast_compile):
    """`tiny,head=flow` (micro-sized) through `titok-jax train` with an evaluation at the end (PSNR
    through the sampler), then load_tokenizer: prefix decodes, given noise, reconstruct."""
    from titok_jax import cli
    from titok_jax.api import load_tokenizer
    workdir = str(tmp_path / "run")
    flags = [f"--config.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in MICRO.items()]
    assert cli.main(["train", "--config", CONFIG + ":tiny,head=flow", "--workdir", workdir, *flags,
                     "--config.masking.encoder_ratios=(0.5,)", "--config.sampler.steps=2",
                     "--config.total_steps=4", "--config.log_every_steps=1",
                     "--config.eval_every_steps=4", "--config.data.eval_num_images=2",
                     "--config.checkpoint.every_steps=4", "--config.checkpoint.async_save=false",
                     "--config.optimizer.warmup_steps=2", "--progress=false"]) == 0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 4 and all(np.isfinite(r["reconstruction"]) for r in rows)
    with open(os.path.join(workdir, "eval.jsonl")) as f:
        assert np.isfinite(json.loads(f.readline())["psnr"])
    tok = load_tokenizer(workdir)
    assert tok.flow_decoder and tok.noise_shape(3) == (3, 32, 32, 3) and tok.variable_length
    images = np.asarray(jax.random.uniform(jax.random.key(3), (3, 32, 32, 3)))
    ids = tok.encode(images)
    prefix = tok.decode(ids[:, :1], steps=2, seed=1)
    assert prefix.shape == (3, 32, 32, 3) and 0 <= prefix.min() and prefix.max() <= 1
    np.testing.assert_array_equal(tok.decode(ids[:, :1], steps=2, seed=1), prefix)
    noise = np.asarray(jax.random.normal(jax.random.key(4), (3, 32, 32, 3)), np.float32)
    np.testing.assert_array_equal(tok.decode(ids, steps=2, noise=noise),
                                  tok.decode(ids, steps=2, noise=noise))
    rec = tok.reconstruct(images)
    assert rec.shape == (3, 32, 32, 3) and np.isfinite(rec).all()


def test_config_head_option_and_errors():
    from test_extractor_task import load_config_module
    from titok_jax.tasks import get_task
    mod = load_config_module("extractor")
    assert mod.get_config("tiny").model.decoder_head == "pixel"
    c = mod.get_config("tiny,head=flow")
    assert c.model.decoder_head == "flow" and c.sampler.guidance == 1.0
    assert mod.get_config("bl128,head=flow,quantizer=vae").model.quantizer.name == "vae"
    with pytest.raises(ValueError, match="head='mlp'"):
        mod.get_config("tiny,head=mlp")
    with pytest.raises(ValueError, match="decoder_repa_layer >= 0"):
        get_task(micro_config(**{"repa.decoder_weight": 1.0}))
    with pytest.raises(ValueError, match="cfg_dropout"):
        get_task(micro_config(**{"masking.cfg_dropout": 0.1}))      # the pixel head has no CFG
    with pytest.raises(ValueError, match="steps/guidance/noise"):
        task = get_task(micro_config(), inference=True)
        task.decode({}, {}, jnp.zeros((1, 4), jnp.int32), steps=3)
