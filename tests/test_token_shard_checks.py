"""Token shards are checked when they are opened (issue 13): ids outside the tokenizer's vocabulary,
labels outside the classes, non-integer shards, shard names that leave the data set and FIFOs are each
refused with one line naming the file (and the first bad row) - before a generator trains on them."""
import contextlib
import json
import os
import pickle
import threading

import numpy as np
import pytest

from titok_jax import cli
from titok_jax.data import tokens as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN = os.path.join(ROOT, "configs", "maskgit.py") + ":tiny"
GEN_MICRO = ["--config.model.codebook_size=32", "--config.model.num_tokens=8", "--config.model.width=32",
             "--config.model.depth=1", "--config.model.num_heads=2", "--config.batch_size=8",
             "--config.total_steps=2", "--config.log_every_steps=1", "--config.eval_every_steps=0",
             "--config.checkpoint.every_steps=2", "--config.checkpoint.async_save=false",
             "--config.samples.num_images=0", "--progress=false"]


def write(path, tokens, labels=None, codebook_size=32, num_classes=6, shard_size=8):
    labels = np.zeros(len(tokens), np.int32) if labels is None else labels
    w = T.TokenShardWriter(str(path), shard_size=shard_size)
    w.add(tokens, labels)
    return w.close({"codebook_size": codebook_size, "num_classes": num_classes})


def good_tokens(rows=20, seed=0):
    return np.random.default_rng(seed).integers(0, 32, (rows, 8)).astype(np.int32)


def edit_meta(path, fn):
    meta_path = os.path.join(path, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    fn(meta)
    with open(meta_path, "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize("value", [32, -1, 2**31 - 1])
def test_ids_outside_the_vocabulary_name_file_and_row(tmp_path, value):
    toks = good_tokens()
    toks[13, 2] = value  # shard 1 (rows 8..15), its row 5
    write(tmp_path / "ds", toks)
    with pytest.raises(ValueError) as e:
        T.TokenSource(str(tmp_path / "ds"))
    msg = str(e.value)
    assert "tokens_00001.npy" in msg and "row 5" in msg and str(value) in msg and "0..31" in msg
    with pytest.raises(ValueError, match="tokens_00001.npy"):  # what generator training opens
        T.make_token_train_dataset(str(tmp_path / "ds"), 4, 0)


def test_labels_outside_the_classes(tmp_path):
    for i, label in enumerate((6, -2)):
        labels = np.zeros(20, np.int32)
        labels[17] = label
        write(tmp_path / f"ds{i}", good_tokens(), labels)
        with pytest.raises(ValueError) as e:
            T.TokenSource(str(tmp_path / f"ds{i}"))
        assert "labels_00002.npy" in str(e.value) and "row 1" in str(e.value) and str(label) in str(e.value)


def test_chunked_scan_finds_the_first_bad_row(tmp_path):
    toks = good_tokens(50)
    toks[[31, 40], 0] = 99
    with pytest.raises(ValueError, match="row 31 holds token id 99"):
        T.check_token_shard(toks, np.zeros(50, np.int32), 32, 1, "x.npy", chunk_rows=7)
    T.check_token_shard(good_tokens(50), np.full(50, -1, np.int32), 32, 0, "x.npy", chunk_rows=7)
    with pytest.raises(ValueError, match="must be integers"):
        T.check_token_shard(toks.astype(np.float32), np.zeros(50, np.int32), 32, 1, "x.npy")


def test_good_shards_open_and_workers_skip_the_rescan(tmp_path):
    write(tmp_path / "ds", good_tokens())
    src = T.TokenSource(str(tmp_path / "ds"))
    assert src.verify and len(src) == 20
    clone = pickle.loads(pickle.dumps(src))
    assert not clone.verify and len(clone) == 20


def test_float_shards_are_refused(tmp_path):
    write(tmp_path / "ds", good_tokens())
    np.save(tmp_path / "ds" / "tokens_00000.npy", good_tokens(8).astype(np.float32) + 0.5)
    with pytest.raises(ValueError, match="tokens_00000.npy: token ids must be integers"):
        T.TokenSource(str(tmp_path / "ds"))


@pytest.mark.parametrize("name, words", [
    ("../outside.npy", "outside"), ("/etc/passwd", "is absolute"), ("sub/tokens.npy", "plain file name"),
    ("labels_00000.npy", "both give"), ("", "is empty"),
])
def test_shard_names_stay_inside_the_data_set(tmp_path, name, words):
    write(tmp_path / "ds", good_tokens())
    np.save(tmp_path / "outside.npy", good_tokens(8))
    edit_meta(tmp_path / "ds", lambda m: m["shards"][0].update(tokens=name))
    with pytest.raises(ValueError, match=words):
        T.TokenSource(str(tmp_path / "ds"))


@pytest.mark.parametrize("key, value", [("count", "20"), ("num_tokens", 0), ("shards", {"a": 1}),
                                        ("codebook_size", -3)])
def test_malformed_meta_is_one_line(tmp_path, key, value):
    write(tmp_path / "ds", good_tokens())
    edit_meta(tmp_path / "ds", lambda m: m.update({key: value}))
    with pytest.raises(ValueError, match=key):
        T.TokenSource(str(tmp_path / "ds"))


def test_a_fifo_shard_is_refused_without_blocking(tmp_path):
    write(tmp_path / "ds", good_tokens())
    fifo = str(tmp_path / "ds" / "tokens_00001.npy")
    os.remove(fifo)
    os.mkfifo(fifo)
    stop = threading.Event()

    def unblock():  # old code blocks in np.load: give it EOF after 20 s so the test fails, not hangs
        if not stop.wait(20):
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                stop.wait(0.2)

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        with pytest.raises(ValueError, match="FIFO"):
            T.TokenSource(str(tmp_path / "ds"))
    finally:
        stop.set()
        thread.join()


def test_generator_training_refuses_out_of_range_shards(tmp_path, capsys):
    toks = good_tokens()
    toks[13, 2] = 32
    write(tmp_path / "ds", toks)
    workdir = tmp_path / "gen"
    assert cli.main(["train", "--config", GEN, "--workdir", str(workdir), *GEN_MICRO,
                     f"--config.data.source=tokens:{tmp_path / 'ds'}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[:2000]
    assert "tokens_00001.npy" in err and "row 5" in err and "token id 32" in err
    assert not (workdir / "metrics.jsonl").exists()
    ckpts = workdir / "checkpoints"
    assert not ckpts.exists() or not any(n.isdigit() for n in os.listdir(ckpts))
