"""Hostile input (issue 13): a directory with unreadable images is reconstructed / tokenized without
them (one warning line with their count and names), a command that fails leaves no partial output,
and valid-looking values that used to fail deep inside (heads that do not divide the AR width, a
``.npy`` or garbage bytes named ``.npz``, a TFDS record without its image, a release
``config.json`` that is not an object) end with one clear line."""
import errno
import os

import numpy as np
import pytest
from PIL import Image

from titok_jax import cli
from titok_jax.errors import ConfigError

from train_helpers import one_line_error


def write_image(path, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)


def tree(path):
    """Every file under ``path`` (relative), or [] when it does not exist."""
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


@pytest.fixture
def mixed_dir(tmp_path):
    """Three good images and two unreadable ones (garbage bytes; a JPEG header and nothing else)."""
    src = tmp_path / "in"
    for i, name in enumerate(("a.png", "sub/b.png", "c.png")):
        write_image(str(src / name), i)
    (src / "bad1.png").write_bytes(b"not an image")
    (src / "sub" / "bad2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return str(src)


def warning_lines(err):
    return [line for line in err.splitlines() if line.startswith("titok-jax: warning")]


# ----------------------------------------------------------------------------- directory inputs
def test_reconstruct_a_directory_skips_unreadable_images_in_one_line(vq_release_dir, mixed_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["reconstruct", "--workdir", vq_release_dir, "--input", mixed_dir,
                     "--output", out, "--batch_size", "2"]) == 0
    captured = capsys.readouterr()
    warnings = warning_lines(captured.err)
    assert len(warnings) == 1, captured.err
    assert "2 unreadable image(s)" in warnings[0] and "bad1.png" in warnings[0], warnings
    assert os.path.join("sub", "bad2.jpg") in warnings[0], warnings
    assert tree(out) == ["a.png", "c.png", os.path.join("sub", "b.png")]
    assert "reconstructed 3 image(s)" in captured.out


def test_tokenize_a_directory_skips_unreadable_images(vq_release_dir, mixed_dir, tmp_path, capsys):
    out = str(tmp_path / "tokens.npz")
    assert cli.main(["tokenize", "--workdir", vq_release_dir, "--input", mixed_dir,
                     "--output", out]) == 0
    warnings = warning_lines(capsys.readouterr().err)
    assert len(warnings) == 1 and "2 unreadable image(s)" in warnings[0], warnings
    with np.load(out) as data:
        assert list(data["files"]) == ["a.png", "c.png", os.path.join("sub", "b.png")]
        assert data["tokens"].shape[0] == 3


def test_a_directory_of_only_unreadable_images_is_one_line_and_writes_nothing(vq_release_dir, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    (src / "x.png").write_bytes(b"garbage")
    (src / "y.jpg").write_bytes(b"")
    for command, out in [("reconstruct", tmp_path / "out"), ("tokenize", tmp_path / "t.npz")]:
        assert cli.main([command, "--workdir", vq_release_dir, "--input", str(src),
                         "--output", str(out)]) == 1
        err = one_line_error(capsys)
        assert "no readable image" in err and "x.png" in err and "y.jpg" in err, err
        assert not out.exists()


def test_a_failing_reconstruct_leaves_no_partial_output(vq_release_dir, tmp_path, monkeypatch, capsys):
    """The decoder fails on the second batch: the PNGs of the first batch are not left behind, and
    a file that --overwrite was to replace is as it was."""
    from titok_jax import api
    src = tmp_path / "in"
    for i, name in enumerate(("a.png", "sub/b.png", "c.png")):
        write_image(str(src / name), i)
    real, calls = api.Tokenizer.decode, []

    def failing_decode(self, tokens, *args, **kwargs):
        calls.append(len(tokens))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, tokens, *args, **kwargs)

    monkeypatch.setattr(api.Tokenizer, "decode", failing_decode)
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.png").write_bytes(b"the old c")
    assert cli.main(["reconstruct", "--workdir", vq_release_dir, "--input", str(src), "--output",
                     str(out), "--batch_size", "1", "--overwrite"]) == 1
    assert "No space left on device" in one_line_error(capsys)
    assert len(calls) == 2
    assert tree(str(out)) == ["c.png"] and (out / "c.png").read_bytes() == b"the old c"


def test_save_png_never_leaves_half_a_file(tmp_path, monkeypatch):
    from titok_jax.evaluation.images import save_png
    real_save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        with open(fp, "r+b") as f:  # half of it written, then the disk is full
            f.truncate(10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    path = tmp_path / "samples" / "grid.png"
    save_png(str(path), np.zeros((8, 8, 3), np.uint8))
    before = path.read_bytes()
    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError):
        save_png(str(path), np.ones((8, 8, 3), np.uint8))
    assert path.read_bytes() == before and os.listdir(path.parent) == ["grid.png"]
    with pytest.raises(OSError):
        save_png(str(tmp_path / "samples" / "new.png"), np.ones((8, 8, 3), np.uint8))
    assert os.listdir(path.parent) == ["grid.png"]


# ----------------------------------------------------------------------------- one-line errors
def test_ar_heads_that_do_not_divide_the_width_are_a_config_error():
    import jax
    import jax.numpy as jnp

    from titok_jax.generators.ar import ARTransformer, CausalSelfAttention
    x = jnp.zeros((1, 4, 64))
    with pytest.raises(ConfigError, match="width 64 is not divisible by num_heads 3"):
        jax.eval_shape(CausalSelfAttention(num_heads=3).init, jax.random.key(0), x, jnp.arange(4))
    for heads in (0, 3):
        model = ARTransformer(codebook_size=16, num_tokens=4, num_classes=2, width=64, depth=1,
                              num_heads=heads)
        with pytest.raises(ConfigError, match=f"num_heads {heads}"):
            jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                           jnp.zeros((1,), jnp.int32))


