"""Hostile input (issue 13): paths taken from file contents never leave the directory the user named,
names that would collapse rows are refused, and FIFOs in an image folder are skipped with a warning
instead of blocking forever. Every refusal is one line on stderr, a non-zero exit and nothing written."""
import contextlib
import os
import threading

import numpy as np
import pytest
from PIL import Image

from titok_jax import cli

from train_helpers import one_line_error






def write_image(path, seed=0, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path, format=fmt)


@contextlib.contextmanager
def fifo_guard(*fifos, after=20.0):
    """Code that opens a FIFO for reading blocks until a writer comes. After ``after`` seconds this
    opens each FIFO for writing (and closes it), so such a reader gets EOF and the test fails
    instead of hanging the suite."""
    stop = threading.Event()

    def unblock():
        if stop.wait(after):
            return
        while not stop.is_set():
            for f in fifos:
                with contextlib.suppress(OSError):
                    os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            stop.wait(0.2)

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def tree(path):
    """Every file under ``path`` (relative), following no links."""
    return sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)


# ----------------------------------------------------------------------------- detokenize names
@pytest.mark.parametrize("files, words", [
    (["ok.png", "sub/evil.png"], "outside"),                       # OUT/sub is a link out of OUT
    (["a.png", "a.png/b.png"], "needs it to be a directory"),      # half written, then a crash
    (["ok.png", "evil\n.png"], "control character"),               # a newline in a file name
    (["ok.png", "x/../../evil.png"], "outside the output directory"),
    (["ok.png", "ok.jpg", "ok.png"], "both give the output name"),  # rows 0 and 2 collapse
])
def test_detokenize_refuses_names_that_leave_or_collapse(vq_release_dir, tmp_path, capsys, files, words):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside, out / "sub")
    path = str(tmp_path / "t.npz")
    np.savez(path, tokens=np.zeros((len(files), 8), np.int32), files=np.asarray(files))
    assert cli.main(["detokenize", "--workdir", vq_release_dir, "--input", path,
                     "--output", str(out)]) == 1
    err = one_line_error(capsys)
    assert words in err and "t.npz" in err
    assert os.listdir(out) == ["sub"] and os.listdir(outside) == []  # nothing written anywhere
    assert not (tmp_path / "evil.png").exists()


def test_reconstruct_refuses_input_names_that_collapse(vq_release_dir, tmp_path, capsys):
    # a.jpg and a.png would both be a.png, so a.jpg becomes a.jpg.png - the name of a third input.
    src = tmp_path / "in"
    write_image(str(src / "a.jpg"), 0, "JPEG")
    write_image(str(src / "a.png"), 1)
    write_image(str(src / "a.jpg.png"), 2)
    out = tmp_path / "out"
    assert cli.main(["reconstruct", "--workdir", vq_release_dir, "--input", str(src),
                     "--output", str(out)]) == 1
    err = one_line_error(capsys)
    assert "both give the output name 'a.jpg.png'" in err
    assert not out.exists()


def test_reconstruct_refuses_a_link_out_of_the_output_directory(vq_release_dir, tmp_path, capsys):
    src = tmp_path / "in"
    write_image(str(src / "a.png"))
    write_image(str(src / "sub" / "b.png"), 1)
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside, out / "sub")
    assert cli.main(["reconstruct", "--workdir", vq_release_dir, "--input", str(src),
                     "--output", str(out)]) == 1
    assert "outside" in one_line_error(capsys)
    assert os.listdir(outside) == [] and os.listdir(out) == ["sub"]


# ----------------------------------------------------------------------------- FIFOs and links
def test_reconstruct_skips_a_fifo_with_a_warning(vq_release_dir, tmp_path, capsys):
    src = tmp_path / "in"
    write_image(str(src / "a.png"))
    fifo = str(src / "b.png")
    os.mkfifo(fifo)
    out = tmp_path / "out"
    with fifo_guard(fifo):
        rc = cli.main(["reconstruct", "--workdir", vq_release_dir, "--input", str(src),
                       "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "b.png" in warnings[0] and "FIFO" in warnings[0], err
    assert tree(out) == ["a.png"]


def test_tokenize_a_folder_source_skips_a_fifo(vq_release_dir, tmp_path, capsys):
    src = tmp_path / "folder"
    for i, name in enumerate(("a.png", "b.png", "c.jpg")):
        write_image(str(src / name), i, "JPEG" if name.endswith("jpg") else None)
    fifo = str(src / "d.png")
    os.mkfifo(fifo)
    out = tmp_path / "shards"
    with fifo_guard(fifo):
        rc = cli.main(["tokenize", "--workdir", vq_release_dir, "--data", f"folder:{src}",
                       "--augment=false", "--batch_size", "2", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "d.png" in err and "FIFO" in err and "Traceback" not in err
    from titok_jax.data.tokens import TokenSource
    assert len(TokenSource(str(out))) == 3  # the three images, the FIFO neither read nor counted


def test_a_fifo_as_input_is_refused(vq_release_dir, tmp_path, capsys):
    fifo = str(tmp_path / "t.npz")
    os.mkfifo(fifo)
    with fifo_guard(fifo):
        rc = cli.main(["detokenize", "--workdir", vq_release_dir, "--input", fifo,
                       "--output", str(tmp_path / "out")])
    assert rc == 1
    assert "FIFO" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_folder_source_follows_a_link_loop_once(tmp_path):
    from titok_jax.data import make_source
    write_image(str(tmp_path / "root" / "cls" / "a.png"))
    os.symlink(tmp_path / "root", tmp_path / "root" / "cls" / "loop")
    src = make_source(f"folder:{tmp_path / 'root'}", "train")
    assert src.files == [os.path.join("cls", "a.png")]
