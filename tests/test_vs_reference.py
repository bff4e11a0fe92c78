"""``benchmarks/vs_reference.py`` without a reference checkout times ours only, on the trainer's
own step (the side-by-side run needs the official repository; BENCHMARKS.md has its figures)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ours_only_without_a_reference(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vs_reference.py"),
                          "--config", os.path.join(ROOT, "configs", "titok.py") + ":tiny",
                          "--batch", "2", "--pairs", "2", "--steps", "1", "--warmup", "0"],
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=600,
                         env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["config"] == "titok:tiny" and result["median_ratio"] is None
    assert len(result["pairs"]) == 2 and all(p["ours_s"] > 0 and "official_s" not in p
                                             for p in result["pairs"])
    assert result["ours_params_M"] > 0.5
