"""``titok-jax generate``: a generator workdir + a tokenizer workdir -> images (and gFID / IS).

Both ``--workdir`` and ``--tokenizer`` take ``hf:ORG/NAME`` (a release in the local Hugging Face
cache, converted once): ``common.parse`` resolves them (``common.WORKDIR_FLAGS``).

A video generator (MaskGIT over a video tokenizer's latent grid) writes a GIF per clip (and an mp4
with PyAV), ``grid.png`` (a row of frames per clip) and ``tokens.npz``; ``--first_frame IMG``
predicts the clips that start with that image (a causal MAGVIT-v2 tokenizer encodes it alone)."""
from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

from titok_jax.commands.common import UsageError, check_npz_input, check_output_dir, parse, require
from titok_jax.outputs import check_new_outputs, define_overwrite

# The names ``generation.generate_images`` writes: ``{index:06d}_class{K}.png`` (videos: .gif, .mp4).
_IMAGE_NAME = re.compile(r"^(\d{6,})_class-?\d+\.(png|gif|mp4)$")


def _flags(fv: Any) -> None:
    from absl import flags
    flags.DEFINE_string("workdir", None, "GEN_DIR: a generator workdir (configs/maskgit.py or "
                        "configs/ar.py, or an imported generator; hf:ORG/NAME: a release in the "
                        "local Hugging Face cache)", flag_values=fv)
    flags.DEFINE_string("tokenizer", None, "TOK_DIR: the tokenizer workdir whose tokens it learned "
                        "(or hf:ORG/NAME)", flag_values=fv)
    flags.DEFINE_string("output", None, "OUT_DIR: where the PNGs go", flag_values=fv)
    flags.DEFINE_integer("class_id", None, "class to sample (default: cycle through the classes; "
                         "num_classes = unconditional)", flag_values=fv)
    flags.DEFINE_integer("num", 8, "number of images", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "sampling seed (same seed, same images)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "images per sampling call", flag_values=fv)
    flags.DEFINE_integer("steps", None, "decoding steps (default: the config's sampler)", flag_values=fv)
    flags.DEFINE_float("guidance_scale", None, "classifier-free guidance scale", flag_values=fv)
    flags.DEFINE_float("temperature", None, "sampling temperature (MaskGIT: randomize_temperature; "
                       "AR: softmax temperature, 0 = greedy)", flag_values=fv)
    flags.DEFINE_integer("max_len", None, "AR only: generate this many leading tokens (a prefix, "
                         "for ordered tokenizers such as FlexTok)", flag_values=fv)
    flags.DEFINE_string("inception_weights", None, "InceptionV3 params (titok-jax convert-inception): "
                        "compute gFID and Inception Score", flag_values=fv)
    flags.DEFINE_string("fid_reference", None, "reference statistics .npz (mu, sigma) for gFID, e.g. "
                        "from titok-jax fid-reference", flag_values=fv)
    flags.DEFINE_integer("is_splits", 1, "splits of the Inception Score (ADM uses 10 over 50k)",
                         flag_values=fv)
    flags.DEFINE_bool("save_images", True, "write one PNG per image (a GIF per clip)", flag_values=fv)
    flags.DEFINE_string("first_frame", None, "IMG: a video generator predicts clips that start with "
                        "this image (its ids from a causal video tokenizer stay fixed)", flag_values=fv)
    flags.DEFINE_float("fps", 8.0, "frames per second of the videos written", flag_values=fv)
    define_overwrite(fv)


def _existing_outputs(fv: Any) -> list[str]:
    """The files of --output this run would write that exist already: ``grid.png``, ``tokens.npz``,
    ``metrics.json`` (when scoring) and, with --save_images, a PNG of any class for the indices
    ``0..num-1`` (an older run's image of the same index counts, whatever its class)."""
    if not os.path.isdir(fv.output):
        return [fv.output] if os.path.lexists(fv.output) else []
    fixed = ["grid.png", "tokens.npz"] + (["metrics.json"] if fv.inception_weights else [])
    names = sorted(os.listdir(fv.output))
    found = [n for n in fixed if n in names]
    if fv.save_images:
        found += [n for n in names if (m := _IMAGE_NAME.match(n)) and int(m.group(1)) < fv.num]
    return [os.path.join(fv.output, n) for n in found]


def generate(argv: Sequence[str]) -> int:
    """Sample token ids with a generator workdir and decode them with a tokenizer workdir, chunk by
    chunk (:func:`titok_jax.generation.generate_images`): PNGs, ``grid.png`` and ``tokens.npz``
    under --output; with --inception_weights also gFID against --fid_reference and the Inception
    Score, printed as one JSON line and written to ``metrics.json``."""
    fv = parse("titok-jax generate", argv, _flags)
    require(fv, ("workdir", "tokenizer", "output"), "generate", "generate --workdir GEN_DIR "
            "--tokenizer TOK_DIR --output OUT_DIR [--class-id K] [--num N]")
    if fv.num < 1 or fv.batch_size < 1 or fv.is_splits < 1:
        raise UsageError("--num, --batch_size and --is_splits must be >= 1")
    check_output_dir(fv.output)
    if fv.fid_reference and not fv.inception_weights:
        raise UsageError("--fid_reference needs --inception_weights")
    check_npz_input(fv.inception_weights, "inception_weights")
    check_npz_input(fv.fid_reference, "fid_reference")
    if fv.first_frame is not None and not os.path.isfile(fv.first_frame):
        raise FileNotFoundError(f"--first_frame {fv.first_frame} does not exist")
    if fv.fps <= 0:
        raise UsageError("--fps must be > 0")
    existing = _existing_outputs(fv)
    check_new_outputs(existing, fv.overwrite)  # before any model is loaded
    from titok_jax.api import load_tokenizer
    from titok_jax.generation import class_labels, first_frame_tokens, generate_images, load_generator
    gen = load_generator(fv.workdir)
    tok = load_tokenizer(fv.tokenizer, batch_size=fv.batch_size)
    first = None
    if fv.first_frame is not None:
        if not gen.grid_shape:
            raise UsageError("--first_frame needs a video generator (MaskGIT over a video "
                             "tokenizer's latent grid: configs/maskgit.py:video_tiny)")
        first = first_frame_tokens(tok, fv.first_frame)
    sampler = {k: v for k, v in (("steps", fv.steps), ("guidance_scale", fv.guidance_scale),
                                 ("randomize_temperature", fv.temperature), ("max_len", fv.max_len))
               if v is not None}
    out = generate_images(gen, tok, fv.output, class_labels(fv.num, gen.num_classes, fv.class_id),
                          batch_size=fv.batch_size, seed=fv.seed, sampler=sampler,
                          inception_weights=fv.inception_weights, fid_reference=fv.fid_reference,
                          is_splits=fv.is_splits, save_images=fv.save_images, tokenizer_name=fv.tokenizer,
                          first_frame=first, fps=fv.fps)
    what = "clip" if gen.grid_shape else "image"
    print(f"generated {fv.num} {what}(s) -> {fv.output} (grid: {out['grid']})")
    if out["metrics"] is not None:
        print(json.dumps(out["metrics"]))
    return 0
