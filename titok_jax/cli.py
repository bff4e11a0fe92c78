"""The `titok-jax` command line.

Every command of the contract is listed here; a command whose implementation has not landed yet says so
and exits with status 2, as does an unknown command.
"""
from __future__ import annotations

import sys

# name -> one-line description; the order is the order of the usage text.
COMMANDS = {
    "train": "train a tokenizer or generator: --config configs/<family>.py:<variant> --workdir DIR",
    "eval": "evaluate the latest checkpoint of a workdir: --workdir DIR [--split NAME] "
            "[--data SOURCE] [--inception_weights FILE]",
    "reconstruct": "encode + decode images: --workdir DIR --input IMG_OR_DIR --output PATH [--overwrite]",
    "tokenize": "images to token ids: --workdir DIR --input IMG_OR_DIR --output tokens.npz "
                "(or --data SOURCE --output DIR: token shards for generator training)",
    "features": "images to feature vectors: --workdir DIR --input IMG_OR_DIR --output feats.npz "
                "[--num_tokens K]",
    "detokenize": "token ids to images: --workdir DIR --input tokens.npz --output OUT_DIR [--overwrite]",
    "generate": "sample images: --workdir GEN_DIR --tokenizer TOK_DIR --output OUT_DIR "
                "[--class-id K] [--num N] [--seed S]",
    "import-torch": "official PyTorch release to a workdir: --input HF_DIR --output DIR",
    "convert-lpips": "LPIPS-VGG weights for the perceptual loss: --vgg VGG16.pth --lin vgg.pth "
                     "--output OUT.safetensors",
    "convert-convnext": "torchvision ConvNeXt-S weights for the perceptual loss: --input PTH --output OUT",
    "convert-dinov2": "official DINOv2 weights for FlexTok's REPA teacher: --input PTH --output OUT",
    "convert-clip": "CLIP visual tower (OpenAI .pt or HF) for FQGAN's teachers: --input PT_OR_DIR "
                    "--output OUT",
    "convert-inception": "pytorch-fid InceptionV3 weights for FID / IS: --input PTH --output OUT",
    "convert-i3d": "Inception-I3D weights for FVD (i3d_pretrained_400.pt): --input PT --output OUT",
    "fid-reference": "FID reference statistics of a data split: --data SOURCE --inception_weights FILE "
                     "--output ref.npz",
}

# Every command that writes user-named files refuses to replace one unless given --overwrite
# (titok_jax.outputs); import-torch and `tokenize --data` never replace anything.

# Commands with an implementation: name -> (module of titok_jax.commands, function).
HANDLERS: dict[str, tuple[str, str]] = {
    "train": ("train", "train"), "eval": ("train", "evaluate"),
    "reconstruct": ("tokenizer", "reconstruct"), "tokenize": ("tokenizer", "tokenize"),
    "detokenize": ("tokenizer", "detokenize"), "features": ("tokenizer", "features"),
    "generate": ("generate", "generate"),
    "import-torch": ("import_torch", "import_torch"),
    "convert-lpips": ("convert", "convert_lpips"), "convert-convnext": ("convert", "convert_convnext"),
    "convert-dinov2": ("convert", "convert_dinov2"), "convert-clip": ("convert", "convert_clip"),
    "convert-inception": ("convert", "convert_inception"), "convert-i3d": ("convert", "convert_i3d"),
    "fid-reference": ("convert", "fid_reference"),
}


def run(command: str, argv: list[str]) -> int:
    """Run the implemented ``command`` with ``argv``: its exit status (errors are one line on stderr)."""
    import importlib

    from titok_jax.commands.common import run_command
    module, function = HANDLERS[command]
    return run_command(getattr(importlib.import_module(f"titok_jax.commands.{module}"), function), argv)


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: titok-jax <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"titok-jax: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if command not in HANDLERS:
        print(f"titok-jax: command {command!r} is not available in this version yet", file=sys.stderr)
        return 2
    return run(command, rest)
