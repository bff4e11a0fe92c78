"""``benchmarks/vs_quantizers.py``: ours-only at the smallest sizes (no torch needed), its numerics
checks on hand-made outputs, and - where torch, einops, einx and a vector-quantize-pytorch
checkout exist (``$VQ_PYTORCH_REPO`` or the local mirror) - the side-by-side run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "vs_quantizers.py")
MIRROR = "/work/.mirror/lucidrains+vector-quantize-pytorch/repo"
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import vs_quantizers  # noqa: E402  (numpy only at import)


def _run(args, cwd, timeout=300):
    out = subprocess.run([sys.executable, SCRIPT, *args], cwd=str(cwd), capture_output=True, text=True,
                         timeout=timeout, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout


def test_ours_only_small(tmp_path):
    result, stdout = _run(["--small", "--fsq_levels", "8,5,5,5"], tmp_path)
    cases = [("vq256x8_l2", 512), ("vq256x8_euclid", 512), ("fsq_8.5.5.5", 1024), ("lfq10_entropy", 512)]
    assert [(r["case"], r["tokens"], r["mode"]) for r in result["rows"]] == [
        (c, n, m) for c, n in cases for m in ("fwd", "fwd+bwd")]
    for r in result["rows"]:
        assert len(r["ours_s"]) == 2 and all(t > 0 for t in r["ours_s"])   # --small: 2 pairs
        assert r["ours_tokens_per_s"] == pytest.approx(r["tokens"] / np.median(r["ours_s"]))
        assert r["ours_xla_mb"] > 0
        assert r["theirs_s"] == [] and r["ratio"] is None and r["agree"] is None
    assert result["reference"] is None and result["numerics"] == {} and result["median_ratio"] is None
    assert result["device"].startswith("cpu") and result["memory_limit_gb"] > 0
    assert "lfq10_entropy" in stdout and "ours_tokens_per_s" in stdout   # the table


def test_bad_reference_path_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, "--small", "--reference_repo", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "not a vector-quantize-pytorch checkout" in out.stderr


def _outputs(indices, z_q, loss=0.0, grad=None, **extra):
    z_q = np.asarray(z_q, np.float32)
    return {"indices": np.asarray(indices), "z_q": z_q, "loss": loss,
            "grad": np.ones_like(z_q) if grad is None else grad, **extra}


def test_compare_vq_counts_float_ties_only():
    case = {"kind": "vq", "l2": False}
    codebook = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], np.float32)   # codes 0 and 1 tie
    arrays = {"z": np.array([[0.9, 0.1], [0.1, 0.9]], np.float32), "codebook": codebook}
    ours = _outputs([0, 2], codebook[[0, 2]])
    tie = vs_quantizers.compare(case, arrays, ours, _outputs([1, 2], codebook[[1, 2]]))
    assert tie["index_mismatches"] == 1 and tie["mismatches_are_ties"] and tie["mismatch_max_rel_gap"] == 0
    assert tie["index_agreement"] == 0.5 and not tie["ok"]        # too many mismatches for "ok"
    real = vs_quantizers.compare(case, arrays, ours, _outputs([2, 2], codebook[[2, 2]]))
    assert not real["mismatches_are_ties"] and real["mismatch_max_rel_gap"] > 0.1 and not real["ok"]
    same = vs_quantizers.compare(case, arrays, ours, _outputs([0, 2], codebook[[0, 2]]))
    assert same["ok"] and same["index_agreement"] == 1.0 and same["code_max_abs_diff"] == 0.0


def test_compare_lfq_reverses_their_bit_order_and_fsq_is_exact():
    case = {"kind": "lfq", "bits": 3}
    codes = np.array([[1, -1, -1], [1, 1, -1]], np.float32)   # ours: LSB first -> 1, 3; theirs 4, 6
    ours = _outputs([1, 3], codes, 1.0, per_sample_entropy=0.5, batch_entropy=2.0)
    check = vs_quantizers.compare(case, {}, ours, _outputs([4, 6], codes, 1.001))
    assert check["index_agreement"] == 1.0 and check["ok"] and check["loss_rel_diff"] < 0.01
    assert not vs_quantizers.compare(case, {}, ours, _outputs([1, 3], codes, 1.0))["ok"]
    fsq = {"kind": "fsq"}
    assert vs_quantizers.compare(fsq, {}, _outputs([5], [[0.5]]), _outputs([5], [[0.5]]))["ok"]
    assert not vs_quantizers.compare(fsq, {}, _outputs([5], [[0.5]]), _outputs([5], [[0.25]]))["ok"]


def _reference_checkout(tmp_path):
    repo = os.environ.get("VQ_PYTORCH_REPO")
    if repo:
        return repo
    if not os.path.isdir(MIRROR):
        pytest.skip("no vector-quantize-pytorch checkout ($VQ_PYTORCH_REPO) and no local mirror")
    dest = tmp_path / "vqp"
    dest.mkdir()
    archive = subprocess.run(["git", f"--git-dir={MIRROR}", "archive", "HEAD"], capture_output=True,
                             timeout=60)
    if archive.returncode != 0:
        pytest.skip(f"cannot read the mirror: {archive.stderr[-300:]!r}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, timeout=60)
    return str(dest)


def test_against_the_reference(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("einops")
    pytest.importorskip("einx")
    repo = _reference_checkout(tmp_path)
    result, _ = _run(["--small", "--vq_metric", "l2", "--fsq_levels", "8,8,8,5,5,5",
                      "--reference_repo", repo], tmp_path)
    assert result["theirs_errors"] == {}
    assert set(result["numerics"]) == {"vq256x8_l2@512", "fsq_8.8.8.5.5.5@1024", "lfq10_entropy@512"}
    for key, check in result["numerics"].items():
        assert check["ok"], (key, check)
        assert check["index_agreement"] == 1.0
        assert check["code_max_abs_diff"] < 1e-6
    assert result["numerics"]["fsq_8.8.8.5.5.5@1024"]["grad_rel_err"] < 1e-5
    assert result["numerics"]["vq256x8_l2@512"]["grad_rel_err"] < 1e-5
    lfq = result["numerics"]["lfq10_entropy@512"]
    assert lfq["batch_entropy_ours"] == pytest.approx(lfq["batch_entropy_theirs"], rel=1e-3)
    assert lfq["per_sample_entropy_ours"] == pytest.approx(lfq["per_sample_entropy_theirs"], rel=1e-2)
    for r in result["rows"]:
        assert len(r["theirs_s"]) == len(r["ratios"]) == 2 and r["ratio"] > 0
        assert r["ratio"] == pytest.approx(np.median(r["ratios"]))
        assert r["agree"].startswith("ok")
    assert result["median_ratio"] > 0 and result["reference"]["version"]
