"""`titok-jax convert-clip` and ``nets.clip.CLIPVisionTower`` (FQGAN's CLIP teachers, issue 17)
against vectors made with Hugging Face transformers' ``CLIPVisionModel`` (tests/data/clip/
make_clip_vectors.py: a tiny random tower, every LayerNorm and bias off its default; the same
tensors in the HF layout (float32) and, renamed by that script, in OpenAI's ``visual.*`` layout
(float16)).

Our class token before ``ln_post`` (FQGAN's target), ``ln_post`` of it (HF ``pooler_output``) and
the patch tokens equal the HF model's to float32 round-off from both layouts (measured max |diff|
1.4e-6 for the class token, 1.0e-6 pooled, 1.9e-6 patch tokens; features of scale ~3-5), also
through a 22 -> 16 px PyTorch legacy-``nearest`` resize (FQGAN's teacher input). A float64 numpy
tower written from the maths agrees with both. Bad inputs give one line. The FQGAN task trains a
step with an ``"arch": "clip"`` teacher. Needs neither transformers nor torch (the stored vectors
are the reference; the .pt checks run only where torch is installed)."""
from __future__ import annotations

import json
import os
import sys
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from titok_jax import cli
from titok_jax.convert.clip import clip_arch, clip_layout, convert_clip_state_dict
from titok_jax.nets.clip import CLIP_MEAN, CLIP_STD, CLIP_VARIANTS, CLIPVisionTower
from titok_jax.nets.dinov2 import torch_nearest_indices
from titok_jax.tasks.flextok import build_teacher, load_repa_teacher

from train_helpers import load_config_module, one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "clip")
HF = os.path.join(DATA, "hf_tiny.safetensors")
OPENAI = os.path.join(DATA, "openai_tiny.safetensors")
ATOL = 1e-5   # measured: 1.4e-6 (cls), 1.0e-6 (pooled), 1.9e-6 (patch); scale ~3-5
TINY = dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=4)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """Every test here runs with XLA's heavy optimisation passes off (conftest ``fast_compile``)."""


@pytest.fixture(scope="module")
def vectors():
    return load_file(os.path.join(DATA, "vectors.safetensors"))


def images(v, size):
    return jnp.asarray(v[f"x{size}"].astype(np.float32) / 255)


def clip_model_layout(tmp_path):
    """The HF tensors as a ``CLIPModel`` file has them: ``vision_model.`` prefix, a text tower,
    both projections, ``logit_scale`` and a ``position_ids`` buffer (all dropped)."""
    sd = {f"vision_model.{k}": v for k, v in load_file(HF).items()}
    sd.update({"text_model.embeddings.token_embedding.weight": np.ones((5, 8), np.float32),
               "text_model.final_layer_norm.weight": np.ones(8, np.float32),
               "text_projection.weight": np.ones((4, 8), np.float32),
               "visual_projection.weight": np.ones((4, 32), np.float32),
               "logit_scale": np.asarray(2.0, np.float32),
               "vision_model.embeddings.position_ids": np.arange(17, dtype=np.int64)[None]})
    path = str(tmp_path / "clip_model.safetensors")
    save_file(sd, path)
    return path


def convert(tmp_path, src, *extra):
    out = str(tmp_path / "clip.safetensors")
    assert cli.main(["convert-clip", "--input", src, "--output", out, *extra]) == 0
    return out


def teacher(weights, resize="nearest"):
    return load_repa_teacher({"arch": "clip", "weights": weights,
                              "model": dict(TINY, mean=CLIP_MEAN, std=CLIP_STD, resize=resize)},
                             "teachers.sem")


def check_outputs(module, params, v):
    for size in (16, 22):
        out = module.apply({"params": params}, images(v, size), all_tokens=True)
        np.testing.assert_allclose(out["cls"], v[f"cls{size}"], atol=ATOL, rtol=0)
        np.testing.assert_allclose(out["pooled"], v[f"pooled{size}"], atol=ATOL, rtol=0)
        if size == 16:
            np.testing.assert_allclose(out["patch"], v["patch16"], atol=ATOL, rtol=0)
            np.testing.assert_array_equal(module.apply({"params": params}, images(v, 16)),
                                          out["patch"])
        assert out["registers"].shape == (2, 0, 32)


