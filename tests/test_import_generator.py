"""`titok-jax import-torch` for the TiTok MaskGIT generators (ImageBert / UViTBert) against
vectors made with the OFFICIAL PyTorch code (tests/data/maskgit_gen/make_vectors.py: random
weights with every norm and bias off its default, small configs, the release layout with the
unresolved `image_seq_len` interpolation in config.json).

An imported workdir's `Generator.logits` must equal the official forward to float32 round-off
(measured max |diff| about 2e-6 for logits of scale ~3.5) with class labels and with the null
class (`labels=None`); `generate` runs with it. Bad inputs give one line and never touch an
existing directory. Needs no torch (the .bin check runs only where torch is installed)."""
import json
import os
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import titok_jax
from titok_jax import cli
from titok_jax.convert import maskgit_generator as conv
from titok_jax.generators.maskgit import GENERATOR_VARIANTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "maskgit_gen")
CASES = ("imagebert", "uvitbert")
ATOL = 2e-5   # measured: 1.3e-6 (imagebert), 1.9e-6 (uvitbert); logits up to ~3.5


def vectors(case):
    with np.load(os.path.join(DATA, case, "vectors.npz")) as v:
        return {k: v[k] for k in v.files}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[:2000]
    return err


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for case in CASES:
        dest = str(root / case)
        assert cli.main(["import-torch", "--input", os.path.join(DATA, case), "--output", dest]) == 0
        out[case] = dest
    return out


