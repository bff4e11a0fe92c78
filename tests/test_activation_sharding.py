"""Activation sharding constraints (``titok_jax.nn.activation_sharding``): logical names through the
trainer's rules onto its mesh, the identity outside a mesh and rules, a dimension the mesh does not
divide left to XLA, Auto and Explicit meshes; the compiled training step of a TiTok micro model at
one image per device keeps the FSDP pattern everywhere, and so does a scanned FlowMo micro model.

Measured on the TiTok case below (width 384, 6 heads, 64 px / 8 px patches, one block a side, VQ-32,
8 images on ``fsdp`` 8), collectives of the compiled step: without constraints 22 all-to-alls (10 in
the blocks), 5 all-reduces and 10 all-gathers of ``[B, ...]`` activations; with the block
constraints (``nn.TransformerBlock``) 5 all-to-alls (at ``ln_pre`` / ``ln_post`` / the
concatenations of ``models/titok.py``) and 2 activation all-gathers; with the model's own
boundaries constrained too, none of either. The FlowMo case below (width 128, scanned MMDiTs, the
loss's gradients): unconstrained 31 all-to-alls, 33 activation all-reduces and 33 activation
all-gathers; constrained (``models/mmdit.py``, ``models/flowmo.py``) none.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from titok_jax import nn as tnn
from titok_jax.nn.activation_sharding import BTD, activation_rules, activation_spec, constrain
from titok_jax.tasks.titok_stages import random_params
from titok_jax.train import sharding as sharding_lib
from titok_jax.train.step import build_step, step_options

from train_helpers import fresh_state, micro_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

RULES = sharding_lib.DEFAULT_RULES
OPS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


# ---- names -> specs ------------------------------------------------------------------------------
def _batch_entry(mesh):
    """The batch entry of ``sharding.batch_sharding`` with the axes of size 1 left out."""
    axes = tuple(a for a in sharding_lib.BATCH_AXES if mesh.shape.get(a, 1) > 1)
    return axes[0] if len(axes) == 1 else axes


def test_spec_follows_the_rules_and_leaves_what_does_not_divide_to_xla():
    mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 4})
    assert activation_spec(BTD, (8, 5, 16), mesh, RULES) == P(_batch_entry(mesh), None, None)
    # a batch the 8 batch devices do not divide, and a None name: unconstrained, not an error
    assert activation_spec(BTD, (4, 5, 16), mesh, RULES) == P(P.UNCONSTRAINED, None, None)
    assert activation_spec(("batch", None), (8, 3), mesh, RULES) == \
        P(_batch_entry(mesh), P.UNCONSTRAINED)
    # the act_* names have no default rule (features stay whole); a table may map them
    tp = sharding_lib.make_mesh({"data": 4, "tensor": 2})
    rules = RULES + (("act_mlp", "tensor"),)
    assert activation_spec(("batch", "tokens", "act_mlp"), (8, 5, 16), tp, rules) == \
        P(_batch_entry(tp), None, "tensor")
    with pytest.raises(ValueError, match="unknown activation axis names"):
        activation_spec(("batch", "tokens", "embed"), (8, 5, 16), mesh, RULES)   # a param's name
    with pytest.raises(ValueError, match="3 names"):
        activation_spec(BTD, (8, 16), mesh, RULES)


def test_constrain_is_the_identity_outside_a_mesh_and_rules():
    x = jnp.ones((4, 3, 2))
    mesh = sharding_lib.make_mesh({"data": 8})
    assert constrain(x, BTD) is x
    with nn.logical_axis_rules(RULES):
        assert constrain(x, BTD) is x                      # rules, no mesh
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert constrain(x, BTD) is x                      # mesh, no rules


# ---- a block on Auto and Explicit meshes ---------------------------------------------------------
@pytest.fixture(scope="module")
def block_and_variables():
    """A block and seeded random variables of its shapes (no init to compile)."""
    block = tnn.TransformerBlock(num_heads=2)
    shapes = nn.unbox(jax.eval_shape(block.init, jax.random.key(1), jnp.zeros((8, 6, 16))))
    rng = np.random.default_rng(1)
    draw = lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32)
    return block, jax.tree.map(draw, shapes)


def test_block_under_the_rules_on_an_auto_mesh_equals_unsharded(block_and_variables):
    """A batch of 4 on 8 batch devices: the constraints leave it to XLA (the divisible case is
    the training step below)."""
    block, variables = block_and_variables
    x = jax.random.normal(jax.random.key(2), (4, 6, 16))
    ref = jax.jit(block.apply)(variables, x)
    mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 4})

    def f(v, x):
        with activation_rules(mesh, RULES):
            return block.apply(v, x)

    repl = sharding_lib.replicated(mesh)
    got = jax.jit(f, in_shardings=(repl, repl))(variables, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_block_under_the_rules_on_an_explicit_mesh_equals_unsharded(block_and_variables):
    block, variables = block_and_variables
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    x = jax.random.normal(jax.random.key(2), (8, 6, 16))
    ref = jax.jit(block.apply)(variables, x)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        got = jax.jit(block.apply)(variables, jax.device_put(x, NamedSharding(mesh, P("data"))))
        assert jax.typeof(got).sharding.spec[0] == "data"
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


# ---- the trainer's step -------------------------------------------------------------------------
def _titok_config():
    """A micro TiTok wide enough (384) that at one image per device XLA, unconstrained, splits
    activations over ``fsdp`` instead of gathering weights."""
    c = micro_config(**{"model.image_size": 64, "data.image_size": 64, "model.encoder_width": 384,
                        "model.decoder_width": 384, "model.encoder_heads": 6,
                        "model.decoder_heads": 6})
    c.batch_size = 8
    return c


def _collectives(text, batch):
    """``{op[:act][:block]: count}``: ``act`` when an operand is an activation (rank >= 3, leading
    dimension ``batch``), ``block`` when the op comes from a transformer block."""
    out = {}
    for line in text.splitlines():
        m = re.search(rf"= (.*?) ({'|'.join(OPS)})(-start)?\(", line)
        if not m:
            continue
        shapes = [tuple(int(d) for d in s.split(",") if d)
                  for s in re.findall(r"[a-z0-9]+\[([\d,]*)\]", m.group(1))]
        name = re.search(r'op_name="([^"]*)"', line)
        key = m.group(2)
        if any(len(s) >= 3 and s[0] == batch for s in shapes):
            key += ":act"
        if name and re.search(r"/(transformer_\d+|layers)/", name.group(1)):
            key += ":block"
        out[key] = out.get(key, 0) + 1
    return out


@pytest.fixture(scope="module")
def titok_step():
    """The compiled step on ``fsdp`` 8 (its HLO) and its loss, and the loss of the single-device
    step, from the same initial state and batch."""
    config = _titok_config()
    task, state, optimizer, shardings, mesh = fresh_state(config, {"fsdp": 8}, jax.devices())
    images = np.random.default_rng(0).uniform(size=(8, 64, 64, 3)).astype(np.float32)
    options = step_options(config, state.params)
    batch = jax.device_put({"image": images}, sharding_lib.batch_sharding(mesh))
    step = build_step(task, optimizer, shardings, mesh, donate=False, **options)
    compiled = step.lower(state, batch, {}).compile()
    _, metrics = compiled(state, batch, {})
    one = jax.device_put(state, jax.devices()[0])
    _, single = build_step(task, optimizer, donate=False, **options)(one, {"image": images}, {})
    return compiled.as_text(), float(metrics["loss"]), float(single["loss"])


def test_step_at_one_image_per_device_keeps_activations_in_place(titok_step):
    ops = _collectives(titok_step[0], 8)
    # no activation all-reduce anywhere (5 without the constraints), and inside the blocks no
    # activation collective and no all-to-all at all (10 all-to-alls without): weights are gathered
    assert ops.get("all-reduce:act", 0) + ops.get("all-reduce:act:block", 0) == 0, ops
    in_blocks = [k for k in ops if k.endswith(":block") and (":act" in k or k.startswith("all-to-all"))]
    assert not in_blocks, ops
    assert ops.get("all-gather:block", 0) >= 6, ops          # the blocks' weights, gathered
    assert ops.get("collective-permute", 0) == 0, ops


def test_step_at_one_image_per_device_has_no_all_to_all(titok_step):
    """The model's own boundaries (embeddings, concatenations, ln_pre / ln_post, read-outs) are
    constrained too: no all-to-all and no activation all-gather anywhere in the step."""
    ops = _collectives(titok_step[0], 8)
    assert sum(v for k, v in ops.items() if k.startswith("all-to-all")) == 0, ops
    assert not [k for k in ops if ":act" in k], ops


def test_sharded_step_loss_equals_the_single_device_loss(titok_step):
    _, loss, single = titok_step
    np.testing.assert_allclose(loss, single, rtol=2e-6)


# ---- a scanned FlowMo (MMDiT) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def flowmo_grads():
    """A FlowMo micro model (width 128, scanned MMDiTs: the constraints run inside the scan body),
    its loss and gradients jitted on ``fsdp`` 8 (params sharded by the rules, 8 images) under the
    rules (the compiled HLO and the loss), and the loss jitted on one device, from the same weights.
    XLA's heavy passes are off: they cost seconds here and do not change the partitioning."""
    from titok_jax.models.flowmo import FlowMo
    model = FlowMo(image_size=16, patch_size=4, code_length=4, token_bits=8, id_bits=8,
                   entropy_group_bits=4, encoder_width=128, encoder_depth=2, encoder_heads=2,
                   decoder_width=128, decoder_depth=3, decoder_heads=2, scan_layers=True)
    images = np.random.default_rng(0).uniform(size=(8, 16, 16, 3)).astype(np.float32)
    boxed = jax.eval_shape(lambda k: model.init({"params": k, "quantizer": k}, images),
                           jax.random.key(0))
    state = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                         nn.unbox({k: v for k, v in boxed.items() if k != "params"}))
    params = random_params(model, 16, seed=0)
    mesh = sharding_lib.make_mesh({"fsdp": 8})
    shardings = sharding_lib.logical_shardings(boxed["params"], mesh, RULES)

    def loss(p, x):
        v, aux = model.apply({"params": p, **state}, x, t=jnp.full((8,), 0.3))
        return jnp.mean((v - aux["x"]) ** 2)

    def sharded(p, x):
        with activation_rules(mesh, RULES):
            return loss(p, x)

    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        batch = sharding_lib.batch_sharding(mesh)
        compiled = jax.jit(jax.value_and_grad(sharded), in_shardings=(shardings, batch)).lower(
            jax.device_put(params, shardings), jax.device_put(images, batch)).compile()
        value, _ = compiled(jax.device_put(params, shardings), jax.device_put(images, batch))
        single = jax.jit(loss)(params, images)
    finally:
        jax.config.update("jax_disable_most_optimizations", old)
    return compiled.as_text(), float(value), float(single)


