"""Usage errors come before JAX is imported (issue 13): a missing flag, an unknown flag or an
unknown command costs a fraction of a second, not the ~2 s of importing JAX, Flax and Orbax."""
import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
from titok_jax import cli
code = cli.main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "jax": "jax" in sys.modules, "numpy": "numpy" in sys.modules}))
"""

CASES = [
    ["train"],
    ["train", "--workdir", "w"],
    ["train", "--config", "configs/titok.py:tiny"],
    ["eval"],
    ["reconstruct", "--input", "x.png", "--output", "y.png"],
    ["reconstruct", "--workdir", "w", "--bogus", "1"],
    ["tokenize"],
    ["detokenize", "--workdir", "w"],
    ["generate", "--workdir", "w"],
    ["import-torch", "--input", "x"],
    ["convert-lpips"],
    ["convert-convnext", "--output", "x.npz"],
    ["convert-dinov2"],
    ["convert-clip"],
    ["convert-inception"],
    ["fid-reference", "--data", "sample"],
    ["frobnicate"],
]


def probe(args):
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(args)], capture_output=True,
                         text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.parametrize("args", CASES, ids=[" ".join(c) for c in CASES])
def test_usage_errors_exit_2_before_jax_is_imported(args):
    result, err = probe(args)
    assert result["code"] == 2, err
    assert not result["jax"] and not result["numpy"], f"{args}: imported jax/numpy before the usage error"
    lines = err.strip().splitlines()
    assert lines and lines[0].startswith("titok-jax:") and "Traceback" not in err, err
