"""``titok-jax reconstruct``, ``tokenize``, ``features`` and ``detokenize``: a tokenizer workdir
applied to image files, token files or a data source (``titok_jax.api`` and ``titok_jax.data.tokens``).

A directory input skips the images that cannot be read (one warning line with their count and
names, as training does); a single image that cannot be read is an error. Outputs are written
under temporary names and renamed into place when the whole command has succeeded
(``outputs.staging``; ``reconstruct`` through ``api.write_reconstructions``, which
``Tokenizer.reconstruct_files`` shares), so a failure leaves no partial output. ``--workdir`` may be
``hf:ORG/NAME``: a release in the local Hugging Face cache (``common.parse`` resolves it).

With a video tokenizer (MAGVIT, MAGVIT-v2) ``reconstruct`` and ``tokenize`` take a video: a video
file or a folder of frame images (``titok_jax.video_files``), and ``detokenize`` decodes clip
tokens into a video per ``files`` name."""
from __future__ import annotations

import os
from typing import Any, Sequence

from titok_jax.commands.common import (UsageError, check_npz_input, check_output_dir, check_workdir,
                                       parse, require)
from titok_jax.outputs import (check_new_outputs, define_overwrite, npz_path, replacing,
                                        staging)


def _tokenizer_flags(fv: Any, input_help: str, output_help: str) -> None:
    from absl import flags
    flags.DEFINE_string("workdir", None, "a tokenizer workdir (train or import-torch output), or "
                        "hf:ORG/NAME[@REVISION][/FILE]: a release in the local Hugging Face cache "
                        "(converted once, never downloaded)", flag_values=fv)
    flags.DEFINE_string("input", None, input_help, flag_values=fv)
    flags.DEFINE_string("output", None, output_help, flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "images per encode/decode call", flag_values=fv)
    define_overwrite(fv)


def _tokenizer_args(name: str, argv: Sequence[str], input_help: str, output_help: str) -> Any:
    fv = parse(f"titok-jax {name}", argv, lambda fv: _tokenizer_flags(fv, input_help, output_help))
    require(fv, ("workdir", "input", "output"), name, f"{name} --workdir DIR --input "
            f"{input_help.split(':')[0]} --output {output_help.split(':')[0]}")
    return _tokenizer_args_checks(fv)


def _tokenizer_args_checks(fv: Any) -> Any:
    """The checks every image-file command makes of its parsed flags (batch size, workdir, input)."""
    if fv.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {fv.batch_size}")
    if not os.path.isdir(fv.workdir):
        raise UsageError(f"workdir {fv.workdir} does not exist")
    check_workdir(fv.workdir)
    if not os.path.exists(fv.input):
        raise FileNotFoundError(f"input {fv.input} does not exist")
    from titok_jax.data.paths import file_kind, is_regular_file
    if not (os.path.isdir(fv.input) or is_regular_file(fv.input)):  # a FIFO would block the read
        raise ValueError(f"input {fv.input} is a {file_kind(fv.input)}, not a file or a directory")
    return fv


def reconstruct(argv: Sequence[str]) -> int:
    """encode + decode: a single image -> a PNG at --output; a directory -> a PNG per image under
    --output/ (relative names kept, extension .png). An unreadable image is an error naming it (in
    a directory: skipped, and reported in one warning line). Every output path is checked (inside
    --output, no two alike, none existing unless --overwrite) before the model is loaded; the
    PNGs are renamed into place once every image went through."""
    fv = _tokenizer_args("reconstruct", argv, "IMG_OR_DIR: an image file or a directory of images "
                         "(a video file or a folder of frames for a video tokenizer)",
                         "PATH: the PNG to write (a directory when --input is one; a video "
                         "file, .gif or .mp4, for a video input)")
    if _video_run(fv):
        return _reconstruct_video(fv)
    from titok_jax.api import list_images, load_tokenizer, png_names, write_reconstructions
    from titok_jax.data.paths import paths_inside
    paths, names, is_dir = list_images(fv.input)
    if is_dir:
        check_output_dir(fv.output, "a directory input needs an output directory")
        outputs = paths_inside(fv.output, png_names(names), f"{fv.input}: images", source=names)
    elif os.path.isdir(fv.output):
        outputs = [os.path.join(fv.output, png_names(names)[0])]
    else:
        outputs = [fv.output]
    check_new_outputs(outputs, fv.overwrite)
    tok = load_tokenizer(fv.workdir, batch_size=fv.batch_size)
    # renamed into place once every image went through (Tokenizer.reconstruct_files: the same)
    written = write_reconstructions(tok, paths, outputs, names=names, source=fv.input,
                                    skip_unreadable=is_dir)
    print(f"reconstructed {len(written)} image(s) -> {fv.output if is_dir else outputs[0]}")
    return 0


