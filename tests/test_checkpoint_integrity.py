"""Checkpoint integrity (issue 13): a content hash per saved step, checked before a restore; a corrupt
step is refused naming it and the newest intact one (`train --resume_from_intact` resumes from that);
a save that fails on a full disk is one line and leaves no partial step; resuming with another
model config names what differs; `eval` of a read-only workdir still prints its metrics."""
import builtins
import errno
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from titok_jax import cli
from titok_jax.checkpoint import (CORRUPT_DIR, HASH_FILE, Checkpointer, CheckpointSaveError,
                                  CorruptCheckpointError, config_differences, inference_state,
                                  restore_params, verify, write_workdir)
from titok_jax.errors import CheckpointError

from conftest import MICRO_TOKENIZER_ARGS
from train_helpers import ROOT, tree_digest

CONFIG = os.path.join(ROOT, "configs", "titok.py") + ":tiny_vq"


def small_state(k=1.0):
    return {"w": jnp.full((4, 8), k, jnp.float32), "b": {"c": jnp.arange(16, dtype=jnp.int32) * int(k)}}


def abstract_of(tree):
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree)


def flip_a_byte(step_path):
    """Flip one byte in the middle of the largest file of the step's train state."""
    files = [os.path.join(r, n) for r, _, ns in os.walk(os.path.join(step_path, "state")) for n in ns]
    target = max(files, key=os.path.getsize)
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x5A]))
    return target


def saved(tmp_path, steps=(1, 2), async_save=False):
    workdir = str(tmp_path / "w")
    ck = Checkpointer(workdir, every_steps=1, keep=5, async_save=async_save)
    for s in steps:
        ck.save(s, small_state(s), config={"step": s}, force=True)
    ck.close()
    return workdir, os.path.join(workdir, "checkpoints")


@pytest.mark.parametrize("async_save", [False, True])
def test_every_saved_step_carries_a_hash_that_verifies(tmp_path, async_save):
    workdir, ckdir = saved(tmp_path, async_save=async_save)
    assert sorted(os.listdir(ckdir)) == ["000000001", "000000002"]  # no temporary left
    for s in ("000000001", "000000002"):
        manifest = json.load(open(os.path.join(ckdir, s, HASH_FILE)))
        assert any(name.startswith("state/") for name in manifest["files"])
        assert verify(os.path.join(ckdir, s)) == ("ok", "")


def test_a_flipped_byte_names_the_corrupt_step_and_the_intact_one(tmp_path):
    workdir, ckdir = saved(tmp_path)
    flip_a_byte(os.path.join(ckdir, "000000002"))
    before = tree_digest(workdir)
    ck = Checkpointer(workdir, every_steps=1, keep=5, async_save=False)
    with pytest.raises(CorruptCheckpointError) as info:
        ck.restore(abstract_of(small_state()))
    text = str(info.value)
    assert len(text.splitlines()) == 1
    assert "step 2" in text and "corrupt" in text and "step 1 is intact" in text
    assert "--resume_from_intact" in text and info.value.step == 2 and info.value.intact == 1
    assert tree_digest(workdir) == before  # nothing written, nothing moved

    with pytest.warns(UserWarning, match="resuming from step 1"):
        state, step = ck.restore(abstract_of(small_state()), from_intact=True)
    ck.close()
    assert step == 1 and float(state["w"][0, 0]) == 1.0
    moved = os.path.join(workdir, CORRUPT_DIR, "000000002")
    assert os.listdir(ckdir) == ["000000001"] and os.path.isdir(moved)
    assert {k.replace(os.path.join(CORRUPT_DIR, ""), os.path.join("checkpoints", ""), 1): v
            for k, v in tree_digest(workdir).items()} == before  # moved, bytes untouched


def test_inference_restore_refuses_a_corrupt_step_too(tmp_path):
    workdir, ckdir = saved(tmp_path)
    flip_a_byte(os.path.join(ckdir, "000000002"))
    with pytest.raises(CheckpointError, match=r"step 2 .*corrupt.*step 1 is intact"):
        restore_params(workdir, abstract_of({"w": small_state()["w"]}))
    restored, step = restore_params(workdir, abstract_of({"w": small_state()["w"]}), step=1)
    assert step == 1 and float(restored["w"][0, 0]) == 1.0


def test_steps_without_a_hash_load_and_write_workdir_writes_one(tmp_path):
    workdir, ckdir = saved(tmp_path)
    os.remove(os.path.join(ckdir, "000000002", HASH_FILE))  # an older workdir
    ck = Checkpointer(workdir, every_steps=1, keep=5, async_save=False)
    state, step = ck.restore(abstract_of(small_state()))
    ck.close()
    assert step == 2 and float(state["w"][0, 0]) == 2.0
    imported = str(tmp_path / "imported")
    path = write_workdir(imported, {"model": {}}, inference_state({"k": np.ones(3, np.float32)}))
    assert verify(path) == ("ok", "")


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_partial_step(tmp_path, monkeypatch, async_save):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    workdir, ckdir = saved(tmp_path, steps=(1,))

    async def full_disk(self, item, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))

    ck = Checkpointer(workdir, every_steps=1, keep=5, async_save=async_save)
    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_disk)
    with pytest.raises(CheckpointSaveError) as info:
        ck.save(2, small_state(2), config={"step": 2}, force=True)
        ck.wait()  # an async save's failure surfaces here
    ck.close()
    e = info.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and e.step == 2
    assert len(str(e).splitlines()) == 1 and "step 2" in str(e) and "No space left on device" in str(e)
    assert "step 1" in str(e)
    assert os.listdir(ckdir) == ["000000001"]  # the partial step (Orbax's temporary) is gone
    assert verify(os.path.join(ckdir, "000000001")) == ("ok", "")


