"""`titok_jax.load_tokenizer` and the reconstruct / tokenize / detokenize commands on a micro workdir
trained once per module: shapes, ranges, equality with the model applied directly, files written, and
one-line errors with the right exit codes."""
import os

import numpy as np
import pytest
from PIL import Image

import titok_jax
from titok_jax import cli

from train_helpers import ROOT

CONFIG = os.path.join(ROOT, "configs", "titok.py") + ":tiny_vq"
MICRO = ["--config.data.image_size=32", "--config.model.image_size=32", "--config.model.encoder_width=32",
         "--config.model.decoder_width=32", "--config.model.encoder_depth=1", "--config.model.decoder_depth=1",
         "--config.model.num_latent_tokens=8", "--config.model.quantizer.codebook_size=32",
         "--config.batch_size=8", "--config.total_steps=2", "--config.log_every_steps=2", "--config.eval_every_steps=0",
         "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=false",
         "--config.data.eval_batch_size=4", "--progress=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    assert cli.main(["train", "--config", CONFIG, "--workdir", workdir, *MICRO]) == 0
    return workdir


@pytest.fixture(scope="module")
def tok(trained):
    return titok_jax.load_tokenizer(trained, batch_size=4)


def images_u8(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[:2000]
    return err


def test_properties_and_single_device(tok):
    import jax
    assert (tok.num_tokens, tok.codebook_size, tok.image_size) == (8, 32, 32)
    assert tok.quantizer == "vq" and tok.step == 2
    devices = {d for leaf in jax.tree.leaves(tok.params) for d in leaf.devices()}
    assert len(devices) == 1


def test_encode_int32_in_range_deterministic_and_batched(tok):
    x = images_u8(7)  # 7 > batch_size 4: two chunks, the second padded
    t = tok.encode(x)
    assert t.dtype == np.int32 and t.shape == (7, 8)
    assert t.min() >= 0 and t.max() < 32
    np.testing.assert_array_equal(t, tok.encode(x))
    np.testing.assert_array_equal(t[5:6], tok.encode(x[5:6]))


def test_uint8_and_float_inputs_agree(tok):
    x = images_u8(3, seed=1)
    np.testing.assert_array_equal(tok.encode(x), tok.encode(x.astype(np.float32) / np.float32(255)))


def test_decode_encode_matches_model_apply_with_ema_params(trained, tok):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from titok_jax.commands.common import load_run_config
    from titok_jax.models.registry import build_model

    # The saved train state read back raw (no abstract tree), the model applied directly.
    config = load_run_config(trained)
    with ocp.StandardCheckpointer() as ckpt:
        state = ckpt.restore(os.path.join(trained, "checkpoints", "000000002", "state"))
    assert state["ema_params"] is not None
    model = build_model(config.model, dtype=config.get("compute_dtype", "float32"))
    x = images_u8(5, seed=2).astype(np.float32) / np.float32(255)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    rec = apply({"params": state["ema_params"], **state["model_state"]["model"]}, jnp.asarray(x))
    expected = np.clip(np.asarray(jax.device_get(rec), np.float32), 0, 1)
    got = tok.decode(tok.encode(x))
    assert got.dtype == np.float32 and got.shape == (5, 32, 32, 3)
    assert got.min() >= 0 and got.max() <= 1
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_bad_inputs_raise_clear_errors(trained, tok, tmp_path):
    with pytest.raises(ValueError, match=r"\[B, 32, 32, 3\]"):
        tok.encode(images_u8(2, size=48))
    with pytest.raises(ValueError, match=r"token id 32 .* 0\.\.31"):
        tok.decode(np.array([[0, 1, 2, 3, 4, 5, 6, 32]]))
    with pytest.raises(ValueError, match=r"token id -1"):
        tok.decode(np.full((1, 8), -1))
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        tok.decode(np.zeros((1, 7), np.int32))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        titok_jax.load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        titok_jax.load_tokenizer(str(tmp_path))
    import shutil
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(os.path.join(trained, "config.json"), empty / "config.json")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        titok_jax.load_tokenizer(str(empty))


def test_corrupt_checkpoint_is_one_line_error(trained, tmp_path):
    """A real process, so stderr is checked up to interpreter exit."""
    import shutil
    import subprocess
    import sys
    copy = str(tmp_path / "copy")
    shutil.copytree(trained, copy)
    for root, _, files in os.walk(os.path.join(copy, "checkpoints", "000000002", "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    img = str(tmp_path / "a.png")
    Image.fromarray(images_u8(1)[0]).save(img)
    proc = subprocess.run([sys.executable, "-m", "titok_jax", "tokenize", "--workdir", copy, "--input", img,
                           "--output", str(tmp_path / "t.npz")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    err = proc.stderr.strip()
    assert proc.returncode == 1 and "cannot be restored" in err
    assert len(err.splitlines()) == 1, err[:2000]


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for name, (h, w) in {"a.png": (40, 64), "b.jpg": (32, 32), "sub/c.png": (90, 50)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / name)
    (d / "notes.txt").write_text("not an image")
    return d


def test_tokenize_then_detokenize(trained, tok, image_dir, tmp_path, capsys):
    from titok_jax.api import load_image
    from titok_jax.evaluation.images import to_uint8
    out = str(tmp_path / "tokens.npz")
    assert cli.main(["tokenize", "--workdir", trained, "--input", str(image_dir), "--output", out,
                     "--batch_size", "2"]) == 0
    data = np.load(out)
    assert list(data["files"]) == ["a.png", "b.jpg", os.path.join("sub", "c.png")]
    tokens = data["tokens"]
    assert tokens.dtype == np.int32 and tokens.shape == (3, 8)
    expected = tok.encode(np.stack([load_image(str(image_dir / f), 32) for f in data["files"]]))
    np.testing.assert_array_equal(tokens, expected)

    out_dir = tmp_path / "dec"
    assert cli.main(["detokenize", "--workdir", trained, "--input", out, "--output", str(out_dir)]) == 0
    decoded = to_uint8(tok.decode(tokens))
    for i, name in enumerate(["a.png", "b.png", os.path.join("sub", "c.png")]):
        np.testing.assert_array_equal(np.asarray(Image.open(out_dir / name)), decoded[i])

    # without `files`: named by index
    plain = str(tmp_path / "plain.npz")
    np.savez(plain, tokens=tokens[:2])
    assert cli.main(["detokenize", "--workdir", trained, "--input", plain, "--output", str(tmp_path / "p")]) == 0
    assert sorted(os.listdir(tmp_path / "p")) == ["000000.png", "000001.png"]


def test_reconstruct_file_and_directory(trained, tok, image_dir, tmp_path):
    from titok_jax.api import load_image
    from titok_jax.evaluation.images import to_uint8
    out = tmp_path / "rec.png"
    assert cli.main(["reconstruct", "--workdir", trained, "--input", str(image_dir / "a.png"),
                     "--output", str(out)]) == 0
    expected = to_uint8(tok.reconstruct(load_image(str(image_dir / "a.png"), 32)[None]))[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected)

    out_dir = tmp_path / "recs"
    assert cli.main(["reconstruct", "--workdir", trained, "--input", str(image_dir), "--output", str(out_dir)]) == 0
    for name in ("a.png", "b.png", os.path.join("sub", "c.png")):
        assert np.asarray(Image.open(out_dir / name)).shape == (32, 32, 3)


def test_command_errors_are_one_line(trained, image_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    args = ["--workdir", trained, "--output", str(tmp_path / "o.npz")]
    assert cli.main(["tokenize", "--input", str(bad), *args]) == 1
    assert str(bad) in one_line_error(capsys)
    only_bad = tmp_path / "only_bad"     # a directory skips bad images; none readable is an error
    only_bad.mkdir()
    (only_bad / "zz.png").write_bytes(b"not a png")
    assert cli.main(["reconstruct", "--workdir", trained, "--input", str(only_bad),
                     "--output", str(tmp_path / "r")]) == 1
    assert "zz.png" in one_line_error(capsys)
    assert not (tmp_path / "r").exists() or not os.listdir(tmp_path / "r")
    assert cli.main(["tokenize", "--input", str(tmp_path / "nope.png"), *args]) == 1
    assert "does not exist" in one_line_error(capsys)
    assert cli.main(["tokenize", "--input", str(bad), "--workdir", str(tmp_path / "nowork"),
                     "--output", "x.npz"]) == 2
    assert "does not exist" in one_line_error(capsys)
    assert cli.main(["tokenize", "--workdir", trained]) == 2
    assert "--input" in one_line_error(capsys)

    out_of_range = str(tmp_path / "oor.npz")
    np.savez(out_of_range, tokens=np.array([[0, 1, 2, 99, 4, 5, 6, 7]], np.int32))
    assert cli.main(["detokenize", "--workdir", trained, "--input", out_of_range, "--output", str(tmp_path / "d")]) == 1
    err = one_line_error(capsys)
    assert "99" in err and "0..31" in err
    wrong_shape = str(tmp_path / "shape.npz")
    np.savez(wrong_shape, tokens=np.zeros((2, 5), np.int32))
    assert cli.main(["detokenize", "--workdir", trained, "--input", wrong_shape, "--output", str(tmp_path / "d")]) == 1
    assert "[B, 8]" in one_line_error(capsys)
    not_npz = tmp_path / "x.npz"
    not_npz.write_bytes(b"hello")
    assert cli.main(["detokenize", "--workdir", trained, "--input", str(not_npz), "--output", str(tmp_path / "d")]) == 1
    assert "x.npz" in one_line_error(capsys)
    assert not os.path.exists(tmp_path / "d")


def test_token_file_names_stay_inside_the_output_directory(trained, tok, tmp_path, capsys):
    from titok_jax.api import read_token_file
    tokens = np.zeros((2, 8), np.int32)
    path = str(tmp_path / "t.npz")
    np.savez(path, tokens=tokens, files=np.asarray(["a.jpg", os.path.join("sub", "b.png")]))
    got, names = read_token_file(path, tok)
    assert names == ["a.png", os.path.join("sub", "b.png")] and got.dtype == np.int32
    for files, match in ((["/tmp/evil.png", "b.png"], "outside the output directory"),
                         ([os.path.join("..", "evil.png"), "b.png"], "outside the output directory"),
                         (["a/../../evil.png", "b.png"], "outside the output directory"),
                         (["a.png", "a.png"], "both give the output name")):
        np.savez(path, tokens=tokens, files=np.asarray(files))
        with pytest.raises(ValueError, match=match):
            read_token_file(path, tok)
        out = tmp_path / "never"
        assert cli.main(["detokenize", "--workdir", trained, "--input", path, "--output", str(out)]) == 1
        assert match in one_line_error(capsys)
        assert not out.exists() and not (tmp_path / "evil.png").exists()


def test_tokenize_a_data_source_into_shards(trained, tok, tmp_path, capsys):
    from titok_jax.data import TRAIN_IMAGES, SampleSource
    from titok_jax.data.tokens import TokenSource, image_batches_for_tokenizing
    out = str(tmp_path / "shards")
    assert cli.main(["tokenize", "--workdir", trained, "--data", "sample", "--epochs", "2",
                     "--shard_size", "5", "--batch_size", "4", "--output", out]) == 0
    assert "tokenized" in capsys.readouterr().out
    src = TokenSource(out)
    n = 2 * len(SampleSource("train"))
    assert len(src) == n and src.num_tokens == tok.num_tokens and src.codebook_size == tok.codebook_size
    assert src.num_classes == len(TRAIN_IMAGES)
    # The rows are the tokenizer's ids of exactly the augmented images, in order.
    batches, _, _ = image_batches_for_tokenizing("sample", tok.image_size, 4, epochs=2, seed=0)
    images = np.concatenate([b["image"] for b in batches])
    np.testing.assert_array_equal(np.stack([src[i]["tokens"] for i in range(n)]), tok.encode(images))
    # The output is never overwritten; --input and --data together are refused.
    assert cli.main(["tokenize", "--workdir", trained, "--data", "sample", "--output", out]) == 1
    assert "not empty" in one_line_error(capsys)
    assert cli.main(["tokenize", "--workdir", trained, "--data", "sample", "--input", out,
                     "--output", str(tmp_path / "x")]) == 2
    assert "not both" in one_line_error(capsys)


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
