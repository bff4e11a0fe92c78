"""Video tokenizer inference commands on video files (issue 18): `detokenize` of clip tokens writes
one video per `files` name (clips concatenated in time) and its frame grid, with the image path's
safety (names checked, nothing overwritten, one-line errors); a folder of frame images is a video
for `reconstruct` and `tokenize`. A random-init tiny causal MAGVIT-v2 (16 px, 5 frames -> latent
3 x 8 x 8) keeps the file fast: the numbers do not need a trained model."""
import os
import re

import jax
import numpy as np
import pytest

import titok_jax
from titok_jax import cli
from titok_jax.video_files import read_video

from train_helpers import load_config_module

pytestmark = pytest.mark.usefixtures("fast_compile")

SIZE, T = 16, 5
# A GIF frame is quantised to an adaptive palette of at most 256 colours (PIL's median cut), which
# is lossy only for frames of more colours than that. A 16 x 16 frame has 256 pixels, so its
# palette is exact and the GIF holds exactly the uint8 rounding (evaluation.images.to_uint8, what
# write_video writes) of tok.decode: compared exactly (measured: max |difference| 0 over 10 frames
# of 256 distinct colours each). Larger frames would need a tolerance.


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    """``(tokenizer, workdir, root)``: a random-init tiny MAGVIT-v2 workdir (as
    test_video_generation's) and a GIF of 11 frames (two 5-frame clips, the last frame dropped)."""
    from flax import linen as nn

    from titok_jax.checkpoint import inference_state, write_workdir
    from titok_jax.tasks import get_task
    root = tmp_path_factory.mktemp("video_files")
    c = load_config_module("magvit2_video").get_config("tiny")
    c.model.image_size = c.data.image_size = SIZE
    c.model.ch_mult, c.model.temporal_downsample = (1, 2), (True,)
    c.optimizer.ema_decay = 0.0
    params, state = nn.unbox(jax.jit(get_task(c).init)(jax.random.key(0)))
    workdir = str(root / "tok")
    write_workdir(workdir, c.to_dict(), inference_state(params["model"], state["model"]))
    frames = np.random.default_rng(0).integers(0, 256, (11, 20, 24, 3), dtype=np.uint8)
    from titok_jax.video_files import write_video
    write_video(str(root / "clip.gif"), frames, fps=5)
    return titok_jax.load_tokenizer(workdir, batch_size=2), workdir, root


