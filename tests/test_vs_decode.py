"""Smoke tests of the side-by-side decode and generation benchmarks (``benchmarks/vs_decode.py``,
``benchmarks/vs_generate.py``) at tiny sizes, one pair: the JSON line's structure and positive
times. Each needs torch and the official checkout (``$FLOWMO_REPO`` / ``$FLEXTOK_REPO`` /
``$TITOK_REPO``, else a work tree made from the local mirror) and the official code's own packages
(FlexTok: hydra-core + diffusers; 1d-tokenizer's generator: transformers), found on ``sys.path``
or in ``$VS_REFERENCE_PATH`` (``os.pathsep``-separated directories given to the official process
only); skipped when any is missing. BENCHMARKS.md has the published-size figures."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIRRORS = "/work/.mirror"


def _reference_path() -> list[str]:
    return [p for p in os.environ.get("VS_REFERENCE_PATH", "").split(os.pathsep) if p]


def _need(*modules: str) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("omegaconf")
    extra = _reference_path()
    saved = list(sys.path)
    sys.path[:0] = extra
    try:
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
    finally:
        sys.path[:] = saved
    if missing:
        pytest.skip(f"the official code needs {missing} (install them or name their directory "
                    "in $VS_REFERENCE_PATH)")


def _checkout(tmp_path, env: str, mirror: str, subdir: str) -> str:
    repo = os.environ.get(env)
    if repo:
        return repo
    git_dir = os.path.join(MIRRORS, mirror, "repo")
    if not os.path.isdir(git_dir):
        pytest.skip(f"no official checkout (${env}) and no local mirror of {mirror}")
    dest = tmp_path / mirror
    dest.mkdir()
    archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "HEAD", subdir],
                             capture_output=True, timeout=60)
    if archive.returncode != 0:
        pytest.skip(f"cannot read the mirror: {archive.stderr[-300:]!r}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, timeout=60)
    return str(dest)


def _run(script: str, args: list[str], cwd) -> dict:
    extra = ",".join(_reference_path())
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args,
                          "--pairs", "1", "--calls", "1", "--warmup", "0", "--build_together",
                          *(["--reference_path", extra] if extra else [])],
                         cwd=str(cwd), capture_output=True, text=True, timeout=600,
                         env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(result: dict, config: str, batch: int) -> None:
    assert result["config"] == config and result["batch"] == batch
    assert result["device"].startswith("cpu") and result["cpu_count"] >= 1
    (pair,) = result["pairs"]
    assert pair["pair"] == 0 and pair["ours_s"] > 0 and pair["official_s"] > 0
    assert len(pair["ours_times"]) == len(pair["official_times"]) == 1
    assert pair["ratio"] == pytest.approx(pair["official_s"] / pair["ours_s"])
    assert result["median_ratio"] == pytest.approx(pair["ratio"])
    assert result["ours_images_per_s"] == pytest.approx(batch / pair["ours_s"])
    assert result["official_images_per_s"] == pytest.approx(batch / pair["official_s"])
    for side in ("ours", "official"):
        assert result[side]["params_M"] > 0 and result[side]["build_s"] > 0
    assert result["ours"]["compile_s"] > 0
    assert result["official"]["threads"] >= 1


def test_vs_decode_flowmo_tiny(tmp_path):
    _need()
    repo = _checkout(tmp_path, "FLOWMO_REPO", "kylesargent+FlowMo", "flowmo")
    result = _run("vs_decode.py", [
        "--config", os.path.join(ROOT, "configs", "flowmo.py") + ":tiny",
        "--config.model.encoder_heads=2", "--config.model.decoder_heads=2",   # official: one count
        "--steps", "2", "--reference_repo", repo], tmp_path)
    _check(result, "flowmo:tiny", 1)
    assert result["family"] == "flowmo" and result["steps"] == 2 and result["guidance"] == 1.5


def test_vs_decode_flextok_tiny(tmp_path):
    _need("hydra", "diffusers", "einops")
    repo = _checkout(tmp_path, "FLEXTOK_REPO", "apple+ml-flextok", "flextok")
    result = _run("vs_decode.py", [
        "--config", os.path.join(ROOT, "configs", "flextok.py") + ":tiny",
        "--steps", "2", "--guidance", "3.0", "--reference_repo", repo], tmp_path)
    _check(result, "flextok:tiny", 1)
    assert result["family"] == "flextok" and result["steps"] == 2 and result["guidance"] == 3.0


def test_vs_generate_maskgit_tiny(tmp_path):
    _need("transformers")
    repo = _checkout(tmp_path, "TITOK_REPO", "bytedance+1d-tokenizer", "modeling")
    result = _run("vs_generate.py", [
        "--config", os.path.join(ROOT, "configs", "maskgit.py") + ":tiny",
        "--steps", "4", "--batch", "2", "--reference_repo", repo], tmp_path)
    _check(result, "maskgit:tiny", 2)
    assert result["sampler"]["steps"] == 4
    assert result["official"]["generate_kwargs"]["num_sample_steps"] == 4
