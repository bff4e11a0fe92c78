"""ConvNeXt (torchvision architecture) and TiTok's ConvNeXt-S perceptual term: a reduced-depth network
with seeded random weights against torchvision + the official TiTok PerceptualLoss (stored vectors),
the full ConvNeXt-S size, the converter, frozen params, and the tokenizer-task wiring."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from titok_jax import cli
from titok_jax.convert import convnext as conv
from titok_jax.losses import convnext_logits, convnext_loss, load_convnext_params
from titok_jax.nets.convnext import CONVNEXT_SMALL, convnext_abstract_params

DATA = os.path.join(os.path.dirname(__file__), "data", "convnext")


def _vectors_module():
    spec = importlib.util.spec_from_file_location("convnext_make_vectors",
                                                  os.path.join(DATA, "make_vectors.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MV = _vectors_module()
ARCH = dict(depths=MV.DEPTHS, dims=MV.DIMS, num_classes=MV.NUM_CLASSES)


@pytest.fixture(scope="module")
def torch_sd():
    return MV.random_state_dict(conv.convnext_name_table(**ARCH))


@pytest.fixture(scope="module")
def weights_file(torch_sd, tmp_path_factory):
    d = tmp_path_factory.mktemp("convnext")
    src, out = str(d / "small_torch.safetensors"), str(d / "convnext_small_test.safetensors")
    save_file(dict(torch_sd), src)
    assert cli.main(["convert-convnext", "--input", src, "--output", out]) == 0    # size read from the file
    return out


def test_convert_command_errors_are_one_line(torch_sd, tmp_path, capsys):
    bad = str(tmp_path / "bad.safetensors")
    save_file({k: v for k, v in torch_sd.items() if k != "features.0.0.weight"}, bad)
    out = tmp_path / "out.safetensors"
    assert cli.main(["convert-convnext", "--input", bad, "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "features.0.0.weight" in err and not out.exists()
    assert cli.main(["convert-convnext", "--input", bad, "--output", str(tmp_path / "x.pt")]) == 1
    assert ".safetensors or .npz" in capsys.readouterr().err
    assert cli.main(["convert-convnext", "--output", str(out)]) == 2
    assert "--input" in capsys.readouterr().err


def test_converter_reads_a_torch_pickle(torch_sd, weights_file, tmp_path):
    torch = pytest.importorskip("torch")
    src, out = str(tmp_path / "small.pth"), str(tmp_path / "small.npz")
    torch.save({k: torch.from_numpy(v) for k, v in torch_sd.items()}, src)
    assert cli.main(["convert-convnext", "--input", src, "--output", out]) == 0
    a, b = load_convnext_params(out), load_convnext_params(weights_file)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _images(v, name):
    return jnp.asarray(v[name], jnp.float32) / 255.0


def test_matches_torchvision_and_official_perceptual_loss(weights_file):
    params = load_convnext_params(weights_file)          # architecture read from the file's keys
    v = np.load(os.path.join(DATA, "convnext_vectors.npz"))

    @jax.jit
    def f(params, x, y):
        return (convnext_logits(params, x), convnext_loss(params, x, y),
                convnext_logits(params, 2 * x - 1, input_range=(-1, 1)))

    for size in ("small", "large"):      # 40x40 -> 224 (upsampling), 256 -> 224 (antialiased)
        x, y = _images(v, f"x_{size}"), _images(v, f"y_{size}")
        ref = v[f"logits_{size}"]
        got, loss, got_pm1 = (np.asarray(a) for a in f(params, x, y))
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4, size
        assert float(loss) == pytest.approx(float(v[f"loss_{size}"]), rel=1e-4), size
        np.testing.assert_allclose(got_pm1, got, atol=1e-4)   # [-1, 1] inputs with input_range


def test_convnext_small_size_and_name_table():
    abstract = convnext_abstract_params()                 # ConvNeXt-S by default
    assert sum(x.size for x in jax.tree.leaves(abstract)) == 50_223_688
    table = conv.convnext_name_table()
    assert sum(int(np.prod(s)) for _, _, s, _ in table) == 50_223_688
    assert len(table) == len(jax.tree.leaves(abstract))
    keys = {t for t, _, _, _ in table}
    assert "features.5.26.block.5.weight" in keys and "features.5.27.layer_scale" not in keys
    assert CONVNEXT_SMALL["depths"] == (3, 3, 27, 3)


def test_converter_layouts_and_errors(torch_sd):
    flat = conv.convert_convnext_state_dict(torch_sd, **ARCH)
    w = torch_sd["features.3.0.block.0.weight"]                          # depthwise [d, 1, 7, 7]
    np.testing.assert_array_equal(flat["stage1_block0/dwconv/kernel"], w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat["stage2_block1/gamma"],
                                  torch_sd["features.5.1.layer_scale"].reshape(-1))
    np.testing.assert_array_equal(flat["down1_conv/kernel"],
                                  torch_sd["features.4.1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat["head_fc/kernel"], torch_sd["classifier.2.weight"].T)
    with pytest.raises(ValueError, match="features.7.0.block.2.bias"):
        conv.convert_convnext_state_dict(
            {k: v for k, v in torch_sd.items() if k != "features.7.0.block.2.bias"}, **ARCH)
    with pytest.raises(ValueError, match="features.5.2.layer_scale"):   # a block too many
        conv.convert_convnext_state_dict({**torch_sd, "features.5.2.layer_scale": np.ones((24, 1, 1))},
                                         **ARCH)
    with pytest.raises(ValueError, match="features.0.0.weight.*shape"):  # not ConvNeXt-S
        conv.convert_convnext_state_dict(torch_sd)
    assert conv.torchvision_arch(torch_sd) == ARCH | {"depths": MV.DEPTHS, "dims": MV.DIMS}
    with pytest.raises(ValueError, match="not a torchvision ConvNeXt"):
        conv.torchvision_arch({"features.0.0.weight": np.zeros((1,))})


def test_params_are_frozen_and_images_get_gradient(weights_file):
    params = load_convnext_params(weights_file)
    v = np.load(os.path.join(DATA, "convnext_vectors.npz"))
    x, y = _images(v, "x_small"), _images(v, "y_small")
    gp, gx = jax.jit(jax.grad(convnext_loss, argnums=(0, 1)))(params, x, y)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(gp))
    assert np.isfinite(np.asarray(gx)).all() and float(jnp.abs(gx).max()) > 0
    assert float(jax.jit(convnext_loss)(params, x, x)) == 0.0


def test_tokenizer_task_adds_the_weighted_convnext_term(weights_file):
    from train_helpers import micro_config

    from titok_jax.tasks import get_task
    from titok_jax.tasks.tokenizer import MODEL_COLLECTIONS, QUANTIZER_RNG, SAMPLE_RNG

    with pytest.raises(ValueError, match="convnext_weights"):
        get_task(micro_config(**{"losses.convnext_weight": 0.5})).constants()
    images = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3)), jnp.float32)
    config = micro_config(**{"losses.convnext_weight": 0.5, "losses.convnext_weights": weights_file})
    task = get_task(config)
    constants = task.constants()
    params, state = task.init(jax.random.key(0))
    key = jax.random.key(1)

    def run(params, state, constants):
        _, (_, metrics) = task.loss(params, state, {"image": images}, key, jnp.asarray(0), constants)
        # the same forward pass as inside the loss (same rngs), then the term computed independently
        k_sample, k_quant = jax.random.split(key)
        rec, _ = task.model.apply({"params": params["model"], **state["model"]}, images, train=True,
                                  rngs={SAMPLE_RNG: k_sample, QUANTIZER_RNG: k_quant},
                                  mutable=list(MODEL_COLLECTIONS))[0]
        return metrics, convnext_loss(constants["convnext"], rec.astype(jnp.float32), images)

    metrics, expect = jax.jit(run)(params, state, constants)
    term = float(metrics["perceptual_convnext"])
    assert term > 0 and term == pytest.approx(float(expect), rel=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
