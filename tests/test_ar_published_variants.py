"""The published multi-index AR sizes of ``configs/ar.py`` (issue 17 §3): ``far_b_dual``,
``far_l_dual``, ``far_b_triple`` (FQGAN's FAR on FQGAN-Dual / -Triple ids) and ``om2_ar_b``,
``om2_ar_l``, ``om2_ar_xl`` (Open-MAGVIT2's AR on an 18-bit LFQ index, split-bit head).

Everything is abstract (``jax.eval_shape``: no parameter is allocated, nothing is compiled), so the
file runs in seconds:
- the parameter count against the published one, within 1%: the published counts are rounded to
  three significant digits (343M, 804M, 415M, 898M: at most 0.15% off) or two (1.5B: up to 3.3%),
  while any structural slip costs more than 1% (one trunk block of B is 12.6M = 3.7% of 343M,
  FFN hidden one multiple of 256 off 6%, a [9, 9] split instead of [6, 12] 1.9%); our exact counts
  must also be the ones in the table of ``configs/ar.py``'s docstring;
- the config builds the ``ar`` task and the generator's forward on integer ids ``[2, 256(, k)]``
  gives per-sub-token logits of the right shapes, and so does the cached trunk + sub-token head;
- the shapes and recipe read from the references (layers, heads, width, head depth, SwiGLU hidden,
  factor layout, the (6, 12) bit split, lr / batch / steps / sampler, weight decay on every >= 2-D
  param and on nothing else).
FAR-Triple has no published count: its count is checked against FAR-B Dual plus exactly one more
factor (a table, an output and D more aggregation inputs)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.generators.ar_subtokens import to_subtokens
from titok_jax.tasks import get_task
from titok_jax.train.optimizer import decay_mask

from train_helpers import load_config_module

AR = load_config_module("ar")
# variant: (published count, the source's rounding unit, our exact count)
PUBLISHED = {
    "far_b_dual": (415e6, 1e6, 417_104_896),
    "far_l_dual": (898e6, 1e6, 901_195_520),
    "om2_ar_b": (343e6, 1e6, 343_570_432),
    "om2_ar_l": (804e6, 1e6, 804_362_240),
    "om2_ar_xl": (1.5e9, 1e8, 1_486_679_040),
}
NEW = ("far_b_dual", "far_l_dual", "far_b_triple", "om2_ar_b", "om2_ar_l", "om2_ar_xl")
# variant: (depth, heads, width, head blocks, SwiGLU hidden, sub-vocabularies)
SHAPES = {
    "far_b_dual": (24, 16, 1024, 3, 2816, (16384, 16384)),
    "far_l_dual": (36, 20, 1280, 4, 3584, (16384, 16384)),
    "far_b_triple": (24, 16, 1024, 3, 2816, (16384,) * 3),
    "om2_ar_b": (24, 16, 1024, 2, 2816, (64, 4096)),
    "om2_ar_l": (36, 20, 1280, 3, 3584, (64, 4096)),
    "om2_ar_xl": (48, 24, 1536, 4, 4096, (64, 4096)),
}
TOLERANCE = 0.01


@functools.lru_cache(maxsize=None)
def _abstract(variant):
    """(config, task, abstract model params) of a variant, built once per variant (not mutated)."""
    cfg = AR.get_config(variant)
    task = get_task(cfg)
    params, _ = nn.unbox(jax.eval_shape(task.init, jax.random.key(0)))
    return cfg, task, params["model"]


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_the_variants_are_listed():
    assert set(NEW) <= set(AR.VARIANTS) and set(NEW) <= set(AR.PUBLISHED)
    for name in NEW:
        assert f"``{name}``" in AR.__doc__ and name in __doc__


@pytest.mark.parametrize("variant", NEW)
def test_parameter_count_shapes_and_forward(variant):
    cfg, task, params = _abstract(variant)
    model = task.model
    depth, heads, width, head_depth, hidden, vocab = SHAPES[variant]
    count = _count(params)
    if variant in PUBLISHED:
        published, _unit, ours = PUBLISHED[variant]
        assert count == ours and f"{ours:,}" in AR.__doc__, count
        assert abs(count / published - 1) <= TOLERANCE, (count, published)
    else:   # FAR-Triple: FAR-B Dual + one more factor, nothing else
        d, v = 1024, 16384
        assert count == PUBLISHED["far_b_dual"][2] + 2 * v * d + d * d, count
    # the shapes of the references
    assert (model.depth, model.num_heads, model.width, model.head_depth) == (depth, heads, width,
                                                                              head_depth)
    assert model.sub_vocab == vocab and model.num_tokens == 256 and model.num_classes == 1000
    assert sum(k.startswith("block_") for k in params) == depth
    assert sum(k.startswith("head_block_") for k in params) == head_depth
    assert params["block_0"]["mlp"]["gate"]["kernel"].shape == (width, hidden)
    assert params["head_block_0"]["mlp"]["fc_out"]["kernel"].shape == (hidden, width)
    assert params["class_embedding"].shape == (1001, width)
    if variant.startswith("far"):
        k = len(vocab)
        assert model.token_shape == (256, k) and model.factor_embedding == "concat"
        assert params["aggregate"]["kernel"].shape == (k * width, width)
        assert params["aggregate"]["bias"].shape == (width,)
    else:
        assert model.token_shape == (256,) and tuple(model.split_bits) == (6, 12)
        assert model.factor_embedding == "sum" and "aggregate" not in params
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    assert [p for p in paths if "bias" in p] == (["['aggregate']['bias']"]   # no other bias
                                                 if variant.startswith("far") else [])
    # the forward on integer ids, abstractly
    tokens = jax.ShapeDtypeStruct((2,) + model.token_shape, jnp.int32)
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    logits = jax.eval_shape(model.apply, {"params": params}, tokens, labels)
    assert [(l.shape, l.dtype) for l in logits] == [((2, 256, v), jnp.float32) for v in vocab]
    # the sampler's path: the cached trunk on sub-ids, then the sub-token head
    cache = jax.eval_shape(lambda: model.init_cache(2, 256))
    prev = jax.ShapeDtypeStruct((2, 1, len(vocab)), jnp.int32)
    h, new_cache = jax.eval_shape(
        lambda p, x, y, c: model.apply({"params": p}, x, y, 5, c, method="decode_hidden"),
        params, prev, labels, cache)
    assert h.shape == (2, 1, width) and len(new_cache) == depth
    assert new_cache[0]["k"].shape == (2, 256, heads, width // heads)
    subs = jax.eval_shape(lambda p, h, s: model.apply({"params": p}, h, s, method="sub_logits"),
                          params, h, prev)
    assert [l.shape for l in subs] == [(2, 1, v) for v in vocab]


@pytest.mark.parametrize("variant", NEW)
def test_recipe(variant):
    cfg, _, params = _abstract(variant)
    opt, sampler = cfg.optimizer, cfg.generator.sampler
    assert (opt.b1, opt.b2, opt.weight_decay, opt.grad_clip) == (0.9, 0.95, 0.05, 1.0)
    assert cfg.generator.class_dropout == 0.1 and cfg.model.position_embedding == "rope_2d"
    m = cfg.model
    assert (m.token_dropout, m.dropout, m.attention_dropout) == (0.1, 0.1, 0.0)
    assert (sampler.top_k, sampler.top_p, sampler.temperature) == (0, 1.0, 1.0)
    if variant.startswith("far"):   # §2.5: constant 1e-4, batch 256, step 1.5M; eval CFG 2.0
        assert (opt.lr, opt.end_lr, opt.warmup_steps) == (1e-4, 1e-4, 0)
        assert (cfg.batch_size, cfg.total_steps, sampler.guidance_scale) == (256, 1_500_000, 2.0)
        assert cfg.generator.subtoken_reduction == "mean"     # FAR averages its factors' CEs
    else:
        assert cfg.generator.subtoken_reduction == "sum"   # batch 768, 300 / 300 / 350 epochs of 1669 steps, decay to 0.1 lr
        lr, epochs, warmup, cfg_scale = {"om2_ar_b": (3e-4, 300, 6, 2.0),
                                         "om2_ar_l": (3e-4, 300, 6, 1.9),
                                         "om2_ar_xl": (2.4e-4, 350, 7, 1.85)}[variant]
        assert cfg.batch_size == 768 and -(-1_281_167 // 768) == 1669
        assert (opt.lr, cfg.total_steps, opt.warmup_steps) == (lr, epochs * 1669, warmup * 1669)
        assert opt.end_lr == pytest.approx(lr / 10) and sampler.guidance_scale == cfg_scale
    # weight decay on every >= 2-D param (embeddings and the aggregation kernel included), on no
    # norm scale and no bias: LlamaGen's optimizer groups
    mask = decay_mask(params, opt.no_decay)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    decayed = {jax.tree_util.keystr(p) for (p, x), m in zip(flat, jax.tree.leaves(mask)) if m}
    for path, x in flat:
        assert (jax.tree_util.keystr(path) in decayed) == (x.ndim >= 2), path
    assert any("token_embedding" in p for p in decayed) and any("class_embedding" in p
                                                                for p in decayed)


def test_the_18_bit_index_splits_low_6_bits_first():
    # t = pre + 64 post, pre = bits 0-5 (LFQ channels 0-5), post = bits 6-17 (reference magvit.md)
    t = jnp.asarray([[0, 63, 64, 5 + 64 * 3, 2 ** 18 - 1]], jnp.int32)
    subs = np.asarray(to_subtokens(t, 1, tuple(AR.get_config("om2_ar_b").model.split_bits)))
    np.testing.assert_array_equal(subs[0], [[0, 0], [63, 0], [0, 1], [5, 3], [63, 4095]])
