"""The compiled step's memory / FLOPs report: ``dry_run`` sizes a config on a mesh of simulated
devices without touching the workdir; the trainer prints the report before step 1."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from titok_jax.train import memory
from titok_jax.train.loop import train

from train_helpers import load_config_module, micro_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

KEYS = ("device_count", "state_bytes_per_device", "ideal_state_bytes_per_device",
        "argument_bytes_per_device", "output_bytes_per_device", "alias_bytes_per_device",
        "temp_bytes_per_device", "total_bytes_per_device", "flops_per_device", "collective_bytes_per_step")


def test_dry_run_of_tiny_on_fsdp8_writes_nothing(tmp_path):
    config = load_config_module("titok").get_config("tiny")
    config.mesh = {"data": 1, "fsdp": 8, "tensor": 1}
    workdir = tmp_path / "run"
    report = memory.dry_run(config, str(workdir))
    assert not workdir.exists() and os.listdir(tmp_path) == []
    for key in KEYS:
        assert key in report, key
    for key, value in report.items():
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    assert report["device_count"] == 8
    ideal = report["ideal_state_bytes_per_device"]
    assert ideal <= report["state_bytes_per_device"] <= 1.3 * ideal, report
    # the arguments are the state's shard plus the batch's; the donated state is aliased
    assert report["argument_bytes_per_device"] >= report["state_bytes_per_device"]
    assert report["alias_bytes_per_device"] >= 0.9 * report["state_bytes_per_device"]
    line = memory.report_line(report)
    assert "\n" not in line and "temporaries" in line and "GFLOP" in line


def test_collective_bytes_sum_operand_shapes():
    hlo = """
HloModule m
ENTRY %main (p0: f32[128,64], p1: bf16[32]) -> f32[128,64] {
  %p0 = f32[128,64]{1,0} parameter(0)
  %p1 = bf16[32]{0} parameter(1)
  %all-reduce.1 = f32[128,64]{1,0} all-reduce(%p0), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %ag = bf16[64]{0} all-gather(%p1), channel_id=2, dimensions={0}
  %ars = (f32[128,64]{1,0}, bf16[32]{0}) all-reduce-start(%p0, %p1), channel_id=3, to_apply=%add
  %ard = (f32[128,64]{1,0}, bf16[32]{0}) all-reduce-done(%ars)
  %rs = f32[64,64]{1,0} reduce-scatter(f32[128,64]{1,0} %p0), dimensions={0}
  ROOT %add.2 = f32[128,64]{1,0} add(%all-reduce.1, %all-reduce.1)
}
"""
    big, small = 128 * 64 * 4, 32 * 2
    assert memory.shape_bytes("(f32[128,64]{1,0}, bf16[32]{0}, f32[])") == big + small + 4
    assert memory.collective_bytes(hlo) == big + small + (big + small) + big


def test_collective_bytes_of_a_compiled_sum():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.device_put(np.ones((64, 1024), np.float32), NamedSharding(mesh, P("x")))
    compiled = jax.jit(lambda a: a.sum(0), out_shardings=NamedSharding(mesh, P())).lower(x).compile()
    assert memory.collective_bytes(compiled.as_text()) == 1024 * 4


def test_trainer_prints_the_report_before_step_one(tmp_path, capsys):
    config = micro_config(**{"total_steps": 1, "mesh": {"data": 1, "fsdp": 8, "tensor": 1}})
    train(config, str(tmp_path / "run"), progress=False)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "compiled step, per device" in line]
    assert len(lines) == 1, err
    assert "(8 devices)" in lines[0] and "GFLOP" in lines[0]


def test_simulate_devices_flag_is_read_before_parsing():
    from titok_jax.train.simulate import simulate_devices_arg
    assert simulate_devices_arg(["--config", "c.py", "--simulate_devices", "16"]) == 16
    assert simulate_devices_arg(["--simulate-devices=4"]) == 4
    assert simulate_devices_arg(["--simulate_devices=0"]) is None
    assert simulate_devices_arg(["--workdir", "w"]) is None
    with pytest.raises(ValueError, match="positive integer"):
        simulate_devices_arg(["--simulate_devices=x"])


def test_simulate_devices_sets_the_environment_before_jax_and_refuses_after():
    import subprocess
    import sys

    from titok_jax.train.simulate import simulate_devices
    simulate_devices(jax.device_count())        # this session already runs so: nothing to do
    with pytest.raises(RuntimeError, match="already imported"):
        simulate_devices(3)
    code = ("from titok_jax.train.simulate import simulate_devices; simulate_devices(4); "
            "import jax; print(jax.device_count(), jax.devices()[0].platform)")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"   # replaced, not appended to
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["4", "cpu"]


def test_cli_dry_run_on_simulated_devices(tmp_path):
    """`titok-jax train --dry_run --simulate_devices 8`: the report's JSON is the last stdout line,
    exit 0, and no workdir is created."""
    import json
    import subprocess
    import sys
    from train_helpers import ROOT
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    wd = tmp_path / "never"
    proc = subprocess.run(
        [sys.executable, "-m", "titok_jax", "train", "--config",
         os.path.join(ROOT, "configs", "titok.py") + ":tiny", "--workdir", str(wd), "--dry_run",
         "--simulate_devices", "8", "--config.mesh.fsdp=8", "--config.mesh.data=1"],
        capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["device_count"] == 8
    assert report["state_bytes_per_device"] < 1.3 * report["ideal_state_bytes_per_device"]
    assert not wd.exists()


@pytest.fixture(autouse=True, scope="module")
def _fast_compile(fast_compile):
    """XLA's heavy optimisation passes off for this module's micro programs (conftest
    ``fast_compile``): their compile, not their run, is most of the time on a 2-core CPU."""
