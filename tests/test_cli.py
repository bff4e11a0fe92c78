"""The command-line entry points: usage, unknown commands, and `python -m titok_jax`."""
import subprocess
import sys

from titok_jax import cli


def test_usage_lists_every_contract_command(capsys):
    assert cli.main([]) == 2  # no command is a usage error
    text = capsys.readouterr().out
    for name in ("train", "eval", "reconstruct", "tokenize", "detokenize", "generate", "import-torch"):
        assert f"  {name}" in text


def test_help_exits_zero(capsys):
    assert cli.main(["--help"]) == 0
    assert "usage: titok-jax" in capsys.readouterr().out


def test_unknown_command_is_one_clear_error(capsys):
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'frobnicate'" in err
    assert "Traceback" not in err


def test_python_dash_m_matches_console_script():
    proc = subprocess.run([sys.executable, "-m", "titok_jax", "no-such-command"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown command 'no-such-command'" in proc.stderr
    assert "Traceback" not in proc.stderr
