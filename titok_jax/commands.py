"""Implementations of the `titok-jax` commands (parsing with absl flags + ml_collections config
files). Each returns an exit status; user errors become one line on stderr."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence


class UsageError(Exception):
    """Bad command-line input; the message is shown as one line."""


def _parse(prog: str, argv: Sequence[str], define) -> Any:
    from absl import flags
    fv = flags.FlagValues()
    define(fv)
    try:
        fv([prog, *argv])
    except Exception as e:  # absl flags.Error, config-file errors, unknown --config.KEY
        raise UsageError(_flag_error(e, argv)) from e
    return fv


def _flag_error(e: BaseException, argv: Sequence[str]) -> str:
    """One readable line for a flag-parsing failure."""
    spec = _config_spec(argv)
    if spec:
        path = spec.split(":", 1)[0]
        if not os.path.isfile(path):
            return f"config file {path!r} not found (expected configs/<family>.py:<variant>)"
        try:
            from ml_collections import config_flags  # load without the overrides to name a bad key
            base = config_flags.config_flags._LoadConfigModule("check_config", path).get_config(
                *([spec.split(":", 1)[1]] if ":" in spec else []))
        except Exception as inner:  # the config itself fails (e.g. unknown variant)
            return _message(inner)
        for arg in argv:
            if arg.startswith("--config."):
                key = arg[len("--config."):].split("=", 1)[0]
                missing = _missing_key(base, key)
                if missing:
                    return missing
    return _message(e)


def _config_spec(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _missing_key(config: Any, dotted: str) -> str | None:
    import difflib
    node, done = config, []
    for part in dotted.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f" (did you mean {'.'.join(done + close)!r}?)" if close else ""
            return f"unknown config key {dotted!r}: {'.'.join(done) or 'the config'} has no field {part!r}{hint}"
        node, done = node[part], done + [part]
    return None


def _message(e: BaseException) -> str:
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    text = lines[0] if lines else type(e).__name__
    for prefix in ("ValueError: ", "KeyError: ", "OSError: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def _maybe_init_distributed() -> None:
    """Multi-host runs (launch/ sets TITOK_MULTIHOST=1): join the JAX cluster before any JAX op.

    On TPU pods, Slurm and Open MPI jax detects everything itself. Elsewhere set
    JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID: jax 0.10 reads only
    the first from the environment, so the other two are passed explicitly. Cross-process
    collectives on CPU use gloo (jax's default, ``jax_cpu_collectives_implementation``)."""
    if os.environ.get("TITOK_MULTIHOST") == "1" or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        import jax
        kwargs = {}
        for key, env in (("coordinator_address", "JAX_COORDINATOR_ADDRESS"),
                         ("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            value = os.environ.get(env)
            if value:
                kwargs[key] = value if key == "coordinator_address" else int(value)
        jax.distributed.initialize(**kwargs)


def _load_run_config(workdir: str):
    import ml_collections
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"{workdir} is not a titok_jax workdir (no config.json); train one first")
    with open(path, encoding="utf-8") as f:
        return ml_collections.ConfigDict(json.load(f))


def train(argv: Sequence[str]) -> int:
    from absl import flags
    from ml_collections import config_flags

    def define(fv):
        config_flags.DEFINE_config_file("config", None, "configs/<family>.py:<variant>",
                                        flag_values=fv, lock_config=True,
                                        sys_argv=["titok-jax train", *argv])
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, samples)", flag_values=fv)
        flags.DEFINE_bool("progress", True, "show a progress bar", flag_values=fv)

    spec = _config_spec(argv)
    if spec and not os.path.isfile(spec.split(":", 1)[0]):
        raise UsageError(f"config file {spec.split(':', 1)[0]!r} not found (expected configs/<family>.py:<variant>)")
    fv = _parse("titok-jax train", argv, define)
    if fv.config is None or not fv.workdir:
        raise UsageError("train needs --config configs/<family>.py:<variant> and --workdir DIR")
    _maybe_init_distributed()
    from titok_jax.train.loop import train as run
    summary = run(fv.config, fv.workdir, progress=fv.progress)
    print(f"trained to step {summary['step']}")
    if summary.get("last_metrics"):  # printed by every process: multi-host runs can be compared
        print(f"last loss:  {summary['last_metrics']['loss']:.8g}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"metrics:    {summary['metrics']}")
    if summary.get("last_eval"):
        e = summary["last_eval"]
        from titok_jax.train.loop import eval_summary
        print(f"eval:       {summary['eval']} ({eval_summary(e)})")
    if summary.get("grid"):
        print(f"grid:       {summary['grid']}")
    return 0


def evaluate(argv: Sequence[str]) -> int:
    from absl import flags

    def define(fv):
        flags.DEFINE_string("workdir", None, "a workdir written by train", flag_values=fv)
        flags.DEFINE_string("split", None, "held-out split name (default: the config's)", flag_values=fv)
        flags.DEFINE_string("data", None, "evaluate on this data source instead of the run's "
                            "(sample, folder:PATH, tfds:NAME)", flag_values=fv)
        flags.DEFINE_string("data_dir", None, "TFDS data dir for --data", flag_values=fv)
        flags.DEFINE_integer("num_images", None, "evaluate at most this many images (default: all)",
                             flag_values=fv)
        flags.DEFINE_string("inception_weights", None, "InceptionV3 params file (python -m "
                            "titok_jax.convert.inception): adds rfid and inception_score", flag_values=fv)
        flags.DEFINE_string("fid_reference", None, "reference statistics .npz for rfid (default: the "
                            "evaluated images themselves)", flag_values=fv)

    fv = _parse("titok-jax eval", argv, define)
    if not fv.workdir:
        raise UsageError("eval needs --workdir DIR")
    config = _load_run_config(fv.workdir)
    if fv.split:
        config.data.eval_split = fv.split
    if fv.data:
        config.data.source = fv.data
    if fv.data_dir:
        config.data.data_dir = fv.data_dir
    if fv.num_images is not None:
        if fv.num_images < 1:
            raise UsageError(f"--num_images must be >= 1, got {fv.num_images}")
        config.data.eval_num_images = fv.num_images
    if fv.inception_weights or fv.fid_reference:
        import ml_collections
        if "eval" not in config:
            config.eval = ml_collections.ConfigDict()
        if fv.inception_weights:
            config.eval.inception_weights = fv.inception_weights
        if fv.fid_reference:
            config.eval.fid_reference = fv.fid_reference
    _maybe_init_distributed()
    from titok_jax.train.loop import Trainer
    t = Trainer(config, fv.workdir)
    if t.checkpointer.latest_step() is None:
        raise UsageError(f"no checkpoint in {t.checkpointer.directory}")
    state, how = t.initial_state()
    step = int(state.step)
    metrics, _ = t.run_eval(state, step)
    t.writer.close()
    print(json.dumps({"step": step, **metrics}))
    return 0


def _tokenizer_flags(fv, input_help: str, output_help: str) -> None:
    from absl import flags
    flags.DEFINE_string("workdir", None, "a tokenizer workdir (train or import-torch output)", flag_values=fv)
    flags.DEFINE_string("input", None, input_help, flag_values=fv)
    flags.DEFINE_string("output", None, output_help, flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "images per encode/decode call", flag_values=fv)


def _tokenizer_args(name: str, argv: Sequence[str], input_help: str, output_help: str):
    fv = _parse(f"titok-jax {name}", argv, lambda fv: _tokenizer_flags(fv, input_help, output_help))
    missing = [f"--{k}" for k in ("workdir", "input", "output") if not getattr(fv, k)]
    if missing:
        raise UsageError(f"{name} needs {' '.join(missing)} (usage: titok-jax {name} --workdir DIR "
                         f"--input {input_help.split(':')[0]} --output {output_help.split(':')[0]})")
    if fv.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {fv.batch_size}")
    if not os.path.isdir(fv.workdir):
        raise UsageError(f"workdir {fv.workdir} does not exist")
    if not os.path.isfile(os.path.join(fv.workdir, "config.json")):
        raise UsageError(f"{fv.workdir} is not a titok_jax workdir (no config.json); train one first")
    if not os.path.exists(fv.input):
        raise FileNotFoundError(f"input {fv.input} does not exist")
    return fv


def _image_batches(paths: Sequence[str], image_size: int, batch_size: int):
    """Yield ``(start, uint8 [b, S, S, 3])`` batches of decoded, resized and centre-cropped images;
    an unreadable file raises ValueError naming it."""
    import numpy as np
    from titok_jax.api import load_image
    for start in range(0, len(paths), batch_size):
        yield start, np.stack([load_image(p, image_size) for p in paths[start:start + batch_size]])


def reconstruct(argv: Sequence[str]) -> int:
    """encode + decode: a single image -> a PNG at --output; a directory -> a PNG per image under
    --output/ (relative names kept, extension .png). An unreadable image is an error naming it."""
    fv = _tokenizer_args("reconstruct", argv, "IMG_OR_DIR: an image file or a directory of images",
                         "PATH: the PNG to write (a directory when --input is one)")
    from titok_jax.api import list_images, load_tokenizer, png_names
    from titok_jax.evaluation.images import save_png
    paths, names, is_dir = list_images(fv.input)
    if is_dir and os.path.isfile(fv.output):
        raise UsageError(f"--output {fv.output} is a file; a directory input needs an output directory")
    tok = load_tokenizer(fv.workdir, batch_size=fv.batch_size)
    if is_dir:
        outputs = [os.path.join(fv.output, n) for n in png_names(names)]
    elif os.path.isdir(fv.output):
        outputs = [os.path.join(fv.output, png_names(names)[0])]
    else:
        outputs = [fv.output]
    for start, images in _image_batches(paths, tok.image_size, fv.batch_size):
        for i, rec in enumerate(tok.decode(tok.encode(images))):
            save_png(outputs[start + i], rec)
    print(f"reconstructed {len(paths)} image(s) -> {fv.output if is_dir else outputs[0]}")
    return 0


def _tokenize_flags(fv) -> None:
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


def tokenize(argv: Sequence[str]) -> int:
    """images -> ``tokens.npz`` with ``tokens`` (int32 [N, T]; float32 [N, T, C] for a VAE) and
    ``files`` (the input names: the basename, or paths relative to the input directory).
    With ``--data SOURCE`` instead of ``--input``: every image of the source (``--epochs``
    augmented passes) -> token shards in the directory ``--output`` (``titok_jax.data.tokens``),
    the input of generator training (``config.data.source=tokens:DIR``)."""
    if any(a == "--data" or a.startswith("--data=") for a in argv):
        return _tokenize_data(argv)
    fv = _tokenizer_args("tokenize", argv, "IMG_OR_DIR: an image file or a directory of images",
                         "tokens.npz: the file to write")
    import numpy as np
    from titok_jax.api import list_images, load_tokenizer
    paths, names, _ = list_images(fv.input)
    tok = load_tokenizer(fv.workdir, batch_size=fv.batch_size)
    tokens = np.concatenate([tok.encode(images) for _, images in
                             _image_batches(paths, tok.image_size, fv.batch_size)])
    out = fv.output if fv.output.endswith(".npz") else fv.output + ".npz"  # np.savez would add it
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    np.savez(out, tokens=tokens, files=np.asarray(names, dtype=str))
    print(f"tokenized {len(paths)} image(s) -> {out} (tokens {tokens.dtype} {list(tokens.shape)})")
    return 0


def _tokenize_data(argv: Sequence[str]) -> int:
    fv = _parse("titok-jax tokenize", argv, _tokenize_flags)
    missing = [f"--{k}" for k in ("workdir", "output") if not getattr(fv, k)]
    if missing:
        raise UsageError(f"tokenize --data needs {' '.join(missing)} (usage: titok-jax tokenize "
                         "--workdir DIR --data SOURCE --output TOKENS_DIR)")
    if fv.input:
        raise UsageError("give either --input (image files -> tokens.npz) or --data (a data source "
                         "-> token shards), not both")
    if fv.batch_size < 1 or fv.shard_size < 1:
        raise UsageError("--batch_size and --shard_size must be >= 1")
    if not os.path.isfile(os.path.join(fv.workdir, "config.json")):
        raise UsageError(f"{fv.workdir} is not a titok_jax workdir (no config.json); train one first")
    import numpy as np
    from tqdm import tqdm
    from titok_jax.api import load_tokenizer
    from titok_jax.data.tokens import image_batches_for_tokenizing, write_token_dataset
    tok = load_tokenizer(fv.workdir, batch_size=fv.batch_size)
    if tok.codebook_size is None:
        raise ValueError(f"{fv.workdir} is a continuous (VAE) tokenizer; token shards hold discrete ids")
    batches, rows, src = image_batches_for_tokenizing(
        fv.data, tok.image_size, fv.batch_size, split=fv.split, epochs=fv.epochs, augment=fv.augment,
        seed=fv.seed, data_dir=fv.data_dir)
    num_classes = getattr(src, "num_classes", None)
    if num_classes is None and getattr(src, "class_names", None) is not None:
        num_classes = len(src.class_names)
    meta = {"tokenizer": os.path.abspath(fv.workdir), "tokenizer_step": tok.step,
            "codebook_size": tok.codebook_size, "image_size": tok.image_size, "source": fv.data,
            "split": fv.split, "epochs": fv.epochs, "augment": fv.augment, "seed": fv.seed,
            "num_classes": int(num_classes or 0)}
    bar = tqdm(total=rows, unit="img", desc="tokenize", file=sys.stderr, disable=not sys.stderr.isatty())
    try:
        meta = write_token_dataset(fv.output, lambda x: tok.encode(np.asarray(x, np.float32)), batches,
                                   meta, shard_size=fv.shard_size, progress=bar.update)
    finally:
        bar.close()
    print(f"tokenized {meta['count']} image(s) ({fv.epochs} pass(es) over {fv.data}:{fv.split}) -> "
          f"{fv.output} ({len(meta['shards'])} shard(s) of {meta['num_tokens']} tokens)")
    return 0


def detokenize(argv: Sequence[str]) -> int:
    """``tokens.npz`` (as written by tokenize: ``tokens`` and optional ``files``) -> a PNG per row
    under --output/, named after ``files`` (extension .png) or the row index."""
    fv = _tokenizer_args("detokenize", argv, "tokens.npz: written by tokenize", "OUT_DIR: where the PNGs go")
    import zipfile
    import numpy as np
    from titok_jax.api import load_tokenizer, png_names
    from titok_jax.evaluation.images import save_png
    if os.path.isdir(fv.input):
        raise ValueError(f"--input {fv.input} is a directory; expected a tokens .npz file")
    try:
        with np.load(fv.input, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise ValueError("not an npz archive")
            if "tokens" not in data.files:
                raise ValueError(f"{fv.input} has no 'tokens' array (it has {sorted(data.files)})")
            tokens = data["tokens"]
            files = data["files"] if "files" in data.files else None
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        text = _message(e)
        raise ValueError(text if text.startswith(fv.input) else f"cannot read {fv.input}: {text}") from None
    if os.path.isfile(fv.output):
        raise UsageError(f"--output {fv.output} is a file; expected an output directory")
    tok = load_tokenizer(fv.workdir, batch_size=fv.batch_size)
    n = tokens.shape[0] if tokens.ndim else 0
    if files is not None and (files.ndim != 1 or len(files) != n):
        raise ValueError(f"{fv.input}: 'files' has shape {files.shape}, expected [{n}] to match 'tokens'")
    try:
        tok._check_tokens(tokens)  # validate everything before writing anything
    except ValueError as e:
        raise ValueError(f"{fv.input}: {e}") from None
    width = max(6, len(str(max(n - 1, 0))))
    names = png_names([str(f) for f in files]) if files is not None else [f"{i:0{width}d}.png" for i in range(n)]
    for start in range(0, n, fv.batch_size):
        for i, image in enumerate(tok.decode(tokens[start:start + fv.batch_size])):
            save_png(os.path.join(fv.output, names[start + i]), image)
    print(f"decoded {n} token row(s) -> {fv.output}")
    return 0


def import_torch(argv: Sequence[str]) -> int:
    """An official PyTorch release (HF_DIR: config.json + model.safetensors / pytorch_model.bin, or
    a bare MaskGIT-VQGAN state dict) -> a workdir at --output (never overwritten)."""
    from absl import flags

    def define(fv):
        flags.DEFINE_string("input", None, "HF_DIR: config.json + model.safetensors "
                            "(or pytorch_model.bin), or a MaskGIT-VQGAN state dict", flag_values=fv)
        flags.DEFINE_string("output", None, "DIR: the workdir to create (must not exist or be empty)",
                            flag_values=fv)
        flags.DEFINE_integer("image_size", None, "image side of a MaskGIT-VQGAN imported without "
                             "config.json (default 256)", flag_values=fv)

    fv = _parse("titok-jax import-torch", argv, define)
    if not fv.input or not fv.output:
        raise UsageError("import-torch needs --input HF_DIR and --output DIR")
    from titok_jax.convert.workdir import import_torch as run
    try:
        summary = run(fv.input, fv.output, image_size=fv.image_size)
    except ImportError as e:  # a .bin without torch installed: one line, not an internal error
        raise ValueError(_message(e)) from None
    print(f"imported {summary['model']} ({summary['num_params']:,} params) from {summary['weights']}")
    print(f"workdir:    {os.path.abspath(fv.output)}")
    print(f"checkpoint: {summary['checkpoint']}")
    return 0


def generate(argv: Sequence[str]) -> int:
    """Sample token ids with a generator workdir and decode them with a tokenizer workdir, chunk by
    chunk: a PNG per image (``{index:06d}_class{K}.png``), ``grid.png`` (the first 64) and
    ``tokens.npz`` under --output; with --inception_weights also gFID against --fid_reference and
    the Inception Score, printed as one JSON line and written to ``metrics.json``."""
    from absl import flags

    def define(fv):
        flags.DEFINE_string("workdir", None, "GEN_DIR: a generator workdir (configs/maskgit.py or "
                            "configs/ar.py)", flag_values=fv)
        flags.DEFINE_string("tokenizer", None, "TOK_DIR: the tokenizer workdir whose tokens it learned", flag_values=fv)
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
        flags.DEFINE_string("inception_weights", None, "InceptionV3 params (python -m "
                            "titok_jax.convert.inception): compute gFID and Inception Score", flag_values=fv)
        flags.DEFINE_string("fid_reference", None, "reference statistics .npz (mu, sigma) for gFID, e.g. "
                            "from python -m titok_jax.evaluation.fid_reference", flag_values=fv)
        flags.DEFINE_integer("is_splits", 1, "splits of the Inception Score (ADM uses 10 over 50k)",
                             flag_values=fv)
        flags.DEFINE_bool("save_images", True, "write one PNG per image", flag_values=fv)

    argv = [a.replace("--class-id", "--class_id", 1) if a.startswith("--class-id") else a for a in argv]
    fv = _parse("titok-jax generate", argv, define)
    missing = [f"--{k}" for k in ("workdir", "tokenizer", "output") if not getattr(fv, k)]
    if missing:
        raise UsageError(f"generate needs {' '.join(missing)} (usage: titok-jax generate --workdir GEN_DIR "
                         "--tokenizer TOK_DIR --output OUT_DIR [--class-id K] [--num N])")
    if fv.num < 1 or fv.batch_size < 1 or fv.is_splits < 1:
        raise UsageError("--num, --batch_size and --is_splits must be >= 1")
    if os.path.isfile(fv.output):
        raise UsageError(f"--output {fv.output} is a file; expected an output directory")
    if fv.fid_reference and not fv.inception_weights:
        raise UsageError("--fid_reference needs --inception_weights")
    import numpy as np
    from titok_jax.api import load_tokenizer
    from titok_jax.evaluation.images import save_png, tile_grid
    from titok_jax.generation import load_generator
    gen = load_generator(fv.workdir)
    tok = load_tokenizer(fv.tokenizer, batch_size=fv.batch_size)
    if tok.codebook_size != gen.codebook_size or tok.num_tokens != gen.num_tokens:
        raise ValueError(f"the generator makes {gen.num_tokens} ids from {gen.codebook_size} codes but the "
                         f"tokenizer {fv.tokenizer} takes {tok.num_tokens} from {tok.codebook_size}")
    if fv.class_id is None:
        labels = np.arange(fv.num) % gen.num_classes if gen.num_classes else np.zeros(fv.num, np.int64)
    else:
        labels = np.full(fv.num, fv.class_id)
    overrides = {k: v for k, v in (("steps", fv.steps), ("guidance_scale", fv.guidance_scale),
                                   ("randomize_temperature", fv.temperature), ("max_len", fv.max_len))
                 if v is not None}
    scorer = None
    if fv.inception_weights:
        from titok_jax.generation import GenerationScorer
        scorer = GenerationScorer(fv.inception_weights, fv.fid_reference)
    os.makedirs(fv.output, exist_ok=True)
    all_ids, grid_images = [], []
    for chunk, start in enumerate(range(0, fv.num, fv.batch_size)):
        part = labels[start:start + fv.batch_size]
        ids = gen.sample(part, seed=fv.seed + chunk, batch_size=fv.batch_size, **overrides)
        images = tok.decode(ids)
        all_ids.append(ids)
        if len(grid_images) < 64:
            grid_images.extend(images[:64 - len(grid_images)])
        if fv.save_images:
            for i, (image, label) in enumerate(zip(images, part)):
                save_png(os.path.join(fv.output, f"{start + i:06d}_class{int(label)}.png"), image)
        if scorer is not None:
            scorer.update(images)
    grid_path = os.path.join(fv.output, "grid.png")
    save_png(grid_path, tile_grid(np.stack(grid_images), ncol=min(8, len(grid_images))))
    np.savez(os.path.join(fv.output, "tokens.npz"), tokens=np.concatenate(all_ids), labels=labels.astype(np.int32))
    print(f"generated {fv.num} image(s) -> {fv.output} (grid: {grid_path})")
    if scorer is not None:
        metrics = {"num_images": fv.num, **scorer.result(splits=fv.is_splits)}
        with open(os.path.join(fv.output, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f)
        print(json.dumps(metrics))
    return 0


def run_command(handler, argv: Sequence[str]) -> int:
    """Run a command; known failures print one line on stderr and exit non-zero."""
    from titok_jax.checkpoint import CheckpointError
    if os.environ.get("TITOK_DEBUG") == "1":  # full tracebacks for developers
        return int(handler(argv) or 0)
    try:
        return int(handler(argv) or 0)
    except UsageError as e:
        print(f"titok-jax: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, OSError, KeyError) as e:
        print(f"titok-jax: error: {_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("titok-jax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from titok_jax.train.loop import TrainingError
        if isinstance(e, TrainingError):
            print(f"titok-jax: error: {e}", file=sys.stderr)
        else:
            print(f"titok-jax: internal error: {type(e).__name__}: {_message(e)} "
                  f"(rerun with TITOK_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