@pytest.mark.parametrize("layout", ["hf_vision", "hf_clip_model", "openai"])
def test_features_match_hf(tmp_path, layout, vectors, capsys):
    src = {"hf_vision": HF, "openai": OPENAI}.get(layout) or clip_model_layout(tmp_path)
    weights = convert(tmp_path, src, "--num_heads", "4")
    assert ("image_size=16, patch_size=4, width=32, depth=2, num_heads=4, activation=quick_gelu"
            in capsys.readouterr().out)
    module, params = teacher(weights)
    assert isinstance(module, CLIPVisionTower)
    check_outputs(module, params, vectors)


def test_both_layouts_give_identical_params():
    a, arch_a = convert_clip_state_dict(load_file(HF), "hf", num_heads=4)
    b, arch_b = convert_clip_state_dict(load_file(OPENAI), "openai", num_heads=4)   # float16
    assert arch_a == arch_b == {**TINY, "activation": "quick_gelu"}
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == np.float32
        np.testing.assert_array_equal(a[k], b[k])
    assert clip_layout(load_file(OPENAI)) == ("openai", "visual.")
    assert clip_layout(load_file(HF)) == ("hf", "")


def test_hf_snapshot_directories(tmp_path, vectors):
    """A snapshot: ``config.json`` gives the heads (no --num_heads); one file or safetensors shards."""
    sd = load_file(clip_model_layout(tmp_path))
    config = {"model_type": "clip", "vision_config": {"hidden_size": 32, "num_attention_heads": 4,
                                                      "hidden_act": "quick_gelu"}}
    one = tmp_path / "snap"
    one.mkdir()
    save_file(sd, str(one / "model.safetensors"))
    (one / "config.json").write_text(json.dumps(config))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(sharded / name))
        weight_map.update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_text(json.dumps(config))
    for d in (one, sharded):
        out = str(tmp_path / f"{d.name}.safetensors")
        assert cli.main(["convert-clip", "--input", str(d), "--output", out]) == 0
        check_outputs(*teacher(out), vectors)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torch_files(tmp_path, vectors):
    """A plain ``torch.save`` state dict and a TorchScript archive (the OpenAI release format)."""
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(np.array(v)) for k, v in load_file(OPENAI).items()}
    plain = str(tmp_path / "plain.pt")
    torch.save(sd, plain)

    class Holder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, Holder())
            m = getattr(m, part)
        m.register_buffer(leaf, value)
    scripted = str(tmp_path / "ViT-tiny.pt")
    torch.jit.save(torch.jit.script(root), scripted)
    for src in (plain, scripted):
        out = str(tmp_path / f"{os.path.basename(src)}.safetensors")
        assert cli.main(["convert-clip", "--input", src, "--output", out, "--num_heads", "4"]) == 0
        check_outputs(*teacher(out), vectors)


