"""LPIPS and the ConvNeXt term run the frozen trunk on ``x`` and ``y`` interleaved per example (not on
their concatenation along the batch axis): the values are those of the concatenated form, and under
an 8-device data-parallel mesh the compiled loss moves no activations between devices (no
collective-permute, no all-to-all, no all-gather)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from titok_jax.losses.perceptual import (LPIPS, LPIPS_SCALE, LPIPS_SHIFT, _unit_normalize,
                                         convnext_logits, convnext_loss, lpips_distance, lpips_loss)
from titok_jax.nets.convnext import ConvNeXt
from titok_jax.nets.vgg import VGG16Features

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

TINY_CONVNEXT = dict(depths=(1, 1), dims=(8, 16), num_classes=10)
RESHARDING = ("collective-permute", "all-to-all")


def _random_params(abstract, seed):
    """Seeded random values for an abstract param tree (no init to compile): He-scaled kernels,
    small biases; the LPIPS ``lin`` weights non-negative, as in the released ones."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else 400
        v = rng.standard_normal(a.shape) * np.sqrt(2.0 / fan_in)
        if "lin" in jax.tree_util.keystr(path):
            v = np.abs(v)
        return jnp.asarray(v, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def lpips_params():
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    return _random_params(jax.eval_shape(LPIPS().init, jax.random.key(0), x, x)["params"], 0)


@pytest.fixture(scope="module")
def convnext_params():
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return _random_params(jax.eval_shape(ConvNeXt(**TINY_CONVNEXT).init, jax.random.key(0), x)["params"], 1)


def _images(n, size, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, size, size, 3)).astype(np.float32)
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


@jax.jit
def _lpips_one_pass(params, x, y):
    """The previous form: one VGG pass over ``concat([x, y])``, then the halves."""
    b = x.shape[0]
    both = jnp.concatenate([x, y], axis=0)
    both = (2.0 * both - 1.0 - jnp.asarray(LPIPS_SHIFT)) / jnp.asarray(LPIPS_SCALE)
    taps = VGG16Features().apply({"params": params["vgg"]}, both)
    total = jnp.zeros((b,), jnp.float32)
    for k, f in enumerate(taps):
        f = _unit_normalize(f)
        diff = jnp.square(f[:b] - f[b:])
        total = total + jnp.mean(diff @ params[f"lin{k}"]["kernel"], axis=(1, 2, 3))
    return total


@jax.jit
def _convnext_one_pass(params, x, y):
    """The previous form: one ConvNeXt pass over ``concat([x, y])``, then the halves."""
    logits = convnext_logits(params, jnp.concatenate([x, y], axis=0))
    return jnp.mean(jnp.square(logits[:x.shape[0]] - logits[x.shape[0]:]))


def test_lpips_interleaved_pass_equals_the_concatenated_one(lpips_params):
    x, y = _images(3, 16, 0)
    got = np.asarray(jax.jit(lpips_distance)(lpips_params, x, y))
    want = np.asarray(_lpips_one_pass(lpips_params, x, y))
    assert np.all(want > 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_convnext_interleaved_pass_equals_the_concatenated_one(convnext_params):
    x, y = _images(3, 32, 1)
    got = float(jax.jit(convnext_loss)(convnext_params, x, y))
    want = float(_convnext_one_pass(convnext_params, x, y))
    assert want > 0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def _compiled_collectives(fn, params, image_shape):
    """Ops of ``fn(params, x, y)`` compiled with ``x``, ``y`` split over 8 devices (data parallel)
    and the frozen params replicated, as ``{op: count}`` for the collectives."""
    mesh = jax.make_mesh((8,), ("data",))
    batch = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), params)
    img = jax.ShapeDtypeStruct(image_shape, jnp.float32, sharding=batch)
    text = jax.jit(fn).lower(abstract, img, img).compile().as_text()
    ops = ("all-reduce", "all-gather", "reduce-scatter") + RESHARDING
    return {op: len(re.findall(rf" {op}(-start)?\(", text)) for op in ops}


@pytest.mark.parametrize("fn", [lpips_distance, lpips_loss, jax.grad(lpips_loss, argnums=1)],
                         ids=["distance", "loss", "grad"])
def test_lpips_under_data_parallelism_moves_no_activations(lpips_params, fn):
    ops = _compiled_collectives(fn, lpips_params, (16, 16, 16, 3))
    assert all(ops[op] == 0 for op in RESHARDING), ops
    assert ops["all-gather"] == 0, ops


def test_convnext_loss_under_data_parallelism_moves_no_activations(convnext_params):
    ops = _compiled_collectives(convnext_loss, convnext_params, (8, 32, 32, 3))
    assert all(ops[op] == 0 for op in RESHARDING), ops
    assert ops["all-gather"] == 0, ops
    assert ops["all-reduce"] >= 1, ops       # the batch mean: the one collective it needs
