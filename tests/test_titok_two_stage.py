"""Two-stage TiTok: the model (legacy logits head, soft proxy-code mixture, frozen stage-2
encoder), the published sizes, the stage-1 / stage-2 tasks and the tiny recipes trained end to end
(stage 2 initialised from the stage-1 workdir the test writes)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import titok_jax
from titok_jax.models.titok_variants import titok_variant
from titok_jax.models.titok_two_stage import TiTokTwoStage

from train_helpers import load_config_module

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "titok")


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("variant, total, pixel", [("l32", 641.05, 30.74), ("b64", 204.81, 30.74),
                                                   ("s128", 83.67, 30.74)])
def test_published_parameter_counts(variant, total, pixel):
    """reference/titok.md 2.7: totals incl. the MaskGIT pixel decoder + its 1024x256 codebook."""
    import flax.linen as nn
    m = TiTokTwoStage(**titok_variant(variant))
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    p = nn.unbox(jax.eval_shape(m.init, jax.random.key(0), x))["params"]
    assert round(count(p) / 1e6, 2) == total
    assert round((count(p["pixel_decoder"]) + count(p["pixel_quantize"])) / 1e6, 2) == pixel
    assert p["decoder"]["ffn_2"]["kernel"].shape == (2 * m.decoder_width, 1024)
    assert "conv_out" not in p["decoder"] and p["quantize"]["codebook"].shape == (4096, 12)


@pytest.fixture(scope="module")
def tiny():
    m = TiTokTwoStage(**titok_variant("tiny_two_stage"))
    x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
    variables = jax.jit(m.init)(jax.random.key(0), x)
    import flax.linen as nn
    return m, nn.unbox(variables), x


@pytest.mark.slow   # also covered by the official vectors / the end-to-end run
def test_soft_mixture_decode_matches_numpy(tiny):
    """decode = pixel_decoder(softmax(logits) @ pixel codebook), the mixture done in numpy."""
    m, v, x = tiny
    apply = lambda method: jax.jit(lambda v, a: m.apply(v, a, method=method))  # noqa: E731
    codes, out = apply("encode")(v, x)
    logits = np.asarray(apply("decode_logits")(v, codes), np.float64)
    assert logits.shape == (2, 4, 4, 64)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    soft = (e / e.sum(-1, keepdims=True)) @ np.asarray(v["params"]["pixel_quantize"]["codebook"], np.float64)
    from titok_jax.models.vqgan import MaskGITDecoder
    dec = MaskGITDecoder(hidden_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=32)
    want = jax.jit(dec.apply)({"params": v["params"]["pixel_decoder"]}, jnp.asarray(soft, jnp.float32))
    got = apply("decode")(v, codes)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(apply("decode_tokens")(v, out.indices), got, atol=1e-5)


@pytest.mark.slow   # also covered by the official vectors / the end-to-end run
def test_stage2_encoder_frozen_stage1_not(tiny):
    """finetune_decoder: no gradient reaches encoder / quantizer / latent tokens and the quantizer
    losses are zero; the stage-1 model trains them."""
    m2, v, x = tiny
    m1 = m2.clone(finetune_decoder=False)
    v1 = {**v, "params": {k: p for k, p in v["params"].items() if not k.startswith("pixel_")}}

    def loss(model, params, variables):
        (y, out), _ = model.apply({**variables, "params": params}, x, train=True,
                                  mutable=["quantizer_stats"])
        return jnp.mean(y ** 2) + out.total_loss(), out

    g2, out2 = jax.jit(jax.grad(lambda p: loss(m2, p, v), has_aux=True))(v["params"])
    g1, out1 = jax.jit(jax.grad(lambda p: loss(m1, p, v1), has_aux=True))(v1["params"])
    for name in ("encoder", "quantize", "latent_tokens"):
        assert count(g2[name]) and max(float(jnp.abs(t).max()) for t in jax.tree.leaves(g2[name])) == 0
        assert max(float(jnp.abs(t).max()) for t in jax.tree.leaves(g1[name])) > 0
    assert all(float(l) == 0 for l in out2.losses.values())
    assert float(out1.losses["commitment"]) > 0
    assert max(float(jnp.abs(t).max()) for t in jax.tree.leaves(g2["pixel_decoder"])) > 0
    with pytest.raises(ValueError, match="stage-1"):
        jax.eval_shape(lambda i: m1.apply(v1, i, method="decode_tokens"), out1.indices)


# ----------------------------------------------------------------------------- tasks
def test_teacher_errors():
    from titok_jax.tasks.titok_stages import load_teacher
    with pytest.raises(ValueError, match="teacher.weights is empty"):
        load_teacher({"weights": "", "allow_random": False, "model": {"name": "maskgit_vqgan"}}, 32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher({"weights": "/nonexistent/maskgit"}, 32)


def test_teacher_from_import_torch_workdir_gives_official_codes(tmp_path):
    """A stage-1 task whose teacher is an `import-torch` workdir of the official-code MaskGIT
    vectors: its proxy codes are the official codes (and the bare state dict loads the same)."""
    from titok_jax import cli
    from titok_jax.tasks import get_task
    from titok_jax.tasks.titok_stages import load_teacher
    teacher_dir = str(tmp_path / "maskgit")
    assert cli.main(["import-torch", "--input", os.path.join(DATA, "maskgit"), "--output",
                     teacher_dir, "--image_size", "32"]) == 0
    c = load_config_module("titok").get_config("tiny_stage1")
    c.model.patch_size = 4                        # 8x8 grid of the f4 teacher
    c.model.proxy_codebook_size = 1024
    c.teacher.weights = teacher_dir
    c.teacher.allow_random = False
    task = get_task(c)
    with np.load(os.path.join(DATA, "maskgit", "vectors.npz")) as v:
        images, ids = v["images"], v["ids"]
    codes = jax.jit(task.proxy_codes)(task.teacher()[1], images)
    np.testing.assert_array_equal(codes, ids)
    _, from_file = load_teacher({"weights": os.path.join(DATA, "maskgit", "maskgit-vqgan.safetensors")}, 32)
    for a, b in zip(jax.tree.leaves(from_file), jax.tree.leaves(task.teacher()[1])):
        np.testing.assert_array_equal(a, b)


def test_stage1_loss_is_cross_entropy_plus_quantizer():
    import flax.linen as nn
    from titok_jax.tasks import get_task
    c = load_config_module("titok").get_config("tiny_stage1")
    task = get_task(c)
    params, state = nn.unbox(jax.jit(task.init)(jax.random.key(0)))
    images = jax.random.uniform(jax.random.key(3), (4, 32, 32, 3))
    teacher = task.constants()["teacher"]
    _, (_, metrics) = jax.jit(task.loss)(params, state, {"image": images}, jax.random.key(1),
                                         jnp.int32(0), {"teacher": teacher})
    codes = np.asarray(jax.jit(task.proxy_codes)(teacher, images))
    (logits, out), _ = jax.jit(lambda v, x: task.model.apply(
        v, x, train=True, mutable=["quantizer_stats"]))(
        {"params": params["model"], **state["model"]}, images)
    lg = np.asarray(logits, np.float64).reshape(4, 16, 64)
    logp = lg - lg.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    ce = -np.mean(np.take_along_axis(logp, codes[..., None], -1))
    np.testing.assert_allclose(float(metrics["proxy_ce"]), ce, rtol=1e-4)
    q = float(metrics["quantizer/commitment"]) + float(metrics["quantizer/codebook"])
    np.testing.assert_allclose(float(metrics["loss"]), ce + q, rtol=1e-4)
    assert q > 0


def test_stage2_needs_a_stage1_workdir(tmp_path):
    from titok_jax.tasks import get_task
    c = load_config_module("titok").get_config("tiny_stage2")
    with pytest.raises(ValueError, match="init_from"):
        get_task(c)
    c.init_from = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        get_task(c)
    (tmp_path / "config.json").write_text("[1, 2]")   # not a JSON object: one line, not a traceback
    with pytest.raises(ValueError) as err:
        get_task(c)
    assert "config.json" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("variant", load_config_module("titok").STAGES)
def test_every_stage_config_loads(variant):
    """Every two-stage config loads; stage-1 tasks build and initialise abstractly without the
    teacher's weights (they are read on first use)."""
    import flax.linen as nn
    from titok_jax.tasks import get_task
    config = load_config_module("titok").get_config(variant)
    assert config.task.name == f"titok_stage{variant[-1]}" and config.model.name == "titok_two_stage"
    assert config.model.finetune_decoder == variant.endswith("2")
    if variant.endswith("1"):
        task = get_task(config)
        params, _ = nn.unbox(jax.eval_shape(task.init, jax.random.key(0)))
        n = count(params["model"])
        assert n > (1e5 if variant.startswith("tiny") else 5e7)
        if variant == "l32_stage1":
            assert round(n / 1e6, 2) == round(641.05 - 30.74, 2)


