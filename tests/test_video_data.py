"""Clip data for video tokenizers (titok_jax.data.video, .video_sources, .sample_video): the offline
``sample_video`` source, ``video_folder:`` (frame folders, GIF; mp4/webm when PyAV is installed),
skipping of unusable videos, and the image pipeline's guarantees (keys, determinism, resume)."""
import os
import pickle
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from titok_jax import data as D
from titok_jax.data import sample_images
from titok_jax.data import sample_video as SV
from titok_jax.data import video as V
from titok_jax.data import video_sources as VS
from titok_jax.data.transforms import record_rng

from data_helpers import SINGLE, assert_batches_equal, take


def _texture(h=24, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _frame(i, texture):
    """Frame ``i`` of a test video: the texture in R and G (same for every frame), the frame number
    as a uniform B = 10 * i."""
    f = texture.copy()
    f[..., 2] = 10 * i
    return f


def _frame_folder(path, n, texture=None, ext="png"):
    texture = _texture() if texture is None else texture
    os.makedirs(path, exist_ok=True)
    for i in range(n):  # unpadded names: natural order f2 < f10
        Image.fromarray(_frame(i, texture)).save(os.path.join(path, f"f{i}.{ext}"))


def _frame_numbers(clip_float):
    """The frame numbers of a transformed clip (from its uniform blue channel)."""
    blue = clip_float[..., 2] * 255.0
    assert np.ptp(blue, axis=(1, 2)).max() <= 2.0  # uniform channel stays uniform through resizes
    return np.round(blue.mean(axis=(1, 2)) / 10.0).astype(int).tolist()


def _write_gif(path, frames):
    ims = [Image.fromarray(f) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=40, loop=0)


# ---------------------------------------------------------------------------------- sample_video

def test_sample_video_shapes_dtype_range_and_keys():
    src = SV.SampleVideoSource("train", num_frames=6, frame_size=24)
    rec = src[0]
    assert rec["video"].shape == (6, 24, 24, 3) and rec["video"].dtype == np.uint8
    assert len(src) == len(sample_images.TRAIN_IMAGES) * 128
    it = V.make_video_train_iterator("sample_video", 24, 4, 0, num_frames=6, read_threads=0, **SINGLE)
    b = next(it)
    image_batch = next(D.make_train_iterator("sample", 24, 4, 0, read_threads=0, **SINGLE))
    assert b.keys() == image_batch.keys()  # the same keys as the image pipeline
    assert b["image"].shape == (4, 6, 24, 24, 3) and b["image"].dtype == np.float32
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0 and b["image"].std() > 0.05
    assert b["label"].dtype == np.int32 and b["index"].dtype == np.int64
    e = list(V.make_video_eval_iterator("sample_video", 24, 2, num_frames=6, **SINGLE))
    assert [x["mask"].tolist() for x in e] == [[True, True], [True, False]]  # 3 held-out clips
    assert e[0]["image"].shape == (2, 6, 24, 24, 3) and e[0]["image"].dtype == np.float32
    assert not e[1]["image"][1].any()  # padding


def test_sample_video_deterministic_in_seed_and_index():
    src = SV.SampleVideoSource("train", num_frames=5, frame_size=16)
    a = src.get_clip(3, record_rng(7, 11))["video"]
    np.testing.assert_array_equal(a, src.get_clip(3, record_rng(7, 11))["video"])
    assert not np.array_equal(a, src.get_clip(3, record_rng(7, 12))["video"])  # new draw, same photo
    assert not np.array_equal(src[0]["video"], src[6]["video"])  # repeats of a photo differ
    np.testing.assert_array_equal(src[6]["video"], pickle.loads(pickle.dumps(src))[6]["video"])
    kw = dict(num_frames=5, **SINGLE)
    x = take(V.make_video_train_iterator("sample_video", 16, 4, 1, read_threads=0, **kw), 2)
    y = take(V.make_video_train_iterator("sample_video", 16, 4, 1, read_threads=4, **kw), 2)
    assert_batches_equal(x, y)  # threads do not change the result
    z = next(V.make_video_train_iterator("sample_video", 16, 4, 2, read_threads=0, **kw))
    assert not np.array_equal(x[0]["image"], z["image"])


def test_sample_video_held_out_split_uses_only_held_out_photos():
    for split, names in (("eval", sample_images.EVAL_IMAGES), ("train", sample_images.TRAIN_IMAGES)):
        src = SV.SampleVideoSource(split, num_frames=3, frame_size=16, repeats=2)
        files = {src.get_clip(i, record_rng(0, i))["file"] for i in range(len(src))}
        assert files == {f"sample_video:{n}" for n in names}
    # the eval pipeline's clips are exactly the held-out photos' fixed clips, whatever the run seed
    batches = list(V.make_video_eval_iterator("sample_video", 16, 4, num_frames=3, **SINGLE))
    held_out = SV.SampleVideoSource("eval", num_frames=3, frame_size=16)
    np.testing.assert_allclose(batches[0]["image"][:3],
                               np.stack([held_out[i]["video"] for i in range(3)]) / 255.0, atol=1e-6)


def test_camera_path_stays_inside_the_photo():
    for k in range(200):
        rng = np.random.default_rng(k)
        h, w = (300, 451) if k % 2 else (1411, 1411)
        p = SV.camera_path(h, w, 31, rng)
        for u in np.linspace(0, 1, 31):
            cy, cx = p["c0"] + u * p["d"]
            half = 0.5 * p["s0"] * (p["s1"] / p["s0"]) ** u
            assert -1e-6 <= cy - half and cy + half <= h + 1e-6, (k, p)
            assert -1e-6 <= cx - half and cx + half <= w + 1e-6, (k, p)


def test_sample_video_renders_every_draw_at_any_size():
    """Windows touching the photo's border (after float rounding and the shrunk copy) still render."""
    src = SV.SampleVideoSource("train", num_frames=16, frame_size=64)
    for i in (51, 107, 117):  # full-photo windows whose edges round to -1e-14 px
        assert src.get_clip(i, record_rng(0, i))["video"].shape == (16, 64, 64, 3)
    for size in (16, 40, 128):
        src = SV.SampleVideoSource("train", num_frames=3, frame_size=size, frame_stride=7)
        for i in range(30):
            assert src.get_clip(i, record_rng(size, i))["video"].shape == (3, size, size, 3)


def test_sample_video_motion_is_smooth():
    src = SV.SampleVideoSource("train", num_frames=8, frame_size=32)
    motions = set()
    for i in range(24):
        rec = src.get_clip(i, record_rng(5, i))
        motions.add(rec["motion"])
        v = rec["video"].astype(np.float32) / 255.0
        step = np.abs(np.diff(v, axis=0)).mean(axis=(1, 2, 3))
        first_last = np.abs(v[0] - v[-1]).mean()
        assert first_last > 0.003, i  # the camera moves (retina: mostly flat dark)
        assert step.max() < first_last, (i, step, first_last)  # ... a little each frame
        assert step.max() < 0.2, (i, step)
    assert motions == set(SV.MOTIONS)


# -------------------------------------------------------------------------------- video_folder

def test_frame_folder_temporal_crops_and_stride(tmp_path):
    tex = _texture()
    _frame_folder(tmp_path / "walk" / "clip_a", 20, tex)  # class "walk"
    _frame_folder(tmp_path / "run" / "clip_b", 12, tex)
    src = VS.VideoFolderSource(str(tmp_path), num_frames=4, frame_stride=3)  # span 10
    assert src.files == [os.path.join("run", "clip_b"), os.path.join("walk", "clip_a")]
    assert src.class_names == ["run", "walk"] and src.labels.tolist() == [0, 1]
    # eval: the central clip; frames in natural name order (f2 before f10)
    assert (src[1]["video"][..., 2] // 10)[:, 0, 0].tolist() == [5, 8, 11, 14]
    assert (src[0]["video"][..., 2] // 10)[:, 0, 0].tolist() == [1, 4, 7, 10]
    np.testing.assert_array_equal(src[1]["video"][0, ..., :2], tex[..., :2])
    # training: random starts, stride 3, one spatial crop / flip for all frames; same seed -> same
    spec = f"video_folder:{tmp_path}"
    kw = dict(num_frames=4, frame_stride=3, crop_scale=(0.5, 1.0), read_threads=0, **SINGLE)
    batches = take(V.make_video_train_iterator(spec, 16, 2, 0, **kw), 6)
    assert_batches_equal(batches, take(V.make_video_train_iterator(spec, 16, 2, 0, **kw), 6))
    starts = set()
    for b in batches:
        for clip, index in zip(b["image"], b["index"]):
            nums = _frame_numbers(clip)
            assert np.diff(nums).tolist() == [3, 3, 3] and 0 <= nums[0] <= (20 if index else 12) - 10
            starts.add((int(index), nums[0]))
            for t in range(1, 4):  # the texture channels are cropped identically in every frame
                np.testing.assert_array_equal(clip[t, ..., :2], clip[0, ..., :2])
    assert len(starts) > 3
    e = list(V.make_video_eval_iterator(spec, 16, 2, num_frames=4, frame_stride=3, **SINGLE))
    assert [_frame_numbers(c) for c in e[0]["image"]] == [[1, 4, 7, 10], [5, 8, 11, 14]]


def test_too_short_video_skipped_and_counted(tmp_path):
    _frame_folder(tmp_path / "long", 8)
    _frame_folder(tmp_path / "short", 3)  # known too short from the listing
    tex = _texture()
    _write_gif(str(tmp_path / "short.gif"), [_frame(i, tex) for i in range(2)])  # found at read time
    with pytest.warns(VS.CorruptVideoWarning, match=r"skipping 1 of 3 videos.*1 too short") as rec:
        src = VS.VideoFolderSource(str(tmp_path), num_frames=4)
    assert len(rec) == 1  # one summary warning
    assert src.files == ["long", "short.gif"] and src.num_skipped == 1
    assert src.skipped_files["short"].startswith("too short: 3 frames")
    with pytest.warns(VS.CorruptVideoWarning, match="short.gif: too short"):
        r = src[1]
    assert r["index"] == 0 and r["file"] == "long"  # the next usable video stands in
    assert src.num_skipped == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each video warns once
        assert src[1]["index"] == 0


def test_corrupt_video_skipped_with_warning_and_masked_at_eval(tmp_path):
    _frame_folder(tmp_path / "a_good", 5)
    (tmp_path / "b_bad.gif").write_bytes(b"GIF89a not really a gif")
    _frame_folder(tmp_path / "c_bad_frame", 5)
    (tmp_path / "c_bad_frame" / "f2.png").write_bytes(b"\x89PNG\r\n broken")
    spec = f"video_folder:{tmp_path}"
    with pytest.warns(VS.CorruptVideoWarning) as rec:
        e = list(V.make_video_eval_iterator(spec, 8, 3, num_frames=4, **SINGLE))
    assert {str(w.message).split(": ")[0] for w in rec} == {
        f"skipping video {tmp_path / 'b_bad.gif'}", f"skipping video {tmp_path / 'c_bad_frame'}"}
    assert e[0]["index"].tolist() == [0, 0, 0] and e[0]["mask"].tolist() == [True, False, False]
    # training never crashes either: every clip comes from the good video
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VS.CorruptVideoWarning)
        b = next(V.make_video_train_iterator(spec, 8, 3, 0, num_frames=4, read_threads=0, **SINGLE))
    assert b["index"].tolist() == [0, 0, 0]
    # verify=True decodes every video once at construction: one summary warning, bad ones left out
    with pytest.warns(VS.CorruptVideoWarning, match=r"skipping 2 of 3 videos .*2 unreadable") as rec:
        src = VS.VideoFolderSource(str(tmp_path), num_frames=4, verify=True)
    assert len(rec) == 1 and src.files == ["a_good"] and src.num_skipped == 2


def test_video_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="video folder not found"):
        VS.VideoFolderSource(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no videos"):
        VS.VideoFolderSource(str(tmp_path))
    _frame_folder(tmp_path / "a", 3)
    with pytest.raises(ValueError, match="no usable video .* all 1 are unreadable or shorter than 5"):
        VS.VideoFolderSource(str(tmp_path), num_frames=2, frame_stride=4)
    with pytest.raises(ValueError, match="unknown video source"):
        V.make_video_source("video_folder:")
    with pytest.raises(ValueError, match="num_frames must be a positive integer"):
        VS.VideoFolderSource(str(tmp_path), num_frames=0)


def test_compressed_video_without_pyav_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    _frame_folder(tmp_path / "frames", 4)
    assert len(VS.VideoFolderSource(str(tmp_path), num_frames=4)) == 1  # frames need no extra
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    with pytest.raises(VS.MissingExtraError, match=r"needs PyAV.*pip install 'titok_jax\[video\]'") as e:
        VS.VideoFolderSource(str(tmp_path), num_frames=4)
    assert "\n" not in str(e.value) and isinstance(e.value, ImportError)


def test_gif_round_trip(tmp_path):
    tex = (_texture() // 64) * 64  # few colours: GIF's palette keeps them exactly
    frames = [_frame(i, tex) for i in range(9)]
    _write_gif(str(tmp_path / "clip.gif"), frames)
    src = VS.VideoFolderSource(str(tmp_path), num_frames=3, frame_stride=2)
    np.testing.assert_array_equal(src[0]["video"], np.stack(frames[2:7:2]))  # central: start 2


def _write_av(path, frames, codec, fps=10):
    av = pytest.importorskip("av")
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize("ext,codec", [("mp4", "libx264"), ("webm", "libvpx")])
def test_compressed_video_round_trip(tmp_path, ext, codec):
    pytest.importorskip("av")
    frames = [np.full((32, 48, 3), 20 * i + 10, np.uint8) for i in range(12)]
    _write_av(str(tmp_path / f"clip.{ext}"), frames, codec)
    src = VS.VideoFolderSource(str(tmp_path), num_frames=4, frame_stride=2)
    clip = src[0]["video"]
    assert clip.shape == (4, 32, 48, 3) and clip.dtype == np.uint8
    np.testing.assert_allclose(clip.mean(axis=(1, 2, 3)), [50, 90, 130, 170], atol=6)  # start 2
    clip = src.get_clip(0, np.random.default_rng(1))["video"]
    levels = np.round((clip.mean(axis=(1, 2, 3)) - 10) / 20)
    assert np.diff(levels).tolist() == [2, 2, 2]


# ---------------------------------------------------------------------------- pipeline guarantees

@pytest.mark.parametrize("spec", ["sample_video", "folder"])
def test_iterator_state_restore_continues_identically(tmp_path, spec):
    if spec == "folder":
        for k in range(3):
            _frame_folder(tmp_path / f"v{k}", 7, _texture(seed=k))
        spec = f"video_folder:{tmp_path}"
    kw = dict(num_frames=3, frame_stride=2, read_threads=0, **SINGLE)
    it = V.make_video_train_iterator(spec, 16, 2, 5, **kw)
    take(it, 2)
    state = it.get_state()
    expected = take(it, 3)
    fresh = V.make_video_train_iterator(spec, 16, 2, 5, **kw)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)
    assert not np.array_equal(next(V.make_video_train_iterator(spec, 16, 2, 5, **kw))["image"],
                              expected[0]["image"])


def test_per_process_slices_partition_the_global_batch():
    """As for images: process p's row j of step k is global stream position k*G + j*n + p."""
    rng = np.random.default_rng(0)
    src = [{"video": rng.integers(0, 256, (6, 10, 12, 3), dtype=np.uint8), "label": np.int32(i)}
           for i in range(8)]
    kw = dict(num_frames=2, frame_stride=2, read_threads=0)
    whole = take(V.make_video_train_iterator(src, 8, 4, 3, **kw, **SINGLE), 2)
    parts = [take(V.make_video_train_iterator(src, 8, 4, 3, process_index=p, process_count=2, **kw), 2)
             for p in range(2)]
    for k in range(2):
        merged = np.empty_like(whole[k]["image"])
        merged[0::2], merged[1::2] = parts[0][k]["image"], parts[1][k]["image"]
        np.testing.assert_array_equal(merged, whole[k]["image"])


def test_video_iterators_from_config_and_pickling():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict(dict(seed=0, batch_size=2, data=dict(
        source="sample_video", image_size=16, num_frames=3, frame_stride=2)))
    a = next(D.train_iterator_from_config(cfg, read_threads=0, **SINGLE))
    b = next(V.make_video_train_iterator("sample_video", 16, 2, 0, num_frames=3, frame_stride=2,
                                         read_threads=0, **SINGLE))
    assert_batches_equal([a], [b])
    e = list(D.eval_iterator_from_config(cfg, **SINGLE))
    assert [x["mask"].tolist() for x in e] == [[True, True], [True, False]]
    assert e[0]["image"].shape == (2, 3, 16, 16, 3)
    ds = V.make_video_train_dataset("sample_video", 16, 2, 0, num_frames=3, read_threads=0, **SINGLE)
    assert_batches_equal(take(iter(pickle.loads(pickle.dumps(ds))), 2), take(iter(ds), 2))
    cfg.data.value_range = (-1.0, 1.0)
    with pytest.raises(ValueError, match=r"data.value_range must be \(0, 1\)"):
        D.train_iterator_from_config(cfg, **SINGLE)


@pytest.mark.slow
def test_worker_processes_give_the_same_clips():
    """mp_prefetch spawns workers: clip sources and transforms pickle, results do not depend on the
    worker count, and the iterator state resumes across them."""
    kw = dict(num_frames=3, read_threads=0, **SINGLE)
    a = take(V.make_video_train_iterator("sample_video", 16, 2, 0, **kw), 3)
    it = V.make_video_train_iterator("sample_video", 16, 2, 0, worker_count=2, **kw)
    assert_batches_equal(a, take(it, 3))
    state = it.get_state()
    c = take(it, 2)
    fresh = V.make_video_train_iterator("sample_video", 16, 2, 0, worker_count=2, **kw)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 2), c)