def _video_run(fv: Any) -> bool:
    """True when ``--input`` is a video file (``video_files.VIDEO_EXTENSIONS``) or a directory (a
    folder of frames) and the workdir a video tokenizer (its task, built without loading the
    checkpoint, says so); a GIF or a directory given to an image tokenizer stays images."""
    from titok_jax.video_files import is_video_file
    if not (os.path.isdir(fv.input) or is_video_file(fv.input)):
        return False
    from titok_jax.tasks.runs import run_task
    return run_task(fv.workdir, "tokenizer").token_spec.is_video


def _reconstruct_video(fv: Any) -> int:
    """A video (file or frame folder) through a video tokenizer: the reconstruction as a video at
    --output (a directory: ``<input stem>.gif`` in it; a frame folder's stem is its name) and the
    first clip's frame grid beside it (``<stem>_frames.png``); both checked before the model is
    loaded."""
    from titok_jax.video_files import (VIDEO_EXTENSIONS, grid_path, is_video_file,
                                       reconstruct_video, video_name)
    output = fv.output
    if os.path.isdir(output):
        name = video_name(fv.input)
        stem = name if os.path.isdir(fv.input) else os.path.splitext(name)[0]
        output = os.path.join(output, stem + ".gif")
    if not is_video_file(output):
        raise UsageError(f"--output {output}: a video input needs a video output "
                         f"({', '.join(VIDEO_EXTENSIONS)}) or a directory")
    check_new_outputs([output, grid_path(output)], fv.overwrite)
    from titok_jax.api import load_tokenizer
    tok = load_tokenizer(fv.workdir, batch_size=fv.batch_size)
    written = reconstruct_video(tok, fv.input, output)
    print(f"reconstructed {fv.input} -> {written[0]} (frame grid {written[1]})")
    return 0


