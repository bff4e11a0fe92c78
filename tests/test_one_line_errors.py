"""Hostile input and faults (issue 13): valid-looking values that used to fail deep inside (a zero
interval, a config.json that is a list, a .npy renamed .npz, garbage bytes as .npz, heads that do
not divide the width, a full disk during training) end with one clear line and a non-zero exit;
genuine bugs still show their traceback, with their own exit status."""
import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from titok_jax import cli
from titok_jax.commands.common import EXIT_BUG, run_command
from titok_jax.errors import CheckpointSaveError, ConfigError, UserError

from train_helpers import ROOT

CONFIG = os.path.join(ROOT, "configs", "titok.py") + ":tiny_vq"


def one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[:3000]
    return err


# ----------------------------------------------------------------------------- run_command
@pytest.mark.parametrize("exc,code", [
    (ValueError("bad value"), 1), (FileNotFoundError("no such file: x"), 1),
    (FileExistsError("output x already exists"), 1), (UserError("bad input"), 1),
    (CheckpointSaveError("could not save checkpoint step 4: No space left on device", errno.ENOSPC), 1),
    (MemoryError(), 1),
])
def test_user_errors_are_one_line(capsys, exc, code):
    def handler(argv):
        raise exc
    assert run_command(handler, []) == code
    err = one_line(capsys)
    assert err.startswith("titok-jax: error:")


@pytest.mark.parametrize("exc", [TypeError("unsupported operand"), KeyError("params"),
                                 AttributeError("'NoneType' object has no attribute 'shape'"),
                                 ZeroDivisionError("integer division or modulo by zero")])
def test_bugs_show_their_traceback_and_say_so(capsys, exc):
    def handler(argv):
        raise exc
    assert run_command(handler, []) == EXIT_BUG
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in handler" in err
    last = err.strip().splitlines()[-1]
    assert "internal error" in last and "bug" in last and type(exc).__name__ in last


def test_out_of_device_memory_is_a_user_error(capsys):
    XlaRuntimeError = type("XlaRuntimeError", (RuntimeError,), {})

    def handler(argv):
        raise XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB")
    assert run_command(handler, []) == 1
    assert "RESOURCE_EXHAUSTED" in one_line(capsys)


# ----------------------------------------------------------------------------- config values
@pytest.mark.parametrize("override,needle", [
    ("--config.log_every_steps=0", "log_every_steps = 0"),
    ("--config.checkpoint.every_steps=0", "checkpoint.every_steps = 0"),
    ("--config.batch_size=0", "batch_size = 0"),
    ("--config.total_steps=-1", "total_steps = -1"),
])
def test_counts_that_cannot_work_are_refused_before_training(tmp_path, capsys, override, needle):
    workdir = tmp_path / "w"
    assert cli.main(["train", "--config", CONFIG, "--workdir", str(workdir), override]) == 1
    err = one_line(capsys)
    assert needle in err and "must be an integer >=" in err
    assert not workdir.exists()


def test_heads_that_do_not_divide_the_width_are_refused():
    import jax
    import jax.numpy as jnp

    from titok_jax.nn.attention import MultiHeadAttention
    x = jnp.zeros((1, 4, 32))
    with pytest.raises(ConfigError, match=r"attention .*width 32 is not divisible by num_heads 3"):
        jax.eval_shape(MultiHeadAttention(num_heads=3).init, jax.random.key(0), x)
    shapes = jax.eval_shape(MultiHeadAttention(num_heads=4).init, jax.random.key(0), x)
    assert shapes["params"]["qkv"]["kernel"].value.shape == (32, 3, 4, 8)


def test_a_model_config_with_indivisible_heads_is_one_line(tmp_path, capsys):
    assert cli.main(["train", "--config", CONFIG, "--workdir", str(tmp_path / "w"),
                     "--config.model.encoder_width=32", "--config.model.encoder_heads=3",
                     "--config.model.image_size=32", "--config.data.image_size=32"]) == 1
    err = one_line(capsys)
    assert "encoder" in err and "width 32" in err and "num_heads 3" in err


