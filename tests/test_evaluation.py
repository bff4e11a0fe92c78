"""Evaluation: PSNR / SSIM against scikit-image, codebook statistics against hand-computed cases
and numpy counts, grid layout pixel by pixel, PNG round trip, TensorBoard image events."""
import functools
import glob
import io
import math
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from titok_jax.evaluation import (
    CodebookCounter,
    codebook_entropy,
    codebook_metrics,
    codebook_perplexity,
    codebook_usage,
    init_counts,
    load_png,
    log_reconstructions,
    make_grid,
    mean_psnr,
    mean_ssim,
    psnr,
    save_png,
    save_reconstruction_grid,
    ssim,
    to_uint8,
    update_counts,
)

PAPER = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)


# ---- test images --------------------------------------------------------------------------------
def _pairs(h, w, seed=0):
    """Float32 pairs in [0, 1]: noise, structured (smooth ramps + sinusoid) and near-flat images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    smooth = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)], -1)
    flat = np.full((h, w, 3), 0.7)
    bump = flat.copy()
    bump[h // 3:h // 2, w // 4:w // 2] = 0.72
    noise = rng.random((h, w, 3))
    pairs = [
        (noise, np.clip(noise + 0.1 * rng.standard_normal(noise.shape), 0, 1)),
        (smooth, np.clip(smooth + 0.02 * rng.standard_normal(smooth.shape), 0, 1)),
        (smooth, np.clip(0.9 * smooth + 0.05, 0, 1)),  # contrast / brightness change only
        (flat, bump),
        (rng.random((h, w, 3)), rng.random((h, w, 3))),  # unrelated: SSIM near 0
    ]
    x = np.stack([a for a, _ in pairs]).astype(np.float32)
    y = np.stack([b for _, b in pairs]).astype(np.float32)
    return x, y


SIZES = [(32, 32), (64, 48), (24, 40)]


# ---- PSNR ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,w", SIZES)
def test_psnr_matches_skimage(h, w):
    x, y = _pairs(h, w, seed=h + w)
    got = np.asarray(psnr(x, y))
    assert got.shape == (len(x),) and got.dtype == np.float32
    ref = [peak_signal_noise_ratio(a.astype(np.float64), b.astype(np.float64), data_range=1.0)
           for a, b in zip(x, y)]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(float(mean_psnr(x, y)), np.mean(ref), atol=1e-4)


def test_psnr_uint8_with_max_val_255():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (3, 16, 20, 3), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-9, 10, x.shape), 0, 255).astype(np.uint8)
    ref = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(x, y)]
    np.testing.assert_allclose(np.asarray(psnr(x, y, max_val=255.0)), ref, atol=1e-4)


def test_psnr_identical_images_is_inf_or_capped():
    x, y = _pairs(16, 16)
    batch_x = np.stack([x[0], x[1]])
    batch_y = np.stack([x[0], y[1]])  # first pair identical, second not
    out = np.asarray(psnr(batch_x, batch_y))
    assert out[0] == np.inf and np.isfinite(out[1])
    capped = np.asarray(psnr(batch_x, batch_y, max_db=100.0))
    assert capped[0] == 100.0 and capped[1] == pytest.approx(out[1])
    assert float(mean_psnr(batch_x, batch_y, max_db=100.0)) == pytest.approx((100.0 + out[1]) / 2)
    assert not np.isnan(out).any()


# ---- SSIM ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, PAPER], ids=["skimage_default", "gaussian_paper"])
@pytest.mark.parametrize("h,w", SIZES)
def test_ssim_matches_skimage(h, w, kwargs):
    x, y = _pairs(h, w, seed=h * w)
    got = np.asarray(ssim(x, y, **kwargs))
    assert got.shape == (len(x),) and got.dtype == np.float32
    ref = [structural_similarity(a.astype(np.float64), b.astype(np.float64), channel_axis=-1,
                                 data_range=1.0, **kwargs) for a, b in zip(x, y)]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(float(mean_ssim(x, y, **kwargs)), np.mean(ref), atol=1e-4)


def test_ssim_variants_differ_and_options_follow_skimage():
    x, y = _pairs(32, 32, seed=7)
    default = np.asarray(ssim(x, y))
    paper = np.asarray(ssim(x, y, **PAPER))
    assert np.max(np.abs(default - paper)) > 1e-3  # the two settings are really different
    # other options: a 5x5 uniform window with population covariance, and data range 255
    # (scikit-image spells the constants K1 / K2; it silently ignores lower-case ones)
    for ours, theirs in [(dict(win_size=5, use_sample_covariance=False),) * 2,
                         (dict(k1=0.02, k2=0.05), dict(K1=0.02, K2=0.05))]:
        ref = [structural_similarity(a.astype(np.float64), b.astype(np.float64), channel_axis=-1,
                                     data_range=1.0, **theirs) for a, b in zip(x, y)]
        np.testing.assert_allclose(np.asarray(ssim(x, y, **ours)), ref, atol=1e-4)
    x8 = to_uint8(x)
    y8 = to_uint8(y)
    ref = [structural_similarity(a, b, channel_axis=-1, data_range=255) for a, b in zip(x8, y8)]
    np.testing.assert_allclose(np.asarray(ssim(x8, y8, max_val=255.0)), ref, atol=1e-4)


@pytest.mark.parametrize("kwargs", [{}, PAPER], ids=["skimage_default", "gaussian_paper"])
def test_ssim_of_identical_images_is_one(kwargs):
    x, _ = _pairs(32, 24, seed=3)
    np.testing.assert_array_equal(np.asarray(ssim(x, x, **kwargs)), np.ones(len(x), np.float32))


def test_metrics_jit():
    x, y = _pairs(32, 32, seed=11)
    f_default = jax.jit(ssim)
    f_paper = jax.jit(functools.partial(ssim, **PAPER))
    f_psnr = jax.jit(psnr)
    np.testing.assert_allclose(np.asarray(f_default(x, y)), np.asarray(ssim(x, y)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(f_paper(x, y)), np.asarray(ssim(x, y, **PAPER)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(f_psnr(x, y)), np.asarray(psnr(x, y)), atol=1e-5)
    ref = structural_similarity(x[0].astype(np.float64), y[0].astype(np.float64), channel_axis=-1,
                                data_range=1.0)
    assert abs(float(f_default(x, y)[0]) - ref) < 1e-4
    # max_val may be a traced argument
    x8, y8 = to_uint8(x), to_uint8(y)
    ref8 = structural_similarity(x8[0], y8[0], channel_axis=-1, data_range=255)
    assert abs(float(jax.jit(ssim)(x8, y8, 255.0)[0]) - ref8) < 1e-4
    np.testing.assert_allclose(np.asarray(jax.jit(psnr)(x8, y8, 255.0)),
                               np.asarray(psnr(x8, y8, max_val=255.0)), atol=1e-5)
    # codebook statistics inside jit
    stats = jax.jit(lambda c: (codebook_usage(c), codebook_entropy(c), codebook_perplexity(c)))(
        jnp.array([2, 2, 0, 0]))
    np.testing.assert_allclose([float(v) for v in stats], [0.5, 1.0, 2.0], atol=1e-5)


def test_metrics_reject_bad_shapes():
    x, y = _pairs(32, 32)
    with pytest.raises(ValueError, match="same shape"):
        ssim(x, y[:, :16])
    with pytest.raises(ValueError, match="window"):
        ssim(x[:, :6, :6], y[:, :6, :6])
    with pytest.raises(ValueError, match="window"):
        ssim(x[:, :10], y[:, :10], **PAPER)  # 11-tap Gaussian window
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        psnr(x[0], y[0])


# ---- codebook statistics ------------------------------------------------------------------------
def test_codebook_hand_computed():
    counts = jnp.array([2, 2, 0, 0], jnp.int32)
    assert float(codebook_usage(counts)) == 0.5
    assert float(codebook_entropy(counts, base=math.e)) == pytest.approx(math.log(2), abs=1e-6)
    assert float(codebook_entropy(counts)) == pytest.approx(1.0, abs=1e-6)  # bits by default
    assert float(codebook_perplexity(counts)) == pytest.approx(2.0, abs=1e-5)

    counts = jnp.array([3, 1, 0, 0, 0, 0, 0, 0])
    h_bits = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert float(codebook_usage(counts)) == 0.25
    assert float(codebook_entropy(counts)) == pytest.approx(h_bits, abs=1e-6)
    assert float(codebook_perplexity(counts)) == pytest.approx(2 ** h_bits, abs=1e-5)

    uniform = jnp.full((4096,), 7)
    assert float(codebook_usage(uniform)) == 1.0
    assert float(codebook_entropy(uniform)) == pytest.approx(12.0, abs=1e-4)
    assert float(codebook_perplexity(uniform)) == pytest.approx(4096.0, rel=1e-4)

    single = jnp.array([0, 0, 9, 0])
    assert float(codebook_entropy(single)) == 0.0 and float(codebook_perplexity(single)) == 1.0
    empty = init_counts(5)
    assert float(codebook_usage(empty)) == 0.0 and float(codebook_entropy(empty)) == 0.0


def test_codebook_entropy_eps_reproduces_official_formula():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, 1024) * (rng.random(1024) < 0.6)
    p = counts / counts.sum()
    official = float((-np.log2(p + 1e-8) * p).sum())  # TiTok evaluator's CodebookEntropy
    exact = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
    assert float(codebook_entropy(jnp.asarray(counts), eps=1e-8)) == pytest.approx(official, abs=2e-5)
    assert float(codebook_entropy(jnp.asarray(counts))) == pytest.approx(exact, abs=2e-5)
    assert official != pytest.approx(exact, abs=1e-7)  # the eps really changes the value


def test_counts_accumulated_over_batches_equal_one_shot():
    rng = np.random.default_rng(0)
    k = 64
    batches = [rng.integers(0, 40, (8, 32)) for _ in range(5)]  # codes >= 40 never used
    counts = init_counts(k)
    step = jax.jit(update_counts)
    for b in batches:
        counts = step(counts, b)
    all_idx = np.concatenate(batches).reshape(-1)
    one_shot = np.bincount(all_idx, minlength=k)
    np.testing.assert_array_equal(np.asarray(counts), one_shot)
    np.testing.assert_array_equal(np.asarray(update_counts(init_counts(k), all_idx)), one_shot)
    assert counts.dtype == jnp.int32
    assert float(codebook_usage(counts)) == np.count_nonzero(one_shot) / k
    p = one_shot / one_shot.sum()
    assert float(codebook_entropy(counts)) == pytest.approx(-(p[p > 0] * np.log2(p[p > 0])).sum(),
                                                          abs=1e-5)
    # per-batch statistics would differ from the whole-set ones: usage is over the whole set
    assert float(codebook_usage(update_counts(init_counts(k), batches[0]))) <= float(
        codebook_usage(counts))


def test_update_counts_mask_and_out_of_range():
    idx = jnp.array([[0, 1, 1], [2, -1, 7], [3, 3, 3]])  # -1 and 7 (>= K) are not counted
    counts = update_counts(init_counts(4), idx)
    np.testing.assert_array_equal(np.asarray(counts), [1, 2, 1, 3])
    masked = update_counts(init_counts(4), idx, mask=jnp.array([True, True, False]))  # padded row
    np.testing.assert_array_equal(np.asarray(masked), [1, 2, 1, 0])
    with pytest.raises(ValueError, match="prefix"):
        update_counts(init_counts(4), idx, mask=jnp.ones((2,), bool))


def test_counts_are_exact_past_float32_integers():
    counts = init_counts(2).at[0].set(2 ** 24)
    counts = update_counts(counts, jnp.array([0, 0, 0]))
    assert int(counts[0]) == 2 ** 24 + 3


def test_factorized_counts_per_codebook():
    rng = np.random.default_rng(2)
    sizes = [16, 8]  # sub-codebooks of different sizes share K = 16
    idx = np.stack([rng.integers(0, 12, (4, 10)), rng.integers(0, 8, (4, 10))], axis=-1)  # [B,T,F]
    counts = init_counts(sizes)
    assert counts.shape == (2, 16)
    for b in range(0, 4, 2):
        counts = update_counts(counts, idx[b:b + 2])
    np.testing.assert_array_equal(np.asarray(counts[0]), np.bincount(idx[..., 0].ravel(), minlength=16))
    np.testing.assert_array_equal(np.asarray(counts[1]), np.bincount(idx[..., 1].ravel(), minlength=16))
    usage = np.asarray(codebook_usage(counts, sizes))
    np.testing.assert_allclose(usage, [len(np.unique(idx[..., 0])) / 16,
                                       len(np.unique(idx[..., 1])) / 8])
    ent = np.asarray(codebook_entropy(counts))
    assert ent.shape == (2,)
    np.testing.assert_allclose(ent[1], float(codebook_entropy(counts[1, :8])), atol=1e-6)
    with pytest.raises(ValueError, match="trailing axis"):
        update_counts(counts, idx[..., :1])


def test_codebook_counter_and_metrics_dict():
    c = CodebookCounter(4)
    c.update(jnp.array([[0, 1], [0, 1]]))
    c.update(jnp.array([[0, 1], [3, 3]]), mask=jnp.array([True, False]))
    assert c.num_updates == 2
    np.testing.assert_array_equal(np.asarray(c.counts), [3, 3, 0, 0])
    m = c.result()
    assert m == pytest.approx({"codebook_usage": 0.5, "codebook_entropy": 1.0,
                               "codebook_perplexity": 2.0}, abs=1e-5)
    assert all(isinstance(v, float) for v in m.values())
    c.reset()
    assert int(c.counts.sum()) == 0

    fc = CodebookCounter([4, 2])
    fc.update(jnp.array([[[0, 0], [1, 0]], [[2, 0], [3, 0]]]))
    m = fc.result()
    assert m["codebook_usage_0"] == 1.0 and m["codebook_usage_1"] == 0.5
    assert m["codebook_usage"] == pytest.approx(0.75)
    assert m["codebook_entropy_0"] == pytest.approx(2.0, abs=1e-5)
    assert m["codebook_entropy_1"] == pytest.approx(0.0, abs=1e-6)
    assert codebook_metrics(fc.counts, [4, 2], prefix="q/")["q/perplexity_0"] == pytest.approx(4.0,
                                                                                              abs=1e-4)


# ---- images -------------------------------------------------------------------------------------
def test_to_uint8_clips_and_rounds():
    x = np.array([-0.5, 0.0, 100.4 / 255, 100.6 / 255, 1.0, 1.5, np.nan], np.float32)
    np.testing.assert_array_equal(to_uint8(x), [0, 0, 100, 101, 255, 255, 0])
    assert to_uint8(x).dtype == np.uint8
    u = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(to_uint8(u), u)  # uint8 passes through unscaled
    np.testing.assert_array_equal(to_uint8(jnp.asarray(u, jnp.float32) / 255.0), u)


def _images(n, h, w, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 200, (n, h, w, 3), dtype=np.uint8)  # never the pad value 255


def test_make_grid_layout_exact():
    n, h, w, p, ncol = 5, 4, 3, 2, 3
    a, b = _images(n, h, w, 0), _images(n, h, w, 1)
    grid = make_grid(a, b, ncol=ncol)
    assert grid.dtype == np.uint8
    assert grid.shape == (p + 2 * 2 * (h + p), p + ncol * (w + p), 3)  # 2 pair rows of 3 columns
    covered = np.zeros(grid.shape[:2], bool)
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = p + 2 * r * (h + p), p + c * (w + p)
        np.testing.assert_array_equal(grid[top:top + h, left:left + w], a[i])
        np.testing.assert_array_equal(grid[top + h + p:top + 2 * h + p, left:left + w], b[i])
        covered[top:top + h, left:left + w] = True
        covered[top + h + p:top + 2 * h + p, left:left + w] = True
    assert (grid[~covered] == 255).all()  # padding and the unused 6th cell
    # concretely: image 4 (row 1, col 1) starts at (2 + 2*6, 2 + 5) and its reconstruction 6 lower
    np.testing.assert_array_equal(grid[14, 7], a[4, 0, 0])
    np.testing.assert_array_equal(grid[20, 7], b[4, 0, 0])


def test_make_grid_float_input_and_small_batch():
    a = np.zeros((2, 5, 6, 3), np.float32)
    b = np.ones((2, 5, 6, 3), np.float32)
    grid = make_grid(a, b, ncol=8, padding=1, pad_value=128)
    assert grid.shape == (1 + 2 * (5 + 1), 1 + 2 * (6 + 1), 3)  # ncol shrinks to the batch
    assert (grid[1:6, 1:7] == 0).all() and (grid[7:12, 1:7] == 255).all()
    assert (grid[0] == 128).all() and (grid[:, 7] == 128).all()
    with pytest.raises(ValueError, match="differ"):
        make_grid(a, b[:1])


def test_png_round_trip(tmp_path):
    a, b = _images(3, 8, 6, 2), _images(3, 8, 6, 3)
    path = tmp_path / "samples" / "step_10.png"  # parent directory is created
    grid = save_reconstruction_grid(path, a, b, ncol=2)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "RGB"
    np.testing.assert_array_equal(load_png(path), grid)
    np.testing.assert_array_equal(grid, make_grid(a, b, ncol=2))
    f = np.random.default_rng(0).random((7, 9, 3)).astype(np.float32)
    save_png(tmp_path / "f.png", f)
    np.testing.assert_array_equal(load_png(tmp_path / "f.png"), to_uint8(f))


def _read_events(path):
    """Parse a TFRecord event file (uint64 length, crc, payload, crc) into Event protos."""
    from tensorboardX.proto import event_pb2

    events = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        payload = data[pos + 12:pos + 12 + length]
        events.append(event_pb2.Event.FromString(payload))
        pos += 12 + length + 4
    return events


def test_tensorboard_image_event(tmp_path):
    from tensorboardX import SummaryWriter

    a, b = _images(4, 6, 5, 4), _images(4, 6, 5, 5)
    writer = SummaryWriter(logdir=str(tmp_path / "tb"))
    grid = log_reconstructions(writer, "eval/reconstructions", a, b, step=42, ncol=2)
    writer.close()
    files = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert len(files) == 1
    images = [(e.step, v) for e in _read_events(files[0]) for v in e.summary.value
              if v.tag == "eval/reconstructions"]
    assert len(images) == 1
    step, value = images[0]
    assert step == 42
    assert (value.image.height, value.image.width) == grid.shape[:2]
    decoded = np.asarray(Image.open(io.BytesIO(value.image.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, grid)
