"""`titok-jax train` / `eval` end to end on a micro config, and their errors: one line, exit != 0,
checkpoints untouched."""
import json
import os

import pytest

from titok_jax import cli

from train_helpers import ROOT, tree_digest

CONFIG = os.path.join(ROOT, "configs", "titok.py") + ":tiny_vq"
MICRO = ["--config.data.image_size=32", "--config.model.image_size=32", "--config.model.encoder_width=32",
         "--config.model.decoder_width=32", "--config.model.encoder_depth=1", "--config.model.decoder_depth=1",
         "--config.model.num_latent_tokens=8", "--config.model.quantizer.codebook_size=32",
         "--config.batch_size=8", "--config.total_steps=4", "--config.log_every_steps=2", "--config.eval_every_steps=4",
         "--config.checkpoint.every_steps=2", "--config.data.eval_batch_size=4", "--progress=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    assert cli.main(["train", "--config", CONFIG, "--workdir", workdir, *MICRO]) == 0
    return workdir


def test_train_writes_the_workdir_layout(trained, capsys):
    for name in ("config.json", "metrics.jsonl", "eval.jsonl"):
        assert os.path.isfile(os.path.join(trained, name)), name
    assert os.listdir(os.path.join(trained, "samples")) and os.listdir(os.path.join(trained, "tb"))
    steps = sorted(os.listdir(os.path.join(trained, "checkpoints")))
    assert steps and int(steps[-1]) == 4
    rows = [json.loads(l) for l in open(os.path.join(trained, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2, 4] and all("loss" in r for r in rows)
    config = json.load(open(os.path.join(trained, "config.json")))
    assert config["total_steps"] == 4 and config["model"]["quantizer"]["codebook_size"] == 32
    # A row at step s logs the learning rate of the update that made it (update s - 1, inside the
    # linear warmup from 0): lr * (s - 1) / warmup_steps.
    opt = config["optimizer"]
    for r in rows:
        assert r["lr/model"] == pytest.approx(opt["lr"] * (r["step"] - 1) / opt["warmup_steps"], rel=1e-6)
    evals = [json.loads(l) for l in open(os.path.join(trained, "eval.jsonl"))]
    assert [e["step"] for e in evals] == [4]  # eval_every_steps=4 of 4 steps: one row
    assert set(evals[0]) == {"step", "psnr", "ssim", "num_images", "codebook_usage", "codebook_entropy",
                             "codebook_perplexity", "bits_per_image", "thumbnail_psnr",
                             "thumbnail_side", "thumbnail_bits"}


def test_eval_command_prints_and_appends(trained, capsys):
    rows = [json.loads(l) for l in open(os.path.join(trained, "eval.jsonl"))]
    assert cli.main(["eval", "--workdir", trained]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(line)
    # The step-4 checkpoint evaluated again on the same eval split: the training run's own step-4
    # eval row, to float round-off.
    (own,) = [r for r in rows if r["step"] == 4]
    assert result["step"] == 4 and set(result) == set(own)
    for key, value in own.items():
        assert result[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    after = [json.loads(l) for l in open(os.path.join(trained, "eval.jsonl"))]
    assert after[:-1] == rows and after[-1] == result


def test_mismatched_checkpoint_is_one_clear_error_and_untouched(trained):
    """Run as a real process: stderr must be one line up to and including interpreter exit."""
    import subprocess
    import sys
    before = tree_digest(trained)
    proc = subprocess.run([sys.executable, "-m", "titok_jax", "train", "--config", CONFIG, "--workdir", trained,
                           *MICRO, "--config.model.quantizer.codebook_size=64", "--config.total_steps=6"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    err = proc.stderr.strip()
    assert proc.returncode == 1
    assert len(err.splitlines()) == 1 and "checkpoint" in err and "Traceback" not in err, err[:2000]
    assert tree_digest(trained) == before


def test_corrupt_checkpoint_is_one_clear_error(trained, tmp_path):
    """Run as a real process: stderr must be one line up to and including interpreter exit."""
    import shutil
    import subprocess
    import sys
    copy = str(tmp_path / "copy")
    shutil.copytree(trained, copy)
    ckpt = os.path.join(copy, "checkpoints", "000000004")
    for root, _, files in os.walk(os.path.join(ckpt, "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    before = tree_digest(copy)
    proc = subprocess.run([sys.executable, "-m", "titok_jax", "train", "--config", CONFIG, "--workdir", copy,
                           *MICRO, "--config.total_steps=6"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    err = proc.stderr.strip()
    assert proc.returncode == 1 and "cannot be restored" in err
    assert len(err.splitlines()) == 1, err[:2000]
    assert tree_digest(copy) == before


@pytest.mark.parametrize("args,needle", [
    (["--config.nope=1"], "unknown config key 'nope'"),
    (["--config.optimizer.lrr=1"], "did you mean 'optimizer.lr'"),
    (["--config.model.use_l2_norm=false"], "model.quantizer.l2_normalize"),   # a moved knob
    (["--config.total_steps=abc"], "total_steps"),
])
def test_bad_config_overrides(tmp_path, capsys, args, needle):
    code = cli.main(["train", "--config", CONFIG, "--workdir", str(tmp_path / "w"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1


def test_missing_config_file_and_workdir(tmp_path, capsys):
    assert cli.main(["train", "--config", "configs/nope.py:tiny", "--workdir", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["eval", "--workdir", str(tmp_path / "none")]) == 2
    assert "not a titok_jax workdir" in capsys.readouterr().err
