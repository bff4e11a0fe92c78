"""`titok-jax import-torch` against vectors made with the OFFICIAL PyTorch TiTok code
(tests/data/titok/make_vectors.py: random weights, small configs, the HF release layout).

An imported workdir must give the official token ids exactly and the official `decode_tokens`
pixels to < 1e-4 (unclamped model output and the API's clamped decode), for a single-stage VQ, a
VAE, a legacy two-stage model (soft proxy-code mixture + MaskGIT decoder) and a bare MaskGIT-VQGAN
state dict. Bad inputs give one line on stderr and a non-zero exit, and never touch an existing
directory. Needs no torch (a .bin check runs only where torch is installed)."""
import json
import os
import shutil

import numpy as np
import pytest

import titok_jax
from titok_jax import cli

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "titok")
TOL = 1e-4


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[:2000]
    return err


def vectors(case):
    with np.load(os.path.join(DATA, case, "vectors.npz")) as v:
        return {k: v[k] for k in v.files}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for case in ("vq", "vae", "legacy", "maskgit"):
        extra = ["--image_size", "32"] if case == "maskgit" else []
        dest = str(root / case)
        assert cli.main(["import-torch", "--input", os.path.join(DATA, case), "--output", dest,
                         *extra]) == 0
        out[case] = dest
    return out


def raw_decode(tok, tokens):
    """The model's unclamped decode_tokens output."""
    return np.asarray(tok.model.apply({"params": tok.params, **tok.model_state}, tokens,
                                      method="decode_tokens"))


@pytest.mark.parametrize("case", ["vq", "legacy", "maskgit"])
def test_ids_and_pixels_match_official(imported, case):
    v = vectors(case)
    tok = titok_jax.load_tokenizer(imported[case], batch_size=4)
    assert tok.image_size == 32 and tok.num_tokens == v["ids"].shape[1]
    np.testing.assert_array_equal(tok.encode(v["images"]), v["ids"])
    # uint8 input path too (ids may differ from the float images; only shape and range here)
    ids_u8 = tok.encode(np.round(v["images"] * 255).astype(np.uint8))
    assert ids_u8.shape == v["ids"].shape and ids_u8.min() >= 0 and ids_u8.max() < tok.codebook_size
    raw = raw_decode(tok, v["ids"])
    assert np.abs(raw - v["pixels"]).max() < TOL
    assert v["pixels"].min() < -0.5 and v["pixels"].max() > 1.5   # the clamp below is exercised
    np.testing.assert_allclose(tok.decode(v["ids"]), np.clip(v["pixels"], 0, 1), atol=TOL, rtol=0)


def test_vae_mean_and_pixels_match_official(imported):
    v = vectors("vae")
    tok = titok_jax.load_tokenizer(imported["vae"])
    assert tok.codebook_size is None and tok.token_dim == 8
    mean = tok.encode(v["images"])
    assert mean.shape == (3, 8, 8) and np.abs(mean - v["mean"]).max() < TOL
    assert np.abs(raw_decode(tok, v["mean"]) - v["pixels"]).max() < TOL
    np.testing.assert_allclose(tok.decode(v["mean"]), np.clip(v["pixels"], 0, 1), atol=TOL, rtol=0)


def test_legacy_logits_and_soft_mixture(imported):
    """The ViT decoder's proxy-code logits match, and pixels come from the softmax mixture (an
    argmax lookup of the same logits gives a different image)."""
    import jax
    v = vectors("legacy")
    tok = titok_jax.load_tokenizer(imported["legacy"])
    assert tok.model.__class__.__name__ == "TiTokTwoStage" and tok.model.is_legacy
    variables = {"params": tok.params, **tok.model_state}
    logits = tok.model.apply(variables, v["ids"][:1], method=lambda m, t: m.decode_logits(
        m.quantize.indices_to_codes(t)))
    assert np.abs(np.asarray(logits) - v["logits"]).max() < TOL
    hard = tok.model.apply(variables, jax.nn.one_hot(np.argmax(v["logits"], -1), 1024) * 1e4,
                           method="logits_to_pixels")
    assert np.abs(np.asarray(hard) - v["pixels"][:1]).max() > 1e-2


