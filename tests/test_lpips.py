"""VGG16 + LPIPS: torchvision/LPIPS-format random weights -> converter -> loader -> forward,
checked against an independent float64 numpy LPIPS; converter/loader errors; frozen params."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from titok_jax import cli
from titok_jax.convert import lpips as conv
from titok_jax.losses import perceptual
from titok_jax.losses.perceptual import LPIPS, load_lpips_params, lpips_distance, lpips_param_shapes
from titok_jax.trees import flatten

# torchvision vgg16 `features` indices holding a conv, with (C_in, C_out) - written out by hand
# so the test does not reuse the model's table.
TV_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
            (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
            (26, 512, 512), (28, 512, 512)]
TAP_AFTER = {2, 7, 14, 21, 28}          # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
POOL_BEFORE = {5, 10, 17, 24}
LIN_CHANNELS = [64, 128, 256, 512, 512]


def _torch_format_weights(seed=0):
    rng = np.random.default_rng(seed)
    vgg = {}
    for idx, c_in, c_out in TV_CONVS:
        vgg[f"features.{idx}.weight"] = (rng.standard_normal((c_out, c_in, 3, 3))
                                         * np.sqrt(2.0 / (9 * c_in))).astype(np.float32)
        vgg[f"features.{idx}.bias"] = (0.05 * rng.standard_normal(c_out)).astype(np.float32)
    # torchvision files also hold the fully-connected head; the last bias stands in for it here.
    vgg["classifier.6.bias"] = rng.standard_normal(1000).astype(np.float32)
    lin = {f"lin{k}.model.1.weight": np.abs(rng.standard_normal((1, c, 1, 1))).astype(np.float32)
           / c for k, c in enumerate(LIN_CHANNELS)}
    return vgg, lin


def _np_conv3x3(h, w, b):
    """h [B,H,W,Ci] float64, w [Co,Ci,3,3] (PyTorch layout, cross-correlation), padding 1."""
    n, hh, ww, _ = h.shape
    hp = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, hh, ww, w.shape[0]))
    for i in range(3):
        for j in range(3):
            out += hp[:, i:i + hh, j:j + ww, :] @ w[:, :, i, j].T.astype(np.float64)
    return out + b.astype(np.float64)


def _np_feats(vgg, img):
    """Float64 VGG16 taps of NHWC images in [0, 1] (LPIPS shift / scale applied first)."""
    shift = np.array([-0.030, -0.088, -0.188])
    scale = np.array([0.458, 0.448, 0.450])
    h = ((2.0 * img.astype(np.float64) - 1.0) - shift) / scale
    taps = []
    for idx, _, _ in TV_CONVS:
        if idx in POOL_BEFORE:
            n, hh, ww, c = h.shape
            h = h[:, :hh // 2 * 2, :ww // 2 * 2].reshape(n, hh // 2, 2, ww // 2, 2, c)
            h = h.max(axis=(2, 4))
        w, b = vgg[f"features.{idx}.weight"], vgg[f"features.{idx}.bias"]
        h = np.maximum(_np_conv3x3(h, w, b), 0)
        if idx in TAP_AFTER:
            taps.append(h)
    return taps


def _np_lpips(vgg, lin, x, y):
    """Float64 LPIPS from the torch-layout weights; ``y`` is images or their ``_np_feats``."""
    feats_y = y if isinstance(y, list) else _np_feats(vgg, y)
    total = np.zeros(x.shape[0])
    for k, (fx, fy) in enumerate(zip(_np_feats(vgg, x), feats_y)):
        nx = fx / (np.sqrt(np.sum(fx ** 2, axis=-1, keepdims=True)) + 1e-10)
        ny = fy / (np.sqrt(np.sum(fy ** 2, axis=-1, keepdims=True)) + 1e-10)
        w = lin[f"lin{k}.model.1.weight"][0, :, 0, 0].astype(np.float64)
        total += np.mean((nx - ny) ** 2 @ w, axis=(1, 2))
    return total


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    vgg, lin = _torch_format_weights()
    save_file(vgg, str(d / "vgg16.safetensors"))
    save_file(lin, str(d / "vgg_lin.safetensors"))
    out = str(d / "lpips_vgg.safetensors")
    assert cli.main(["convert-lpips", "--vgg", str(d / "vgg16.safetensors"),
                     "--lin", str(d / "vgg_lin.safetensors"), "--output", out]) == 0
    rng = np.random.default_rng(1)
    x = rng.random((2, 24, 24, 3)).astype(np.float32)   # 24 -> 12 -> 6 -> 3 -> 1: odd pool floors
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    return dict(dir=d, vgg=vgg, lin=lin, path=out, params=load_lpips_params(out), x=x, y=y)


_dist = jax.jit(lpips_distance, static_argnames=("input_range",))


def test_converted_lpips_matches_numpy_float64(setup):
    got = np.asarray(_dist(setup["params"], setup["x"], setup["y"]))
    want = _np_lpips(setup["vgg"], setup["lin"], setup["x"], setup["y"])
    assert got.shape == (2,)
    assert np.all(want > 1e-3)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_identity_zero_and_symmetric(setup):
    p, x, y = setup["params"], setup["x"], setup["y"]
    # zero up to float32 rounding (XLA may contract a*b - c*d into an FMA: ~1e-17, not bit-exact 0)
    d_xx = np.asarray(_dist(p, x, x))
    assert np.abs(d_xx).max() < 1e-12 * np.abs(np.asarray(_dist(p, x, y))).min()
    np.testing.assert_allclose(np.asarray(_dist(p, y, x)), np.asarray(_dist(p, x, y)), rtol=1e-6)


def test_minus_one_one_input_range(setup):
    p, x, y = setup["params"], setup["x"], setup["y"]
    got = _dist(p, 2 * x - 1, 2 * y - 1, input_range=(-1.0, 1.0))
    np.testing.assert_allclose(np.asarray(got), np.asarray(_dist(p, x, y)), rtol=1e-5)


def test_params_frozen_and_input_gradient_correct(setup):
    p, x, y = setup["params"], setup["x"][:1], setup["y"][:1]
    grad_fn = jax.jit(jax.grad(lambda p, x: jnp.sum(lpips_distance(p, x, y)), argnums=(0, 1)))
    gp, gx = grad_fn(p, x)
    assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(gp))
    gx = np.asarray(gx)
    assert np.all(np.isfinite(gx)) and np.abs(gx).max() > 0
    # directional derivative against central differences of the float64 reference (small h: the
    # ReLU kinks make larger steps inaccurate; 1% still catches any wrong factor or missing term)
    v = np.random.default_rng(2).standard_normal(x.shape)
    h = 1e-6
    fy = _np_feats(setup["vgg"], y)
    ref = lambda x: _np_lpips(setup["vgg"], setup["lin"], x, fy).sum()  # noqa: E731
    fd = (ref(x + h * v) - ref(x - h * v)) / (2 * h)
    np.testing.assert_allclose(np.sum(gx * v), fd, rtol=1e-2)


def test_unit_normalize_zero_vector_has_finite_gradient():
    f = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([3.0, 0.0, 4.0, 0.0]))
    out = perceptual._unit_normalize(f)
    np.testing.assert_allclose(np.asarray(out[0, 0, 0]), [0.6, 0.0, 0.8, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out[0, 1]), 0.0)
    g = jax.grad(lambda f: jnp.sum(perceptual._unit_normalize(f) * jnp.arange(4.0)))(f)
    assert np.all(np.isfinite(np.asarray(g)))


def test_module_param_tree_matches_file_format():
    shapes = jax.eval_shape(LPIPS().init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                            jnp.zeros((1, 16, 16, 3)))["params"]
    flat = {k: tuple(v.shape) for k, v in flatten(shapes).items()}
    assert flat == lpips_param_shapes()
    assert len(flat) == 13 * 2 + 5
    assert sum(int(np.prod(s)) for s in flat.values()) == 14_714_688 + 1472


def test_npz_roundtrip_and_full_lpips_state_dict(setup, tmp_path):
    # npz in and out
    np.savez(tmp_path / "vgg.npz", **setup["vgg"])
    np.savez(tmp_path / "lin.npz", **setup["lin"])
    conv.convert_lpips_files(tmp_path / "vgg.npz", tmp_path / "lin.npz", tmp_path / "out.npz")
    a = flatten(load_lpips_params(tmp_path / "out.npz"))
    b = flatten(setup["params"])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # one `lpips.LPIPS` state dict: net.slice{n}.{i}.* + lin* + scaling buffers
    slices = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
    full = {f"net.slice{slices[int(k.split('.')[1])]}.{k.split('.', 1)[1]}": v
            for k, v in setup["vgg"].items() if k.startswith("features.")}
    full.update(setup["lin"])
    full["scaling_layer.shift"] = np.array([-.030, -.088, -.188], np.float32).reshape(1, 3, 1, 1)
    full["scaling_layer.scale"] = np.array([.458, .448, .450], np.float32).reshape(1, 3, 1, 1)
    out = conv.convert_lpips_state_dicts(full, full)
    assert all(np.array_equal(out[k], b[k]) for k in b)
    full["scaling_layer.scale"] = np.ones((1, 3, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"scaling_layer\.scale"):
        conv.convert_lpips_state_dicts(full, full)


def test_converter_errors_name_the_key(setup, capsys):
    vgg, lin = setup["vgg"], setup["lin"]
    bad = dict(vgg)
    del bad["features.28.bias"]
    with pytest.raises(ValueError, match=r"missing key 'features\.28\.bias'"):
        conv.convert_lpips_state_dicts(bad, lin)
    bad = dict(vgg, **{"features.12.weight": np.zeros((256, 128, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"'features\.12\.weight' has shape \(256, 128, 3, 3\)"):
        conv.convert_lpips_state_dicts(bad, lin)
    bad = dict(lin)
    bad["lin3.model.1.weight"] = np.zeros((1, 256, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"lin3\.model\.1\.weight"):
        conv.convert_lpips_state_dicts(vgg, bad)
    with pytest.raises(ValueError, match=r"unexpected key 'features\.30\.weight'"):
        conv.convert_lpips_state_dicts(dict(vgg, **{"features.30.weight": np.zeros(1)}), lin)
    with pytest.raises(ValueError, match=r"unexpected key 'lin5\.model\.1\.weight'"):
        conv.convert_lpips_state_dicts(vgg, dict(lin, **{"lin5.model.1.weight": np.zeros(1)}))
    # the CLI prints one error line and returns non-zero
    d = setup["dir"]
    bad = dict(lin)
    del bad["lin0.model.1.weight"]
    save_file(bad, str(d / "bad_lin.safetensors"))
    capsys.readouterr()
    rc = cli.main(["convert-lpips", "--vgg", str(d / "vgg16.safetensors"), "--lin",
                   str(d / "bad_lin.safetensors"), "--output", str(d / "never.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "lin0.model.1.weight" in err and not os.path.exists(d / "never.safetensors")
    assert len(err.splitlines()) == 1 and err.startswith("titok-jax: error:")
    # a missing flag is a usage error (exit 2) naming it
    assert cli.main(["convert-lpips", "--vgg", str(d / "vgg16.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lin --output" in err


def test_loader_errors_name_the_key(setup, tmp_path):
    flat = {k: np.asarray(v) for k, v in flatten(setup["params"]).items()}
    bad = dict(flat)
    del bad["lin2/kernel"]
    save_file(bad, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match=r"missing LPIPS param 'lin2/kernel'"):
        load_lpips_params(tmp_path / "a.safetensors")
    bad = dict(flat, **{"vgg/conv3_1/kernel": np.zeros((3, 3, 256, 128), np.float32)})
    np.savez(tmp_path / "b.npz", **bad)
    with pytest.raises(ValueError, match=r"'vgg/conv3_1/kernel' has shape \(3, 3, 256, 128\)"):
        load_lpips_params(tmp_path / "b.npz")
    with pytest.raises(FileNotFoundError):
        load_lpips_params(tmp_path / "missing.safetensors")


def test_torch_pth_input_matches_safetensors(setup, tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(v) for k, v in setup["vgg"].items()}, tmp_path / "vgg16.pth")
    torch.save({k: torch.from_numpy(v) for k, v in setup["lin"].items()}, tmp_path / "vgg.pth")
    out = conv.convert_lpips_files(tmp_path / "vgg16.pth", tmp_path / "vgg.pth",
                                   tmp_path / "lpips.safetensors")
    ref = flatten(setup["params"])
    assert all(np.array_equal(out[k], np.asarray(ref[k])) for k in ref)
    # PyTorch's own conv / max-pool (NCHW, float64) as a second reference for the layouts
    F = torch.nn.functional
    sd = {k: torch.from_numpy(v).double() for k, v in {**setup["vgg"], **setup["lin"]}.items()}

    def feats(img):
        h = torch.from_numpy(img).double().permute(0, 3, 1, 2) * 2 - 1
        h = (h - torch.tensor([-.030, -.088, -.188]).double().view(1, 3, 1, 1)) \
            / torch.tensor([.458, .448, .450]).double().view(1, 3, 1, 1)
        taps = []
        for idx, _, _ in TV_CONVS:
            if idx in POOL_BEFORE:
                h = F.max_pool2d(h, 2, 2)
            w, b = sd[f"features.{idx}.weight"], sd[f"features.{idx}.bias"]
            h = F.relu(F.conv2d(h, w, b, padding=1))
            if idx in TAP_AFTER:
                taps.append(h)
        return taps

    want = 0
    for k, (fx, fy) in enumerate(zip(feats(setup["x"]), feats(setup["y"]))):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        want = want + F.conv2d((nx - ny) ** 2, sd[f"lin{k}.model.1.weight"]).mean(dim=(1, 2, 3))
    params = load_lpips_params(tmp_path / "lpips.safetensors")
    got = np.asarray(_dist(params, setup["x"], setup["y"]))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4)


def test_small_image_rejected(setup):
    with pytest.raises(ValueError, match="at least 16x16"):
        lpips_distance(setup["params"], jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))
