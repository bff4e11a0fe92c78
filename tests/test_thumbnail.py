"""The same-bit thumbnail baseline (evaluation/thumbnail.py) and its place in reconstruction
evaluation: the bit budget is respected, the best (side, bits) is picked, and on the sample set's
held-out photos at 64 px 240 bits give the 19.0 dB the README quotes."""
import numpy as np

from titok_jax.evaluation.thumbnail import choose_thumbnail, thumbnail, thumbnail_psnr


def _heldout64():
    from PIL import Image
    from titok_jax.data import sample_images
    from titok_jax.data.transforms import center_crop
    out = []
    for name in sample_images.EVAL_IMAGES:
        im = sample_images.load_sample_image(name)
        h, w = im.shape[:2]
        s = 64 / min(h, w)
        im = np.asarray(Image.fromarray(im).resize((max(64, round(w * s)), max(64, round(h * s))),
                                                   Image.BICUBIC))
        out.append(center_crop(im, 64).astype(np.float32) / 255.0)
    return np.stack(out)


def test_constant_images_are_exact_and_the_budget_is_kept():
    flat = np.full((2, 16, 16, 3), 0.2, np.float32)
    flat[1] = 0.6
    side, bits = choose_thumbnail(flat, 3 * 8)      # one pixel per image fits: exact
    assert side == 1 and thumbnail_psnr(flat, side, bits).min() > 45
    np.testing.assert_allclose(thumbnail(flat[0], 1, 8), flat[0], atol=1 / 255)
    for budget in (3, 50, 240, 1000):
        side, bits = choose_thumbnail(_heldout64()[:1], budget)
        assert side * side * 3 * bits <= max(budget, 3)


def test_heldout_sample_photos_at_240_bits():
    images = _heldout64()
    side, bits = choose_thumbnail(images, 240)
    assert (side, bits) == (4, 5)
    assert abs(float(thumbnail_psnr(images, side, bits).mean()) - 18.99) < 0.05
    # more bits never hurt the best thumbnail
    assert thumbnail_psnr(images, *choose_thumbnail(images, 1024)).mean() > 20.5