def test_fifo_named_like_a_video_is_skipped_not_read(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    _frame_folder(tmp_path / "clip", 4)
    os.mkfifo(tmp_path / "pipe.gif")  # reading it would block forever
    with pytest.warns(VS.CorruptVideoWarning, match="skipping 1 of 2 videos"):
        src = VS.VideoFolderSource(str(tmp_path), num_frames=4)
    assert src.files == ["clip"] and "not a regular video file" in src.skipped_files["pipe.gif"]


# ----------------------------------------------------------------------------- tfds_video
try:
    import tensorflow_datasets as tfds
except ImportError:   # the tfds extra is optional
    tfds = None

if tfds is not None:
    class TitokTinyClips(tfds.core.GeneratorBasedBuilder):
        """12-frame 20x24 clips (a ``video`` Tensor feature: TFDS's ``Video`` feature needs
        TensorFlow to prepare); the records come from ``mock_data``."""
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "video": tfds.features.Tensor(shape=(12, 20, 24, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(), "test": self._generate_examples()}

        def _generate_examples(self):
            yield 0, {"video": np.zeros((12, 20, 24, 3), np.uint8), "label": 0}


@pytest.mark.skipif(tfds is None, reason="needs tensorflow_datasets")
def test_tfds_video_source_and_pipelines_with_mock_data():
    spec = "tfds_video:titok_tiny_clips"
    assert V.is_video_spec(spec) and not V.is_video_spec("tfds:titok_tiny_clips")
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        src = V.make_video_source(spec, "train")
        assert isinstance(src, VS.TfdsVideoSource) and len(src) == 5
        r = src[3]
        assert r["video"].dtype == np.uint8 and r["video"].shape == (12, 20, 24, 3)
        assert 0 <= int(r["label"]) < 3 and int(r["index"]) == 3
        assert V.make_video_source(spec, "eval").split in ("validation", "test")
        assert V.make_video_source(f"{spec}:train", "eval").split == "train"
        copy = pickle.loads(pickle.dumps(src))
        np.testing.assert_array_equal(copy[3]["video"], r["video"])
        it = V.make_video_train_iterator(spec, 16, 4, 0, num_frames=5, frame_stride=2,
                                         process_index=0, process_count=1, read_threads=0)
        b = next(it)
        assert b["image"].shape == (4, 5, 16, 16, 3) and b["image"].dtype == np.float32
        ev = V.make_video_eval_iterator(spec, 16, 4, num_frames=5, process_index=0,
                                        process_count=1, read_threads=0)
        b = next(ev)
        assert b["image"].shape == (4, 5, 16, 16, 3)
    with pytest.raises(ValueError, match="TFDS video data set"):
        V.make_video_source("tfds_video:no_such_set_here", "train")
