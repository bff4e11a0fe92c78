"""``titok-jax import-torch``: an official PyTorch release -> a workdir (``titok_jax.convert.workdir``).

``--input hf:ORG/NAME[@REVISION][/FILE]`` reads the release from the local Hugging Face cache
(``titok_jax.convert.hub``; never a download)."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from titok_jax.commands.common import UsageError, message, parse


def _flags(fv: Any) -> None:
    from absl import flags
    flags.DEFINE_string("input", None, "HF_DIR: config.json + model.safetensors "
                        "(or pytorch_model.bin), a MaskGIT-VQGAN state dict, a taming VQGAN "
                        "last.ckpt (or its state dict), an Open-MAGVIT2 tokenizer .ckpt (its EMA "
                        "weights when present), a TiTok MaskGIT "
                        "generator (generator_titok_*.bin, config.json optional), a FlexTok "
                        "model.safetensors (its config in the metadata), or a FlowMo checkpoint "
                        "(flowmo_lo.pth / flowmo_hi.pth, its training yaml optional); or "
                        "hf:ORG/NAME[@REVISION][/FILE]: such a release in the local Hugging Face "
                        "cache", flag_values=fv)
    flags.DEFINE_string("output", None, "DIR: the workdir to create (must not exist or be empty)",
                        flag_values=fv)
    flags.DEFINE_integer("image_size", None, "image side of a MaskGIT-VQGAN or taming VQGAN "
                         "imported without config.json (default 256), of an Open-MAGVIT2 (default: "
                         "a 16x16 grid, 128 or 256 for the releases), or of a FlexTok (default: "
                         "its position table's largest)", flag_values=fv)


def import_torch(argv: Sequence[str]) -> int:
    """An official PyTorch release (HF_DIR: config.json + model.safetensors / pytorch_model.bin, or
    a bare MaskGIT-VQGAN state dict, a taming VQGAN last.ckpt, an Open-MAGVIT2 .ckpt, a TiTok
    MaskGIT generator, a FlexTok model.safetensors, or a FlowMo .pth) -> a workdir at --output
    (never overwritten)."""
    fv = parse("titok-jax import-torch", argv, _flags)
    if not fv.input or not fv.output:
        raise UsageError("import-torch needs --input HF_DIR and --output DIR")
    from titok_jax.convert.hub import find_snapshot, import_snapshot, is_hf_name
    if is_hf_name(fv.input):  # a release in the local Hugging Face cache
        snapshot = find_snapshot(fv.input)
        _check_release_config(snapshot.path)
        summary = import_snapshot(snapshot, fv.output, image_size=fv.image_size)
    else:
        _check_release_config(fv.input)
        from titok_jax.convert.workdir import import_torch as run
        try:
            summary = run(fv.input, fv.output, image_size=fv.image_size)
        except ImportError as e:  # a .bin without torch installed: one line, not an internal error
            raise ValueError(message(e)) from None
    print(f"imported {summary['model']} ({summary['num_params']:,} params) from {summary['weights']}")
    print(f"workdir:    {os.path.abspath(fv.output)}")
    print(f"checkpoint: {summary['checkpoint']}")
    return 0


def _check_release_config(input_dir: str) -> None:
    """A release's ``config.json`` that is valid JSON but not an object (a list, a number) is a
    one-line ValueError here, before the converters index into it."""
    path = os.path.join(input_dir, "config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # the importer reports these with its own one line
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a release config: a JSON {type(raw).__name__}, not an object")