def _tokenize(workdir, src, out):
    argv = ["tokenize", "--workdir", workdir, "--input", str(src), "--output", str(out)]
    assert cli.main(argv) == 0
    with np.load(out) as data:
        return data["tokens"], list(data["files"])


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_detokenize_clip_tokens_writes_one_video_and_its_grid(video, tmp_path):
    from PIL import Image

    from titok_jax.evaluation.images import to_uint8
    tok, workdir, root = video
    tokens, files = _tokenize(workdir, root / "clip.gif", tmp_path / "t.npz")
    assert tokens.shape == (2, 3, 8, 8) and files == ["clip.gif", "clip.gif"]
    out = tmp_path / "out"
    assert cli.main(["detokenize", "--workdir", workdir, "--input", str(tmp_path / "t.npz"),
                     "--output", str(out), "--fps", "4"]) == 0
    assert sorted(os.listdir(out)) == ["clip.gif", "clip_frames.png"]
    frames, fps = read_video(str(out / "clip.gif"))
    assert frames.shape == (2 * T, SIZE, SIZE, 3) and fps == 4
    np.testing.assert_array_equal(frames, to_uint8(tok.decode(tokens)).reshape(frames.shape))
    with Image.open(out / "clip_frames.png") as im:   # the first clip's frames in one row
        assert im.size == (2 + T * (SIZE + 2), 2 + SIZE + 2)
    # nothing is overwritten without --overwrite: not even the video when only the grid exists
    os.remove(out / "clip.gif")
    before = (out / "clip_frames.png").read_bytes()
    argv = ["detokenize", "--workdir", workdir, "--input", str(tmp_path / "t.npz"), "--output", str(out)]
    assert cli.main(argv) == 1
    assert sorted(os.listdir(out)) == ["clip_frames.png"]
    assert (out / "clip_frames.png").read_bytes() == before
    assert cli.main(argv + ["--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["clip.gif", "clip_frames.png"]
    assert read_video(str(out / "clip.gif"))[1] == 5.0    # without --fps: the source's, stored
    with np.load(tmp_path / "t.npz") as f:                 # by tokenize; a file without it ...
        assert float(f["fps"]) == 5.0
        np.savez(tmp_path / "old.npz", tokens=f["tokens"], files=f["files"])
    argv[argv.index(str(tmp_path / "t.npz"))] = str(tmp_path / "old.npz")
    assert cli.main(argv + ["--overwrite"]) == 0
    assert read_video(str(out / "clip.gif"))[1] == 10.0   # ... DEFAULT_FPS


def test_rows_of_several_names_give_a_video_each(video, tmp_path, monkeypatch, capsys):
    from titok_jax import video_files
    from titok_jax.evaluation.images import to_uint8
    tok, workdir, _ = video
    tokens = np.random.default_rng(1).integers(0, tok.codebook_size, (3, 3, 8, 8)).astype(np.int32)
    np.savez(tmp_path / "t.npz", tokens=tokens, files=np.asarray(["a.mp4", "sub/b", "a.mp4"]))
    monkeypatch.setattr(video_files, "has_pyav", lambda: False)
    out = tmp_path / "out"
    assert cli.main(["detokenize", "--workdir", workdir, "--input", str(tmp_path / "t.npz"),
                     "--output", str(out)]) == 0
    assert "a.mp4 is written as a.gif" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["a.gif", "a_frames.png", "sub"]
    assert sorted(os.listdir(out / "sub")) == ["b.gif", "b_frames.png"]
    a = read_video(str(out / "a.gif"))[0]   # rows 0 and 2, in order
    np.testing.assert_array_equal(a, to_uint8(tok.decode(tokens[[0, 2]])).reshape(a.shape))
    assert read_video(str(out / "sub" / "b.gif"))[0].shape == (T, SIZE, SIZE, 3)


def test_an_mp4_name_stays_mp4_with_pyav_and_no_link_leads_out(video, tmp_path, capsys):
    pytest.importorskip("av")
    _, workdir, _ = video
    np.savez(tmp_path / "t.npz", tokens=np.zeros((1, 3, 8, 8), np.int32), files=np.asarray(["a.mp4"]))
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(tmp_path / "elsewhere.mp4", out / "a.mp4")   # a dangling link out of OUT_DIR
    argv = ["detokenize", "--workdir", workdir, "--input", str(tmp_path / "t.npz"), "--output", str(out)]
    assert cli.main(argv + ["--overwrite"]) == 1
    assert "outside" in _one_line_error(capsys) and os.listdir(out) == ["a.mp4"]
    os.remove(out / "a.mp4")
    assert cli.main(argv) == 0
    assert sorted(os.listdir(out)) == ["a.mp4", "a_frames.png"]
    assert read_video(str(out / "a.mp4"))[0].shape == (T, SIZE, SIZE, 3)


@pytest.mark.parametrize("tokens, files, match", [
    (np.zeros((2, 32), np.int32), None, r"expects token ids \[B, T', 8, 8\] \(or \[B, 192\]\)"),
    (np.zeros((1, 3, 8, 8), np.int32), ["../x.gif"], "'..' component"),
    (np.zeros((2, 3, 8, 8), np.int32), ["a", "a.gif"], "both give the output name 'a.gif'"),
])
def test_detokenize_refuses_bad_clip_tokens_and_writes_nothing(video, tmp_path, capsys, tokens,
                                                                files, match):
    _, workdir, _ = video
    extra = {} if files is None else {"files": np.asarray(files)}
    np.savez(tmp_path / "t.npz", tokens=tokens, **extra)
    assert cli.main(["detokenize", "--workdir", workdir, "--input", str(tmp_path / "t.npz"),
                     "--output", str(tmp_path / "out")]) == 1
    assert re.search(match, _one_line_error(capsys))
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "x.gif")


def test_a_frame_folder_is_the_video_of_its_frames(video, tmp_path, capsys):
    from PIL import Image
    tok, workdir, root = video
    frames, _ = read_video(str(root / "clip.gif"))   # what the GIF decodes to: exact PNG frames
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):   # f1 .. f11: natural order, f2 before f10
        Image.fromarray(f).save(folder / f"f{i + 1}.png")
    (folder / "notes.txt").write_text("not a frame")
    gif_tokens, _ = _tokenize(workdir, root / "clip.gif", tmp_path / "gif.npz")
    tokens, files = _tokenize(workdir, str(folder) + os.sep, tmp_path / "dir.npz")
    np.testing.assert_array_equal(tokens, gif_tokens)
    assert files == ["frames", "frames"]
    # reconstruct: a video output (a file name or a directory), the frame grid beside it
    assert cli.main(["reconstruct", "--workdir", workdir, "--input", str(folder), "--output",
                     str(tmp_path / "rec.gif")]) == 0
    assert read_video(str(tmp_path / "rec.gif"))[0].shape == (2 * T, SIZE, SIZE, 3)
    with Image.open(tmp_path / "rec_frames.png") as im:   # originals over reconstructions
        assert im.size == (2 + T * (SIZE + 2), 2 + 2 * (SIZE + 2))
    (tmp_path / "recs").mkdir()
    assert cli.main(["reconstruct", "--workdir", workdir, "--input", str(folder), "--output",
                     str(tmp_path / "recs")]) == 0
    assert sorted(os.listdir(tmp_path / "recs")) == ["frames.gif", "frames_frames.png"]
    assert cli.main(["reconstruct", "--workdir", workdir, "--input", str(folder), "--output",
                     str(tmp_path / "rec.png")]) == 2
    assert not os.path.exists(tmp_path / "rec.png")