def _numpy_tower(sd, x):
    """CLIP's visual tower in float64 from the OpenAI-layout tensors, written from the maths."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    g = lambda k: sd["visual." + k]   # noqa: E731

    def ln(h, name):
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + 1e-5) * g(name + ".weight") + g(name + ".bias")

    x = (np.asarray(x, np.float64) - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    b, s, p, w, heads = x.shape[0], 16, 4, 32, 4
    patches = x.reshape(b, s // p, p, s // p, p, 3).transpose(0, 1, 3, 5, 2, 4).reshape(b, -1, 3 * p * p)
    h = patches @ g("conv1.weight").reshape(w, -1).T
    h = np.concatenate([np.broadcast_to(g("class_embedding"), (b, 1, w)), h], 1)
    h = ln(h + g("positional_embedding"), "ln_pre")
    for i in range(2):
        r = f"transformer.resblocks.{i}."
        y = ln(h, r + "ln_1") @ g(r + "attn.in_proj_weight").T + g(r + "attn.in_proj_bias")
        q, k, v = (t.reshape(b, -1, heads, w // heads).transpose(0, 2, 1, 3) for t in np.split(y, 3, -1))
        a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(w // heads)
        a = np.exp(a - a.max(-1, keepdims=True))
        a = (a / a.sum(-1, keepdims=True)) @ v
        a = a.transpose(0, 2, 1, 3).reshape(b, -1, w)
        h = h + a @ g(r + "attn.out_proj.weight").T + g(r + "attn.out_proj.bias")
        u = ln(h, r + "ln_2") @ g(r + "mlp.c_fc.weight").T + g(r + "mlp.c_fc.bias")
        u = u / (1 + np.exp(-1.702 * u))
        h = h + u @ g(r + "mlp.c_proj.weight").T + g(r + "mlp.c_proj.bias")
    return h[:, 0], ln(h[:, 0], "ln_post")


def test_float64_numpy_tower_agrees(tmp_path, vectors):
    x = vectors["x16"].astype(np.float64) / 255
    cls, pooled = _numpy_tower(load_file(OPENAI), x)
    np.testing.assert_allclose(vectors["cls16"], cls, atol=ATOL, rtol=0)      # HF float32
    np.testing.assert_allclose(vectors["pooled16"], pooled, atol=ATOL, rtol=0)
    module, params = teacher(convert(tmp_path, HF, "--num_heads", "4"))
    out = module.apply({"params": params}, jnp.asarray(x, jnp.float32), all_tokens=True)
    np.testing.assert_allclose(out["cls"], cls, atol=ATOL, rtol=0)


def test_torch_nearest_rule():
    """PyTorch's legacy nearest source index ``floor(i * in / out)`` (not JAX's half-pixel one)."""
    np.testing.assert_array_equal(torch_nearest_indices(4, 8), [0, 2, 4, 6])
    np.testing.assert_array_equal(torch_nearest_indices(16, 22)[:6], [0, 1, 2, 4, 5, 6])
    torch = pytest.importorskip("torch")
    for out_size, in_size in ((224, 256), (16, 22), (32, 20)):
        x = torch.arange(in_size, dtype=torch.float32).view(1, 1, 1, in_size)
        want = torch.nn.functional.interpolate(x, size=(1, out_size))[0, 0, 0].long().numpy()
        np.testing.assert_array_equal(torch_nearest_indices(out_size, in_size), want)


def test_arch_read_from_shapes_and_released_sizes():
    assert clip_arch(load_file(HF), num_heads=4) == TINY
    with pytest.raises(ValueError, match="does not split into 0 heads"):
        clip_arch(load_file(OPENAI))
    # the released towers' param counts (HF CLIPVisionModel of openai/clip-vit-{large-patch14,
    # base-patch16}, post_layernorm included, no projection)
    for name, count in (("vitl14", 303_179_776), ("vitb16", 85_799_424)):
        m = CLIPVisionTower(**CLIP_VARIANTS[name])
        shapes = nn.unbox(jax.eval_shape(m.init, jax.random.key(0),
                                         jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))["params"])
        assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == count


def _bad(tmp_path, name, sd):
    path = str(tmp_path / name)
    save_file(sd, path)
    return path


def test_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "o.safetensors")
    sd = load_file(HF)
    text = {"text_model.embeddings.token_embedding.weight": np.ones((5, 8), np.float32)}
    missing = {k: v for k, v in sd.items() if k != "encoder.layers.1.mlp.fc2.bias"}
    half = {k: v for k, v in sd.items() if k != "encoder.layers.0.self_attn.k_proj.weight"}
    cases = [
        (str(tmp_path / "missing.safetensors"), "no such file"),
        (os.path.join(ROOT, "tests", "data", "dinov2", "ls", "model.safetensors"),
         "not a CLIP vision state dict"),
        (_bad(tmp_path, "text.safetensors", text), "a CLIP text tower only"),
        (_bad(tmp_path, "lost.safetensors", missing), "missing tensor 'encoder.layers.1.mlp.fc2.bias'"),
        (_bad(tmp_path, "half.safetensors", half),
         "missing tensor 'encoder.layers.0.self_attn.k_proj.weight'"),
        (_bad(tmp_path, "extra.safetensors", {**sd, "encoder.extra": np.ones(2, np.float32)}),
         "unexpected tensor 'encoder.extra'"),
        (str(tmp_path), "not a Hugging Face CLIP snapshot"),
    ]
    for src, want in cases:
        assert cli.main(["convert-clip", "--input", src, "--output", out, "--num_heads", "4"]) == 1
        err = one_line_error(capsys)
        assert want in err, err
        assert not os.path.exists(out)
    assert cli.main(["convert-clip", "--input", HF, "--output", out, "--num_heads", "x"]) == 2
    one_line_error(capsys)
    assert cli.main(["convert-clip", "--input", HF]) == 2
    one_line_error(capsys)
    keep = tmp_path / "keep.safetensors"
    keep.write_bytes(b"keep")
    assert cli.main(["convert-clip", "--input", HF, "--output", str(keep)]) == 1
    assert "exists" in one_line_error(capsys) and keep.read_bytes() == b"keep"


def test_torch_files_without_torch_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)            # import torch -> ImportError
    script = str(tmp_path / "ViT-L-14.pt")
    with zipfile.ZipFile(script, "w") as z:                    # TorchScript's archive layout
        z.writestr("ViT-L-14/constants.pkl", b"")
        z.writestr("ViT-L-14/code/__torch__.py", b"")
    plain = tmp_path / "plain.pth"
    plain.write_bytes(b"\x80\x02}q\x00.")
    for src in (script, str(plain)):
        out = str(tmp_path / "o.safetensors")
        assert cli.main(["convert-clip", "--input", src, "--output", out]) == 1
        assert "PyTorch" in one_line_error(capsys) and not os.path.exists(out)


def test_teacher_arch_is_picked_and_checked():
    assert isinstance(build_teacher({"model": dict(image_size=28, patch_size=14, width=48, depth=1,
                                                   num_heads=4)}), nn.Module)
    assert type(build_teacher({"arch": "clip", "model": TINY})).__name__ == "CLIPVisionTower"
    assert type(build_teacher({"arch": "dinov2", "model": TINY})).__name__ == "ViTFeatures"
    with pytest.raises(ValueError, match=r"teachers.sem.arch 'siglip' is not one of"):
        build_teacher({"arch": "siglip", "model": TINY}, "teachers.sem")
    with pytest.raises(ValueError, match=r"teachers.sem.model: .*layerscale"):
        build_teacher({"arch": "clip", "model": {**TINY, "layerscale": True}}, "teachers.sem")
    with pytest.raises(ValueError, match=r"teachers.sem.weights is empty"):
        load_repa_teacher({"arch": "clip", "model": TINY}, "teachers.sem")


def test_published_fqgan_configs_use_clip_teachers():
    configs = load_config_module("fqgan")
    dual, triple = configs.get_config("dual"), configs.get_config("triple")
    assert dual.teachers.sem.arch == "clip" and triple.teachers.sem_high.arch == "clip"
    assert triple.teachers.sem_mid.arch == "dinov2"
    assert configs.get_config("tiny_dual").teachers.sem.arch == "dinov2"
    for entry, name in ((dual.teachers.sem, "vitl14"), (triple.teachers.sem_high, "vitb16")):
        m = build_teacher(entry)
        assert isinstance(m, CLIPVisionTower) and m.resize == "nearest"
        assert {k: getattr(m, k) for k in CLIP_VARIANTS[name]} == CLIP_VARIANTS[name]


def test_fqgan_trains_a_step_with_a_clip_teacher():
    """The tiny FQGAN (shrunk as test_fqgan's training test) with a random ``"arch": "clip"``
    teacher: the task builds it, its params are constants, and one jitted training step runs."""
    from titok_jax.train.step import build_step
    from train_helpers import fresh_state

    c = load_config_module("fqgan").get_config("tiny_dual")
    c.data.image_size = c.model.image_size = 8
    c.model.ch_mult, c.model.z_channels = [1], 32
    c.teachers.sem.arch = "clip"
    c.teachers.sem.model = dict(image_size=8, patch_size=4, width=64, depth=1, num_heads=2,
                                resize="nearest")
    task, state, optimizer, shardings, mesh = fresh_state(c)
    assert isinstance(task.teachers[1][0], CLIPVisionTower) and task.teachers[0] is None
    constants = task.constants()
    assert "class_embedding" in constants["teacher_1"]
    step = build_step(task, optimizer, shardings, mesh)
    images = np.random.default_rng(0).uniform(size=(8, 8, 8, 3)).astype(np.float32)
    state, metrics = step(state, {"image": jnp.asarray(images)}, constants)
    assert np.isfinite(float(metrics["loss"]))
    assert float(metrics["quantizer/representation"]) > 0
