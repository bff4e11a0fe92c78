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
    "reconstruct": "encode + decode images: --workdir DIR --input IMG_OR_DIR --output PATH",
    "tokenize": "images to token ids: --workdir DIR --input IMG_OR_DIR --output tokens.npz "
                "(or --data SOURCE --output DIR: token shards for generator training)",
    "detokenize": "token ids to images: --workdir DIR --input tokens.npz --output OUT_DIR",
    "generate": "sample images: --workdir GEN_DIR --tokenizer TOK_DIR --output OUT_DIR "
                "[--class-id K] [--num N] [--seed S]",
    "import-torch": "official PyTorch release to a workdir: --input HF_DIR --output DIR",
}



def _handler(name: str):
    def run(argv):
        from titok_jax import commands
        return commands.run_command(getattr(commands, name), argv)
    return run


# Commands with an implementation: name -> callable(argv) -> exit status.
HANDLERS: dict = {"train": _handler("train"), "eval": _handler("evaluate"),
                  "reconstruct": _handler("reconstruct"), "tokenize": _handler("tokenize"),
                  "detokenize": _handler("detokenize"), "import-torch": _handler("import_torch"),
                  "generate": _handler("generate")}


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
    handler = HANDLERS.get(command)
    if handler is None:
        print(f"titok-jax: command {command!r} is not available in this version yet", file=sys.stderr)
        return 2
    return int(handler(rest) or 0)
