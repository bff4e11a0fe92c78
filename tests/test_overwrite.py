"""No command overwrites a user-named output file unless --overwrite is given (issue 13): the refusal
is one line, exit status 1, comes before any model or weights are loaded, and leaves the old file as it
was; with --overwrite the new file replaces it whole (written beside it, then renamed)."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from titok_jax import cli

from train_helpers import one_line_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DINO = os.path.join(ROOT, "tests", "data", "dinov2", "ls", "model.safetensors")





def refused(capsys, path, content=b"keep"):
    err = one_line_error(capsys)
    assert "already exists" in err and "--overwrite" in err, err
    with open(path, "rb") as f:
        assert f.read() == content


def no_temporaries(folder):
    left = [n for n in os.listdir(folder) if ".tmp" in n]
    assert not left, left


def write_image(path, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def fake_workdir(tmp_path):
    """Passes the commands' cheap workdir check (a config.json) but holds no model: a command that
    refuses before loading one never notices."""
    d = tmp_path / "fake_workdir"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return str(d)


def test_reconstruct_file_and_directory(vq_release_dir, tmp_path, capsys):
    write_image(str(tmp_path / "in" / "a.png"))
    write_image(str(tmp_path / "in" / "b.png"), 1)
    out = tmp_path / "out.png"
    out.write_bytes(b"keep")
    args = ["reconstruct", "--workdir", vq_release_dir, "--input", str(tmp_path / "in" / "a.png"),
            "--output", str(out)]
    assert cli.main(args) == 1
    refused(capsys, out)
    assert cli.main([*args, "--overwrite"]) == 0
    assert np.asarray(Image.open(out)).shape == (32, 32, 3)
    no_temporaries(tmp_path)
    # A directory: one existing output refuses the whole run; nothing else is written.
    out_dir = tmp_path / "recs"
    out_dir.mkdir()
    (out_dir / "b.png").write_bytes(b"keep")
    args = ["reconstruct", "--workdir", vq_release_dir, "--input", str(tmp_path / "in"),
            "--output", str(out_dir)]
    assert cli.main(args) == 1
    refused(capsys, out_dir / "b.png")
    assert os.listdir(out_dir) == ["b.png"]
    assert cli.main([*args, "--overwrite"]) == 0
    assert sorted(os.listdir(out_dir)) == ["a.png", "b.png"]
    assert np.asarray(Image.open(out_dir / "b.png")).shape == (32, 32, 3)


def test_tokenize_and_detokenize(vq_release_dir, tmp_path, capsys):
    write_image(str(tmp_path / "in" / "a.png"))
    write_image(str(tmp_path / "in" / "b.png"), 1)
    tokens = tmp_path / "t.npz"
    tokens.write_bytes(b"keep")
    base = ["tokenize", "--workdir", vq_release_dir, "--input", str(tmp_path / "in")]
    for output in (str(tokens), str(tmp_path / "t")):  # np.savez would add .npz to the second
        assert cli.main([*base, "--output", output]) == 1
        refused(capsys, tokens)
    assert cli.main([*base, "--output", str(tokens), "--overwrite"]) == 0
    with np.load(tokens) as t:
        assert t["tokens"].shape == (2, 8) and list(t["files"]) == ["a.png", "b.png"]
    no_temporaries(tmp_path)

    out = tmp_path / "pngs"
    out.mkdir()
    (out / "b.png").write_bytes(b"keep")
    args = ["detokenize", "--workdir", vq_release_dir, "--input", str(tokens), "--output", str(out)]
    assert cli.main(args) == 1
    refused(capsys, out / "b.png")
    assert os.listdir(out) == ["b.png"]  # a.png was not written either
    assert cli.main([*args, "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["a.png", "b.png"]
    assert np.asarray(Image.open(out / "b.png")).shape == (32, 32, 3)


def test_tokenize_data_refuses_before_loading_the_tokenizer(fake_workdir, tmp_path, capsys):
    out = tmp_path / "shards"
    out.mkdir()
    (out / "meta.json").write_text("keep")
    assert cli.main(["tokenize", "--workdir", fake_workdir, "--data", "sample", "--output", str(out)]) == 1
    assert "not empty" in one_line_error(capsys)
    assert cli.main(["tokenize", "--workdir", fake_workdir, "--data", "sample", "--output", str(out),
                     "--overwrite"]) == 2
    assert "--overwrite does not apply to token shards" in one_line_error(capsys)
    assert os.listdir(out) == ["meta.json"] and (out / "meta.json").read_text() == "keep"


def test_generate_refuses_before_loading_models(fake_workdir, tmp_path, capsys):
    out = tmp_path / "gen"
    out.mkdir()
    (out / "grid.png").write_bytes(b"keep")
    args = ["generate", "--workdir", fake_workdir, "--tokenizer", fake_workdir, "--output", str(out),
            "--num", "3"]
    assert cli.main(args) == 1
    refused(capsys, out / "grid.png")
    # An older run's image of an index this run writes counts too, whatever its class.
    os.remove(out / "grid.png")
    (out / "000002_class7.png").write_bytes(b"keep")
    assert cli.main(args) == 1
    refused(capsys, out / "000002_class7.png")
    # Without images, or with fewer of them, nothing collides: the run goes on (to the fake workdir).
    for extra in (["--save_images=false"], ["--num", "2"]):
        assert cli.main([*args, *extra]) == 1
        assert "already exists" not in one_line_error(capsys)
    assert os.listdir(out) == ["000002_class7.png"]


def test_fid_reference_refuses_before_loading_weights(tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"keep")
    for output in (str(ref), str(tmp_path / "ref")):
        assert cli.main(["fid-reference", "--data", "sample", "--inception_weights",
                         str(tmp_path / "missing.safetensors"), "--output", output]) == 1
        refused(capsys, ref)


@pytest.mark.parametrize("command, inputs", [
    ("convert-inception", ["--input", "missing.pth"]),
    ("convert-i3d", ["--input", "missing.pt"]),
    ("convert-convnext", ["--input", "missing.pth"]),
    ("convert-lpips", ["--vgg", "missing.pth", "--lin", "missing_lin.pth"]),
])
def test_converters_refuse_before_reading_inputs(tmp_path, capsys, command, inputs):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep")
    assert cli.main([command, *inputs, "--output", str(out)]) == 1
    refused(capsys, out)


def test_convert_dinov2_overwrite_replaces_whole_files_only(tmp_path, capsys):
    from safetensors.numpy import load_file
    fresh = tmp_path / "fresh.safetensors"
    assert cli.main(["convert-dinov2", "--input", DINO, "--output", str(fresh), "--num_heads", "4"]) == 0
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep")
    args = ["convert-dinov2", "--input", DINO, "--output", str(out)]
    assert cli.main([*args, "--num_heads", "4"]) == 1
    refused(capsys, out)
    # --overwrite with a conversion that fails: the old file stays, no temporary is left.
    assert cli.main([*args, "--num_heads", "5", "--overwrite"]) == 1
    assert "5 heads" in one_line_error(capsys) and out.read_bytes() == b"keep"
    no_temporaries(tmp_path)
    assert cli.main([*args, "--num_heads", "4", "--overwrite"]) == 0
    a, b = load_file(str(out)), load_file(str(fresh))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    no_temporaries(tmp_path)


def test_import_torch_still_never_overwrites(tmp_path, capsys):
    out = tmp_path / "wd"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"keep": 1}))
    assert cli.main(["import-torch", "--input", os.path.join(ROOT, "tests", "data", "titok", "vq"),
                     "--output", str(out)]) == 1
    assert "already exists" in one_line_error(capsys)
    assert json.loads((out / "config.json").read_text()) == {"keep": 1}
