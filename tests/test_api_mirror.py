"""The Python API mirrors the command line: ``titok_jax.train(config, workdir)`` runs the CLI's loop
and returns its summary, ``titok_jax.evaluate(workdir, data=...)`` returns the eval command's
metrics line, ``Tokenizer.reconstruct_files(paths, output_dir)`` writes what ``reconstruct`` writes
(unreadable images of a directory skipped with one warning, nothing partial on failure)."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import titok_jax

from train_helpers import ROOT, micro_config


def save(path, seed, size=(40, 48)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_train_runs_the_cli_loop_and_returns_its_summary(tmp_path):
    import titok_jax.train.loop as loop  # the trainer package still imports as one

    assert callable(titok_jax.train) and titok_jax.train.loop is loop
    config = micro_config(total_steps=2, log_every_steps=1, **{"checkpoint.every_steps": 2})
    workdir = str(tmp_path / "run")
    summary = titok_jax.train(config, workdir, progress=False)
    assert summary["step"] == 2 and np.isfinite(summary["last_metrics"]["loss"])
    assert summary["checkpoint"].startswith(os.path.join(workdir, "checkpoints"))
    with open(summary["metrics"]) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["total_steps"] == 2
    # the CLI's checks, before any step: an unknown key, a count that cannot work, a missing file
    from titok_jax.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown config key 'model.bogus'"):
        titok_jax.train(config, workdir, overrides={"model.bogus": 1})
    with pytest.raises(ConfigError, match="log_every_steps"):
        titok_jax.train(config, workdir, overrides={"log_every_steps": 0})
    with pytest.raises(FileNotFoundError, match="config file 'configs/nope.py' not found"):
        titok_jax.train("configs/nope.py:tiny", workdir)
    assert config.total_steps == 2 and config.log_every_steps == 1  # the caller's config is untouched
    spec = os.path.join(ROOT, "configs", "titok.py") + ":tiny_vq"
    from titok_jax.errors import ConfigMismatchError
    with pytest.raises(ConfigMismatchError, match="cannot resume"):  # loaded as --config loads it
        titok_jax.train(spec, workdir, progress=False)


def test_evaluate_returns_the_eval_line(vq_release_dir, tmp_path):
    workdir = str(tmp_path / "workdir")
    shutil.copytree(vq_release_dir, workdir)  # eval appends to eval.jsonl: not the shared fixture
    metrics = titok_jax.evaluate(workdir, data="sample", num_images=2)
    assert metrics["step"] == 0 and np.isfinite(metrics["psnr"]) and "codebook_usage" in metrics
    with open(os.path.join(workdir, "eval.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert logged[-1]["psnr"] == pytest.approx(metrics["psnr"])
    with pytest.raises(ValueError, match="num_images must be >= 1"):
        titok_jax.evaluate(workdir, num_images=0)


def test_reconstruct_files_skips_bad_images_and_writes_all_or_nothing(vq_release_dir, tmp_path):
    from titok_jax.api import load_image
    from titok_jax.data.sources import CorruptImageWarning
    from titok_jax.evaluation.images import to_uint8

    tok = titok_jax.load_tokenizer(vq_release_dir, batch_size=4)
    src = tmp_path / "photos"
    a, b = save(src / "a.jpg", 0), save(src / "sub" / "b.png", 1)
    (src / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    with pytest.warns(CorruptImageWarning, match="skipped 1 unreadable image.*broken.png"):
        written = tok.reconstruct_files(str(src), out)
    assert written == [str(out / "a.png"), str(out / "sub" / "b.png")]
    want = to_uint8(tok.reconstruct(np.stack([load_image(p, 32) for p in (a, b)])))
    for path, image in zip(written, want):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    with pytest.raises(FileExistsError, match="already exists"):
        tok.reconstruct_files(str(src), out)
    # a list of files is named by their basenames
    assert tok.reconstruct_files([a, b], out, overwrite=True) == [str(out / "a.png"), str(out / "b.png")]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "b.png")), want[1])
    # all unreadable: an error and no output at all
    with pytest.raises(ValueError, match="no readable image"):
        tok.reconstruct_files([str(src / "broken.png")], tmp_path / "none" / "deeper")
    assert not os.path.exists(tmp_path / "none")
    with pytest.raises(ValueError, match="cannot read image"):  # a single file is not skipped
        tok.reconstruct_files(str(src / "broken.png"), tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tok.reconstruct_files([str(src / "missing.png")], tmp_path / "none")
    assert not os.path.exists(tmp_path / "none")


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