def test_published_stage_configs():
    m = load_config_module("titok")
    s1, s2 = m.get_config("l32_stage1"), m.get_config("b64_stage2")
    assert (s1.task.name, s1.model.finetune_decoder, s1.optimizer.b2, s1.optimizer.warmup_steps,
            s1.total_steps, s1.batch_size) == ("titok_stage1", False, 0.99, 10_000, 1_000_000, 256)
    assert (s2.task.name, s2.model.finetune_decoder, s2.optimizer.b2, s2.optimizer.warmup_steps,
            s2.total_steps, s2.losses.gan_weight, s2.losses.gan_start_step) == (
        "titok_stage2", True, 0.999, 5_000, 500_000, 0.01, 20_000)
    assert s2.losses.discriminator.name == "maskbit" and s2.losses.convnext_weight == 0.1
    assert m.get_config("s128_stage1").model.num_latent_tokens == 128


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def runs(tmp_path_factory, fast_compile):
    from titok_jax.train.loop import train
    root = tmp_path_factory.mktemp("two_stage")
    m = load_config_module("titok")
    c1 = m.get_config("tiny_stage1")
    c1.total_steps = c1.eval_every_steps = c1.checkpoint.every_steps = 2
    s1 = train(c1, str(root / "s1"), progress=False)
    c2 = m.get_config("tiny_stage2")
    c2.total_steps = c2.checkpoint.every_steps = 2
    c2.eval_every_steps = 0           # stage 2 evaluates as the tokenizer task does
    c2.losses.gan_start_step = 1
    c2.init_from = str(root / "s1")
    s2 = train(c2, str(root / "s2"), progress=False)
    return str(root / "s1"), str(root / "s2"), s1, s2


