"""FVD: the Inception-I3D port (vs an independent float64 NumPy forward of the PyTorch
``InceptionI3d`` semantics on random weights of the same layout, narrowed by ``channel_div``), its
converter from the state dict (names, shapes, one-line errors), and the Fréchet part (the image
FID's code on the same features; identical sets give ~0)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax import cli
from titok_jax.convert import i3d as conv
from titok_jax.evaluation import fid
from titok_jax.nets.i3d import (InceptionI3D, Unit3D, i3d_feature_fn, i3d_variant, load_i3d_params,
                               max_pool_same, same_padding)
from titok_jax.tasks.eval_fvd import FVDEval, fvd_from_features

DIV, CLASSES = 16, 10   # a narrow network of the same layout: every width // 16, 10 classes


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors under the torch keys and shapes of the narrow network (+ a BN counter)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for tkey, _, shape in conv.i3d_name_table(CLASSES, DIV):
        if tkey.endswith("running_var"):
            v = rng.uniform(0.5, 1.5, shape)
        elif tkey.endswith("conv3d.weight"):   # He scale: the signal survives the ReLU stack
            v = rng.normal(0, math.sqrt(2.0 / np.prod(shape[1:])), shape)
        elif tkey.endswith("bn.weight"):
            v = rng.uniform(0.8, 1.2, shape)
        else:
            v = rng.normal(0, 0.1, shape)
        sd[tkey] = v.astype(np.float32)
    sd["Mixed_3b.b0.bn.num_batches_tracked"] = np.zeros((), np.float32)
    return sd


# ------------------------------------------------------------ float64 NumPy reference, NCTHW
def _pt_pad(size, k, s):
    """pytorch-i3d's ``compute_pad`` (written independently of ``nets.i3d.same_padding``)."""
    p = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
    return p // 2, p - p // 2


def _pad(x, k, s):
    pads = [_pt_pad(n, kk, ss) for n, kk, ss in zip(x.shape[2:], k, s)]
    return np.pad(x, [(0, 0), (0, 0), *pads])


