"""Data sources (sample, folder, tfds) and NumPy transforms of titok_jax.data."""
import os
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image

from titok_jax import data as D
from titok_jax.data import sample_images


# ----------------------------------------------------------------------------- sample source
def test_sample_source_offline_uint8_rgb_and_disjoint_split():
    train = D.SampleSource("train")
    ev = D.SampleSource("eval")
    assert set(train.names).isdisjoint(ev.names)
    assert set(train.names) | set(ev.names) == set(sample_images.SAMPLE_FILES)
    assert len(ev) == len(ev.names) == 3  # eval: every held-out image once
    assert len(train) == len(train.names) * 128  # virtual epoch of many crops
    seen = {}
    for src in (train, ev):
        for i in range(len(src.names)):
            r = src[i]
            img = r["image"]
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] == 3
            assert min(img.shape[:2]) >= 256
            assert img.std() > 10  # a real photograph, not a blank
            seen[r["file"]] = img
    assert len(seen) == 9
    # record i of the virtual train epoch is image i % n
    n = len(train.names)
    assert train[n + 1]["file"] == train[1]["file"]
    assert D.SampleSource("validation").names == ev.names
    with pytest.raises(ValueError, match="unknown split"):
        D.SampleSource("bogus")


def test_sample_images_match_skimage_functions():
    import skimage.data

    np.testing.assert_array_equal(D.load_sample_image("astronaut"), skimage.data.astronaut())
    np.testing.assert_array_equal(D.load_sample_image("rocket"), skimage.data.rocket())


