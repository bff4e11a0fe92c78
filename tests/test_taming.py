"""taming VQGAN: the import of a Lightning ``last.ckpt`` against the OFFICIAL PyTorch model's outputs
(tests/data/taming, made by make_vectors.py from CompVis/taming-transformers@3ba01b2), the name
table against the published model's state-dict names, one-line errors on wrong files, the
``import-torch`` workdir through ``load_tokenizer``, and taming's adaptive GAN weight in the
tokenizer task."""
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import titok_jax
from titok_jax import cli
from titok_jax.convert.common import read_state_dict
from titok_jax.convert.taming import (infer_taming_kwargs, taming_name_table,
                                      taming_params_from_state_dict)
from titok_jax.models.registry import build_model
from titok_jax.models.taming import TAMING_F16_1024

from train_helpers import load_config_module

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "taming")
CKPT = os.path.join(DATA, "last.ckpt")
STATE = os.path.join(DATA, "last_state.safetensors")   # last.ckpt's state_dict (no torch needed)
SMALL = dict(image_size=32, ch=32, ch_mult=(2, 1), num_res_blocks=1, attn_resolutions=(16,),
             z_channels=16, embed_dim=8,
             quantizer={"name": "vq", "codebook_size": 64, "commitment_weight": 1.0,
                        "codebook_weight": 0.25})