def test_tiny_two_stage_end_to_end(runs):
    from titok_jax.tasks.runs import restore_run
    s1_dir, s2_dir, s1, s2 = runs
    assert s1["step"] == 2 and np.isfinite(s1["last_metrics"]["proxy_ce"])
    assert np.isfinite(s1["last_eval"]["psnr"])
    assert s2["step"] == 2 and s2["last_metrics"]["quantizer/commitment"] == 0
    assert "gan/discriminator" in s2["last_metrics"]
    with pytest.raises(ValueError, match="stage-1"):
        titok_jax.load_tokenizer(s1_dir)
    p1 = restore_run(s1_dir, host=True).params                 # stage-1 EMA params (stage 2's init)
    run2 = restore_run(s2_dir, ema=False, host=True)           # stage-2 trained params
    p2, cfg2 = run2.params, run2.config.to_dict()
    for name in ("encoder", "quantize", "latent_tokens"):  # frozen: carried over exactly
        for a, b in zip(jax.tree.leaves(p1[name]), jax.tree.leaves(p2[name])):
            np.testing.assert_array_equal(a, b)
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1["decoder"]),
                                                         jax.tree.leaves(p2["decoder"]))]
    assert max(moved) > 0                                 # the ViT decoder trains
    tok = titok_jax.load_tokenizer(s2_dir)
    x = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    ids = tok.encode(x)
    assert ids.shape == (3, 8) and ids.dtype == np.int32
    m1 = TiTokTwoStage(**{k: v for k, v in cfg2["model"].items() if k != "name"}).clone(
        finetune_decoder=False, pixel_channel_mult=(1, 1, 2, 2))
    _, out = jax.jit(lambda p, a: m1.apply({"params": p}, a, method="encode"))(
        p1, jnp.asarray(x, jnp.float32) / 255.0)
    np.testing.assert_array_equal(ids, out.indices)       # stage-1 tokens == stage-2 tokens
    rec = tok.decode(ids)
    assert rec.shape == (3, 32, 32, 3) and rec.min() >= 0 and rec.max() <= 1
    with open(os.path.join(s2_dir, "config.json")) as f:
        assert json.load(f)["task"]["name"] == "titok_stage2"