def _windows(x, k, s):
    """Yield ``(offset, strided view)`` of every kernel offset of a VALID window op."""
    out = [(n - kk) // ss + 1 for n, kk, ss in zip(x.shape[2:], k, s)]
    for dt in range(k[0]):
        for dh in range(k[1]):
            for dw in range(k[2]):
                yield (dt, dh, dw), x[:, :, dt:dt + s[0] * out[0]:s[0], dh:dh + s[1] * out[1]:s[1],
                                      dw:dw + s[2] * out[2]:s[2]]


def _unit(sd, name, x, k=(1, 1, 1), s=(1, 1, 1), eps=1e-5, head=False):
    w = sd[f"{name}.conv3d.weight"].astype(np.float64)          # [out, in, kt, kh, kw]
    x = _pad(x, k, s)
    y = sum(np.einsum("bcthw,oc->bothw", v, w[:, :, dt, dh, dw])
            for (dt, dh, dw), v in _windows(x, k, s))
    if head:
        return y + sd[f"{name}.conv3d.bias"][None, :, None, None, None]
    g = lambda n: sd[f"{name}.bn.{n}"].astype(np.float64)[None, :, None, None, None]  # noqa: E731
    y = (y - g("running_mean")) / np.sqrt(g("running_var") + eps) * g("weight") + g("bias")
    return np.maximum(y, 0.0)


def _maxpool(x, k, s):
    out = None
    for _, v in _windows(_pad(x, k, s), k, s):
        out = v if out is None else np.maximum(out, v)
    return out


def _mixed(sd, name, x, eps):
    u = lambda n, y, k=(1, 1, 1): _unit(sd, f"{name}.{n}", y, k, eps=eps)  # noqa: E731
    return np.concatenate([u("b0", x), u("b1b", u("b1a", x), (3, 3, 3)),
                           u("b2b", u("b2a", x), (3, 3, 3)),
                           u("b3b", _maxpool(x, (3, 3, 3), (1, 1, 1)))], axis=1)


def reference_forward(sd, clips, eps=1e-5):
    """``[B, T, 224, 224, 3]`` in [-1, 1] -> (time-averaged logits, time-averaged pool)."""
    x = np.asarray(clips, np.float64).transpose(0, 4, 1, 2, 3)
    x = _unit(sd, "Conv3d_1a_7x7", x, (7, 7, 7), (2, 2, 2), eps)
    x = _maxpool(x, (1, 3, 3), (1, 2, 2))
    x = _unit(sd, "Conv3d_2b_1x1", x, eps=eps)
    x = _unit(sd, "Conv3d_2c_3x3", x, (3, 3, 3), eps=eps)
    x = _maxpool(x, (1, 3, 3), (1, 2, 2))
    x = _mixed(sd, "Mixed_3c", _mixed(sd, "Mixed_3b", x, eps), eps)
    x = _maxpool(x, (3, 3, 3), (2, 2, 2))
    for m in ("4b", "4c", "4d", "4e", "4f"):
        x = _mixed(sd, f"Mixed_{m}", x, eps)
    x = _maxpool(x, (2, 2, 2), (2, 2, 2))
    x = _mixed(sd, "Mixed_5c", _mixed(sd, "Mixed_5b", x, eps), eps)
    pooled = sum(v for _, v in _windows(x, (2, 7, 7), (1, 1, 1))) / (2 * 7 * 7)   # [B, C, T'', 1, 1]
    logits = _unit(sd, "logits", pooled, head=True)
    return logits[:, :, :, 0, 0].mean(axis=2), pooled[:, :, :, 0, 0].mean(axis=2)


@pytest.fixture(scope="module")
def state_dict():
    return random_state_dict()


@pytest.fixture(scope="module")
def params(state_dict, tmp_path_factory):
    """The random state dict written as .npz (no torch needed), read back and converted."""
    return load_i3d_params(weights_file(state_dict, tmp_path_factory))


_FILES: dict = {}


def weights_file(state_dict, tmp_path_factory):
    """The random state dict as an .npz (no torch needed), converted by ``titok-jax convert-i3d``
    (class count and width read from the tensors)."""
    if "out" not in _FILES:
        d = tmp_path_factory.mktemp("i3d")
        np.savez(d / "i3d_random.npz", **state_dict)
        out = str(d / "i3d_fvd.safetensors")
        assert cli.main(["convert-i3d", "--input", str(d / "i3d_random.npz"), "--output", out]) == 0
        _FILES["out"] = out
    return _FILES["out"]


# ----------------------------------------------------------------------------- network
def test_same_padding_is_pytorch_i3d_compute_pad():
    for n in range(1, 20):
        for k in (1, 2, 3, 7):
            for s in (1, 2):
                assert same_padding(n, k, s) == _pt_pad(n, k, s), (n, k, s)


@pytest.fixture(scope="module")
def clips_and_features(params):
    """Two 17-frame 224 x 224 clips on the uint8 grid (so FVD's rounding is exact) and their
    features from the jitted FVD path; 17 frames (Open-MAGVIT2's clip length) give two temporal
    windows, so the time average is exercised."""
    rng = np.random.default_rng(1)
    clips = (rng.integers(0, 256, (2, 17, 224, 224, 3)) / 255.0).astype(np.float32)
    out = i3d_feature_fn(num_classes=CLASSES, channel_div=DIV)(params, jnp.asarray(clips))
    return clips, {k: np.asarray(v) for k, v in out.items()}


def test_i3d_matches_float64_reference(state_dict, clips_and_features):
    clips, out = clips_and_features
    logits, pool = reference_forward(state_dict, 2.0 * clips.astype(np.float64) - 1.0)
    assert out["logits"].shape == (2, CLASSES) and out["pool"].shape == (2, 1024 // DIV)
    assert np.abs(logits[0] - logits[1]).max() > 1e-2 * np.abs(logits).max()   # input-dependent
    np.testing.assert_allclose(out["logits"], logits, atol=1e-5 * np.abs(logits).max(), rtol=1e-4)
    np.testing.assert_allclose(out["pool"], pool, atol=1e-5 * np.abs(pool).max(), rtol=1e-4)


@pytest.mark.usefixtures("fast_compile")
def test_unit3d_and_max_pool_on_odd_sizes():
    """TF-'SAME' padding on odd sizes with strides (the 224 path sees even sizes only), and
    the BatchNorm epsilon of piergiaj's original (1e-3)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 9, 11, 10, 3)).astype(np.float32)   # NTHWC
    x_ref = x.astype(np.float64).transpose(0, 4, 1, 2, 3)
    sd = {"u.conv3d.weight": rng.normal(0, 0.1, (5, 3, 7, 7, 7)).astype(np.float32),
          "u.bn.weight": rng.uniform(0.5, 1.5, 5).astype(np.float32),
          "u.bn.bias": rng.normal(size=5).astype(np.float32),
          "u.bn.running_mean": rng.normal(size=5).astype(np.float32),
          "u.bn.running_var": rng.uniform(1e-3, 2e-3, 5).astype(np.float32)}
    p = {"conv3d": {"kernel": conv.conv3d_kernel(sd["u.conv3d.weight"])},
         "bn": {k: sd[f"u.bn.{t}"] for k, t in conv._BN.items()}}
    got = Unit3D(5, (7, 7, 7), (2, 2, 2), bn_eps=1e-3, precision="highest").apply(
        {"params": p}, jnp.asarray(x))
    want = _unit(sd, "u", x_ref, (7, 7, 7), (2, 2, 2), eps=1e-3).transpose(0, 2, 3, 4, 1)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * np.abs(want).max())
    for k, s in (((3, 3, 3), (2, 2, 2)), ((1, 3, 3), (1, 2, 2)), ((2, 2, 2), (2, 2, 2))):
        got = max_pool_same(jnp.asarray(x), k, s)
        want = _maxpool(x_ref, k, s).transpose(0, 2, 3, 4, 1)
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, err_msg=str((k, s)))


@pytest.mark.usefixtures("fast_compile")
def test_i3d_refuses_short_or_small_clips(params):
    model = InceptionI3D(CLASSES, DIV)
    with pytest.raises(ValueError, match="at least 9 frames"):
        model.apply({"params": params}, jnp.zeros((1, 8, 224, 224, 3)))
    with pytest.raises(ValueError, match="224x224"):
        model.apply({"params": params}, jnp.zeros((1, 9, 112, 112, 3)))


# ----------------------------------------------------------------------------- converter
def test_name_table_is_the_pytorch_i3d_layout():
    table = {t: s for t, _, s in conv.i3d_name_table()}
    assert table["Conv3d_1a_7x7.conv3d.weight"] == (64, 3, 7, 7, 7)
    assert table["Conv3d_2c_3x3.conv3d.weight"] == (192, 64, 3, 3, 3)
    assert table["Mixed_4b.b1b.conv3d.weight"] == (208, 96, 3, 3, 3)
    assert table["Mixed_5c.b3b.bn.running_var"] == (128,)
    assert table["logits.conv3d.weight"] == (400, 1024, 1, 1, 1)
    assert table["logits.conv3d.bias"] == (400,)
    # each module's input width (pytorch-i3d's InceptionModule(in_channels, ...)): the concat order
    ins = {"3b": 192, "3c": 256, "4b": 480, "4c": 512, "4d": 512, "4e": 512, "4f": 528,
           "5b": 832, "5c": 832}
    for m, c in ins.items():
        for b in ("b0", "b1a", "b2a", "b3b"):
            assert table[f"Mixed_{m}.{b}.conv3d.weight"][1] == c, (m, b)
    # 3 stem units + 9 inception modules x 6 units, 4 BN tensors each, + logits weight and bias
    assert len(table) == (3 + 9 * 6) * 5 + 2


def test_converter_errors_are_one_line(state_dict, tmp_path, capsys):
    with pytest.raises(ValueError, match="missing tensor 'Mixed_4c.b2b.bn.weight'"):
        conv.convert_i3d_state_dict({k: v for k, v in state_dict.items()
                                     if k != "Mixed_4c.b2b.bn.weight"}, "sd", CLASSES, DIV)
    with pytest.raises(ValueError, match="unexpected tensor 'extra.weight'"):
        conv.convert_i3d_state_dict({**state_dict, "extra.weight": np.zeros(3, np.float32)},
                                    "sd", CLASSES, DIV)
    with pytest.raises(ValueError, match="has shape .4,., expected .64,."):   # narrow vs full net
        conv.convert_i3d_state_dict(state_dict, "sd", channel_div=1)
    bad = str(tmp_path / "inception.npz")
    np.savez(bad, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3), np.float32)})
    assert cli.main(["convert-i3d", "--input", bad, "--output", str(tmp_path / "o.npz")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not an InceptionI3d state dict" in err, err
    assert not (tmp_path / "o.npz").exists()
    with pytest.raises(ValueError, match="not Inception-I3D params: no 'Conv3d_1a_7x7/conv3d/kernel'"):
        load_i3d_params(bad)   # an unconverted / foreign file given as eval.fvd_weights


# ----------------------------------------------------------------------------- Fréchet part
def test_fvd_frechet_part_is_the_image_fid():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(0.3, 1.2, size=(50, 6))
    want = fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fvd_from_features(a, b) == pytest.approx(want, rel=1e-8, abs=1e-9)
    assert fvd_from_features(a, a) == pytest.approx(0.0, abs=1e-8)


def test_fvd_of_identical_sets_is_zero(clips_and_features):
    """On the I3D logits of the FVD path: identical sets ~ 0; a shift of every logit by 1 adds
    exactly ``||1||^2 = classes`` (same covariances)."""
    logits = clips_and_features[1]["logits"].astype(np.float64)
    assert fvd_from_features(logits, logits) == pytest.approx(0.0, abs=1e-6)
    assert fvd_from_features(logits, logits + 1.0) == pytest.approx(CLASSES, rel=1e-6)


def test_fvd_eval_from_config():
    import ml_collections
    cfg = ml_collections.ConfigDict({"eval": {"fvd_weights": ""}})
    assert FVDEval.from_config(cfg, None) is None
    assert FVDEval.from_config(ml_collections.ConfigDict({}), None) is None
    cfg = ml_collections.ConfigDict({"eval": {"fvd_weights": "x.npz", "fvd_features": "probs"}})
    with pytest.raises(ValueError, match="fvd_features"):
        FVDEval.from_config(cfg, None)


def test_rfvd_in_video_evaluation(state_dict, tmp_path_factory):
    """``eval.fvd_weights`` in the video branch of the reconstruction pass (9-frame 16 px clips of
    ``sample_video``; a stand-in "tokenizer" that dims the clips): ``rfvd`` is the Fréchet distance
    of the I3D logits of the originals and reconstructions, computed directly."""
    from train_helpers import load_config_module

    from titok_jax.tasks.eval_reconstruction import clip_scores, reconstruction_metrics
    from titok_jax.train import sharding as sharding_lib

    path = weights_file(state_dict, tmp_path_factory)
    assert i3d_variant(load_i3d_params(path)) == (CLASSES, DIV)
    config = load_config_module("magvit2_video").get_config("tiny")
    assert config.eval.fvd_weights == ""   # off unless named
    with config.unlocked():
        config.data.update(image_size=16, num_frames=9, eval_batch_size=2)
        config.eval.fvd_weights = path
    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])

    @jax.jit
    def dim(params, state, clips):
        rec = 0.1 + 0.8 * clips
        return (rec, None, *clip_scores(rec, clips))

    metrics, originals, recs = reconstruction_metrics(dim, None, None, config, mesh, 0, max_images=2)
    assert metrics["num_images"] == 2 and originals.shape == (2, 9, 16, 16, 3)
    # placed as the pass places them, so the compiled feature function is reused
    from jax.sharding import NamedSharding, PartitionSpec
    from titok_jax import data as data_lib
    feats = i3d_feature_fn(num_classes=CLASSES, channel_div=DIV)
    p = jax.device_put(load_i3d_params(path), NamedSharding(mesh, PartitionSpec()))
    real, fake = (np.asarray(feats(p, data_lib.to_global_array({"image": x}, mesh)["image"])["logits"])
                  for x in (originals, recs))
    assert metrics["rfvd"] == pytest.approx(fvd_from_features(real, fake), rel=1e-4, abs=1e-6)
    assert metrics["rfvd"] > 0
