"""Video tokenizers through the one trainer and the CLI (issue 18): `tiny` MAGVIT (3D-VQ) and causal
MAGVIT-v2 train on `sample_video` with `titok-jax train`, write eval metrics and a frame grid, load
as tokenizers (clips [B, T, H, W, 3] -> int32 [B, T', h, w] and back), and `reconstruct` /
`tokenize` take a GIF end to end. Tiny shapes (16 px, 2 steps) so the file runs in seconds."""
import json
import os

import jax
import numpy as np
import pytest

import titok_jax
from titok_jax import cli

from train_helpers import load_config_module

pytestmark = pytest.mark.usefixtures("fast_compile")

FAMILIES = ("magvit", "magvit2_video")
SIZE = 16
# two levels (f2; time halved once) at 16 px: the smallest programs that still down- and upsample
SMALL = {"magvit": ["--config.model.channel_mult=(1,2)", "--config.model.temporal_downsample=(True,)"],
         "magvit2_video": ["--config.model.ch_mult=(1,2)",
                           "--config.model.temporal_downsample=(True,)"]}


@pytest.fixture(scope="module", params=FAMILIES)
def run(request, tmp_path_factory):
    """``(family, workdir)`` of a 2-step CLI run of the family's tiny config at 16 px, two
    levels."""
    family = request.param
    workdir = str(tmp_path_factory.mktemp(family) / "run")
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        rc = cli.main([
            "train", "--config", f"configs/{family}.py:tiny", "--workdir", workdir,
            f"--config.data.image_size={SIZE}", f"--config.model.image_size={SIZE}",
            "--config.batch_size=8", "--config.total_steps=2", "--config.log_every_steps=1",
            "--config.eval_every_steps=2", "--config.checkpoint.every_steps=2",
            "--config.checkpoint.async_save=false", "--config.data.eval_batch_size=8",
            "--config.optimizer.warmup_steps=1", "--progress=false", *SMALL[family]])
    finally:
        jax.config.update("jax_disable_most_optimizations", old)
    assert rc == 0
    return family, workdir


def _gif(path, frames=7, size=(20, 24)):
    """A small animated GIF: a bright square moving over a gradient."""
    from PIL import Image
    h, w = size
    base = np.linspace(0, 200, w, dtype=np.uint8)[None, :, None].repeat(h, 0).repeat(3, 2)
    images = []
    for t in range(frames):
        f = base.copy()
        f[4:10, 2 + 2 * t:8 + 2 * t] = 255
        images.append(Image.fromarray(f))
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return str(path)


def test_tiny_trains_through_the_cli_and_evaluates_clips(run):
    family, workdir = run
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) and "reconstruction" in r for r in rows)
    assert "quantizer/commitment" in rows[0] and "quantizer/entropy" in rows[0]
    with open(os.path.join(workdir, "eval.jsonl")) as f:
        ev = json.loads(f.readline())
    assert ev["step"] == 2 and np.isfinite(ev["psnr"]) and 0 < ev["psnr"] < 100
    assert -1 <= ev["ssim"] <= 1 and 0 < ev["codebook_usage"] <= 1
    assert "thumbnail_psnr" not in ev   # the image baseline is skipped for clips
    from PIL import Image
    grid = np.asarray(Image.open(os.path.join(workdir, "samples", "reconstructions_000000002.png")))
    frames = 4 if family == "magvit" else 5
    # one pair of rows per clip (4 clips at most), one column per frame
    clips = min(4, ev["num_images"])
    assert grid.shape[:2] == (2 + 2 * clips * (SIZE + 2), 2 + frames * (SIZE + 2))


def test_a_video_run_loads_as_a_tokenizer(run):
    family, workdir = run
    tok = titok_jax.load_tokenizer(workdir, batch_size=2)
    t, latent = {"magvit": (4, (2, 8, 8)), "magvit2_video": (5, (3, 8, 8))}[family]
    assert (tok.num_frames, tok.latent_shape, tok.image_size) == (t, latent, SIZE)
    assert tok.num_tokens == int(np.prod(latent))
    clips = np.random.default_rng(0).integers(0, 256, (3, t, SIZE, SIZE, 3), dtype=np.uint8)
    tokens = tok.encode(clips)
    assert tokens.shape == (3, *latent) and tokens.dtype == np.int32
    assert tokens.min() >= 0 and tokens.max() < tok.codebook_size
    out = tok.decode(tokens)
    assert out.shape == clips.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    np.testing.assert_array_equal(tok.decode(tokens.reshape(3, -1)), out)   # [B, N] ids too
    if family == "magvit2_video":   # causal: a 1-frame clip (an image) is 1 latent frame
        assert tok.encode(clips[:, :1]).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="frames"):
        tok.encode(clips[:, :t - 1] if family == "magvit" else clips[:, :2])
    with pytest.raises(ValueError, match="clips"):
        tok.encode(clips[:, 0])