# ----------------------------------------------------------------------------- files
def test_a_config_json_that_is_a_list(tmp_path, capsys):
    workdir = tmp_path / "w"
    (workdir / "checkpoints" / "000000002").mkdir(parents=True)
    (workdir / "config.json").write_text("[1, 2, 3]")
    assert cli.main(["eval", "--workdir", str(workdir)]) == 1
    assert "not a valid config" in one_line(capsys)
    assert cli.main(["train", "--config", CONFIG, "--workdir", str(workdir)]) == 1
    assert "not a valid config" in one_line(capsys)
    release = tmp_path / "release"
    release.mkdir()
    (release / "config.json").write_text("[1, 2, 3]")
    (release / "model.safetensors").write_bytes(b"\0" * 16)
    assert cli.main(["import-torch", "--input", str(release), "--output", str(tmp_path / "out")]) == 1
    assert "not a release config" in one_line(capsys)


@pytest.fixture
def npz_inputs(tmp_path):
    npy_renamed = tmp_path / "tokens.npz"
    np.save(tmp_path / "tokens.npy", np.zeros((2, 8), np.int32))
    os.replace(tmp_path / "tokens.npy", npy_renamed)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(np.random.default_rng(0).bytes(300))
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")
    return str(npy_renamed), str(garbage), str(workdir)


def test_a_npy_renamed_npz_and_garbage_npz_are_one_line(npz_inputs, tmp_path, capsys):
    npy_renamed, garbage, workdir = npz_inputs
    out = str(tmp_path / "out")
    for args, path in [
        (["detokenize", "--workdir", workdir, "--input", npy_renamed, "--output", out], npy_renamed),
        (["detokenize", "--workdir", workdir, "--input", garbage, "--output", out], garbage),
        (["convert-inception", "--input", npy_renamed, "--output", out + ".npz"], npy_renamed),
        (["convert-inception", "--input", garbage, "--output", out + ".npz"], garbage),
        (["fid-reference", "--data", "sample", "--inception_weights", garbage, "--output", out + ".npz"], garbage),
        (["eval", "--workdir", workdir, "--fid_reference", garbage, "--inception_weights", garbage], garbage),
        (["generate", "--workdir", workdir, "--tokenizer", workdir, "--output", out,
          "--inception_weights", npy_renamed], npy_renamed),
    ]:
        assert cli.main(args) == 1, args
        err = one_line(capsys)
        assert path in err, err
        assert (".npy array file renamed" if path == npy_renamed else "not an .npz archive") in err, err
    assert not os.path.exists(out) and not os.path.exists(out + ".npz")


def test_read_token_file_names_a_npy_renamed(npz_inputs):
    from titok_jax.api import read_token_file
    npy_renamed, _, _ = npz_inputs
    with pytest.raises(ValueError, match=r"tokens\.npz is a \.npy array, not an \.npz archive"):
        read_token_file(npy_renamed, tokenizer=None)


# ----------------------------------------------------------------------------- faults in a run
FULL_DISK_AT_STEP_4 = """
import errno, os, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
real = jh.JsonCheckpointHandler._save_fn
async def save_fn(self, item, directory):
    if "000000004" in str(directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return await real(self, item, directory)
jh.JsonCheckpointHandler._save_fn = save_fn
from titok_jax import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_full_disk_while_training_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path):
    from conftest import MICRO_TOKENIZER_ARGS
    from titok_jax.checkpoint import verify
    workdir = str(tmp_path / "w")
    args = [a for a in MICRO_TOKENIZER_ARGS if "async_save" not in a and "total_steps" not in a]
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_AT_STEP_4, "train", "--config", CONFIG,
                           "--workdir", workdir, *args, "--config.total_steps=4"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",  # one device
                               "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"})             # quick compile
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("titok-jax")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "could not save checkpoint step 4" in errors[0] and "No space left on device" in errors[0]
    assert "step 2" in errors[0] and lines[-1] == errors[0], proc.stderr[-3000:]
    assert all(line.startswith("[titok_jax]") for line in lines[:-1]), proc.stderr[-3000:]  # status lines
    ckdir = os.path.join(workdir, "checkpoints")
    assert os.listdir(ckdir) == ["000000002"]  # no partial step 4 left
    assert verify(os.path.join(ckdir, "000000002")) == ("ok", "")


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