def test_read_state_dict_names_a_npy_renamed_or_garbage_npz(tmp_path):
    from titok_jax.convert.common import read_state_dict
    npy = tmp_path / "weights.npz"
    np.save(tmp_path / "w.npy", np.zeros(3, np.float32))
    os.replace(tmp_path / "w.npy", npy)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(np.random.default_rng(0).bytes(200))
    for path, words in [(npy, ".npy array"), (garbage, "not an .npz archive")]:
        with pytest.raises(ValueError) as info:
            read_state_dict(path)
        text = str(info.value)
        assert str(path) in text and words in text and "\n" not in text, text
    np.savez(tmp_path / "ok.npz", w=np.ones(2, np.float32))
    assert list(read_state_dict(tmp_path / "ok.npz")) == ["w"]


def test_a_tfds_record_without_its_image_is_a_value_error():
    from titok_jax.data.sources import TfdsSource
    source = TfdsSource.__new__(TfdsSource)
    source.name, source.split, source.image_key, source.label_key = "toy", "train", "image", "label"
    source._source = [{"img": np.zeros((4, 4, 3), np.uint8), "label": 1}]
    with pytest.raises(ValueError, match=r"TFDS record 0 of 'toy'.*has no 'image'.*\['img', 'label'\]"):
        source[0]


@pytest.mark.parametrize("text", ["[1, 2, 3]", "42", '"a string"', "null"])
def test_read_input_refuses_a_config_json_that_is_not_an_object(tmp_path, text):
    from titok_jax.convert.workdir import read_input
    (tmp_path / "config.json").write_text(text)
    np.savez(tmp_path / "weights.npz", w=np.ones(2, np.float32))
    os.replace(tmp_path / "weights.npz", tmp_path / "model.safetensors")  # not read: the config is first
    with pytest.raises(ValueError, match=r"config\.json is not a release config: a JSON \w+, not an object"):
        read_input(str(tmp_path))