def _tokenize_flags(fv: Any) -> None:
    from absl import flags
    _tokenizer_flags(fv, "IMG_OR_DIR: an image file or a directory of images",
                     "tokens.npz (with --input) or DIR (with --data): what to write")
    flags.DEFINE_string("data", None, "a data source (sample, folder:PATH, tfds:NAME) to tokenize "
                        "into token shards for generator training, instead of --input", flag_values=fv)
    flags.DEFINE_string("split", "train", "split of --data", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data dir of --data", flag_values=fv)
    flags.DEFINE_integer("epochs", 1, "augmented passes over --data (each a new random crop and "
                         "flip of every image)", flag_values=fv)
    flags.DEFINE_bool("augment", True, "random crops and flips for --data (false: centre crops, "
                      "one pass)", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed of the --data augmentations", flag_values=fv)
    flags.DEFINE_integer("shard_size", 65536, "token rows per shard file", flag_values=fv)
    flags.DEFINE_integer("frame_stride", 1, "a video tokenizer on a clip source (sample_video, "
                         "video_folder:PATH): take every k-th frame", flag_values=fv)


def tokenize(argv: Sequence[str]) -> int:
    """images -> ``tokens.npz`` with ``tokens`` (int32 [N, T]; int32 [N, T, k] for the k codebooks
    of an fq / rq tokenizer; float32 [N, T, C] for a VAE) and
    ``files`` (the input names: the basename, or paths relative to the input directory).
    A video tokenizer on a video (a file or a folder of frames) -> one row per clip: ``tokens``
    int32 [C, T', h, w] and ``files`` the video's name (``video_files.video_name``) on each row.
    With ``--data SOURCE`` instead of ``--input``: every image of the source (``--epochs``
    augmented passes) -> token shards in the directory ``--output`` (``titok_jax.data.tokens``),
    the input of generator training (``config.data.source=tokens:DIR``)."""
    if any(a == "--data" or a.startswith("--data=") for a in argv):
        return _tokenize_data(argv)
    fv = _tokenizer_args("tokenize", argv, "IMG_OR_DIR: an image file or a directory of images "
                         "(a video file or a folder of frames for a video tokenizer)",
                         "tokens.npz: the file to write")
    import numpy as np
    if _video_run(fv):   # one row per clip: tokens [C, T', h, w], files the input's name
        from titok_jax.api import load_tokenizer
        from titok_jax.video_files import tokenizer_clips, video_name
        out = npz_path(fv.output)
        check_new_outputs([out], fv.overwrite)
        tok = load_tokenizer(fv.workdir, batch_size=fv.batch_size)
        clips, fps = tokenizer_clips(tok, fv.input)
        tokens = tok.encode(clips)
        with replacing(out) as tmp:   # fps: the source's frame rate, detokenize's default
            np.savez(tmp, tokens=tokens, fps=np.float64(fps),
                     files=np.asarray([video_name(fv.input)] * len(tokens), dtype=str))
        print(f"tokenized {len(tokens)} clip(s) of {fv.input} -> {out} (tokens {tokens.dtype} "
              f"{list(tokens.shape)})")
        return 0

    from titok_jax.api import image_batches, list_images, load_tokenizer, report_skipped
    paths, names, is_dir = list_images(fv.input)
    out = npz_path(fv.output)  # np.savez would add the extension
    check_new_outputs([out], fv.overwrite)
    tok = load_tokenizer(fv.workdir, batch_size=fv.batch_size)
    skipped: list[int] | None = [] if is_dir else None
    encoded, rows = [], []
    for kept, images in image_batches(paths, tok.image_size, fv.batch_size, skipped):
        encoded.append(tok.encode(images))
        rows.extend(kept)
    report_skipped(fv.input, names, skipped or [])
    tokens = np.concatenate(encoded)
    with replacing(out) as tmp:
        np.savez(tmp, tokens=tokens, files=np.asarray([names[i] for i in rows], dtype=str))
    print(f"tokenized {len(rows)} image(s) -> {out} (tokens {tokens.dtype} {list(tokens.shape)})")
    return 0


def features(argv: Sequence[str]) -> int:
    """images -> ``feats.npz`` with ``tokens`` (float32 ``[N, k, D]``: ``Tokenizer.features``, the
    first ``--num_tokens`` tokens; all when 0), ``pooled`` (float32 ``[N, D]``, their mean) and
    ``files`` (as ``tokenize`` writes them)."""
    def define(fv: Any) -> None:
        from absl import flags
        _tokenizer_flags(fv, "IMG_OR_DIR: an image file or a directory of images",
                         "feats.npz: the file to write")
        flags.DEFINE_integer("num_tokens", 0, "keep the first k tokens (ordered tokenizers: any "
                             "1..N; 0 = all)", flag_values=fv)

    fv = parse("titok-jax features", argv, define)
    require(fv, ("workdir", "input", "output"), "features",
            "features --workdir DIR --input IMG_OR_DIR --output feats.npz")
    _tokenizer_args_checks(fv)
    import numpy as np

    from titok_jax.api import image_batches, list_images, load_tokenizer, report_skipped
    paths, names, is_dir = list_images(fv.input)
    out = npz_path(fv.output)
    check_new_outputs([out], fv.overwrite)
    tok = load_tokenizer(fv.workdir, batch_size=fv.batch_size)
    k = fv.num_tokens or None
    skipped: list[int] | None = [] if is_dir else None
    tokens, pooled, rows = [], [], []
    for kept, images in image_batches(paths, tok.image_size, fv.batch_size, skipped):
        t, p = tok.features(images, num_tokens=k)
        tokens.append(t)
        pooled.append(p)
        rows.extend(kept)
    report_skipped(fv.input, names, skipped or [])
    tokens_arr, pooled_arr = np.concatenate(tokens), np.concatenate(pooled)
    with replacing(out) as tmp:
        np.savez(tmp, tokens=tokens_arr, pooled=pooled_arr,
                 files=np.asarray([names[i] for i in rows], dtype=str))
    print(f"features of {len(rows)} image(s) -> {out} (tokens {list(tokens_arr.shape)}, "
          f"pooled {list(pooled_arr.shape)})")
    return 0


def _tokenize_data(argv: Sequence[str]) -> int:
    fv = parse("titok-jax tokenize", argv, _tokenize_flags)
    require(fv, ("workdir", "output"), "tokenize --data",
            "tokenize --workdir DIR --data SOURCE --output TOKENS_DIR")
    if fv.input:
        raise UsageError("give either --input (image files -> tokens.npz) or --data (a data source "
                         "-> token shards), not both")
    if fv.batch_size < 1 or fv.shard_size < 1 or fv.frame_stride < 1:
        raise UsageError("--batch_size, --shard_size and --frame_stride must be >= 1")
    if fv.overwrite:
        raise UsageError("--overwrite does not apply to token shards: --output must be a new or "
                         "empty directory (remove the old data set first)")
    check_workdir(fv.workdir)
    from titok_jax.data.tokens import check_new_token_dir
    check_new_token_dir(fv.output)  # before the tokenizer is loaded
    from titok_jax.api import load_tokenizer
    from titok_jax.data.tokens import tokenize_source
    tok = load_tokenizer(fv.workdir, batch_size=fv.batch_size)
    if tok.codebook_size is None:
        raise ValueError(f"{fv.workdir} is a continuous (VAE) tokenizer; token shards hold discrete ids")
    meta = tokenize_source(
        fv.output, tok.encode, fv.data, image_size=tok.image_size, batch_size=fv.batch_size,
        split=fv.split, epochs=fv.epochs, augment=fv.augment, seed=fv.seed, data_dir=fv.data_dir,
        shard_size=fv.shard_size, progress=True, num_frames=tok.num_frames,
        frame_stride=fv.frame_stride,
        meta={"tokenizer": os.path.abspath(fv.workdir), "tokenizer_step": tok.step,
              "codebook_size": tok.codebook_size})
    print(f"tokenized {meta['count']} {'clip' if tok.num_frames else 'image'}(s) ({fv.epochs} pass(es) over {fv.data}:{fv.split}) -> "
          f"{fv.output} ({len(meta['shards'])} shard(s) of {meta['num_tokens']} tokens"
          + (f" x {meta['num_codebooks']} ids" if meta.get("num_codebooks", 1) > 1 else "") + ")")
    return 0


def detokenize(argv: Sequence[str]) -> int:
    """``tokens.npz`` (as written by tokenize: ``tokens`` and optional ``files``) -> a PNG per row
    under --output/, named after ``files`` (extension .png) or the row index; every name is checked
    (:func:`titok_jax.api.read_token_file`: relative, no ``..``, no two alike;
    :func:`titok_jax.data.paths.paths_inside`: no symlink out of --output) and no output may exist
    (unless --overwrite) before anything is written. A video tokenizer decodes clip tokens
    ``[C, T', h, w]`` into one video per distinct ``files`` name (:func:`_detokenize_video`)."""
    def define(fv: Any) -> None:
        from absl import flags
        _tokenizer_flags(fv, "tokens.npz: written by tokenize", "OUT_DIR: where the PNGs (or "
                         "videos) go")
        flags.DEFINE_float("fps", None, "frames per second of the videos a video tokenizer's "
                           "clip tokens decode to (default: the source's, stored by tokenize; "
                           "else video_files.DEFAULT_FPS, 10)",
                           flag_values=fv)

    fv = parse("titok-jax detokenize", argv, define)
    require(fv, ("workdir", "input", "output"), "detokenize",
            "detokenize --workdir DIR --input tokens.npz --output OUT_DIR")
    _tokenizer_args_checks(fv)
    if fv.fps is not None and fv.fps <= 0:
        raise UsageError(f"--fps must be > 0, got {fv.fps}")
    if os.path.isdir(fv.input):
        raise ValueError(f"--input {fv.input} is a directory; expected a tokens .npz file")
    check_npz_input(fv.input)
    check_output_dir(fv.output)
    from titok_jax.api import load_tokenizer, read_token_file
    from titok_jax.data.paths import paths_inside
    from titok_jax.evaluation.images import save_png
    tok = load_tokenizer(fv.workdir, batch_size=fv.batch_size)
    if fv.fps is not None and not tok.num_frames:
        raise UsageError(f"--fps applies to a video tokenizer's clip tokens; {fv.workdir} is an "
                         "image tokenizer")
    tokens, names = read_token_file(fv.input, tok)
    if tok.num_frames:
        return _detokenize_video(fv, tok, tokens, names)
    outputs = paths_inside(fv.output, names, f"{fv.input}: files")
    check_new_outputs(outputs, fv.overwrite)
    with staging() as stage:  # renamed into place once every row is decoded
        for start in range(0, len(names), fv.batch_size):
            for i, image in enumerate(tok.decode(tokens[start:start + fv.batch_size])):
                save_png(stage.path(outputs[start + i]), image)
    print(f"decoded {len(names)} token row(s) -> {fv.output}")
    return 0


def _detokenize_video(fv: Any, tok: Any, tokens: Any, names: list[str]) -> int:
    """Clip tokens -> one video per distinct name (its rows' clips in row order, concatenated in
    time) at ``--fps``, named ``video_files.video_file_name`` (``clip.gif`` -> ``clip.gif``; an
    mp4 without PyAV -> ``clip.gif``, with a note), and its first clip's frame grid
    (``<stem>_frames.png``); all names checked, none existing, before anything is decoded."""
    import numpy as np

    from titok_jax.data.paths import paths_inside
    from titok_jax.video_files import (AV_EXTENSIONS, DEFAULT_FPS, grid_path, has_pyav,
                                       video_file_name, write_clips)
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(name, []).append(i)
    pyav = has_pyav()
    videos = [video_file_name(name, pyav) for name in rows]
    outputs = paths_inside(fv.output, videos + [grid_path(v) for v in videos],
                           f"{fv.input}: files", source=list(rows) * 2)
    check_new_outputs(outputs, fv.overwrite)
    for name, video in zip(rows, videos):
        if name.lower().endswith(AV_EXTENSIONS) and not pyav:
            print(f"note: {name} is written as {video}: PyAV (the video extra) is not installed: "
                  "pip install 'titok_jax[video]'")
    fps = fv.fps or _stored_fps(fv.input) or DEFAULT_FPS
    with staging() as stage:  # renamed into place once every video is decoded
        for k, name in enumerate(rows):
            clips = tok.decode(tokens[np.asarray(rows[name])])
            write_clips(stage, outputs[k], clips, fps)
    print(f"decoded {len(names)} clip token row(s) -> {len(rows)} video(s) in {fv.output}")
    return 0


def _stored_fps(path: str) -> float | None:
    """The source video's frame rate that ``tokenize`` stored in ``path`` (``fps``), or None
    (older files, or a value that is not one positive finite number)."""
    import numpy as np
    with np.load(path, allow_pickle=False) as f:
        if "fps" not in f.files:
            return None
        value = np.asarray(f["fps"])
    if value.shape != () or not np.issubdtype(value.dtype, np.number):
        return None
    fps = float(value)
    return fps if np.isfinite(fps) and fps > 0 else None
