"""The `tiny` recipe learns: held-out PSNR reaches its level and rises between its first and last
evaluation, and the same-bit thumbnail baseline is measured and printed beside it.

Runs `titok-jax train` with the real `configs/titok.py:tiny` on the built-in `sample` data (the
main job's schedule) in a separate process on one CPU device, as the README's main job does; about
three minutes on a 2-core CPU."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from train_helpers import ROOT


def test_tiny_heldout_psnr_rises(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, like the main job
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "titok_jax", "train", "--config",
         os.path.join(ROOT, "configs", "titok.py") + ":tiny", "--workdir", str(tmp_path),
         "--config.eval_every_steps=500", "--config.log_every_steps=100",
         "--config.checkpoint.every_steps=1500", "--progress=false"],
        capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in open(os.path.join(tmp_path, "eval.jsonl"))]
    assert [r["step"] for r in rows] == [500, 1000, 1500]
    first, last = rows[0]["psnr"], rows[-1]["psnr"]
    # the main job's own schedule (1500 steps, hue augmentation, FSQ saturation penalty, the
    # low-resolution + conv pixel head) measured 18.46 -> 18.81 -> 18.93 dB at 500 / 1000 / 1500
    # (seed 0); without the pixel head options 15.40 -> 18.03 -> 18.35, and the
    # recipe before that (no hue, no penalty) 17.1 (seed 0) and 14.1 (seed 1: saturated FSQ
    # inputs, a constant code). The dynamics depend on the whole schedule, so the test runs the
    # real one; 18.5 leaves room for the seed-to-seed spread (about 0.2 dB) and fails the
    # previous recipe.
    assert last >= 18.5 and last > first + 0.3, (first, last)
    assert rows[-1]["bits_per_image"] == pytest.approx(16 * np.log2(64000), abs=1e-3)
    assert rows[-1]["thumbnail_side"] == 4 and rows[-1]["thumbnail_bits"] == 5
    assert abs(rows[-1]["thumbnail_psnr"] - 18.99) < 0.05
    assert "same-bit thumbnail (4x4 at 5 bits per channel) 18.99 dB" in proc.stdout
    losses = [json.loads(l)["loss"] for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert min(losses[-3:]) < 0.6 * losses[0]
    assert "grid:" in proc.stdout and os.listdir(os.path.join(tmp_path, "samples"))
