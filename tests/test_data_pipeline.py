"""grain pipelines of titok_jax.data: determinism, iterator state, per-process slicing, eval padding,
and host -> global arrays on the 8-device CPU mesh from conftest.py."""

import numpy as np
import pytest
from PIL import Image

from titok_jax import data as D

from data_helpers import SINGLE, assert_batches_equal, take


def _toy_source(n=8, size=12):
    """In-memory records whose pixels encode their index (any list of records is a source)."""
    out = []
    for i in range(n):
        img = np.zeros((size, size + 4, 3), np.uint8)
        img[...] = (i * 20) % 256
        img[0, 0] = (i, 0, 0)
        out.append({"image": img, "label": np.int32(i % 3), "index": np.int64(i), "file": str(i)})
    return out


def test_train_batches_shape_and_determinism():
    a = take(D.make_train_iterator("sample", 16, 4, seed=0, read_threads=0, **SINGLE), 2)
    b = take(D.make_train_iterator("sample", 16, 4, seed=0, **SINGLE), 2)  # threads: same result
    assert_batches_equal(a, b)
    assert a[0]["image"].shape == (4, 16, 16, 3) and a[0]["image"].dtype == np.float32
    assert a[0]["label"].dtype == np.int32 and a[0]["index"].dtype == np.int64
    c = take(D.make_train_iterator("sample", 16, 4, seed=1, read_threads=0, **SINGLE), 2)
    assert not np.array_equal(a[0]["index"], c[0]["index"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    m = next(D.make_train_iterator("sample", 16, 4, seed=0, read_threads=0, value_range=(-1, 1), **SINGLE))
    np.testing.assert_allclose(m["image"], a[0]["image"] * 2 - 1, atol=1e-6)


def test_shuffle_is_reshuffled_every_epoch():
    src = _toy_source(8)
    it = D.make_train_iterator(src, 8, 8, seed=3, num_epochs=3, read_threads=0, **SINGLE)
    epochs = [b["index"].tolist() for b in it]
    assert len(epochs) == 3
    for e in epochs:
        assert sorted(e) == list(range(8))  # each epoch sees every record once
    assert epochs[0] != list(range(8)) and len({tuple(e) for e in epochs}) == 3
    plain = D.make_train_iterator(src, 8, 8, seed=3, num_epochs=1, shuffle=False, read_threads=0, **SINGLE)
    assert next(plain)["index"].tolist() == list(range(8))


def test_finite_epochs_cut_to_whole_global_batches():
    src = _toy_source(10)
    # 2 epochs x 10 = 20 records -> 3 global batches of 6 on every process (18 records)
    counts = []
    seen = []
    for p in range(2):
        batches = list(D.make_train_iterator(src, 8, 6, seed=0, num_epochs=2, read_threads=0,
                                             process_index=p, process_count=2))
        counts.append(len(batches))
        seen += [i for b in batches for i in b["index"].tolist()]
    assert counts == [3, 3] and len(seen) == 18


@pytest.mark.parametrize("read_threads", [0, 4])
def test_iterator_state_restore_continues_identically(read_threads):
    kw = dict(read_threads=read_threads, **SINGLE)
    it = D.make_train_iterator("sample", 16, 4, seed=5, **kw)
    take(it, 2)
    state = it.get_state()
    expected = take(it, 3)
    fresh = D.make_train_iterator("sample", 16, 4, seed=5, **kw)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)
    # and a fresh iterator without the state starts over (so the check above means something)
    assert not np.array_equal(next(D.make_train_iterator("sample", 16, 4, seed=5, **kw))["index"],
                              expected[0]["index"])


def test_per_process_slices_partition_the_global_batch():
    """Process p's row j of step k is global stream position k*G + j*n + p: the n processes together
    see exactly the single-process global batch (same records, same crops), without overlap."""
    src = _toy_source(16)
    G, steps = 8, 3
    whole = take(D.make_train_iterator(src, 8, G, seed=7, read_threads=0, **SINGLE), steps)
    for n in (2, 4):
        per_proc = [
            take(D.make_train_iterator(src, 8, G, seed=7, read_threads=0, process_index=p,
                                       process_count=n), steps)
            for p in range(n)
        ]
        for k in range(steps):
            rows = [per_proc[p][k] for p in range(n)]
            assert all(r["image"].shape[0] == G // n for r in rows)
            idx = np.concatenate([r["index"] for r in rows])
            assert len(set(idx.tolist())) == G  # no overlap within a step (16 records, 8 per step)
            for p in range(n):
                for j in range(G // n):
                    np.testing.assert_array_equal(per_proc[p][k]["image"][j], whole[k]["image"][j * n + p])
                    assert per_proc[p][k]["index"][j] == whole[k]["index"][j * n + p]


def test_eval_iterator_covers_held_out_images_once_with_padding_mask():
    ds = D.make_eval_dataset("sample", 32, 2, **SINGLE)
    assert len(ds) == 2  # 3 held-out images -> 2 batches of 2
    batches = list(D.make_eval_iterator("sample", 32, 2, **SINGLE))
    assert len(batches) == 2
    assert batches[0]["mask"].tolist() == [True, True] and batches[1]["mask"].tolist() == [True, False]
    assert batches[1]["index"].tolist() == [2, -1]
    src = D.SampleSource("eval")
    want = D.EvalTransform(32)(1, src[1])["image"]
    np.testing.assert_array_equal(batches[0]["image"][1], want)
    again = list(D.make_eval_iterator("sample", 32, 2, **SINGLE))
    assert_batches_equal(batches, again)
    # two processes: same number of steps each, valid images partitioned without overlap
    parts = [list(D.make_eval_iterator("sample", 32, 4, process_index=p, process_count=2))
             for p in range(2)]
    assert [len(x) for x in parts] == [1, 1]
    valid = [int(i) for x in parts for b in x for i, m in zip(b["index"], b["mask"]) if m]
    assert sorted(valid) == [0, 1, 2]
    assert parts[1][0]["mask"].tolist() == [True, False]  # positions 1 and 3 (padding)


def test_eval_masks_stand_in_for_corrupt_file(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "1b.png").write_bytes(b"not a png")  # sorts between 1.png and 2.png
    with pytest.warns(D.CorruptImageWarning):
        batches = list(D.make_eval_iterator(f"folder:{tmp_path}", 8, 4, read_threads=0, **SINGLE))
    (b,) = batches
    assert b["index"].tolist() == [0, 1, 3, 3] and b["mask"].tolist() == [True, True, False, True]
    assert int(b["mask"].sum()) == 3  # each readable image counted once


def test_pipeline_errors():
    with pytest.raises(ValueError, match="image_size"):
        D.make_train_iterator("sample", 0, 8, 0, **SINGLE)
    with pytest.raises(ValueError, match="divisible by the process count"):
        D.make_train_iterator("sample", 16, 8, 0, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="batch size"):
        D.make_eval_iterator("sample", 16, 0, **SINGLE)
    with pytest.raises(ValueError, match="unknown data source"):
        D.make_train_iterator("imagenet", 16, 8, 0, **SINGLE)
    with pytest.raises(ValueError, match="seed"):
        D.make_train_iterator("sample", 16, 8, -1, **SINGLE)
    with pytest.raises(ValueError, match="less than one global batch"):
        D.make_train_iterator(_toy_source(4), 8, 8, 0, num_epochs=1, **SINGLE)
    with pytest.raises(ValueError, match="process"):
        D.make_train_iterator("sample", 16, 8, 0, process_index=2, process_count=2)
    with pytest.raises(FileNotFoundError, match="not found"):
        D.make_train_iterator("folder:/nonexistent/images", 16, 8, 0, **SINGLE)


def test_to_global_array_on_8_device_mesh():
    import jax
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))
    batch = next(D.make_train_iterator("sample", 8, 8, 0, read_threads=0))  # jax's process info
    g = D.to_global_array(batch, mesh)
    assert g["image"].shape == (8, 8, 8, 3) and g["label"].shape == (8,)
    assert g["image"].sharding.spec == P(("data", "fsdp"))
    # batch split 4 ways over data x fsdp, replicated over tensor
    shard_shapes = {s.data.shape for s in g["image"].addressable_shards}
    assert shard_shapes == {(2, 8, 8, 3)}
    assert len({s.index[0].start for s in g["image"].addressable_shards}) == 4
    np.testing.assert_array_equal(np.asarray(g["image"]), batch["image"])
    np.testing.assert_array_equal(np.asarray(g["index"]), batch["index"])
    # a mesh without fsdp: the batch goes over 'data' only
    mesh2 = jax.make_mesh((8,), ("data",))
    g2 = D.make_global_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh2)
    assert g2["x"].sharding.spec == P(("data",))
    assert {s.data.shape for s in g2["x"].addressable_shards} == {(1, 2)}
    with pytest.raises(ValueError, match="divisible"):
        D.to_global_array({"x": np.zeros((6, 2))}, mesh)


