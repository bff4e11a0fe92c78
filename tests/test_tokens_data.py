"""Token shards: the writer/reader round trip, the grain batches, and refusals."""
import json
import os
import pickle

import numpy as np
import pytest

from titok_jax.data import tokens as T


def _write(path, rows=23, num_tokens=5, shard_size=7, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 100, (rows, num_tokens)).astype(np.int32)
    labels = rng.integers(0, 4, rows).astype(np.int32)
    w = T.TokenShardWriter(str(path), shard_size=shard_size)
    for start in range(0, rows, 5):  # batches of 5 cross the shard boundaries
        w.add(toks[start:start + 5], labels[start:start + 5])
    meta = w.close({"codebook_size": 100})
    return toks, labels, meta


def test_round_trip_across_shards(tmp_path):
    toks, labels, meta = _write(tmp_path / "ds")
    assert meta["count"] == 23 and [s["count"] for s in meta["shards"]] == [7, 7, 7, 2]
    assert meta["num_classes"] == int(labels.max()) + 1  # inferred from the labels
    src = T.TokenSource(str(tmp_path / "ds"))
    assert len(src) == 23 and src.num_tokens == 5
    got = np.stack([src[i]["tokens"] for i in range(23)])
    np.testing.assert_array_equal(got, toks)
    np.testing.assert_array_equal([int(src[i]["label"]) for i in range(23)], labels)
    with pytest.raises(IndexError):
        src[23]
    clone = pickle.loads(pickle.dumps(src))  # grain workers get it by path
    np.testing.assert_array_equal(clone[22]["tokens"], toks[22])


def test_train_batches_are_a_seeded_permutation(tmp_path):
    toks, _, _ = _write(tmp_path / "ds", rows=16, shard_size=5)
    def epoch(seed):
        ds = T.make_token_train_dataset(str(tmp_path / "ds"), 4, seed, num_epochs=1)
        return np.concatenate([b["tokens"] for b in ds])
    a, b, c = epoch(1), epoch(1), epoch(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert sorted(map(tuple, a)) == sorted(map(tuple, toks))  # every row once per epoch


def test_refusals(tmp_path):
    _write(tmp_path / "ds")
    with pytest.raises(ValueError, match="not empty"):
        T.TokenShardWriter(str(tmp_path / "ds"))
    w = T.TokenShardWriter(str(tmp_path / "vae"))
    with pytest.raises(ValueError, match="integer ids"):
        w.add(np.zeros((2, 3), np.float32), np.zeros(2))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.TokenSource(str(tmp_path / "nothing"))
    os.makedirs(tmp_path / "partial")
    np.save(tmp_path / "partial" / "tokens_00000.npy", np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="interrupted"):  # no meta.json: an interrupted write
        T.TokenSource(str(tmp_path / "partial"))
    meta_path = tmp_path / "ds" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["count"] = 99
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="meta.json says 99"):
        T.TokenSource(str(tmp_path / "ds"))


def test_augmented_passes_differ_and_cover_the_source():
    batches, rows, src = T.image_batches_for_tokenizing("sample", 16, 4, epochs=2, seed=0)
    out = list(batches)
    images = np.concatenate([b["image"] for b in out])
    labels = np.concatenate([b["label"] for b in out])
    assert rows == 2 * len(src) and images.shape == (rows, 16, 16, 3)
    n = len(src)
    assert not np.allclose(images[:n], images[n:])  # a new crop/flip per pass
    np.testing.assert_array_equal(labels[:n], labels[n:])
    assert set(labels.tolist()) == set(range(src.num_classes))
    with pytest.raises(ValueError, match="epochs=1"):
        T.image_batches_for_tokenizing("sample", 16, 4, epochs=2, augment=False)
