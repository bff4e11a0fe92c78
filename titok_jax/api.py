"""The Python inference API: ``load_tokenizer(workdir) -> Tokenizer``.

```python
import titok_jax
tok = titok_jax.load_tokenizer(DIR)   # latest checkpoint of a workdir (EMA params if present)
tok.num_tokens, tok.codebook_size, tok.image_size
tokens = tok.encode(images)           # uint8 [B,H,W,3] or float32 in [0,1] -> int32 [B, num_tokens]
images = tok.decode(tokens)           # -> float32 [B,H,W,3] in [0,1]
```

Only what inference needs is read from the checkpoint (the EMA params, or ``params["model"]`` when
the run kept no EMA, and the model's non-param collections); it lives on one device. ``encode`` and
``decode`` are jitted and run in chunks of ``batch_size`` images (the last chunk is padded, so at
most two shapes are compiled per batch size).

Also here, for the command line: ``list_images`` (an image file or a directory of them) and
``load_image`` (decode + resize the shorter side + centre crop to the tokenizer's size).
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DEFAULT_BATCH_SIZE = 32
# Run tasks whose workdirs hold a tokenizer this API can load.
TOKENIZER_TASKS = ("tokenizer", "titok_stage2", "flowmo", "flextok")


class Tokenizer:
    """A trained image tokenizer ready for inference (build it with ``load_tokenizer``).

    Attributes: ``num_tokens`` (tokens per image), ``codebook_size`` (None for continuous VAE
    tokenizers), ``image_size`` (square side the model takes), ``token_dim`` (the VAE's channel
    count; for VQ the codebook's code dimension), ``quantizer`` ("vq" or "vae"), ``step`` (the
    checkpoint's step), ``config`` (the run config) and ``batch_size`` (chunk size of
    ``encode``/``decode``)."""

    def __init__(self, model: Any, params: Any, model_state: dict, config: Any = None, step: int | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        import jax
        import jax.numpy as jnp

        self.model, self.config, self.step = model, config, step
        self.params, self.model_state = params, dict(model_state)
        self.quantizer = getattr(model, "quantizer", "vq")
        self.num_tokens = int(model.num_latent_tokens)
        self.image_size = int(model.image_size)
        self.token_dim = int(getattr(model, "token_size", 0)) or None
        self.codebook_size = None if self.quantizer == "vae" else int(model.codebook_size)
        self.batch_size = max(1, int(batch_size))

        def encode(params, state, images):
            codes, out = model.apply({"params": params, **state}, images, train=False, method="encode")
            if self.quantizer == "vae":
                return codes.astype(jnp.float32)
            return out.indices.astype(jnp.int32)

        def decode(params, state, tokens):
            rec = model.apply({"params": params, **state}, tokens, method="decode_tokens")
            return jnp.clip(rec.astype(jnp.float32), 0.0, 1.0)

        self._encode = jax.jit(encode)
        self._decode = jax.jit(decode)
        # Flow-decoder tokenizers (FlexTok, FlowMo): the model has ``flow_decoder = True`` and
        # ``decode_tokens(tokens, key=, steps=, guidance_scale=)``; FlexTok (``variable_length``)
        # decodes any prefix of its ordered tokens.
        self.flow_decoder = bool(getattr(model, "flow_decoder", False))
        self.variable_length = bool(getattr(model, "variable_length", False))

        def decode_flow(params, state, tokens, key, guidance, steps):
            rec = model.apply({"params": params, **state}, tokens, key=key, steps=steps,
                              guidance_scale=guidance, method="decode_tokens")
            return jnp.clip(rec.astype(jnp.float32), 0.0, 1.0)

        self._decode_flow = jax.jit(decode_flow, static_argnames=("steps",))

    def __repr__(self) -> str:
        return (f"Tokenizer(quantizer={self.quantizer!r}, image_size={self.image_size}, "
                f"num_tokens={self.num_tokens}, codebook_size={self.codebook_size}, step={self.step})")

    # ------------------------------------------------------------------ public
    def encode(self, images: Any) -> np.ndarray:
        """``images``: uint8 ``[B, S, S, 3]`` or float ``[B, S, S, 3]`` in [0, 1] (``S ==
        image_size``). Returns int32 ``[B, num_tokens]`` token ids (VQ) or float32
        ``[B, num_tokens, token_dim]`` posterior means (VAE)."""
        x = self._check_images(images)
        return self._batched(self._encode, x)

    def decode(self, tokens: Any, steps: int | None = None, guidance: float | None = None,
               seed: int = 0) -> np.ndarray:
        """``tokens``: int ``[B, num_tokens]`` ids in ``[0, codebook_size)`` (VQ) or float
        ``[B, num_tokens, token_dim]`` (VAE) -> float32 ``[B, S, S, 3]`` in [0, 1].

        Flow-decoder tokenizers also take ``steps`` and ``guidance`` (default: the model's published
        sampler) and ``seed`` (chunk ``i`` of ``batch_size`` rows uses ``fold_in(key(seed), i)``, so
        the same call gives the same pixels); FlexTok accepts any prefix ``[B, k]``, ``1 <= k <= N``."""
        if not self.flow_decoder:
            if steps is not None or guidance is not None:
                raise ValueError("steps/guidance apply to flow-decoder tokenizers (FlexTok, FlowMo) only")
            return self._batched(self._decode, self._check_tokens(tokens))
        import jax
        t = self._check_tokens(tokens)
        steps = int(steps if steps is not None else getattr(self.model, "default_steps", 25))
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        guidance = float(guidance if guidance is not None else getattr(self.model, "default_guidance", 1.0))
        base = jax.random.key(int(seed))
        counter = iter(range(1 << 30))
        fn = lambda p, st, chunk: self._decode_flow(p, st, chunk, jax.random.fold_in(base, next(counter)),  # noqa: E731
                                                    guidance, steps=steps)
        return self._batched(fn, t)

    def reconstruct(self, images: Any) -> np.ndarray:
        """``decode(encode(images))``."""
        return self.decode(self.encode(images))

    # ------------------------------------------------------------------ helpers
    def _batched(self, fn, x: np.ndarray) -> np.ndarray:
        import jax
        n, bs = x.shape[0], self.batch_size
        if n == 0:
            raise ValueError("got an empty batch (0 images/token rows)")
        outs = []
        for start in range(0, n, bs):
            chunk = x[start:start + bs]
            k = chunk.shape[0]
            if n > bs and k < bs:  # pad the tail so every chunk has the same shape
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - k, axis=0)])
            out = np.asarray(jax.device_get(fn(self.params, self.model_state, chunk)))
            outs.append(out[:k])
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def _check_images(self, images: Any) -> np.ndarray:
        x = np.asarray(images)
        s = self.image_size
        if x.ndim == 3 and x.shape[-1] == 3:
            raise ValueError(f"encode expects a batch of images [B, {s}, {s}, 3], got one image of shape "
                             f"{x.shape}; add a batch axis (images[None])")
        if x.ndim != 4 or x.shape[1:] != (s, s, 3):
            raise ValueError(f"encode expects images [B, {s}, {s}, 3] (this tokenizer's image_size is {s}), "
                             f"got shape {x.shape}; resize/crop first (titok_jax.api.load_image does)")
        if x.dtype == np.uint8:
            from titok_jax.data.transforms import to_float
            return to_float(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"encode expects uint8 images or float images in [0, 1], got dtype {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _check_tokens(self, tokens: Any) -> np.ndarray:
        t = np.asarray(tokens)
        n = self.num_tokens
        if self.quantizer == "vae":
            c = self.token_dim
            if t.ndim != 3 or t.shape[1:] != (n, c):
                raise ValueError(f"decode expects continuous tokens [B, {n}, {c}] for this VAE tokenizer, "
                                 f"got shape {t.shape}")
            if not np.issubdtype(t.dtype, np.floating):
                raise ValueError(f"decode expects float tokens for this VAE tokenizer, got dtype {t.dtype}")
            return np.ascontiguousarray(t, dtype=np.float32)
        if self.variable_length and t.ndim == 2 and 1 <= t.shape[1] <= n:
            pass  # an ordered-token prefix
        elif t.ndim != 2 or t.shape[1] != n:
            what = f"[B, k] with 1 <= k <= {n}" if self.variable_length else f"[B, {n}]"
            raise ValueError(f"decode expects token ids {what} for this tokenizer, got shape {t.shape}")
        if not np.issubdtype(t.dtype, np.integer):
            if t.size and np.issubdtype(t.dtype, np.floating) and np.all(np.isfinite(t)) \
                    and np.all(t == np.round(t)):
                t = t.astype(np.int64)
            else:
                raise ValueError(f"decode expects integer token ids, got dtype {t.dtype}")
        k = self.codebook_size
        bad = (t < 0) | (t >= k)
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"token id {int(t[row, col])} at [{row}, {col}] is out of range: valid ids are "
                             f"0..{k - 1} (codebook_size {k}); {int(bad.sum())} id(s) out of range")
        return t.astype(np.int32)


# ---------------------------------------------------------------------- loading
def _read_config(workdir: str):
    import ml_collections
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not a titok_jax workdir (no config.json); train one first")
    try:
        with open(path, encoding="utf-8") as f:
            return ml_collections.ConfigDict(json.load(f))
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(f"{path} is not a valid config: {e}") from None


def load_tokenizer(workdir: str | os.PathLike, step: int | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, device: Any = None) -> Tokenizer:
    """The tokenizer of a workdir (written by ``train`` or ``import-torch``) at its latest
    checkpoint (or ``step``): EMA params when the run kept them, else ``params["model"]``, on one
    device (``device``, default the first). Errors (one line): FileNotFoundError for a missing
    workdir / config / checkpoint, ValueError for a config that is not a tokenizer or a checkpoint
    that cannot be read."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from titok_jax.checkpoint import checkpoint_dir
    from titok_jax.models.registry import build_model

    workdir = os.fspath(workdir)
    config = _read_config(workdir)
    task = config.get("task", {}).get("name", "tokenizer") if hasattr(config.get("task", {}), "get") else "tokenizer"
    if task == "titok_stage1":
        raise ValueError(f"{workdir} is a TiTok stage-1 run: it predicts MaskGIT proxy codes and does "
                         "not decode pixels on its own; train stage 2 from it (configs/titok.py:*_stage2)")
    if task not in TOKENIZER_TASKS:
        raise ValueError(f"{workdir} holds a {task!r} run, not a tokenizer")
    if "model" not in config:
        raise ValueError(f"{workdir}/config.json has no model section")
    model = build_model(config.model, dtype=config.get("compute_dtype", "float32"))
    size = int(model.image_size)

    def init(key):
        variables = model.init({"params": key, "sample": key, "quantizer": key},
                               jnp.zeros((1, size, size, 3), jnp.float32), train=False)
        return variables["params"], {k: v for k, v in variables.items() if k != "params"}

    try:
        params_abs, state_abs = nn.unbox(jax.eval_shape(init, jax.random.key(0)))
    except Exception as e:
        raise ValueError(f"{workdir}/config.json does not describe a buildable model: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    device = device or jax.devices()[0]
    sh = SingleDeviceSharding(device)
    to_abs = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), tree)
    use_ema = float(config.get("optimizer", {}).get("ema_decay", 0.0) or 0.0) > 0
    abstract = {"model_state": {"model": to_abs(state_abs)}}
    if use_ema:
        abstract["ema_params"] = to_abs(params_abs)
    else:
        abstract["params"] = {"model": to_abs(params_abs)}
    ckdir = checkpoint_dir(workdir)
    if not os.path.isdir(ckdir) or not any(n.isdigit() for n in os.listdir(ckdir)):
        raise FileNotFoundError(f"no checkpoint in {ckdir}")
    restored, step = restore_for_inference(workdir, abstract, step)
    params = restored["ema_params"] if use_ema else restored["params"]["model"]
    model_state = restored["model_state"]["model"]
    return Tokenizer(model, params, model_state, config=config, step=step, batch_size=batch_size)


