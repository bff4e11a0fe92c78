"""``benchmarks/accelerator_suite.sh``: the CPU smoke run of the whole suite (tiny configs), and the
stand-ins that let the published configs run without their weight files."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_every_full_suite_config_gets_its_stand_ins(tmp_path):
    import accelerator_suite as suite
    flags = {name: suite._overrides(name, str(tmp_path))
             for kind in ("train", "decode") for name in suite.SUITES["full"][kind]}
    assert "--config.teacher.allow_random=true" in flags["titok:l32_stage1"]
    assert any(f.startswith("--config.losses.perceptual_weights=") for f in flags["titok:bl64_vq"])
    assert {"--config.vae.allow_random=true", "--config.repa.teacher.allow_random=true"} <= set(
        flags["flextok:d18_d18"])
    assert any(f.startswith("--config.losses.perceptual_weights=") for f in flags["flowmo:lo"])
    # the smoke suite mirrors the full one kind by kind
    assert {k: len(v) for k, v in suite.SUITES["smoke"].items()} == {
        k: len(v) for k, v in suite.SUITES["full"].items()}


@pytest.mark.slow
def test_smoke_suite_runs_on_cpu(tmp_path):
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "accelerator_suite.sh"), "--smoke",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "accelerator_suite.json").read_text())
    rows = result["rows"]
    assert not [r for r in rows if "error" in r]
    kinds = {r["benchmark"].split(" (")[0] for r in rows}
    assert kinds == {"train step", "generate", "decode"}
    assert all(r["images_per_s"] > 0 for r in rows)
    trains = [r for r in rows if r["benchmark"] == "train step"]
    assert len(trains) == 4 and all(r["gflops_step"] > 0 and r["peak_memory_mb"] > 0 for r in trains)
    table = (tmp_path / "accelerator_suite.md").read_text()
    assert table.count("\n| train step |") == 4 and "flowmo:tiny" in table