@pytest.mark.parametrize("case", CASES)
def test_logits_match_official(imported, case):
    v = vectors(case)
    gen = titok_jax.load_generator(imported[case])
    k = v["logits"].shape[-1]
    assert gen.codebook_size == k and gen.mask_token_id == k and gen.num_classes == 10
    assert (v["tokens"] == k).any() and (v["tokens"][-1] == k).all()
    np.testing.assert_allclose(gen.logits(v["tokens"], v["labels"]), v["logits"], atol=ATOL, rtol=0)
    null = gen.logits(v["tokens"], None)
    np.testing.assert_allclose(null, v["logits_null"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(gen.logits(v["tokens"], np.full(4, 10)), null, atol=1e-6, rtol=0)
    assert np.abs(v["logits"] - v["logits_null"]).max() > 0.1   # the label matters


def test_workdir_config_is_a_full_maskgit_config(imported):
    sys.path.insert(0, ROOT)
    from configs.maskgit import get_config

    def keys(d, prefix=""):
        return {prefix + k for k in d} | {x for k, val in d.items() if isinstance(val, dict)
                                          for x in keys(val, f"{prefix}{k}.")}
    with open(os.path.join(imported["uvitbert"], "config.json")) as f:
        ours = json.load(f)
    ref = get_config("titok_s128").to_dict()
    ref_keys = keys(ref) - {x for x in keys(ref) if x.startswith("generator.sampler.")}
    assert ref_keys <= keys(ours), sorted(ref_keys - keys(ours))
    assert ours["task"]["name"] == "maskgit" and ours["model"]["arch"] == "uvit"
    assert ours["model"]["num_tokens"] == 16   # the "${...num_latent_tokens}" resolved


def test_generate_command_with_imported_tokenizer(imported, tmp_path):
    """ImageBert case: 8 tokens from 64 codes, the vocabulary of the imported TiTok `vq` case."""
    tok = str(tmp_path / "tok")
    assert cli.main(["import-torch", "--input", os.path.join(ROOT, "tests", "data", "titok", "vq"),
                     "--output", tok]) == 0
    out = tmp_path / "samples"
    assert cli.main(["generate", "--workdir", imported["imagebert"], "--tokenizer", tok,
                     "--output", str(out), "--num", "2", "--steps", "2"]) == 0
    assert len([n for n in os.listdir(out) if n.endswith(".png") and "class" in n]) == 2


def test_torch_bin_release_format(tmp_path):
    torch = pytest.importorskip("torch")
    sd = load_file(os.path.join(DATA, "uvitbert", "model.safetensors"))
    src = tmp_path / "release"
    src.mkdir()
    torch.save({k: torch.from_numpy(x) for k, x in sd.items()}, src / "generator_titok_tiny.bin")
    with open(os.path.join(DATA, "uvitbert", "config.json")) as f:
        (src / "config.json").write_text(f.read())
    assert cli.main(["import-torch", "--input", str(src), "--output", str(tmp_path / "wd")]) == 0
    v = vectors("uvitbert")
    gen = titok_jax.load_generator(str(tmp_path / "wd"))
    np.testing.assert_allclose(gen.logits(v["tokens"], v["labels"]), v["logits"], atol=ATOL, rtol=0)


def _release(tmp_path, case, edit=None, config=True):
    sd = load_file(os.path.join(DATA, case, "model.safetensors"))
    if edit:
        edit(sd)
    src = tmp_path / "in"
    src.mkdir()
    save_file(sd, str(src / "model.safetensors"))
    if config:
        with open(os.path.join(DATA, case, "config.json")) as f:
            (src / "config.json").write_text(f.read() if config is True else config(f.read()))
    return str(src)


@pytest.mark.parametrize("case,edit,expect", [
    ("imagebert", lambda sd: sd.pop("model.encoder.layer.1.output.LayerNorm.bias"),
     "missing tensor 'model.encoder.layer.1.output.LayerNorm.bias'"),
    ("uvitbert", lambda sd: sd.pop("out_blocks.1.skip_linear.weight"),
     "missing tensor 'out_blocks.1.skip_linear.weight'"),
    ("uvitbert", lambda sd: sd.update({"mid_block.attn.qkv.weight": sd["mid_block.attn.qkv.weight"][:-3]}),
     "tensor 'mid_block.attn.qkv.weight' has shape (141, 48), expected (144, 48)"),
    ("imagebert", lambda sd: sd.update({"model.extra.weight": np.zeros(3, np.float32)}),
     "unexpected tensor 'model.extra.weight'"),
])
def test_bad_state_dict_one_line(tmp_path, capsys, case, edit, expect):
    src = _release(tmp_path, case, edit)
    out = tmp_path / "out"
    assert cli.main(["import-torch", "--input", src, "--output", str(out)]) != 0
    assert expect in one_line_error(capsys)
    assert not out.exists()


def test_config_disagreeing_with_tensors_and_no_config(tmp_path, capsys):
    src = _release(tmp_path, "imagebert", config=lambda s: s.replace('"hidden_size": 48', '"hidden_size": 64'))
    assert cli.main(["import-torch", "--input", src, "--output", str(tmp_path / "o1")]) != 0
    assert "hidden_size is 64 but the tensors" in one_line_error(capsys)
    bare = tmp_path / "bare"
    bare.mkdir()
    os.link(os.path.join(src, "model.safetensors"), bare / "generator_custom.safetensors")
    assert cli.main(["import-torch", "--input", str(bare), "--output", str(tmp_path / "o2")]) != 0
    assert "head count is not in the tensors" in one_line_error(capsys)


def test_existing_output_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["import-torch", "--input", os.path.join(DATA, "imagebert"),
                     "--output", str(out)]) != 0
    assert "already exists" in one_line_error(capsys)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("variant", ["titok_l32", "titok_b64", "titok_s128"])
def test_published_name_table_both_directions(variant):
    """The released sizes: shapes from the name table infer the published variant (16 heads, no
    config.json needed), and the table's params are exactly the model's."""
    kw = GENERATOR_VARIANTS[variant]
    rows = conv.generator_name_table(kw)
    shapes = {t: np.broadcast_to(np.float32(0), shape) for t, _, shape, _ in rows}
    inferred, found = conv.infer_generator_kwargs(shapes)
    assert found == variant and inferred == kw
    ours = {f: shape for _, f, shape, _ in rows}
    from titok_jax.trees import flat_shapes
    assert set(ours) == set(flat_shapes(conv.abstract_generator_params(kw)))
