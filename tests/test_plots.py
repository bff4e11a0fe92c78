"""Pictures and plots: the plot functions on synthetic records (valid PNGs of the documented size,
the series drawn, different inputs give different pixels), a failed plot is a warning, importing
titok_jax does not import matplotlib; `eval` of a trained micro TiTok writes curves.png and the
codebook histogram; FlexTok's coarse-to-fine strip and PSNR-vs-tokens plot and a generator's
per-class grids from untrained micro models written as workdirs (no training)."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from titok_jax import cli
from titok_jax.errors import WriteWarning
from titok_jax.evaluation import plots
from titok_jax.evaluation.images import caption_grid, load_png, tile_grid

from train_helpers import load_config_module

TRAIN_ROWS = [{"step": s, "loss": 1.0 / s, "steps_per_s": 3.0, "quantizer/usage": 0.5}
              for s in range(1, 41)]
EVAL_ROWS = [{"step": 20, "psnr": 14.0, "ssim": 0.3, "thumbnail_psnr": 13.0, "codebook_usage": 0.4},
             {"step": 40, "psnr": 15.5, "ssim": 0.4, "thumbnail_psnr": 13.1, "codebook_usage": 0.6}]


def test_curves_draw_the_series_the_records_hold(tmp_path):
    path = tmp_path / "curves.png"
    drawn = plots.plot_curves(TRAIN_ROWS, EVAL_ROWS, path)
    assert drawn == ["train/loss", "eval/psnr", "eval/thumbnail_psnr", "eval/codebook_usage",
                     "train/quantizer/usage"]
    image = load_png(path)
    assert image.shape == (320, 3 * 420, 3) and image.dtype == np.uint8   # 3 panels at 100 dpi
    assert not [f for f in os.listdir(tmp_path) if f != "curves.png"]     # no temporary file left
    # generator logs: loss and token accuracy; a NaN (null) or +-inf (1e30) value is left out
    gen = [{"step": 2, "loss": 3.0, "masked_accuracy": 0.1}, {"step": 4, "loss": None, "masked_accuracy": 0.2}]
    ev = [{"step": 4, "loss": 1e30, "masked_accuracy": 0.3}]
    assert plots.plot_curves(gen, ev, tmp_path / "g.png") == ["train/loss", "eval/masked_accuracy",
                                                              "train/masked_accuracy"]
    assert plots.curve_series(gen, ev)["train/loss"][0].tolist() == [2]
    # other values, other pixels
    other = [dict(r, loss=r["loss"] * (1 + r["step"] % 3)) for r in TRAIN_ROWS]
    again, _ = plots.render_curves(other, EVAL_ROWS)
    assert again.shape == image.shape and np.abs(again.astype(int) - image).sum() > 0
    with pytest.raises(ValueError, match="no training or evaluation curves"):
        plots.render_curves([{"step": 1, "steps_per_s": 2.0}], [])


def test_write_curves_reads_the_workdir_logs(tmp_path):
    assert plots.write_curves(tmp_path) is None                 # no training log: nothing written
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in TRAIN_ROWS) + '{"step": 41, "lo')  # a cut line
    with open(tmp_path / "eval.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in EVAL_ROWS))
    assert plots.write_curves(tmp_path) == os.path.join(tmp_path, "curves.png")
    assert load_png(tmp_path / "curves.png").shape == (320, 1260, 3)


def test_histogram_and_psnr_vs_tokens(tmp_path):
    counts = np.array([5, 0, 9, 1, 0, 3, 3, 7], np.int32)
    a = load_png(plots.plot_codebook_histogram(counts, tmp_path / "h.png"))
    assert a.shape == (360, 640, 3)
    b = plots.render_codebook_histogram(counts[::-1].copy() * 0 + np.arange(8))
    assert b.shape == a.shape and np.abs(b.astype(int) - a).sum() > 0
    # large codebooks and [F, K] counts of factorized quantizers
    big = np.bincount(np.random.default_rng(0).zipf(1.5, 20_000) % 64_000, minlength=64_000)
    assert plots.render_codebook_histogram(big).shape == (360, 640, 3)
    assert plots.render_codebook_histogram(np.stack([counts, counts[::-1]]), [8, 6]).shape == (360, 640, 3)
    p = load_png(plots.plot_psnr_vs_tokens([1, 2, 4, 8], [10.0, 12.0, 13.5, 15.0], tmp_path / "p.png", 8))
    assert p.shape == (360, 520, 3)
    q = plots.render_psnr_vs_tokens([1, 2, 4, 8], [15.0, 13.5, 12.0, 10.0])
    assert np.abs(q.astype(int) - p).sum() > 0
    with pytest.raises(ValueError, match="one PSNR per token count"):
        plots.render_psnr_vs_tokens([1, 2], [3.0])


def test_captioned_grid_adds_bands_and_keeps_the_cells():
    cells = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), np.uint8)
    grid = tile_grid(cells, ncol=3)
    out = caption_grid(grid, (16, 16), columns=["in", "k=1", "k=2"], rows=["class 0", "class 9"])
    top, left = out.shape[0] - grid.shape[0], out.shape[1] - grid.shape[1]
    assert top > 0 and left > 0
    np.testing.assert_array_equal(out[top:, left:], grid)
    assert out[:top].min() < 128 and out[top:, :left].min() < 128     # some dark text in each band
    np.testing.assert_array_equal(caption_grid(grid, (16, 16)), grid)


def test_a_failed_plot_is_a_warning_not_an_exception(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")                   # a file where a directory should be: unwritable
    with pytest.warns(WriteWarning, match="could not draw the curves"):
        assert plots.try_plot("the curves", plots.plot_curves, TRAIN_ROWS, EVAL_ROWS,
                              blocker / "curves.png") is None
    with pytest.warns(WriteWarning, match="could not draw the histogram"):
        assert plots.try_plot("the histogram", plots.render_codebook_histogram, np.zeros((2, 2, 2))) is None
    assert plots.try_plot("x", lambda: 3) == 3


def test_importing_titok_jax_does_not_import_matplotlib():
    code = ("import sys, titok_jax, titok_jax.evaluation.plots, titok_jax.train.loop; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.stdout.strip() == "False"


def test_prefix_lengths():
    from titok_jax.tasks.eval_reconstruction import prefix_lengths
    assert prefix_lengths(1) == [1]
    assert prefix_lengths(4) == [1, 2, 4]
    assert prefix_lengths(6) == [1, 2, 4, 6]
    assert prefix_lengths(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]


def test_eval_of_a_trained_workdir_writes_curves_and_histogram(micro_tokenizer_dir, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    shutil.copytree(micro_tokenizer_dir, workdir)
    assert cli.main(["eval", "--workdir", workdir, "--num_images", "4"]) == 0
    capsys.readouterr()
    curves = load_png(os.path.join(workdir, "curves.png"))
    # train loss + held-out PSNR (with the thumbnail baseline) + codebook usage: 3 panels
    assert curves.shape == (320, 3 * 420, 3)
    hist = load_png(os.path.join(workdir, "samples", "codebook_histogram_000000002.png"))
    assert hist.shape == (360, 640, 3)


# ---------------------------------------------------------------------------- untrained micro models

def _workdir(config, path):
    """A workdir of ``config``'s model with random params (normal, std 0.02; no init compiled, no
    training) written as an import is (``write_workdir``)."""
    import flax.linen as nn

    from titok_jax.checkpoint import inference_state, write_workdir
    from titok_jax.tasks import get_task
    with config.unlocked():
        config.optimizer.ema_decay = 0.0          # the params are the model's, as an import's
    params, state = nn.unbox(jax.eval_shape(get_task(config, inference=True).init, jax.random.key(0)))
    rng = np.random.default_rng(0)
    fill = lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype) if a.dtype.kind == "f" \
        else np.zeros(a.shape, a.dtype)  # noqa: E731
    write_workdir(str(path), config.to_dict(),
                  inference_state(jax.tree.map(fill, params["model"]), jax.tree.map(fill, state["model"])))
    return str(path)


@pytest.fixture(scope="module")
def flextok_dir(tmp_path_factory):
    c = load_config_module("flextok").get_config("tiny")
    c.model.update(dict(image_size=32, encoder_width=32, encoder_depth=1, decoder_width=32,
                        decoder_depth=1, head_dim=16, num_registers=2, repa_dim=0))
    c.repa.weight = 0.0
    c.data.image_size = 32
    c.batch_size = 8
    c.data.eval_batch_size = 8
    c.samples.num_images = 2
    c.sampler.steps = 2
    return _workdir(c, tmp_path_factory.mktemp("flextok") / "run")


def test_flextok_eval_writes_the_coarse_to_fine_strip_and_psnr_plot(flextok_dir, capsys):
    assert cli.main(["eval", "--workdir", flextok_dir, "--num_images", "2"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(k for k in metrics if k.startswith("psnr_tokens_")) == [
        "psnr_tokens_1", "psnr_tokens_2"]
    # all K = 2 tokens: evaluation's own reconstructions of these 2 images
    assert metrics["psnr_tokens_2"] == pytest.approx(metrics["psnr"], abs=1e-4)
    samples = os.path.join(flextok_dir, "samples")
    strip = load_png(os.path.join(samples, "coarse_to_fine_000000000.png"))
    grid = tile_grid(np.zeros((6, 32, 32, 3)), ncol=3)     # 2 images x (input, k = 1, 2)
    assert strip.shape[1] == grid.shape[1] and strip.shape[0] > grid.shape[0]   # + the caption band
    assert load_png(os.path.join(samples, "psnr_vs_tokens_000000000.png")).shape == (360, 520, 3)
    assert not os.path.exists(os.path.join(flextok_dir, "curves.png"))    # no training log


def _generator_config(family, tokenizer, **model):
    c = load_config_module(family).get_config("tiny")
    c.model.update(dict(width=32, depth=1, num_heads=2, num_classes=10, **model))
    c.data.source = "sample"                    # token ids on the fly by the tokenizer
    c.data.image_size = 32
    c.batch_size = 8
    c.data.eval_batch_size = 8
    c.samples.num_images = 4
    c.samples.grid_classes, c.samples.grid_per_class = 2, 2    # the sampler's batch stays 4
    c.tokenizer.workdir = tokenizer
    return c


def test_generator_eval_writes_the_per_class_grid(micro_tokenizer_dir, tmp_path, capsys):
    """An untrained micro MaskGIT on the micro TiTok's ids: `eval` adds the per-class grid (and no
    grid over token counts: MaskGIT is not causal, TiTok decodes all tokens only)."""
    c = _generator_config("maskgit", micro_tokenizer_dir, codebook_size=32, num_tokens=8)
    c.generator.sampler.steps = 2
    workdir = _workdir(c, tmp_path / "maskgit")
    assert cli.main(["eval", "--workdir", workdir]) == 0
    capsys.readouterr()
    samples = os.path.join(workdir, "samples")
    assert sorted(os.listdir(samples)) == ["generated_000000000.png", "per_class_000000000.png"]
    per_class = load_png(os.path.join(samples, "per_class_000000000.png"))
    cells = tile_grid(np.zeros((4, 32, 32, 3)), ncol=2)         # classes 0 and 9, 2 samples each
    assert per_class.shape[0] == cells.shape[0] and per_class.shape[1] > cells.shape[1]  # + captions


def test_sample_lengths_need_a_causal_generator_and_a_prefix_decoder(flextok_dir, micro_tokenizer_dir):
    from titok_jax.tasks import get_task
    ar = get_task(_generator_config("ar", flextok_dir, codebook_size=64_000, num_tokens=2), inference=True)
    assert ar.sample_lengths() == [1, 2]
    assert get_task(_generator_config("ar", micro_tokenizer_dir, codebook_size=32, num_tokens=8),
                    inference=True).sample_lengths() == []
    assert get_task(_generator_config("maskgit", flextok_dir, codebook_size=64_000, num_tokens=2),
                    inference=True).sample_lengths() == []


class _StubGenerator:
    """``sample``: ids ``[B, 4]`` = ``label * 10 + row``, then ``1, 2, 3``; a stand-in task."""

    def __init__(self, num_classes):
        from titok_jax.tasks import GeneratorSpec
        self.generator_spec = GeneratorSpec(num_tokens=4, codebook_size=100, num_classes=num_classes,
                                            sampler={}, sampler_keys=())
        self.calls = []

    def sample(self, params, labels, seed):
        self.calls.append(np.asarray(labels).tolist())
        first = np.asarray(labels) * 10 + np.arange(len(labels))
        return np.stack([first, np.full_like(first, 1), np.full_like(first, 2), np.full_like(first, 3)], 1)


def _stub_decoder(ids):
    """Images ``[B, 8, 8, 3]`` whose pixels are ``(first id, number of tokens, 0) / 255``."""
    ids = np.asarray(ids)
    out = np.zeros((len(ids), 8, 8, 3), np.uint8)
    out[..., 0] = ids[:, :1, None]
    out[..., 1] = ids.shape[1]
    return out


def test_class_pictures_layout():
    from titok_jax.tasks.eval_generation import class_pictures, grid_classes
    assert grid_classes(1000, 4).tolist() == [0, 333, 666, 999]
    assert grid_classes(2, 4).tolist() == [0, 1] and grid_classes(0, 4).tolist() == [0]
    task = _StubGenerator(10)
    out = class_pictures(task, None, _stub_decoder, 0, classes=3, per_class=2, lengths=[1, 2, 4])
    assert task.calls == [[0, 0, 4, 4, 9, 9]]                        # one sampling call
    assert sorted(out) == ["per_class", "per_class_lengths"]
    grid = out["per_class_lengths"]
    top, left = grid.shape[0] - (2 + 3 * 10), grid.shape[1] - (2 + 3 * 10)   # caption bands
    for r, label in enumerate([0, 4, 9]):
        for c, k in enumerate([1, 2, 4]):
            y, x = top + 2 + r * 10, left + 2 + c * 10
            # row r: class label's first sample (row 2 r of the batch), decoded from k tokens
            assert grid[y + 3, x + 3].tolist() == [label * 10 + 2 * r, k, 0]
    # an unconditional generator: one row of null-label samples, no grid over token counts
    task = _StubGenerator(0)
    out = class_pictures(task, None, _stub_decoder, 0, classes=3, per_class=2)
    assert task.calls == [[0, 0]] and sorted(out) == ["per_class"]


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