def test_config_differences_names_the_keys():
    old = {"family": "titok", "task": {"name": "tokenizer"}, "total_steps": 10,
           "model": {"encoder_width": 128, "levels": [8, 8], "quantizer": {"codebook_size": 32}}}
    new = {"family": "titok", "task": {"name": "tokenizer"}, "total_steps": 99,
           "model": {"encoder_width": 64, "levels": (8, 8), "quantizer": {"codebook_size": 64},
                     "added_later": 1}}
    assert config_differences(old, new) == ["model.encoder_width 128 vs 64",
                                            "model.quantizer.codebook_size 32 vs 64"]
    assert config_differences(old, old) == []


# ----------------------------------------------------------------------------- the train command
@pytest.fixture
def two_steps(micro_tokenizer_dir, tmp_path):
    """A copy of the session's micro tokenizer run (one checkpoint, step 2) with a later step 4:
    step 2's folder copied (the train command checks a step's hash before Orbax reads it)."""
    copy = str(tmp_path / "copy")
    shutil.copytree(micro_tokenizer_dir, copy)
    ckdir = os.path.join(copy, "checkpoints")
    assert sorted(os.listdir(ckdir))[-1] == "000000002"
    shutil.copytree(os.path.join(ckdir, "000000002"), os.path.join(ckdir, "000000004"))
    return copy


def test_train_refuses_a_corrupt_latest_step_then_resumes_from_the_intact_one(two_steps, capsys):
    flip_a_byte(os.path.join(two_steps, "checkpoints", "000000004"))
    before = tree_digest(two_steps)
    args = ["train", "--config", CONFIG, "--workdir", two_steps, *MICRO_TOKENIZER_ARGS]
    capsys.readouterr()
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "step 4" in err and "corrupt" in err and "step 2 is intact" in err and "--resume_from_intact" in err
    assert tree_digest(two_steps) == before

    assert cli.main([*args, "--resume_from_intact"]) == 0  # total_steps=2: resumes, nothing to train
    captured = capsys.readouterr()
    assert "resuming from step 2" in captured.err and "resumed from step 2" in captured.err
    assert sorted(os.listdir(os.path.join(two_steps, "checkpoints")))[-1] == "000000002"
    assert os.listdir(os.path.join(two_steps, CORRUPT_DIR)) == ["000000004"]


def test_train_with_another_model_config_names_the_key(two_steps, capsys):
    before = tree_digest(two_steps)
    capsys.readouterr()
    assert cli.main(["train", "--config", CONFIG, "--workdir", two_steps, *MICRO_TOKENIZER_ARGS,
                     "--config.model.encoder_width=64", "--config.total_steps=6"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "model.encoder_width 32 vs 64" in err and "checkpoints" in err
    assert tree_digest(two_steps) == before


# ----------------------------------------------------------------------------- eval leaves the workdir as it is
def test_eval_on_a_read_only_workdir_still_prints_its_metrics(micro_tokenizer_dir, tmp_path, monkeypatch, capsys):
    workdir = str(tmp_path / "ro")
    shutil.copytree(micro_tokenizer_dir, workdir)
    root = os.path.realpath(workdir) + os.sep
    inside = lambda p: isinstance(p, (str, os.PathLike)) and os.path.realpath(p).startswith(root)  # noqa: E731
    real_open, real_mkdir = builtins.open, os.mkdir

    def ro_open(file, mode="r", *args, **kwargs):
        if inside(file) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    def ro_mkdir(path, *args, **kwargs):
        if inside(path) and not os.path.exists(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", ro_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)
    code = cli.main(["eval", "--workdir", workdir, "--num_images", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads(captured.out.strip().splitlines()[-1])
    assert metrics["step"] == 2 and "psnr" in metrics
    assert "warning" in captured.err and "Traceback" not in captured.err


def test_checkpoint_of_another_layout_is_one_line_not_abstract_params(vq_release_dir, tmp_path):
    """An unrolled checkpoint read by a config that scans its stacks: a partial restore would hand
    back placeholders for the stacked params (and fail later with a raw TypeError); it is one
    line naming the missing array instead (load_tokenizer's ValueError)."""
    import titok_jax
    work = str(tmp_path / "scanned")
    shutil.copytree(vq_release_dir, work)
    path = os.path.join(work, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["model"]["scan_layers"] = True
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError) as err:
        titok_jax.load_tokenizer(work, batch_size=2)
    msg = str(err.value)
    assert "\n" not in msg and "layers/transformer" in msg and "scan_layers" in msg, msg