# ----------------------------------------------------------------------------- folder source
def _write(path, array, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (24, 16), dtype=np.uint8)
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., :3] = (10, 20, 30)
    rgba[:5, :, 3] = 255  # top half opaque, bottom half transparent
    root = tmp_path / "imgs"
    _write(str(root / "cats" / "a.png"), rgb)
    _write(str(root / "cats" / "deep" / "b.JPG"), rgb, fmt="JPEG")
    _write(str(root / "dogs" / "c.webp"), rgb, fmt="WEBP")
    _write(str(root / "dogs" / "gray.png"), gray)
    _write(str(root / "loose_rgba.png"), rgba)
    (root / "dogs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "notes.txt").write_text("not an image")
    return str(root), dict(rgb=rgb, gray=gray, rgba=rgba)


def test_folder_source_reads_rgb_and_skips_corrupt_at_read_time(image_folder):
    root, arrays = image_folder
    src = D.FolderSource(root)
    norm = [f.replace(os.sep, "/") for f in src.files]
    assert norm == sorted(norm)
    assert "notes.txt" not in norm and len(src) == 6  # 5 images + the corrupt .png
    assert src.class_names == ["cats", "dogs"]
    bad = norm.index("dogs/corrupt.png")
    with pytest.warns(D.CorruptImageWarning, match="corrupt.png"):
        records = [src[i] for i in range(len(src))]
    assert src.num_skipped == 1 and list(src.skipped_files) == [src.files[bad]]
    # the corrupt slot holds the next readable record, and says so through its index
    assert int(records[bad]["index"]) == (bad + 1) % len(src)
    assert records[bad]["file"] == records[(bad + 1) % len(src)]["file"]
    by_file = {r["file"].replace(os.sep, "/"): r for r in records}
    for r in records:
        assert r["image"].dtype == np.uint8 and r["image"].shape[-1] == 3
    np.testing.assert_array_equal(by_file["cats/a.png"]["image"], arrays["rgb"])
    assert by_file["cats/deep/b.JPG"]["image"].shape == (20, 30, 3)
    assert by_file["dogs/c.webp"]["image"].shape == (20, 30, 3)
    g = by_file["dogs/gray.png"]["image"]
    np.testing.assert_array_equal(g, np.repeat(arrays["gray"][..., None], 3, -1))
    rgba = by_file["loose_rgba.png"]["image"]
    np.testing.assert_array_equal(rgba[0, 0], [10, 20, 30])  # opaque keeps its colour
    np.testing.assert_array_equal(rgba[-1, 0], [255, 255, 255])  # transparent -> white
    assert int(by_file["cats/a.png"]["label"]) == 0 and int(by_file["dogs/gray.png"]["label"]) == 1
    assert int(by_file["loose_rgba.png"]["label"]) == -1
    # a second read of the corrupt slot neither warns again nor counts twice
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        src[bad]
    assert src.num_skipped == 1


def test_folder_source_verify_drops_corrupt_at_index_time(image_folder):
    root, _ = image_folder
    with pytest.warns(D.CorruptImageWarning, match="corrupt.png"):
        src = D.FolderSource(root, verify=True)
    assert len(src) == 5 and src.num_skipped == 1
    assert all("corrupt" not in f for f in src.files)
    assert all(int(src[i]["index"]) == i for i in range(len(src)))


def test_folder_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        D.FolderSource(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        D.FolderSource(str(tmp_path / "empty"))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        D.make_source(f"folder:{tmp_path / 'text'}")
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "a.jpg").write_bytes(b"garbage")
    with pytest.warns(D.CorruptImageWarning), pytest.raises(ValueError, match="corrupt"):
        D.FolderSource(str(tmp_path / "allbad"))[0]


def test_folder_split_subfolders(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    _write(str(tmp_path / "train" / "x" / "1.png"), img)
    _write(str(tmp_path / "train" / "y" / "2.png"), img)
    _write(str(tmp_path / "val" / "x" / "3.png"), img)
    tr = D.make_source(f"folder:{tmp_path}", "train")
    ev = D.make_source(f"folder:{tmp_path}", "eval")
    assert [os.path.basename(f) for f in tr.files] == ["1.png", "2.png"]
    assert [os.path.basename(f) for f in ev.files] == ["3.png"]
    with pytest.raises(ValueError, match="split"):
        D.make_source(f"folder:{tmp_path}", "test")


# ----------------------------------------------------------------------------- specs and tfds
def test_parse_source_spec():
    assert D.parse_source_spec("sample") == ("sample", None, None)
    assert D.parse_source_spec("folder:/a/b:c") == ("folder", "/a/b:c", None)
    assert D.parse_source_spec("tfds:imagenet2012") == ("tfds", "imagenet2012", None)
    assert D.parse_source_spec("tfds:cifar10:train[:10%]") == ("tfds", "cifar10", "train[:10%]")
    assert D.parse_source_spec("tfds:mnist:3.0.1:test") == ("tfds", "mnist:3.0.1", "test")
    for bad in ["imagenet", "folder:", "tfds:", "s3:bucket", "", None]:
        with pytest.raises(ValueError, match="data source"):
            D.make_source(bad)


def test_tfds_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        src = D.make_source("tfds:cifar10", "train")
        assert isinstance(src, D.TfdsSource) and len(src) == 6
        r = src[2]
        assert r["image"].dtype == np.uint8 and r["image"].shape == (32, 32, 3)
        assert 0 <= int(r["label"]) < 10 and int(r["index"]) == 2
        assert D.make_source("tfds:cifar10", "eval").split in ("validation", "test")
        assert D.make_source("tfds:cifar10:test", "train").split == "test"
        copy = pickle.loads(pickle.dumps(src))
        np.testing.assert_array_equal(copy[2]["image"], r["image"])
        it = D.make_train_iterator("tfds:cifar10", 16, 4, 0, process_index=0, process_count=1,
                                   read_threads=0)
        b = next(it)
        assert b["image"].shape == (4, 16, 16, 3) and b["label"].dtype == np.int32


def test_to_rgb_uint8():
    g = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(D.to_rgb_uint8(g), np.stack([g] * 3, -1))
    np.testing.assert_array_equal(D.to_rgb_uint8(g[..., None]), np.stack([g] * 3, -1))
    assert D.to_rgb_uint8(np.ones((2, 2), bool)).max() == 255
    np.testing.assert_array_equal(D.to_rgb_uint8(np.full((1, 1, 3), 0.5)), [[[128, 128, 128]]])
    with pytest.raises(ValueError, match="image"):
        D.to_rgb_uint8(np.zeros((2, 2, 5), np.uint8))


# ----------------------------------------------------------------------------- transforms
def test_center_crop_indices():
    img = np.arange(5 * 8 * 3, dtype=np.uint8).reshape(5, 8, 3)
    # top = (5 - 3) // 2 = 1, left = (8 - 3) // 2 = 2
    np.testing.assert_array_equal(D.center_crop(img, 3), img[1:4, 2:5])
    img = np.arange(7 * 4 * 3, dtype=np.uint8).reshape(7, 4, 3)
    np.testing.assert_array_equal(D.center_crop(img, 4), img[1:5, 0:4])
    with pytest.raises(ValueError, match="crop"):
        D.center_crop(img, 5)


def test_random_crop_is_a_window_and_deterministic():
    img = np.arange(10 * 12 * 3, dtype=np.int64).reshape(10, 12, 3)
    crops = [D.random_crop(img, 4, np.random.default_rng(s)) for s in range(20)]
    tops_lefts = set()
    for c in crops:
        top, left = int(c[0, 0, 0]) // (12 * 3), (int(c[0, 0, 0]) % (12 * 3)) // 3
        np.testing.assert_array_equal(c, img[top : top + 4, left : left + 4])
        tops_lefts.add((top, left))
    assert len(tops_lefts) > 5
    np.testing.assert_array_equal(D.random_crop(img, 4, np.random.default_rng(3)), crops[3])


def test_flip_and_value_range():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(D.horizontal_flip(img), img[:, [2, 1, 0]])
    x = np.array([[[0, 51, 255]]], np.uint8)
    f = D.to_float(x)
    assert f.dtype == np.float32
    np.testing.assert_allclose(f, [[[0.0, 0.2, 1.0]]], atol=1e-7)
    np.testing.assert_allclose(D.to_float(x, (-1.0, 1.0)), [[[-1.0, -0.6, 1.0]]], atol=1e-6)


def test_resize_shorter_side_keeps_aspect():
    rng = np.random.default_rng(0)
    assert D.resize_shorter_side(np.zeros((100, 50, 3), np.uint8), 20).shape == (40, 20, 3)
    assert D.resize_shorter_side(np.zeros((50, 100, 3), np.uint8), 20).shape == (20, 40, 3)
    # 451 * 32 / 300 = 48.1 -> 48
    assert D.resize_shorter_side(np.zeros((300, 451, 3), np.uint8), 32).shape == (32, 48, 3)
    const = np.full((60, 90, 3), 77, np.uint8)
    np.testing.assert_array_equal(D.resize_shorter_side(const, 20), np.full((20, 30, 3), 77))
    img = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    # 2x downscale: bicubic with antialias ~ the 2x2 block means (a smooth image would match closely)
    smooth = np.asarray(Image.fromarray(img).resize((48, 32), Image.Resampling.BOX))
    small = D.resize_shorter_side(img, 32)
    assert small.shape == (32, 48, 3) and small.dtype == np.uint8
    assert np.abs(small.astype(float) - smooth).mean() < np.abs(img[::2, ::2].astype(float) - smooth).mean()
    with pytest.raises(ValueError, match="image_size"):
        D.resize_shorter_side(img, 0)


def test_train_transform_deterministic_in_seed_and_index():
    rec = {"image": D.load_sample_image("coffee"), "label": np.int32(3), "index": np.int64(7)}
    t = D.TrainTransform(32, seed=1)
    a, b = t(5, rec), t(5, rec)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.float32
    assert 0.0 <= a["image"].min() and a["image"].max() <= 1.0
    assert int(a["label"]) == 3 and int(a["index"]) == 7
    assert not np.array_equal(t(6, rec)["image"], a["image"])
    assert not np.array_equal(D.TrainTransform(32, seed=2)(5, rec)["image"], a["image"])
    # flips happen about half the time
    t_img = D.TrainTransform(8, seed=0, crop_scale=(1.0, 1.0))
    sym = {"image": np.tile(np.arange(8, dtype=np.uint8)[None, :, None], (8, 1, 3)) * 30}
    flipped = [t_img(i, sym)["image"][0, 0, 0] > 0.5 for i in range(40)]
    assert 8 < sum(flipped) < 32
    for bad in [dict(image_size=0), dict(image_size=-3), dict(image_size=32, crop_scale=(0.0, 1.0)),
                dict(image_size=32, value_range=(1.0, 0.0))]:
        with pytest.raises(ValueError):
            D.TrainTransform(seed=0, **{"image_size": 32, **bad})


def test_rotate_hue_keeps_luminance_and_rotates_chroma():
    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, (16, 16, 3), dtype=np.uint8)   # mid-range: little clipping
    np.testing.assert_array_equal(D.rotate_hue(img, 0.0, 1.0), img)
    lum = np.array([0.299, 0.587, 0.114])
    for angle, sat in [(0.7, 1.0), (np.pi, 0.5), (2.0, 1.4)]:
        out = D.rotate_hue(img, angle, sat)
        assert out.dtype == np.uint8 and out.shape == img.shape
        unclipped = (out > 0).all(-1) & (out < 255).all(-1)
        assert unclipped.mean() > 0.8
        np.testing.assert_allclose((out @ lum)[unclipped], (img @ lum)[unclipped], atol=1.0)
    # a full turn is the identity; saturation 0 gives the grey of equal luminance
    np.testing.assert_allclose(D.rotate_hue(img, 2 * np.pi), img, atol=1)
    grey = D.rotate_hue(img, 1.0, 0.0).astype(float)
    np.testing.assert_allclose(grey[..., 0], grey[..., 2], atol=1)
    np.testing.assert_allclose(grey[..., 0], img @ lum, atol=1)
    # half a turn maps a colour's chroma to its negative: red -> cyan-ish, luminance kept
    red = np.array([[[180, 60, 60]]], np.uint8)
    cyan = D.rotate_hue(red, np.pi)[0, 0].astype(int)
    assert cyan[0] < 100 and cyan[1] > 100 and cyan[2] > 100
    # the transform applies it with probability `hue`: same seed and index, same colours
    rec = {"image": D.load_sample_image("coffee")}
    plain, hued = D.TrainTransform(32, seed=1), D.TrainTransform(32, seed=1, hue=1.0)
    a, b = plain(5, rec)["image"], hued(5, rec)["image"]
    np.testing.assert_array_equal(b, hued(5, rec)["image"])
    assert np.abs(a - b).mean() > 0.01
    np.testing.assert_allclose((a @ lum).mean(), (b @ lum).mean(), atol=0.01)
    with pytest.raises(ValueError, match="hue"):
        D.TrainTransform(32, seed=0, hue=1.5)


def test_eval_transform_center_crop_and_padding():
    img = D.load_sample_image("chelsea")  # 300 x 451
    t = D.EvalTransform(64, value_range=(-1.0, 1.0))
    out = t(4, {"image": img, "label": 1, "index": 4})
    want = D.to_float(D.center_crop(D.resize_shorter_side(img, 64), 64), (-1.0, 1.0))
    np.testing.assert_array_equal(out["image"], want)
    assert bool(out["mask"]) and int(out["index"]) == 4
    assert not bool(t(4, {"image": img, "index": 5})["mask"])  # a stand-in for a corrupt file
    pad = t(9, None)
    assert not bool(pad["mask"]) and pad["image"].shape == (64, 64, 3) and int(pad["index"]) == -1


def test_sources_and_transforms_pickle(image_folder):
    root, _ = image_folder
    for obj in [D.SampleSource("eval"), D.FolderSource(root, verify=False)]:
        copy = pickle.loads(pickle.dumps(obj))
        np.testing.assert_array_equal(copy[0]["image"], obj[0]["image"])
    t = D.TrainTransform(16, seed=3, crop_scale=(0.5, 1.0))
    rec = D.SampleSource("train")[0]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(t))(11, rec)["image"], t(11, rec)["image"])