def test_workdir_layout_and_eval_command(imported, capsys):
    with open(os.path.join(imported["legacy"], "config.json")) as f:
        config = json.load(f)
    assert config["task"]["name"] == "tokenizer" and config["model"]["name"] == "titok_two_stage"
    assert config["model"]["pixel_channel_mult"] == [1, 1, 1]
    assert os.path.isdir(os.path.join(imported["legacy"], "checkpoints", "000000000"))
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", imported["vq"]]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(line)
    assert metrics["step"] == 0 and np.isfinite(metrics["psnr"])


def test_eval_of_an_imported_tokenizer_on_folder_data(imported, tmp_path, capsys):
    from PIL import Image
    from titok_jax.api import load_image
    from titok_jax.evaluation import psnr
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (h, w) in enumerate([(40, 48), (32, 32), (64, 40)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", imported["vq"], "--data", f"folder:{folder}"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["num_images"] == 3
    # The PSNR is that of the tokenizer's reconstructions of exactly these three images.
    tok = titok_jax.load_tokenizer(imported["vq"])
    images = np.stack([load_image(str(folder / f"{i}.png"), tok.image_size) for i in range(3)])
    x = images.astype(np.float32) / 255.0
    want = float(np.mean(np.asarray(psnr(tok.reconstruct(images), x, max_db=100.0))))
    assert abs(metrics["psnr"] - want) < 1e-3, (metrics["psnr"], want)
    # --num_images counts exactly, even inside one eval batch.
    assert cli.main(["eval", "--workdir", imported["vq"], "--data", f"folder:{folder}", "--num_images", "2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_images"] == 2


# ----------------------------------------------------------------------------- errors
def copy_case(tmp_path, case="vq", edit=None, config_edit=None):
    """A copy of a release folder, its state dict edited by ``edit(dict) -> dict``."""
    from safetensors.numpy import load_file, save_file
    src, dst = os.path.join(DATA, case), tmp_path / f"hf_{case}"
    dst.mkdir()
    shutil.copy(os.path.join(src, "config.json"), dst / "config.json")
    sd = load_file(os.path.join(src, "model.safetensors"))
    save_file(edit(sd) if edit else sd, str(dst / "model.safetensors"))
    if config_edit:
        with open(dst / "config.json") as f:
            cfg = json.load(f)
        config_edit(cfg)
        with open(dst / "config.json", "w") as f:
            json.dump(cfg, f)
    return str(dst)


def drop(key):
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def add_extra(sd):
    return {**sd, "decoder.extra.weight": np.zeros((2, 2), np.float32)}


def reshape(key):
    return lambda sd: {**sd, key: np.zeros((sd[key].shape[0] + 1,) + sd[key].shape[1:], np.float32)}


@pytest.mark.parametrize("edit, message", [
    (drop("encoder.ln_post.weight"), "missing tensor 'encoder.ln_post.weight'"),
    (drop("decoder.transformer.0.attn.in_proj_bias"),
     "missing tensor 'decoder.transformer.0.attn.in_proj_bias'"),
    (add_extra, "unexpected tensor 'decoder.extra.weight'"),
    (reshape("quantize.embedding.weight"), "tensor 'quantize.embedding.weight' has shape (65, 16)"),
])
def test_name_table_errors_one_line(tmp_path, capsys, edit, message):
    src = copy_case(tmp_path, edit=edit)
    out = tmp_path / "out"
    assert cli.main(["import-torch", "--input", src, "--output", str(out)]) == 1
    err = one_line_error(capsys)
    assert message in err, err
    assert not out.exists()


def test_legacy_pixel_decoder_error(tmp_path, capsys):
    src = copy_case(tmp_path, "legacy", edit=drop("pixel_decoder.up.1.upsample_conv.bias"))
    assert cli.main(["import-torch", "--input", src, "--output", str(tmp_path / "o")]) == 1
    assert "pixel_decoder.up.1.upsample_conv.bias" in one_line_error(capsys)


def test_stage1_config_refused(tmp_path, capsys):
    def stage1(cfg):
        cfg["model"]["vq_model"]["finetune_decoder"] = False
    src = copy_case(tmp_path, "legacy", config_edit=stage1)
    assert cli.main(["import-torch", "--input", src, "--output", str(tmp_path / "o")]) == 1
    assert "stage-1" in one_line_error(capsys)


def test_existing_directory_untouched(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["import-torch", "--input", os.path.join(DATA, "vq"), "--output", str(out)]) == 1
    assert "already exists" in one_line_error(capsys)
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_missing_input_and_usage(tmp_path, capsys):
    assert cli.main(["import-torch", "--input", str(tmp_path / "nope"), "--output",
                     str(tmp_path / "o")]) == 1
    assert "does not exist" in one_line_error(capsys)
    assert cli.main(["import-torch", "--input", str(tmp_path)]) == 2
    assert "--output" in one_line_error(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["import-torch", "--input", str(empty), "--output", str(tmp_path / "o")]) == 1
    assert "model.safetensors" in one_line_error(capsys)


def test_bin_without_torch_one_line(tmp_path, capsys, monkeypatch):
    src = tmp_path / "hf"
    src.mkdir()
    shutil.copy(os.path.join(DATA, "vq", "config.json"), src / "config.json")
    (src / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)   # `import torch` fails
    assert cli.main(["import-torch", "--input", str(src), "--output", str(tmp_path / "o")]) == 1
    err = one_line_error(capsys)
    assert "needs PyTorch" in err and "titok_jax[torch]" in err


def test_pytorch_model_bin(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file
    src = tmp_path / "hf"
    src.mkdir()
    shutil.copy(os.path.join(DATA, "legacy", "config.json"), src / "config.json")
    sd = load_file(os.path.join(DATA, "legacy", "model.safetensors"))
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, str(src / "pytorch_model.bin"))
    assert cli.main(["import-torch", "--input", str(src), "--output", str(tmp_path / "o")]) == 0
    v = vectors("legacy")
    np.testing.assert_array_equal(titok_jax.load_tokenizer(str(tmp_path / "o")).encode(v["images"]),
                                  v["ids"])


# ----------------------------------------------------------------------------- published tables
@pytest.mark.parametrize("variant, torch_keys", [("l32", 692), ("bl64_vq", None)])
def test_published_name_table_fills_the_model(variant, torch_keys):
    """The name table of a published size names exactly the model's params with the right
    shapes (transforms applied to zeros one tensor at a time); L-32 has the 692 official keys."""
    import jax
    from titok_jax.convert import titok as conv
    from titok_jax.convert.vqgan import decoder_name_table
    from titok_jax.models.titok_variants import titok_model_name, titok_variant

    model = {"name": titok_model_name(variant), **titok_variant(variant)}
    two_stage = model["name"] == "titok_two_stage"
    rows = [(t, f, s, fn) for t, f, s, fn in conv.titok_name_table(model, two_stage)]
    if two_stage:
        pix = {k[len("pixel_"):]: v for k, v in conv.with_defaults(model).items()
               if k.startswith("pixel_")}
        rows += [(t, "pixel_decoder/" + f, s, fn) for t, f, s, fn in
                 decoder_name_table("pixel_decoder.", pix)]
    if torch_keys:
        assert len(rows) == len({r[0] for r in rows}) == torch_keys
    got = {f: (fn or (lambda x: x))(np.zeros(s, np.float32)).shape for _, f, s, fn in rows}
    abstract, _ = conv.abstract_params(model)
    want = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(a.shape)
            for path, a in jax.tree_util.tree_leaves_with_path(abstract)}
    assert got == want


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