def test_reconstruct_and_tokenize_a_gif(run, tmp_path):
    from PIL import Image
    family, workdir = run
    gif = _gif(tmp_path / "in.gif")
    out = tmp_path / "out" / "rec.gif"
    assert cli.main(["reconstruct", "--workdir", workdir, "--input", gif, "--output", str(out)]) == 0
    t = 4 if family == "magvit" else 5   # 7 frames: one whole clip, the tail dropped
    with Image.open(out) as im:
        assert (im.n_frames, im.size) == (t, (SIZE, SIZE))
    assert os.path.isfile(tmp_path / "out" / "rec_frames.png")
    # nothing is overwritten without --overwrite
    assert cli.main(["reconstruct", "--workdir", workdir, "--input", gif, "--output", str(out)]) != 0
    bad = cli.main(["reconstruct", "--workdir", workdir, "--input", gif, "--output",
                    str(tmp_path / "rec.png")])
    assert bad == 2 and not os.path.exists(tmp_path / "rec.png")   # a usage error, nothing written
    npz = tmp_path / "tokens.npz"
    assert cli.main(["tokenize", "--workdir", workdir, "--input", gif, "--output", str(npz)]) == 0
    with np.load(npz) as data:
        assert data["tokens"].dtype == np.int32 and data["tokens"].ndim == 4
        assert data["tokens"].shape[0] == 1 and list(data["files"]) == ["in.gif"]


def test_video_configs_and_refusals():
    mv = load_config_module("magvit")
    ucf = mv.get_config("ucf_16x128")
    assert (ucf.model.num_frames, ucf.model.image_size, ucf.model.quantizer.codebook_size) == \
        (16, 128, 1024)
    assert ucf.data.num_frames == 16
    # MAGVIT v1's GAN: 3D StyleGAN D, non-saturating, weight 0.1, R1 10 (tiny: off)
    assert (ucf.losses.gan_weight, ucf.losses.gan_loss, ucf.losses.r1_weight) == \
        (0.1, "non_saturating", 10.0)
    assert ucf.losses.discriminator.name == "stylegan3d"
    assert mv.get_config("tiny").losses.gan_weight == 0
    mv2 = load_config_module("magvit2_video")
    k600 = mv2.get_config("k600_17x128")
    assert (k600.model.num_frames, k600.model.z_channels, k600.data.num_frames) == (17, 18, 17)
    assert k600.losses.reconstruction == "l1"
    # Open-MAGVIT2's video GAN: 3D PatchGAN (BatchNorm), weight 0.3, LeCam 0.05 (tiny: off)
    assert (k600.losses.gan_weight, k600.losses.lecam_weight) == (0.3, 0.05)
    assert (k600.losses.discriminator.name, k600.losses.discriminator.norm) == ("patchgan3d", "batch")
    assert mv2.get_config("tiny").losses.gan_weight == 0
    assert mv2.get_config("tiny,quantizer=fsq").model.quantizer.name == "fsq"
    from titok_jax.tasks import get_task
    for config, latent in ((ucf, (4, 16, 16)), (k600, (5, 16, 16))):   # the published shapes build
        task = get_task(config)
        params, _ = jax.eval_shape(task.init, jax.random.key(0))
        assert sum(x.size for x in jax.tree.leaves(params["model"])) > 3e7
        assert "disc" in params   # the 3D discriminator, built on one clip
        assert task.token_spec.latent_shape == latent
    c = mv2.get_config("tiny")
    c.losses.gan_weight = 0.1
    c.losses.discriminator = {"name": "patchgan"}   # a 2D discriminator on clips
    with pytest.raises(ValueError, match="3D discriminator"):
        get_task(c)


def test_reconstruct_an_mp4(run, tmp_path):
    """With PyAV (the ``video`` extra): mp4 in, mp4 out; 9 frames -> two 4-frame clips."""
    pytest.importorskip("av")
    from titok_jax.video_files import read_video, write_video
    family, workdir = run
    if family != "magvit":
        pytest.skip("one family is enough for the container round trip")
    frames = np.random.default_rng(0).integers(0, 256, (9, 24, 30, 3), dtype=np.uint8)
    write_video(str(tmp_path / "in.mp4"), frames, fps=8)
    out = tmp_path / "rec.mp4"
    assert cli.main(["reconstruct", "--workdir", workdir, "--input", str(tmp_path / "in.mp4"),
                     "--output", str(out)]) == 0
    rec, fps = read_video(str(out))
    assert rec.shape == (8, SIZE, SIZE, 3) and fps == 8


def test_clip_scores_are_psnr_over_all_frames_and_the_mean_frame_ssim():
    from titok_jax import evaluation as ev
    from titok_jax.tasks.eval_reconstruction import clip_scores
    rng = np.random.default_rng(0)
    clips = rng.random((2, 3, 16, 16, 3), dtype=np.float32)
    rec = np.clip(clips + 0.05 * rng.standard_normal(clips.shape).astype(np.float32), 0, 1)
    psnr, ssim = map(np.asarray, clip_scores(rec, clips))
    mse = ((rec - clips) ** 2).reshape(2, -1).mean(axis=1)
    np.testing.assert_allclose(psnr, 10 * np.log10(1 / mse), rtol=1e-5)
    frame_ssim = np.asarray(ev.ssim(rec.reshape(6, 16, 16, 3), clips.reshape(6, 16, 16, 3)))
    np.testing.assert_allclose(ssim, frame_ssim.reshape(2, 3).mean(axis=1), rtol=1e-5)
