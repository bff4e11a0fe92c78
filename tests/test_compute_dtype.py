"""``compute_dtype: "auto"``, the published configs' default: bfloat16 on GPU/TPU, float32 on CPU
(where bfloat16 is emulated), ``TITOK_JAX_AUTO_DTYPE`` to force it, ``--simulate_devices`` standing
for accelerators."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from titok_jax.models.registry import AUTO_DTYPE_ENV, build_model, resolve_compute_dtype

from train_helpers import load_config_module

FAMILIES = ("titok", "flextok", "flowmo", "maskgit", "ar", "vqgan", "extractor", "magvit2",
            "fqgan")


def test_auto_is_float32_on_this_cpu_and_names_pass_through(monkeypatch):
    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)
    assert jax.default_backend() == "cpu"
    assert resolve_compute_dtype("auto") == "float32"
    for name in ("float32", "bfloat16", "float16"):
        assert resolve_compute_dtype(name) == name
    monkeypatch.setenv(AUTO_DTYPE_ENV, "bfloat16")
    assert resolve_compute_dtype("auto") == "bfloat16"
    assert resolve_compute_dtype("float32") == "float32"      # only "auto" follows the variable


@pytest.mark.parametrize("bad", ["bf16", "", None, "fp32"])
def test_unknown_names_are_one_clear_error(bad):
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        resolve_compute_dtype(bad)


def test_a_bad_override_is_named(monkeypatch):
    monkeypatch.setenv(AUTO_DTYPE_ENV, "half")
    with pytest.raises(ValueError, match=AUTO_DTYPE_ENV):
        resolve_compute_dtype("auto")


def test_published_configs_default_to_auto_and_build_in_float32_here(monkeypatch):
    monkeypatch.delenv(AUTO_DTYPE_ENV, raising=False)
    for family in FAMILIES:
        module = load_config_module(family)
        for variant in module.PUBLISHED:
            assert module.get_config(variant).compute_dtype == "auto", (family, variant)
        assert module.get_config("tiny").compute_dtype == "float32", family
    config = load_config_module("titok").get_config("tiny")
    assert build_model(config.model, dtype="auto").dtype == jnp.float32
    monkeypatch.setenv(AUTO_DTYPE_ENV, "bfloat16")
    assert build_model(config.model, dtype="auto").dtype == jnp.bfloat16


def test_simulated_devices_resolve_auto_as_an_accelerator_would():
    code = ("import sys; from titok_jax.train.simulate import simulate_devices; simulate_devices(2); "
            "from titok_jax.models.registry import resolve_compute_dtype; import jax; "
            "print(jax.device_count(), resolve_compute_dtype('auto'))")
    env = {k: v for k, v in os.environ.items() if k not in (AUTO_DTYPE_ENV, "XLA_FLAGS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "bfloat16"]
    env[AUTO_DTYPE_ENV] = "float32"                           # a value the user set wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["2", "float32"], out.stderr[-2000:]
