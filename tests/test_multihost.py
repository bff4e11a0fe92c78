"""Two real processes on localhost joined with `jax.distributed` (4 CPU devices each, gloo
collectives) run `titok-jax train` on one shared workdir: both finish, agree on the loss, see the
8-device global mesh, and together write exactly one checkpoint tree."""
import json
import os
import re
import socket
import subprocess
import sys

from train_helpers import ROOT

from test_train_cli import CONFIG, MICRO

NUM_PROCESSES = 2
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cluster(workdir: str) -> list[tuple[int, str, str]]:
    address = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "TPU_", "SLURM_", "OMPI_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               TITOK_MULTIHOST="1", JAX_COORDINATOR_ADDRESS=address,
               JAX_NUM_PROCESSES=str(NUM_PROCESSES), PYTHONPATH=ROOT,
               JAX_DISABLE_MOST_OPTIMIZATIONS="true")   # tiny programs: a quick compile
    cmd = [sys.executable, "-m", "titok_jax", "train", "--config", CONFIG, "--workdir", workdir, *MICRO]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**env, "JAX_PROCESS_ID": str(i)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(NUM_PROCESSES)]
    results = []
    try:
        for p in procs:  # a hang (e.g. a collective never met) fails the test instead of blocking
            out, err = p.communicate(timeout=TIMEOUT_S)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


def test_two_processes_train_one_run(tmp_path):
    workdir = str(tmp_path / "shared")
    results = _run_cluster(workdir)
    for i, (code, out, err) in enumerate(results):
        assert code == 0, f"process {i} exited {code}:\n{err[-3000:]}"
        # every process sees the global mesh: 2 processes x 4 CPU devices
        assert re.search(r"on 8 cpu device\(s\), mesh \{'data': 8", err), err[-2000:]
        assert "trained to step 4" in out, out

    losses = [re.search(r"^last loss:\s+(\S+)$", out, re.M) for _, out, _ in results]
    assert all(losses), [out for _, out, _ in results]
    assert losses[0].group(1) == losses[1].group(1)  # the same replicated step on both hosts

    # process 0 alone writes the metrics; its last loss is the one both processes printed
    rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [2, 4]
    assert f"{rows[-1]['loss']:.8g}" == losses[0].group(1)
    assert len(open(os.path.join(workdir, "eval.jsonl")).readlines()) == 1

    # one checkpoint tree in the shared workdir: the expected step dirs, nothing duplicated or
    # left half-written (orbax's tmp dirs) by the second process
    assert sorted(os.listdir(workdir)) == sorted(
        n for n in os.listdir(workdir) if n in {"checkpoints", "config.json", "metrics.jsonl", "eval.jsonl",
                                                "curves.png", "samples", "tb"})
    steps = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    assert steps == ["000000002", "000000004"], steps
    for root, dirs, _ in os.walk(os.path.join(workdir, "checkpoints")):
        assert not [d for d in dirs if "tmp" in d.lower()], (root, dirs)
    for step in steps:
        assert os.listdir(os.path.join(workdir, "checkpoints", step, "state"))