def close(got, want, rel=1e-5):
    """float32 round-off: |got - want| <= rel * max|want| everywhere."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    err, scale = np.abs(got - want).max(), np.abs(want).max()
    assert err <= rel * scale, f"max error {err:.3g} vs scale {scale:.3g}"


@pytest.fixture(scope="module")
def official():
    sd = read_state_dict(STATE)
    with np.load(os.path.join(DATA, "io.npz")) as f:
        io = {k: f[k] for k in f.files}
    return sd, io


@pytest.fixture(scope="module")
def converted(official):
    sd, _ = official
    kwargs = infer_taming_kwargs(sd, image_size=32)
    params = taming_params_from_state_dict(sd, kwargs, source="last.ckpt")
    return kwargs, params


def test_import_reproduces_the_official_encode_quantize_decode(official, converted):
    _, io = official
    kwargs, params = converted
    assert kwargs == SMALL   # shape read from the tensors
    model = build_model({"name": "taming_vqgan", **kwargs})
    run = jax.jit(lambda p, x: (model.apply({"params": p}, x, method="pre_quant"),
                                model.apply({"params": p}, x, method="encode"),
                                model.apply({"params": p}, x)))
    h, (codes, out), (rec, _) = run(params, jnp.asarray(io["images"]))
    close(h, io["h"])                                        # quant_conv(encoder(2x - 1))
    assert io["id_margin"].min() > 5e-5 and len(np.unique(io["ids"])) > 32
    np.testing.assert_array_equal(np.asarray(out.indices), io["ids"])
    np.testing.assert_array_equal(np.asarray(codes).reshape(2, 16, 16, 8),
                                  params["quantize"]["codebook"][io["ids"]].reshape(2, 16, 16, 8))
    # legacy VectorQuantizer2 loss: weight 1 on the commitment term, 0.25 on the codebook term
    np.testing.assert_allclose(float(sum(out.losses.values())), float(io["qloss"]), rtol=1e-5)
    close(2.0 * np.asarray(rec) - 1.0, io["forward"])        # VQModel.forward, in [-1, 1] units
    close(2.0 * np.asarray(rec) - 1.0, io["decoded"])
    assert np.abs(io["forward"]).max() > 1.0                 # unclamped, as the official decoder
    pixels = jax.jit(lambda p, t: model.apply({"params": p}, t, method="decode_tokens"))(
        params, jnp.asarray(io["decoded_ids"]))
    close(2.0 * np.asarray(pixels) - 1.0, io["decoded_from_ids"])


def test_name_table_uses_every_tensor_once(official):
    sd, _ = official
    rows = taming_name_table(SMALL)
    torch_keys = [r[0] for r in rows]
    assert len(torch_keys) == len(set(torch_keys)) and len({r[1] for r in rows}) == len(rows)
    model_keys = {k for k in sd if not k.startswith("loss.")}
    assert set(torch_keys) == model_keys and len(model_keys) < len(sd)
    for t, _, shape, _ in rows:
        assert tuple(sd[t].shape) == shape, t


def test_published_name_table_matches_the_official_state_dict_and_our_model():
    with open(os.path.join(DATA, "official_keys.json")) as f:
        official = json.load(f)["imagenet_f16_1024"]
    rows = taming_name_table(TAMING_F16_1024)
    assert {r[0]: list(r[2]) for r in rows} == official and len(rows) == len(official)
    model = build_model({"name": "taming_vqgan", **TAMING_F16_1024})
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
    import flax.linen as nn
    from flax.traverse_util import flatten_dict
    ours = {"/".join(k): v.shape for k, v in flatten_dict(nn.unbox(shapes["params"])).items()}
    assert sorted(r[1] for r in rows) == sorted(ours)
    n = sum(int(np.prod(s)) for s in official.values())
    assert n == 72_141_699 == sum(int(np.prod(s)) for s in ours.values())


def _edited(tmp_path, edit):
    sd = read_state_dict(STATE)
    path = tmp_path / "edited.npz"
    np.savez(path, **edit(dict(sd)))
    return read_state_dict(str(path))


@pytest.mark.parametrize("edit, message", [
    (lambda sd: {k: v for k, v in sd.items() if k != "decoder.up.1.attn.1.q.bias"},
     "missing tensor 'decoder.up.1.attn.1.q.bias'"),
    (lambda sd: {**sd, "decoder.extra.weight": np.zeros(2, np.float32)},
     "unexpected tensor 'decoder.extra.weight'"),
    (lambda sd: {**sd, "quant_conv.bias": np.zeros(9, np.float32)},
     "tensor 'quant_conv.bias' has shape (9,), expected (8,)"),
])
def test_converter_errors_name_the_tensor(tmp_path, edit, message):
    sd = _edited(tmp_path, edit)
    with pytest.raises(ValueError, match=None) as e:
        taming_params_from_state_dict(sd, SMALL, source="x.ckpt")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_lightning_ckpt_reads_as_its_state_dict():
    """last.ckpt (Lightning 1.x layout, a pickled pytorch_lightning callback class) is read
    weights-only without pytorch_lightning, into the tensors of last_state.safetensors."""
    pytest.importorskip("torch")
    sd = read_state_dict(CKPT)
    assert "pytorch_lightning" not in sys.modules
    want = read_state_dict(STATE)
    assert sorted(sd) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(sd[k], want[k], err_msg=k)


def test_wrong_files_are_one_line_errors(tmp_path):
    maskgit = read_state_dict(os.path.join(os.path.dirname(DATA), "vqgan",
                                           "vqgan_state.safetensors"))
    with pytest.raises(ValueError, match="is not a taming VQGAN state dict"):
        infer_taming_kwargs(maskgit, source="maskgit.safetensors")
    pytest.importorskip("torch")
    bad = tmp_path / "last.ckpt"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable torch state dict"):
        read_state_dict(str(bad))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    src = tmp_path_factory.mktemp("release")
    shutil.copy(STATE, src / "last_state.safetensors")   # last.ckpt itself: the test above
    out = str(tmp_path_factory.mktemp("imported") / "w")
    assert cli.main(["import-torch", "--input", str(src), "--output", out,
                     "--image_size", "32"]) == 0
    return out


def test_import_torch_workdir_loads_as_a_tokenizer(official, imported):
    _, io = official
    tok = titok_jax.load_tokenizer(imported, batch_size=2)
    assert (tok.image_size, tok.num_tokens, tok.codebook_size) == (32, 256, 64)
    np.testing.assert_array_equal(tok.encode(io["images"]), io["ids"])
    want = np.clip((io["decoded_from_ids"] + 1.0) / 2.0, 0.0, 1.0)
    np.testing.assert_allclose(tok.decode(io["decoded_ids"]), want, atol=1e-5)


def test_import_torch_bad_file_is_one_line(tmp_path, capsys):
    src = tmp_path / "release"
    src.mkdir()
    (src / "last.ckpt").write_bytes(b"\x00garbage")
    assert cli.main(["import-torch", "--input", str(src), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "last.ckpt" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- adaptive GAN weight
def test_adaptive_gan_weight_is_tamings_ratio_on_the_last_decoder_conv(fast_compile):
    """losses.adaptive_weight_layer: the generator weight logged and used is
    0.8 * ||d nll / dW|| / (||d g / dW|| + 1e-4) with W the decoder's conv_out kernel,
    computed here the slow way (gradients of whole forwards w.r.t. that one param)."""
    import flax.linen as nn

    from titok_jax import losses as L
    from titok_jax.tasks import get_task

    c = load_config_module("vqgan").get_config("taming_f16_1024")
    c.model.update(SMALL)
    c.data.image_size = 32
    c.losses.update(perceptual_weight=0.0, gan_start_step=3,   # step 5: through the lax.cond gate
                    discriminator={"name": "patchgan", "ndf": 8, "n_layers": 2, "norm": "group"})
    c.compute_dtype = "float32"
    task = get_task(c)
    params, state = nn.unbox(task.init(jax.random.key(0)))
    images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 32, 3)), jnp.float32)
    key = jax.random.key(1)
    _, (_, m) = jax.jit(task.loss)(params, state, {"image": images}, key, jnp.asarray(5), {})

    w0 = params["model"]["decoder"]["conv_out"]["kernel"]

    def rec_of(w):
        p = dict(params["model"], decoder=dict(params["model"]["decoder"],
                                               conv_out={"kernel": w, "bias": params["model"]
                                                         ["decoder"]["conv_out"]["bias"]}))
        return task.model.apply({"params": p, **state["model"]}, images, train=False)[0]

    nll = lambda w: 2.0 * L.reconstruction_loss(rec_of(w), images, "l1")  # noqa: E731
    g = lambda w: L.generator_loss(task.disc.apply({"params": params["disc"]}, rec_of(w)),  # noqa: E731
                                   "hinge")
    g_nll, g_gan = jax.jit(lambda w: (jax.grad(nll)(w), jax.grad(g)(w)))(w0)
    want = 0.8 * np.linalg.norm(np.asarray(g_nll)) / (np.linalg.norm(np.asarray(g_gan)) + 1e-4)
    np.testing.assert_allclose(float(m["gan/weight"]), want, rtol=1e-4)
    assert float(m["gan/weight"]) != pytest.approx(0.8, rel=1e-2)
    np.testing.assert_allclose(float(m["loss"]), float(
        2.0 * m["reconstruction"] + sum(v for k, v in m.items() if k.startswith("quantizer/")
                                        and k[10:] in ("commitment", "codebook"))
        + m["gan/weight"] * m["gan/generator"]), rtol=1e-5)
