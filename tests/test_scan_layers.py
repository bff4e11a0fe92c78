"""Scanned layer stacks (``titok_jax.nn.scan``): the scanned and unrolled stacks of TiTok, FlexTok
and FlowMo compute the same loss and gradients from the same weights (the unrolled params stacked
by ``match_layers``), every remat policy gives the gradients of no remat, the importers' stacked
output is the stacked unrolled output, the layer axis is never sharded, and the published configs
scan while the tiny ones do not."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax.nn import TransformerBlock
from titok_jax.nn.scan import (REMAT_POLICIES, layer_stack, match_layers, resolve_remat,
                               stack_layers, unstack_layers)
from titok_jax.tasks.titok_stages import random_params
from train_helpers import load_config_module

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """Every test here runs with XLA's heavy optimisation passes off (conftest ``fast_compile``)."""


def _max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _same_tree(a, b, rtol):
    """Same structure, every leaf within ``rtol`` of the largest magnitude in ``b``."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    scale = max(1.0, max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(b)))
    assert _max_diff(a, b) <= rtol * scale


def _stacked_like(params, model, *init_args):
    """``params`` of the unrolled model in the layout of ``model`` (abstract init, no compile)."""
    abstract = nn.unbox(jax.eval_shape(lambda k: model.init(k, *init_args), jax.random.key(0)))
    return match_layers(params, abstract["params"]), abstract


# ----------------------------------------------------------------------------- the helper
def test_stack_and_unstack_round_trip():
    rng = np.random.default_rng(0)
    node = {f"{b}_{i}": {"w": rng.normal(size=(2, 3)), "b": rng.normal(size=(3,))}
            for b in ("transformer", "token_prior") for i in range(3)}
    node["ln_pre"] = {"scale": np.ones(3)}
    stacked = stack_layers(node, ["transformer", "token_prior"], 3)
    assert set(stacked) == {"ln_pre", "layers"}
    assert stacked["layers"]["transformer"]["w"].shape == (3, 2, 3)
    np.testing.assert_array_equal(stacked["layers"]["token_prior"]["b"][2], node["token_prior_2"]["b"])
    _same_tree(unstack_layers(stacked), node, 0.0)
    # match_layers reads the direction from the target tree, at any depth
    tree, like = {"encoder": node}, {"encoder": stacked}
    _same_tree(match_layers(tree, like), like, 0.0)
    _same_tree(match_layers(like, tree), tree, 0.0)
    assert match_layers(tree, tree) == tree


def test_remat_policy_names():
    assert resolve_remat(False) == "none" and resolve_remat(True) == "full"
    assert resolve_remat(True, "dots") == "dots" and resolve_remat(False, "dots_saveable") == "dots_saveable"
    with pytest.raises(ValueError, match="unknown remat_policy 'most'"):
        resolve_remat(True, "most")


class _Stack(nn.Module):
    scan: bool
    policy: str = "none"

    @nn.compact
    def __call__(self, x):
        def layer(ctx, h):
            return ctx.module(TransformerBlock)(num_heads=2, name=ctx.name("block"))(h)
        return layer_stack(layer, x, depth=3, scan=self.scan, remat_policy=self.policy)


def test_remat_policies_give_the_gradients_of_no_remat():
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    params = nn.unbox(jax.jit(_Stack(False).init)(jax.random.key(1), x)["params"])
    like = nn.unbox(jax.eval_shape(_Stack(True).init, jax.random.key(1), x))["params"]
    stacked = match_layers(params, like)
    assert stacked["layers"]["block"]["attn"]["qkv"]["kernel"].shape[0] == 3

    def grads(scan, policy, p):
        loss = lambda p: jnp.sum(_Stack(scan, policy).apply({"params": p}, x) ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(p)

    ref_loss, ref = grads(False, "none", params)
    for scan, policy in [(False, "dots")] + [(True, p) for p in REMAT_POLICIES if p != "none"]:
        loss, g = grads(scan, policy, stacked if scan else params)
        assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
        _same_tree(match_layers(g, ref), ref, 1e-5)


# ----------------------------------------------------------------------------- the models
def test_titok_scanned_equals_unrolled():
    """TiTok with the token prior (a per-layer param inside the scan), remat "dots"."""
    from titok_jax.models.titok import TiTok
    from titok_jax.models.titok_variants import titok_variant
    kw = titok_variant("tiny", token_prior=1.0, encoder_depth=3, decoder_depth=2)
    unrolled, scanned = TiTok(**kw), TiTok(**kw, scan_layers=True, remat=True, remat_policy="dots")
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    params = random_params(unrolled, 32, seed=0)
    stacked, abstract = _stacked_like(params, scanned, x)
    assert abstract["params"]["encoder"]["layers"]["token_prior"]["scale"].shape == (3, 4)
    assert "transformer_0" not in abstract["params"]["decoder"]

    def run(model, p):
        def loss(p):
            recon, out = model.apply({"params": p}, x)
            return jnp.mean((recon - x) ** 2) + out.total_loss(), recon
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(p)

    (lu, ru), gu = run(unrolled, params)
    (ls, rs), gs = run(scanned, stacked)
    assert abs(float(lu) - float(ls)) <= 1e-5 * abs(float(lu))
    assert _max_diff(ru, rs) < 1e-5
    _same_tree(match_layers(gu, gs), gs, 1e-5)


def test_flextok_scanned_equals_unrolled():
    """FlexTok's encoder, velocity and the REPA features after decoder block 1 (carried through the
    scan), on VAE latents (the frozen VAE has no layer stack)."""
    from titok_jax.models.flextok import FlexTok
    kw = dict(image_size=32, vae_latent_channels=4, vae_base_channels=32, vae_channel_mult=(1, 1, 2, 2),
              vae_num_res_blocks=1, encoder_width=32, encoder_depth=2, decoder_width=32,
              decoder_depth=3, head_dim=16, num_registers=4, repa_layer=1, repa_dim=16,
              repa_hidden_dim=32)
    # remat on both sides: unrolled "full" (the block's static split), scanned "dots"
    unrolled = FlexTok(**kw, remat=True)
    scanned = FlexTok(**kw, scan_layers=True, remat=True, remat_policy="dots")
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    params = random_params(unrolled, 32, seed=0)
    stacked, abstract = _stacked_like(params, scanned, x)
    assert abstract["params"]["decoder"]["layers"]["block"]["adaln"]["kernel"].shape[0] == 3
    lat = jax.random.normal(jax.random.key(1), (2, 4, 4, 4))
    t, keep, cond = jnp.array([0.3, 0.8]), jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]], bool), jnp.ones(2, bool)

    def run(model, p):
        def loss(p):
            def f(m):
                codes, _ = m.encode_latents(lat)
                return m.decoder(lat, t, codes, keep, cond)
            v, feats = model.apply({"params": p}, method=f)
            return jnp.mean(v ** 2) + jnp.mean(feats ** 2), (v, feats)
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(p)

    (lu, (vu, fu)), gu = run(unrolled, params)
    (ls, (vs, fs)), gs = run(scanned, stacked)
    assert abs(float(lu) - float(ls)) <= 1e-5 * abs(float(lu))
    assert float(np.abs(np.asarray(fu)).max()) > 0 and _max_diff((vu, fu), (vs, fs)) < 1e-5
    _same_tree(match_layers(gu, gs), gs, 1e-5)


def test_flowmo_scanned_equals_unrolled():
    """FlowMo's MMDiTs: blocks 0..depth-2 scanned, the readout-only last block apart (forward: the
    gradients of a scan are checked above and for TiTok / FlexTok)."""
    from titok_jax.models.flowmo import FlowMo
    kw = dict(image_size=16, patch_size=4, code_length=4, token_bits=8, id_bits=4, entropy_group_bits=4,
              encoder_width=32, encoder_depth=2, encoder_heads=1, decoder_width=32, decoder_depth=3,
              decoder_heads=1)
    unrolled, scanned = FlowMo(**kw), FlowMo(**kw, scan_layers=True, remat=True)
    x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
    params = random_params(unrolled, 16, seed=0)
    abstract = nn.unbox(jax.eval_shape(lambda k: scanned.init({"params": k, "quantizer": k}, x),
                                       jax.random.key(0)))
    stacked = match_layers(params, abstract["params"])
    dec = abstract["params"]["decoder"]
    assert dec["layers"]["block"]["img_qkv"]["kernel"].shape[0] == 2 and "block_2" in dec
    state = {k: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), v)
             for k, v in abstract.items() if k != "params"}

    def run(model, p):
        fwd = lambda p: model.apply({"params": p, **state}, x, t=jnp.full((2,), 0.5))  # noqa: E731
        v, aux = jax.jit(fwd)(p)
        return v, aux["codes"]

    (vu, cu), (vs, cs) = run(unrolled, params), run(scanned, stacked)
    np.testing.assert_array_equal(cu, cs)
    assert float(np.abs(np.asarray(vu)).max()) > 0 and _max_diff(vu, vs) < 1e-5


def test_layer_axis_is_never_sharded():
    """Stacked params carry the logical name "layers" first; the default rules leave it whole."""
    from titok_jax.models.titok import TiTok
    from titok_jax.models.titok_variants import titok_variant
    from titok_jax.train import sharding as sharding_lib
    model = TiTok(**titok_variant("tiny", scan_layers=True))
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    spec = nn.get_partition_spec(boxed)["encoder"]["layers"]["transformer"]["mlp"]["fc_in"]["kernel"]
    assert tuple(spec) == ("layers", "embed", "mlp")
    mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 4})
    shardings = sharding_lib.logical_shardings(boxed, mesh, sharding_lib.DEFAULT_RULES)
    for s in jax.tree.leaves(shardings["encoder"]["layers"]):
        assert len(s.spec) == 0 or s.spec[0] is None, s.spec


# ----------------------------------------------------------------------------- importers
def test_titok_importer_writes_the_stacked_layout():
    from titok_jax.convert import titok as conv
    from titok_jax.convert.common import read_state_dict
    sd = read_state_dict(os.path.join(DATA, "titok", "vq", "model.safetensors"))
    with open(os.path.join(DATA, "titok", "vq", "config.json"), encoding="utf-8") as f:
        model = conv.titok_model_from_hf_config(json.load(f), sd)
    assert model["scan_layers"] is False    # imported workdirs say which layout they hold
    unrolled = conv.titok_params_from_state_dict(sd, model)
    stacked = conv.titok_params_from_state_dict(sd, {**model, "scan_layers": True})
    assert "transformer_1" in unrolled["encoder"] and "layers" in stacked["encoder"]
    _same_tree(stacked, match_layers(unrolled, stacked), 0.0)


def test_flextok_importer_writes_the_stacked_layout():
    from titok_jax.convert import flextok as ft
    sd, cfg = ft.read_release(os.path.join(DATA, "flextok", "learned", "model.safetensors"))
    kw, names = ft.flextok_kwargs_from_release(cfg, sd, source="learned")
    unrolled = ft.flextok_params_from_state_dict(sd, kw, names)
    stacked = ft.flextok_params_from_state_dict(sd, {**kw, "scan_layers": True}, names)
    assert "block_0" in unrolled["decoder"] and "layers" in stacked["decoder"]
    _same_tree(stacked, match_layers(unrolled, stacked), 0.0)
    assert ft.flextok_model_section(kw)["scan_layers"] is False


def test_flowmo_importer_writes_the_stacked_layout():
    from titok_jax.convert import flowmo as fm
    from titok_jax.convert.common import read_state_dict
    sd = read_state_dict(os.path.join(DATA, "flowmo", "flowmo_tiny.safetensors"))
    kw, variant, sampler = fm.infer_flowmo_kwargs(sd, None, source="flowmo_tiny")
    unrolled = fm.flowmo_params_from_state_dict(sd, kw)
    stacked = fm.flowmo_params_from_state_dict(sd, {**kw, "scan_layers": True})
    depth = kw["decoder_depth"]
    assert stacked["decoder"]["layers"]["block"]["img_qkv"]["kernel"].shape[0] == depth - 1
    assert f"block_{depth - 1}" in stacked["decoder"]
    _same_tree(stacked, match_layers(unrolled, stacked), 0.0)
    # an imported workdir names its layout, so resuming it with the other one is a one-line
    # mismatch naming the key (commands/train.py check_same_model)
    from titok_jax.checkpoint import config_differences
    old = fm.flowmo_workdir_config(kw, variant, sampler, "x")
    assert old["model"]["scan_layers"] is False
    new = {**old, "model": {**old["model"], "scan_layers": True}}
    assert config_differences(old, new) == ["model.scan_layers false vs true"]


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("family,published,tiny", [
    ("titok", ("bl64_vq", "ll32_vae", "l32_stage1", "s128_stage2"), ("tiny", "tiny_vq", "tiny_stage2")),
    ("flextok", ("d12_d12", "d18_d28"), ("tiny",)),
    ("flowmo", ("lo", "hi_post"), ("tiny", "tiny_post")),
])
def test_published_configs_scan_and_remat(family, published, tiny):
    m = load_config_module(family)
    for v in published:
        model = m.get_config(v).model
        assert model.scan_layers and model.remat, v
        assert resolve_remat(model.remat, model.remat_policy) != "none", v
    for v in tiny:
        model = m.get_config(v).model
        assert (model.scan_layers, model.remat, model.remat_policy) == (False, False, ""), v