def test_bad_frame_folders_are_one_line_errors(video, tmp_path, capsys):
    _, workdir, _ = video
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)   # frames in a sub-folder are not this video's
    bad = tmp_path / "bad"
    bad.mkdir()
    from PIL import Image
    Image.new("RGB", (16, 16)).save(bad / "f1.png")
    (bad / "f2.png").write_bytes(b"not a png")
    for folder, match in ((empty, "holds no frame images"), (bad, "cannot read frame .*f2.png")):
        for command, out in (("tokenize", "t.npz"), ("reconstruct", "rec.gif")):
            assert cli.main([command, "--workdir", workdir, "--input", str(folder),
                             "--output", str(tmp_path / out)]) == 1
            assert re.search(match, _one_line_error(capsys))
            assert not os.path.exists(tmp_path / out)


def test_clip_tokens_for_an_image_tokenizer_say_the_shape_expected(tmp_path):
    """The reverse refusal, in ``read_token_file`` (what ``detokenize`` reads with): an image
    tokenizer (the image MAGVIT-v2's task; its params are not needed to check a token file)."""
    from titok_jax.api import Tokenizer, read_token_file
    from titok_jax.tasks import get_task
    c = load_config_module("magvit2").get_config("tiny")
    image = Tokenizer(get_task(c, inference=True), None, None)
    np.savez(tmp_path / "t.npz", tokens=np.zeros((2, 3, 4, 4), np.int32))
    with pytest.raises(ValueError, match=rf"expects token ids \[B, {image.num_tokens}\].*clip tokens"):
        read_token_file(str(tmp_path / "t.npz"), image)