def test_train_iterator_from_config():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict(dict(seed=0, batch_size=4, data=dict(source="sample", image_size=16)))
    a = next(D.train_iterator_from_config(cfg, read_threads=0, **SINGLE))
    b = next(D.make_train_iterator("sample", 16, 4, 0, read_threads=0, **SINGLE))
    assert_batches_equal([a], [b])
    e = list(D.eval_iterator_from_config(cfg, **SINGLE))
    assert len(e) == 1 and e[0]["mask"].tolist() == [True, True, True, False]
    # hue augmentation from the config: same crops, other colours; eval never augments
    cfg.data.hue = 1.0
    h = next(D.train_iterator_from_config(cfg, read_threads=0, **SINGLE))
    assert not np.array_equal(h["image"], a["image"])
    np.testing.assert_array_equal(list(D.eval_iterator_from_config(cfg, **SINGLE))[0]["image"],
                                  e[0]["image"])
    # the trainer's tasks and metrics expect [0, 1]: another range is a one-line config error
    cfg.data.value_range = (-1.0, 1.0)
    for make in (D.train_iterator_from_config, D.eval_iterator_from_config):
        with pytest.raises(ValueError, match=r"data.value_range must be \(0, 1\)"):
            make(cfg, **SINGLE)


def test_train_dataset_pickles_for_spawned_workers():
    import pickle

    ds = D.make_train_dataset("sample", 16, 4, 0, read_threads=0, **SINGLE)
    copy = pickle.loads(pickle.dumps(ds))
    assert_batches_equal(take(iter(copy), 2), take(iter(ds), 2))


@pytest.mark.slow
def test_worker_processes_give_the_same_batches():
    """mp_prefetch spawns workers: sources and transforms must pickle, and results must not depend
    on the worker count."""
    a = take(D.make_train_iterator("sample", 16, 4, 0, read_threads=0, **SINGLE), 3)
    it = D.make_train_iterator("sample", 16, 4, 0, read_threads=0, worker_count=2, **SINGLE)
    b = take(it, 3)
    assert_batches_equal(a, b)
    state = it.get_state()
    c = take(it, 2)
    fresh = D.make_train_iterator("sample", 16, 4, 0, read_threads=0, worker_count=2, **SINGLE)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 2), c)
