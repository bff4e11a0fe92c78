"""`titok-jax convert-dinov2` (official DINOv2 -> FlexTok's REPA teacher, ``nets.dinov2.ViTFeatures``)
against vectors made with the OFFICIAL PyTorch code (tests/data/dinov2/make_vectors.py: tiny
``DinoVisionTransformer``s with LayerScale, without and with 4 registers, every norm / bias /
gamma off its default, state dicts in the release key names).

Our normalised patch tokens, class token and registers equal the official ``forward_features`` to
float32 round-off (measured max |diff| 2.6e-6 for features of scale ~3.5), at the stored position
grid, upsampled (2 -> 3) and downsampled (4 -> 2, 4 -> 3) by the official bicubic
``interpolate_pos_encoding``. Bad inputs give one line and never overwrite a file. Needs no torch
(the .pth and ``F.interpolate`` checks run only where torch is installed)."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from titok_jax import cli
from titok_jax.convert.dinov2 import convert_dinov2_state_dict, dinov2_arch
from titok_jax.nets.dinov2 import ViTFeatures, bicubic_matrix
from titok_jax.nets.files import load_frozen_params
from titok_jax.tasks.flextok import load_repa_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "dinov2")
CASES = {"ls": 0, "reg4": 4}
ATOL = 2e-5   # measured: 2.6e-6 (patch tokens), 1.3e-6 (cls), 1.7e-6 (registers); scale ~3.5


def vectors(case):
    with np.load(os.path.join(DATA, case, "vectors.npz")) as v:
        return {k: v[k] for k in v.files}


def model_file(case):
    return os.path.join(DATA, case, "model.safetensors")


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[:2000]
    return err


def convert(tmp_path, case, src=None):
    out = str(tmp_path / f"{case}.safetensors")
    assert cli.main(["convert-dinov2", "--input", src or model_file(case), "--output", out,
                     "--num_heads", "4"]) == 0
    return out


def features(weights, size, registers, pos_grid):
    """Our features of the converted file through the REPA-teacher loader (identity mean/std:
    the official model takes normalised images)."""
    cfg = {"weights": weights, "model": dict(
        image_size=size, patch_size=14, width=48, depth=2, num_heads=4, layerscale=True,
        num_registers=registers, pos_grid=pos_grid, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))}
    teacher, params = load_repa_teacher(cfg)
    return teacher, params


@pytest.mark.parametrize("case", CASES)
def test_features_match_official(tmp_path, case, capsys):
    weights = convert(tmp_path, case)
    assert "num_registers=%d" % CASES[case] in capsys.readouterr().out
    v = vectors(case)
    pos_grid = {"ls": 2, "reg4": 4}[case]
    for s in (28, 42):
        teacher, params = features(weights, s, CASES[case], pos_grid)
        x = jnp.asarray(v[f"x{s}"].transpose(0, 2, 3, 1))
        out = teacher.apply({"params": params}, x, all_tokens=True)
        np.testing.assert_allclose(out["patch"], v[f"patch{s}"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(out["cls"], v[f"cls{s}"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(out["registers"], v[f"reg{s}"], atol=ATOL, rtol=0)
        np.testing.assert_array_equal(teacher.apply({"params": params}, x), out["patch"])


def test_arch_read_from_tensors():
    sd = load_file(model_file("reg4"))
    assert dinov2_arch(sd, num_heads=4) == dict(patch_size=14, width=48, depth=2, num_heads=4,
                                                layerscale=True, num_registers=4, pos_grid=4)
    # the released widths split into heads of 64 by default
    assert dinov2_arch({**sd, "patch_embed.proj.weight": np.zeros((384, 3, 14, 14))})["num_heads"] == 6


def test_chunked_block_keys_accepted():
    sd = load_file(model_file("ls"))
    chunked = {k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v
               for k, v in sd.items()}
    a, _ = convert_dinov2_state_dict(sd, num_heads=4)
    b, _ = convert_dinov2_state_dict(chunked, num_heads=4)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("edit, words", [
    (lambda sd: sd.pop("blocks.1.ls2.gamma"), "missing tensor 'blocks.1.ls2.gamma'"),
    (lambda sd: sd.update({"head.weight": np.zeros((3, 48), np.float32)}), "unexpected tensor 'head.weight'"),
    (lambda sd: sd.update({"blocks.0.attn.proj.bias": np.zeros((47,), np.float32)}),
     "tensor 'blocks.0.attn.proj.bias' has shape (47,), expected (48,)"),
    (lambda sd: sd.pop("mask_token"), "missing tensor 'mask_token'"),
    (lambda sd: sd.pop("pos_embed"), "not a DINOv2 state dict (no 'pos_embed')"),
])
def test_bad_state_dicts_one_line(tmp_path, capsys, edit, words):
    sd = load_file(model_file("ls"))
    edit(sd)
    src = str(tmp_path / "bad.safetensors")
    save_file(sd, src)
    out = str(tmp_path / "out.safetensors")
    assert cli.main(["convert-dinov2", "--input", src, "--output", out, "--num_heads", "4"]) != 0
    assert words in one_line_error(capsys)
    assert not os.path.exists(out)


def test_usage_errors_and_no_overwrite(tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep")
    assert cli.main(["convert-dinov2", "--input", model_file("ls"), "--output", str(out),
                     "--num_heads", "4"]) != 0
    assert "not overwriting" in one_line_error(capsys) and out.read_bytes() == b"keep"
    assert cli.main(["convert-dinov2", "--input", model_file("ls")]) != 0
    assert "--output" in one_line_error(capsys)
    assert cli.main(["convert-dinov2", "--input", model_file("ls"), "--output",
                     str(tmp_path / "x.bin")]) != 0
    assert ".safetensors or .npz" in one_line_error(capsys)
    assert cli.main(["convert-dinov2", "--input", model_file("ls"), "--output",
                     str(tmp_path / "y.safetensors"), "--num_heads", "5"]) != 0
    assert "does not split into 5 heads" in one_line_error(capsys)
    # the tiny width 48 is not released-sized: without --num_heads the default (64) cannot split it
    assert cli.main(["convert-dinov2", "--input", model_file("ls"), "--output",
                     str(tmp_path / "z.safetensors")]) != 0
    assert "pass num_heads" in one_line_error(capsys)


def test_teacher_shape_mismatch_names_param(tmp_path):
    weights = convert(tmp_path, "reg4")
    teacher = ViTFeatures(image_size=28, patch_size=14, width=48, depth=2, num_heads=4,
                          layerscale=True, num_registers=4, pos_grid=0)
    import jax
    from flax import linen as nn
    abstract = nn.unbox(jax.eval_shape(teacher.init, jax.random.key(0), jnp.zeros((1, 28, 28, 3))))
    with pytest.raises(ValueError, match="pos_embed"):
        load_frozen_params(weights, abstract["params"], "REPA teacher", "hint")


def test_pth_release_format(tmp_path):
    torch = pytest.importorskip("torch")
    src = str(tmp_path / "dinov2_tiny_reg4_pretrain.pth")
    torch.save({k: torch.from_numpy(v) for k, v in load_file(model_file("reg4")).items()}, src)
    (tmp_path / "pth").mkdir()
    a = load_file(convert(tmp_path / "pth", "reg4", src))
    b = load_file(convert(tmp_path, "reg4"))
    assert a.keys() == b.keys() and "register_tokens" in a and "mask_token" not in a
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("out_size, in_size", [(16, 37), (37, 37), (3, 2), (2, 4), (3, 4), (40, 37)])
def test_bicubic_matrix_is_torch_interpolate(out_size, in_size):
    torch = pytest.importorskip("torch")
    x = torch.randn(1, 5, in_size, in_size, dtype=torch.float64)
    scale = (out_size + 0.1) / in_size
    ref = torch.nn.functional.interpolate(x, scale_factor=(scale, scale), mode="bicubic",
                                          antialias=False).numpy()
    m = bicubic_matrix(out_size, in_size)
    ours = np.einsum("hm,wn,bcmn->bchw", m, m, x.numpy())
    assert ref.shape == ours.shape
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)
