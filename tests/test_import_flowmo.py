"""FlowMo import (titok_jax.convert.flowmo) against the OFFICIAL code: tests/data/flowmo/ was made by
make_vectors.py from kylesargent/FlowMo's models.py (a tiny model, every tensor perturbed). Our
import must give the official binary codes (as our ids) and the official rf_sample decodes from the
same stored noise, at 1/2/3 steps with and without CFG (3 steps reaches the CFG interval)."""
import os
import shutil

import numpy as np
import pytest

from titok_jax.convert import flowmo as fm
from titok_jax.convert.workdir import import_torch
from titok_jax.models.flowmo import bits_to_ids

DATA = os.path.join(os.path.dirname(__file__), "data", "flowmo")


@pytest.fixture(scope="module")
def vectors():
    with np.load(os.path.join(DATA, "vectors.npz")) as d:
        return {k: d[k] for k in d.files}


def _input_dir(tmp_path, weights):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(os.path.join(DATA, weights), d / weights)
    shutil.copy(os.path.join(DATA, "flowmo_tiny.yaml"), d / "flowmo_tiny.yaml")
    return d


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from titok_jax import load_tokenizer
    tmp = tmp_path_factory.mktemp("flowmo")
    summary = import_torch(str(_input_dir(tmp, "flowmo_tiny.safetensors")), str(tmp / "wd"))
    assert summary["model"] == "flowmo (custom)"
    return load_tokenizer(str(tmp / "wd"))


def test_ids_match_official(tok, vectors):
    ids = np.asarray(tok.encode((vectors["images"] + 1.0) / 2.0))   # official: NCHW in [-1, 1]
    np.testing.assert_array_equal(ids, bits_to_ids(vectors["code"] > 0, 6))


def test_encoder_matches_official(tok, vectors):
    import jax.numpy as jnp
    m = tok.model
    z = m.apply({"params": tok.params}, jnp.asarray((vectors["images"] + 1.0) / 2.0),
                method=m.encode_continuous)
    np.testing.assert_allclose(np.asarray(z), vectors["code_pre"], atol=1e-5)


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_decode_matches_official(tok, vectors, steps, guidance):
    ids = bits_to_ids(vectors["code"] > 0, 6)
    got = np.asarray(tok.decode(ids, steps=steps, guidance=guidance, noise=vectors["noise"]))
    want = (vectors[f"decode_s{steps}_g{guidance}"] + 1.0) / 2.0
    np.testing.assert_allclose(got, np.clip(want, 0, 1), atol=2e-5)   # the API clips to [0, 1]
    # unclipped, through the model (about 40% of these pixels leave [0, 1])
    import jax.numpy as jnp
    m = tok.model
    raw = m.apply({"params": tok.params}, jnp.asarray(vectors["code"]), noise=jnp.asarray(vectors["noise"]),
                  steps=steps, guidance_scale=guidance, method=m.decode_codes)
    np.testing.assert_allclose(np.asarray(raw), want, atol=2e-5)


def test_guidance_reaches_interval(vectors):
    # FlowMo's CFG interval t in [0.145, 0.505]: the 1- and 2-step grids (1 / 1, 0.0625) miss it
    np.testing.assert_array_equal(vectors["decode_s2_g1.5"], vectors["decode_s2_g1.0"])
    assert np.abs(vectors["decode_s3_g1.5"] - vectors["decode_s3_g1.0"]).max() > 1e-3


def test_pth_release_and_detection(tmp_path):
    pytest.importorskip("torch")
    summary = import_torch(str(_input_dir(tmp_path, "flowmo_tiny.pth")), str(tmp_path / "wd"))
    assert summary["model"] == "flowmo (custom)"
    assert summary["weights"].endswith("flowmo_tiny.pth")


def test_shapes_inferred_without_yaml():
    from titok_jax.convert.common import read_state_dict
    sd = read_state_dict(os.path.join(DATA, "flowmo_tiny.safetensors"))
    kw, variant, sampler = fm.infer_flowmo_kwargs(sd, None)
    assert variant == "custom" and sampler == {"steps": 25, "guidance": 1.5}
    assert (kw["encoder_width"], kw["decoder_width"], kw["encoder_depth"], kw["decoder_depth"]) == (32, 32, 1, 2)
    assert (kw["encoder_heads"], kw["patch_size"], kw["token_bits"], kw["image_size"]) == (1, 4, 6, 256)
    assert kw["decoder_rope_axes"] == [4, 14, 14]
    # every official tensor is either converted or listed as unused, and nothing else is left
    used = {r[0] for r in fm.flowmo_rows(kw)}
    assert used | fm.unused_keys(kw) == set(sd)
    with pytest.raises(ValueError, match="disagrees"):
        fm.infer_flowmo_kwargs(sd, {"model": {"context_dim": 18}})


@pytest.mark.parametrize("variant", ["lo", "hi"])
def test_published_variant_recognised_from_shapes(variant):
    """Shapes only (no yaml): the published models give configs/flowmo.py's model section."""
    import runpy
    cfg = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "configs", "flowmo.py"))
    want = cfg["MODELS"][variant]
    bits = want["token_bits"]
    kw0 = dict(encoder_width=768, encoder_depth=8, encoder_heads=12, decoder_width=1152,
               decoder_depth=16, decoder_heads=12, mlp_ratio=4.0, patch_size=4, token_bits=bits)
    sd = {k: np.broadcast_to(np.float32(0), shape) for k, _, shape, _ in fm.flowmo_rows(kw0)}
    kw, name, _ = fm.infer_flowmo_kwargs(sd, None)
    assert name == variant
    for k, v in want.items():
        assert kw[k] == v, k
    assert kw["encoder_rope_axes"] == [8, 28, 28] and kw["decoder_rope_axes"] == [12, 42, 42]


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
