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


def test_usage_lists_the_converter_commands(capsys):
    assert cli.main(["--help"]) == 0
    text = capsys.readouterr().out
    for name in ("convert-lpips", "convert-convnext", "convert-dinov2", "convert-clip", "convert-inception",
                 "convert-i3d", "fid-reference"):
        assert f"  {name}" in text
        assert name in cli.HANDLERS


def test_bad_flags_are_one_line_and_dashes_are_accepted(capsys, tmp_path):
    from titok_jax.commands.common import UsageError, parse
    from absl import flags

    def define(fv):
        flags.DEFINE_integer("class_id", None, "", flag_values=fv)
        flags.DEFINE_bool("save_images", True, "", flag_values=fv)
    fv = parse("t", ["--class-id=3", "--no-save-images"], define)
    assert fv.class_id == 3 and fv.save_images is False
    try:
        parse("t", ["--class-id", "x"], define)
        raise AssertionError("a bad integer must be a UsageError")
    except UsageError as e:
        assert "class_id" in str(e) and len(str(e).splitlines()) == 1
    assert cli.main(["generate", "--workdir", str(tmp_path), "--bogus", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bogus" in err and "Traceback" not in err


def test_distributed_init_is_a_no_op_on_one_host(monkeypatch):
    from titok_jax.train.distributed import maybe_init_distributed
    monkeypatch.delenv("TITOK_MULTIHOST", raising=False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert maybe_init_distributed() is False