def restore_for_inference(workdir: str, abstract: dict, step: int | None = None) -> tuple[dict, int]:
    """``checkpoint.restore_params`` with the API's errors: FileNotFoundError when there is no
    checkpoint, ValueError when it cannot be read into ``abstract`` (both one line)."""
    from titok_jax.checkpoint import CheckpointError, restore_params
    try:
        return restore_params(workdir, abstract, step)
    except CheckpointError as e:
        if str(e).startswith("no checkpoint"):
            raise FileNotFoundError(str(e)) from None
        raise ValueError(str(e)) from None


# ---------------------------------------------------------------------- image files
def list_images(path: str) -> tuple[list[str], list[str], bool]:
    """``(full paths, names, is_dir)``: a single file gives its basename; a directory gives every
    image file under it (recursively, by extension, sorted) with names relative to it."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path], [os.path.basename(path)], False
    if not os.path.isdir(path):
        raise FileNotFoundError(f"input {path} does not exist")
    full, names = [], []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                p = os.path.join(root, name)
                full.append(p)
                names.append(os.path.relpath(p, path))
    if not full:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    order = sorted(range(len(names)), key=lambda i: names[i])
    return [full[i] for i in order], [names[i] for i in order], True


def load_image(path: str, image_size: int) -> np.ndarray:
    """Decode an image file -> uint8 ``[S, S, 3]``: resize the shorter side to ``S`` (bicubic),
    centre crop (the eval transform). A file that cannot be decoded raises ValueError naming it."""
    from titok_jax.data.sources import decode_image_file
    from titok_jax.data.transforms import center_crop, resize_shorter_side
    try:
        image = decode_image_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        lines = str(e).strip().splitlines()
        raise ValueError(f"cannot read image {path}: {lines[0] if lines else type(e).__name__}") from None
    if image.ndim != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"cannot read image {path}: empty image of shape {image.shape}")
    return np.ascontiguousarray(center_crop(resize_shorter_side(image, image_size), image_size))


def png_names(names: Sequence[str]) -> list[str]:
    """Output PNG names for input names: the extension becomes ``.png``; where two inputs would
    collide (``a.jpg``, ``a.png``) the colliding ones keep their extension (``a.jpg.png``)."""
    stems = [os.path.splitext(n)[0] + ".png" for n in names]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [n + ".png" if counts[s] > 1 and not n.endswith(".png") else s for n, s in zip(names, stems)]
