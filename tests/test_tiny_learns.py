"""The `tiny` recipe learns: held-out PSNR rises clearly between its first and last evaluation.

Runs `titok-jax train` with the real `configs/titok.py:tiny` on the built-in `sample` data (a
shorter schedule) in a separate process on one CPU device, as the README's main job does; about
two minutes on a 2-core CPU."""
import json
import os
import subprocess
import sys

from train_helpers import ROOT


def test_tiny_heldout_psnr_rises(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, like the main job
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "titok_jax", "train", "--config",
         os.path.join(ROOT, "configs", "titok.py") + ":tiny", "--workdir", str(tmp_path),
         "--config.total_steps=1000", "--config.eval_every_steps=500", "--config.log_every_steps=100",
         "--config.checkpoint.every_steps=1000", "--progress=false"],
        capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in open(os.path.join(tmp_path, "eval.jsonl"))]
    assert [r["step"] for r in rows] == [500, 1000]
    first, last = rows[0]["psnr"], rows[-1]["psnr"]
    assert last > first + 1.5, (first, last)
    losses = [json.loads(l)["loss"] for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
    assert min(losses[-3:]) < 0.6 * losses[0]
    assert "grid:" in proc.stdout and os.listdir(os.path.join(tmp_path, "samples"))