def test_scanned_flowmo_keeps_activations_in_place(flowmo_grads):
    text, loss, single = flowmo_grads
    ops = _collectives(text, 8)
    assert sum(v for k, v in ops.items() if k.startswith("all-to-all")) == 0, ops
    assert not [k for k in ops if ":act" in k], ops
    assert ops.get("all-gather:block", 0) >= 10, ops         # the scanned blocks' weights, gathered
    np.testing.assert_allclose(loss, single, rtol=2e-6)


# ---- the generators (MaskGIT's BERT and U-ViT stacks, the AR transformer) -------------------------
def _generator(kind):
    from titok_jax.generators.ar import ARTransformer
    from titok_jax.generators.maskgit import MaskGITTransformer
    common = dict(codebook_size=64, num_tokens=8, num_classes=10, width=128, depth=2, num_heads=2)
    if kind == "ar":
        return ARTransformer(**common, token_dropout=0.0, dropout=0.0)
    return MaskGITTransformer(**common, dropout=0.0, attention_dropout=0.0,
                              arch="uvit" if kind == "uvit" else "vit")


@pytest.fixture(scope="module", params=["bert", "uvit", "ar"])
def generator_grads(request):
    """A generator micro model's cross-entropy and its gradients jitted on ``fsdp`` 8 (params sharded
    by the rules, 8 sequences: one per device) under the rules, and the loss on one device.

    Measured without the constraints: BERT 9 activation all-reduces and 6 activation all-gathers (XLA
    split the MLP's hidden dimension instead of gathering the weights), AR the same 9 and 2, U-ViT 2
    all-to-alls of the embedding lookup; with them none."""
    model = _generator(request.param)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 64, size=(8, 8)).astype(np.int32)
    labels = rng.integers(0, 10, size=(8,)).astype(np.int32)
    boxed = jax.eval_shape(lambda k: model.init(k, tokens, labels), jax.random.key(0))
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.05, a.shape), a.dtype),
                          nn.unbox(boxed["params"]))
    mesh = sharding_lib.make_mesh({"fsdp": 8})
    shardings = sharding_lib.logical_shardings(boxed["params"], mesh, RULES)

    def loss(p, t, y):
        logits = model.apply({"params": p}, t, y)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[..., None], -1))

    def sharded(p, t, y):
        with activation_rules(mesh, RULES):
            return loss(p, t, y)

    batch = sharding_lib.batch_sharding(mesh)
    args = (jax.device_put(params, shardings), jax.device_put(tokens, batch),
            jax.device_put(labels, batch))
    compiled = jax.jit(jax.value_and_grad(sharded), in_shardings=(shardings, batch, batch)).lower(
        *args).compile()
    value, _ = compiled(*args)
    return compiled.as_text(), float(value), float(jax.jit(loss)(params, tokens, labels))


def test_generators_gather_weights_not_activations(generator_grads):
    text, loss, single = generator_grads
    ops = _collectives(text, 8)
    assert sum(v for k, v in ops.items() if k.startswith("all-to-all")) == 0, ops
    assert not [k for k in ops if ":act" in k], ops
    assert ops.get("all-gather", 0) >= 4, ops                 # the weights, gathered
    np.testing.assert_allclose(loss, single, rtol=2e-6)
