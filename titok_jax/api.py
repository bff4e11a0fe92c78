"""The Python inference API: ``load_tokenizer(workdir) -> Tokenizer``.

```python
import titok_jax
tok = titok_jax.load_tokenizer(DIR)   # latest checkpoint of a workdir (EMA params if present)
tok = titok_jax.load_tokenizer("hf:yucornetto/tokenizer_titok_l32_imagenet")  # local HF cache
tok.num_tokens, tok.codebook_size, tok.image_size
tokens = tok.encode(images)           # uint8 [B,H,W,3] or float32 in [0,1] -> int32 [B, num_tokens]
                                      # ([B, num_tokens, k] for the k codebooks of fq / rq)
images = tok.decode(tokens)           # -> float32 [B,H,W,3] in [0,1]
tok.reconstruct_files("photos/", "out/")   # what `titok-jax reconstruct` does: a PNG per image
```

Video tokenizers (``tok.num_frames > 0``: MAGVIT, MAGVIT-v2) take clips: ``tok.encode(clips)``
with clips uint8 or float ``[B, T, S, S, 3]`` (``T``: any length the model takes, e.g. its nominal
``tok.num_frames``) -> int32 ``[B, T', h, w]`` (latent time first; ``tok.latent_shape`` is the
nominal clip's ``(T', h, w)``), and ``tok.decode`` the inverse -> float32 ``[B, T, S, S, 3]``;
``titok_jax.video_files`` reads and writes the video files.

Only what inference needs is read from the checkpoint (the EMA params, or ``params["model"]`` when
the run kept no EMA, and the model's non-param collections); it lives on one device. ``encode`` and
``decode`` are jitted and run in chunks of ``batch_size`` images (the last chunk is padded, so at
most two shapes are compiled per batch size).

Also here, for the command line: ``list_images`` (an image file or a directory of them),
``load_image`` (decode + resize the shorter side + centre crop to the tokenizer's size),
``image_batches`` (decoded batches that skip unreadable files of a directory) and
``write_reconstructions`` (the PNGs of ``reconstruct``, renamed into place only when all are done).
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Sequence

import numpy as np

from titok_jax.data.transforms import load_image  # noqa: F401  (api.load_image, re-exported)
from titok_jax.outputs import check_new_outputs, staging

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DEFAULT_BATCH_SIZE = 32


class Tokenizer:
    """A trained image tokenizer ready for inference (build it with ``load_tokenizer``).

    Attributes: ``num_tokens`` (tokens per image), ``codebook_size`` (None for continuous VAE
    tokenizers), ``image_size`` (square side the model takes), ``token_dim`` (the VAE's channel
    count; for VQ the codebook's code dimension), ``quantizer`` ("vq", "vae", "fsq", "lfq", "fq",
    ...), ``num_codebooks`` (k ids per token: 2 or more for the multi-index quantizers ``fq`` /
    ``rq``, whose ids are ``[B, num_tokens, k]``, each in ``[0, codebook_size)``; else 1),
    ``spec`` (the task's ``TokenSpec``), ``task`` (the run's task), ``step`` (the checkpoint's
    step), ``config`` (the run config) and ``batch_size`` (chunk size of ``encode``/``decode``)."""

    def __init__(self, task: Any, params: Any, model_state: Any, config: Any = None,
                 step: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE):
        import jax

        self.task, self.config, self.step = task, config, step
        self.params, self.model_state = params, model_state
        self.spec = spec = task.token_spec
        self.quantizer = spec.quantizer
        self.num_tokens = spec.num_tokens
        self.image_size = spec.image_size
        self.token_dim = spec.token_dim
        self.codebook_size = spec.codebook_size
        self.num_codebooks = spec.num_codebooks
        # video tokenizers: the nominal clip length (0 = images) and latent grid (T', h, w)
        self.num_frames = spec.num_frames
        self.latent_shape = spec.latent_shape
        self.flow_decoder = spec.flow_decoder
        self.variable_length = spec.variable_length
        self.batch_size = max(1, int(batch_size))
        self._encode = jax.jit(task.encode)
        self._features = jax.jit(task.features)
        self._decode = jax.jit(task.decode)
        # guidance is traced (a new scale does not recompile), except guidance 1 (off), which is
        # compiled apart as a Python constant: a traced scale always runs the guided branch, the
        # cond + uncond batch at twice the cost, even where the scale turns out to be 1
        self._decode_flow = jax.jit(lambda p, s, t, key, guidance, steps, unguided: task.decode(
            p, s, t, key=key, steps=steps, guidance=1.0 if unguided else guidance),
            static_argnames=("steps", "unguided"))
        self._decode_noise = jax.jit(lambda p, s, t, noise, guidance, steps, unguided: task.decode(
            p, s, t, noise=noise, steps=steps, guidance=1.0 if unguided else guidance),
            static_argnames=("steps", "unguided"))
        self._decode_visible = jax.jit(lambda p, s, t, images, mask: task.decode(
            p, s, t, visible=images, visible_mask=mask))

    @property
    def model(self) -> Any:
        """The Flax module (``apply`` it with ``{"params": tok.params, **tok.model_state}``)."""
        return self.task.model

    def __repr__(self) -> str:
        return (f"Tokenizer(quantizer={self.quantizer!r}, image_size={self.image_size}, "
                f"num_tokens={self.num_tokens}, codebook_size={self.codebook_size}"
                + (f", num_codebooks={self.num_codebooks}" if self.num_codebooks > 1 else "")
                + f", step={self.step})")

    # ------------------------------------------------------------------ public
    def encode(self, images: Any) -> np.ndarray:
        """``images``: uint8 ``[B, S, S, 3]`` or float ``[B, S, S, 3]`` in [0, 1] (``S ==
        image_size``). Returns int32 ``[B, num_tokens]`` token ids (VQ; ``[B, num_tokens, k]``
        for the ``k = num_codebooks`` ids per token of ``fq`` / ``rq``) or float32
        ``[B, num_tokens, token_dim]`` posterior means (VAE)."""
        x = self._check_images(images)
        return self._batched(self._encode, x)

    def features(self, images: Any, num_tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens [B, k, D], pooled [B, D])``: the task's features of ``images`` (as for
        ``encode``): the continuous codes the decoder reads (quantized code vectors, or a VAE's
        posterior means; the extractor: its pre-quantisation tokens), and their mean
        over the ``k`` tokens. ``num_tokens=k`` keeps the first ``k`` (ordered, variable-length
        tokenizers such as FlexTok; others take only ``k = num_tokens``)."""
        k = self.num_tokens if num_tokens is None else int(num_tokens)
        if not 1 <= k <= self.num_tokens or (k != self.num_tokens and not self.variable_length):
            allowed = f"1..{self.num_tokens}" if self.variable_length else f"{self.num_tokens} (its tokens are not ordered)"
            raise ValueError(f"num_tokens must be {allowed} for this tokenizer, got {num_tokens}")
        tokens = self._batched(self._features, self._check_images(images))[:, :k]
        return tokens, tokens.mean(axis=1)

    def noise_shape(self, batch: int) -> tuple[int, ...]:
        """Shape of the ``noise`` a flow decoder samples from for ``batch`` rows: ``(B, h, w, C)``,
        NHWC (FlexTok: the VAE-latent grid; FlowMo: pixels); t = 1 is noise."""
        if not self.flow_decoder:
            raise ValueError("noise_shape applies to flow-decoder tokenizers (FlexTok, FlowMo) only")
        return (int(batch), *self.spec.noise_shape)

    def decode(self, tokens: Any, steps: int | None = None, guidance: float | None = None,
               seed: int = 0, noise: Any = None, visible: Any = None,
               visible_mask: Any = None) -> np.ndarray:
        """``tokens``: int ``[B, num_tokens]`` ids in ``[0, codebook_size)`` (VQ; ``[B, num_tokens,
        k]`` with ``k = num_codebooks`` for ``fq`` / ``rq``) or float ``[B, num_tokens, token_dim]``
        (VAE) -> float32 ``[B, S, S, 3]`` in [0, 1].

        Flow-decoder tokenizers also take ``steps`` and ``guidance`` (default: the model's published
        sampler) and either ``noise`` (float32 ``noise_shape(B)``: the sampler's initial noise, so a
        decode is reproducible against any implementation given the same noise) or ``seed`` (chunk
        ``i`` of ``batch_size`` rows draws its noise from ``fold_in(key(seed), i)``, so the same call
        gives the same pixels); FlexTok accepts any prefix ``[B, k]``, ``1 <= k <= N``.

        Tokenizers whose decoder takes visible patches (``spec.decoder_visible``: the extractor)
        also take ``visible`` (images as for ``encode``) with ``visible_mask`` (bool ``[B, g, g]``
        or ``[B, g*g]``, one entry per patch): those patches are given to the decoder and the
        rest is completed from the tokens."""
        if visible is not None or visible_mask is not None:
            if not self.spec.decoder_visible:
                raise ValueError("visible/visible_mask apply to tokenizers whose decoder takes "
                                 "visible patches (the extractor) only")
            if visible is None or visible_mask is None:
                raise ValueError("decode needs both visible (images) and visible_mask, or neither")
            t = self._check_tokens(tokens)
            mask = np.asarray(visible_mask)
            if mask.dtype != bool or mask.ndim < 2 or mask.shape[0] != t.shape[0]:
                raise ValueError(f"visible_mask must be bool with one row per token row ({t.shape[0]}), "
                                 f"got {mask.dtype} {mask.shape}")
            images = self._check_images(visible)
            if images.shape[0] != t.shape[0]:
                raise ValueError(f"visible has {images.shape[0]} images for {t.shape[0]} token rows")
            return self._batched(self._decode_visible, t, images, mask)
        if not self.flow_decoder:
            if steps is not None or guidance is not None or noise is not None:
                raise ValueError("steps/guidance/noise apply to flow-decoder tokenizers (FlexTok, FlowMo) only")
            return self._batched(self._decode, self._check_tokens(tokens))
        import jax
        t = self._check_tokens(tokens)
        steps = int(steps if steps is not None else self.spec.default_steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        guidance = float(guidance if guidance is not None else self.spec.default_guidance)
        if noise is not None:
            want = self.noise_shape(t.shape[0])
            n = np.asarray(noise)
            if n.shape != want or not np.issubdtype(n.dtype, np.floating) or not np.all(np.isfinite(n)):
                raise ValueError(f"noise must be finite float32 of shape {want} (tok.noise_shape(B)), "
                                 f"got {n.dtype} {n.shape}")
            return self._batched(lambda p, st, chunk, nz: self._decode_noise(
                p, st, chunk, nz, guidance, steps=steps, unguided=guidance == 1.0),
                t, n.astype(np.float32))
        base = jax.random.key(int(seed))
        counter = iter(range(1 << 30))
        fn = lambda p, st, chunk: self._decode_flow(p, st, chunk, jax.random.fold_in(base, next(counter)),  # noqa: E731
                                                    guidance, steps=steps, unguided=guidance == 1.0)
        return self._batched(fn, t)

    def reconstruct(self, images: Any) -> np.ndarray:
        """``decode(encode(images))``."""
        return self.decode(self.encode(images))

    def reconstruct_files(self, paths: str | os.PathLike | Sequence[str | os.PathLike],
                          output_dir: str | os.PathLike, overwrite: bool = False) -> list[str]:
        """``titok-jax reconstruct`` from Python: encode + decode image files into PNGs under
        ``output_dir``. ``paths``: an image file, a directory (every image under it, names relative
        to it) or a list of image files (named by their basenames); the extension becomes ``.png``
        (:func:`png_names`). Images are resized and centre-cropped to ``image_size`` as ``reconstruct``
        does. In a directory or a list, an unreadable image is skipped with one
        ``CorruptImageWarning`` naming it (a ValueError when none is readable); a single file that
        cannot be read is a ValueError. Every output path is checked first (inside ``output_dir``,
        no two alike, none existing unless ``overwrite``: FileExistsError) and the PNGs are renamed
        into place only once every image went through, so a failure leaves none. Returns the paths
        written, in input order."""
        from titok_jax.data.paths import file_kind, is_regular_file, paths_inside
        output_dir = os.fspath(output_dir)
        if isinstance(paths, (str, os.PathLike)):
            source = os.fspath(paths)
            full, names, skip = list_images(source)
        else:
            full = [os.fspath(p) for p in paths]
            if not full:
                raise ValueError("reconstruct_files got no image paths")
            for p in full:
                if not os.path.exists(p):
                    raise FileNotFoundError(f"image {p} does not exist")
                if not is_regular_file(p):
                    raise ValueError(f"input {p} is a {file_kind(p)}, not an image file")
            names, skip, source = [os.path.basename(p) for p in full], True, f"the {len(full)} files given"
        if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
            raise FileExistsError(f"output {output_dir} is a file; expected an output directory")
        outputs = paths_inside(output_dir, png_names(names), f"{source}: images", source=names)
        check_new_outputs(outputs, overwrite)
        return write_reconstructions(self, full, outputs, names=names, source=source,
                                     skip_unreadable=skip)

    # ------------------------------------------------------------------ helpers
    def _batched(self, fn, x: np.ndarray, *extra: np.ndarray) -> np.ndarray:
        """``fn(params, state, chunk, *extra_chunks)`` over chunks of ``batch_size`` rows of ``x``
        (and of each array in ``extra``, split the same way)."""
        import jax
        n, bs = x.shape[0], self.batch_size
        if n == 0:
            raise ValueError("got an empty batch (0 images/token rows)")
        outs = []
        for start in range(0, n, bs):
            chunks = [a[start:start + bs] for a in (x, *extra)]
            k = chunks[0].shape[0]
            if n > bs and k < bs:  # pad the tail so every chunk has the same shape
                chunks = [np.concatenate([c, np.repeat(c[-1:], bs - k, axis=0)]) for c in chunks]
            out = np.asarray(jax.device_get(fn(self.params, self.model_state, *chunks)))
            outs.append(out[:k])
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def _check_images(self, images: Any) -> np.ndarray:
        x = np.asarray(images)
        s = self.image_size
        if self.num_frames:
            return self._check_clips(x)
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

    def _check_clips(self, x: np.ndarray) -> np.ndarray:
        """A video tokenizer's input: clips ``[B, T, S, S, 3]`` (uint8, or float in [0, 1]) with a
        length ``T`` the model takes; one-line ValueError otherwise."""
        s = self.image_size
        if x.ndim != 5 or x.shape[2:] != (s, s, 3):
            raise ValueError(f"this video tokenizer expects clips [B, T, {s}, {s}, 3] (T frames, "
                             f"nominally {self.num_frames}), got shape {x.shape}")
        self.model.check_frames(int(x.shape[1]))
        if x.dtype == np.uint8:
            from titok_jax.data.transforms import to_float
            return to_float(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"encode expects uint8 clips or float clips in [0, 1], got dtype {x.dtype}")
        return np.ascontiguousarray(x, dtype=np.float32)

    def _check_video_tokens(self, t: np.ndarray) -> np.ndarray:
        """A video tokenizer's ids ``[B, T', h, w]`` (any ``T' >= 1``; ``h, w`` the nominal grid)
        or ``[B, N]`` (the nominal grid flattened), a trailing ``k`` for multi-index tokens."""
        m = self.num_codebooks
        tail = () if m == 1 else (m,)
        grid = tuple(self.latent_shape[1:])
        ok = (t.ndim == 4 + len(tail) and t.shape[2:4] == grid and t.shape[1] >= 1) or \
            (t.ndim == 2 + len(tail) and t.shape[1] == self.num_tokens)
        if not ok or t.shape[t.ndim - len(tail):] != tail:
            k = "" if m == 1 else f", {m}"
            raise ValueError(f"decode expects token ids [B, T', {grid[0]}, {grid[1]}{k}] (or "
                             f"[B, {self.num_tokens}{k}]) for this video tokenizer, got shape "
                             f"{t.shape}")
        return t

    def _check_tokens(self, tokens: Any) -> np.ndarray:
        t = np.asarray(tokens)
        n = self.num_tokens
        if self.spec.continuous:
            c = self.token_dim
            if self.num_frames and t.ndim == 5 and t.shape[2:] == (*self.latent_shape[1:], c) \
                    and np.issubdtype(t.dtype, np.floating):   # a video VAE's code grid
                return np.ascontiguousarray(t, dtype=np.float32)
            if t.ndim != 3 or t.shape[1:] != (n, c):
                raise ValueError(f"decode expects continuous tokens [B, {n}, {c}] for this VAE tokenizer, "
                                 f"got shape {t.shape}")
            if not np.issubdtype(t.dtype, np.floating):
                raise ValueError(f"decode expects float tokens for this VAE tokenizer, got dtype {t.dtype}")
            return np.ascontiguousarray(t, dtype=np.float32)
        m = self.num_codebooks
        tail = () if m == 1 else (m,)   # the k ids of a multi-index token (fq / rq)
        if self.num_frames:
            t = self._check_video_tokens(t)
        elif self.variable_length and t.ndim == 2 + len(tail) and 1 <= t.shape[1] <= n \
                and t.shape[2:] == tail:
            pass  # an ordered-token prefix
        elif t.ndim != 2 + len(tail) or t.shape[1] != n or t.shape[2:] != tail:
            ids = "k" if self.variable_length else str(n)
            shape = f"[B, {ids}]" if m == 1 else f"[B, {ids}, {m}]"
            what = f"{shape} with 1 <= k <= {n}" if self.variable_length else shape
            per = f" ({m} ids per token, one per codebook)" if m > 1 else ""
            raise ValueError(f"decode expects token ids {what}{per} for this tokenizer, got shape "
                             f"{t.shape}")
        if not np.issubdtype(t.dtype, np.integer):
            if t.size and np.issubdtype(t.dtype, np.floating) and np.all(np.isfinite(t)) \
                    and np.all(t == np.round(t)):
                t = t.astype(np.int64)
            else:
                raise ValueError(f"decode expects integer token ids, got dtype {t.dtype}")
        k = self.codebook_size
        bad = (t < 0) | (t >= k)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            at = ", ".join(map(str, where))
            raise ValueError(f"token id {int(t[where])} at [{at}] is out of range: valid ids are "
                             f"0..{k - 1} (codebook_size {k}); {int(bad.sum())} id(s) out of range")
        return t.astype(np.int32)


# ---------------------------------------------------------------------- loading
def load_tokenizer(workdir: str | os.PathLike, step: int | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, device: Any = None) -> Tokenizer:
    """The tokenizer of a workdir (written by ``train`` or ``import-torch``) at its latest
    checkpoint (or ``step``): EMA params when the run kept them, else ``params["model"]``, on one
    device (``device``, default the first). The run's own task (``config.task.name``) says how to
    build, encode and decode it.

    ``workdir`` may also be ``"hf:ORG/NAME[@REVISION][/FILE]"``: that release in the local Hugging
    Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``; never
    downloaded), converted by the ``import-torch`` importer on first use into
    ``~/.cache/titok_jax/hf/ORG--NAME/COMMIT/`` (``TITOK_JAX_CACHE`` moves it) and reused after
    (:mod:`titok_jax.convert.hub`).

    Errors (one line): FileNotFoundError for a missing workdir / config / checkpoint (or a
    repository, revision or file missing from the Hugging Face cache, with how to get it),
    ValueError for a run that is not a tokenizer or a checkpoint that cannot be read."""
    from titok_jax.tasks.runs import restore_run

    run = restore_run(workdir, kind="tokenizer", step=step, device=device)
    return Tokenizer(run.task, run.params, run.model_state, config=run.config, step=run.step,
                     batch_size=batch_size)


# ---------------------------------------------------------------------- image files
def list_images(path: str) -> tuple[list[str], list[str], bool]:
    """``(full paths, names, is_dir)``: a single file gives its basename; a directory gives every
    image file under it (recursively, by extension, sorted) with names relative to it. Entries
    that are not regular files (a FIFO, socket or device named like an image, a broken link) would
    block or fail the reader: they are skipped with a ``CorruptImageWarning`` each."""
    import warnings

    from titok_jax.data.paths import file_kind, is_regular_file
    from titok_jax.data.sources import CorruptImageWarning
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path], [os.path.basename(path)], False
    if not os.path.exists(path):
        raise FileNotFoundError(f"input {path} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"input {path} is a {file_kind(path)}, not an image file or a directory")
    full, names = [], []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                p = os.path.join(root, name)
                if not is_regular_file(p):
                    warnings.warn(f"skipping {p}: a {file_kind(p)}, not a regular image file",
                                  CorruptImageWarning, stacklevel=2)
                    continue
                full.append(p)
                names.append(os.path.relpath(p, path))
    if not full:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {path}")
    order = sorted(range(len(names)), key=lambda i: names[i])
    return [full[i] for i in order], [names[i] for i in order], True


def image_batches(paths: Sequence[str], image_size: int, batch_size: int,
                  skipped: list[int] | None = None) -> Iterator[tuple[list[int], np.ndarray]]:
    """``(indices into paths, uint8 [b, S, S, 3])`` batches of decoded, resized and centre-cropped
    images (``b = batch_size`` but for the last). An unreadable file raises ValueError naming it;
    with ``skipped`` (a directory input) it is left out and its index appended to ``skipped``."""
    kept: list[int] = []
    images: list[np.ndarray] = []
    for i, path in enumerate(paths):
        try:
            images.append(load_image(path, image_size))
        except (ValueError, OSError):
            if skipped is None:
                raise
            skipped.append(i)
            continue
        kept.append(i)
        if len(kept) == batch_size:
            yield kept, np.stack(images)
            kept, images = [], []
    if kept:
        yield kept, np.stack(images)


def report_skipped(source: str, names: Sequence[str], skipped: Sequence[int]) -> None:
    """After a directory input: a one-line ``CorruptImageWarning`` with the count and names of the
    skipped images; a ValueError when every image was skipped."""
    if not skipped:
        return
    shown = [names[i] for i in skipped[:20]]
    more = len(skipped) - len(shown)
    listed = ", ".join(shown) + (f" and {more} more" if more else "")
    if len(skipped) == len(names):
        raise ValueError(f"no readable image in {source}: all {len(names)} image file(s) are "
                         f"unreadable ({listed})")
    import warnings

    from titok_jax.data.sources import CorruptImageWarning
    warnings.warn(CorruptImageWarning(f"skipped {len(skipped)} unreadable image(s) of {len(names)} "
                                      f"in {source}: {listed}"), stacklevel=2)


def write_reconstructions(tokenizer: Tokenizer, paths: Sequence[str], outputs: Sequence[str], *,
                          names: Sequence[str], source: str, skip_unreadable: bool) -> list[str]:
    """Reconstruct image file ``paths[i]`` into the PNG ``outputs[i]`` (checked by the caller), in
    batches of ``tokenizer.batch_size``. With ``skip_unreadable`` an image that cannot be read is
    left out (:func:`report_skipped`: one warning line naming it, by ``names``, in ``source``).
    Each PNG is written under a temporary name beside its target and all are renamed into place
    once every image went through; on any failure they are removed (and the folders made for
    them), so nothing partial is left. Returns the written outputs, in input order."""
    from titok_jax.evaluation.images import save_png
    skipped: list[int] | None = [] if skip_unreadable else None
    written: list[str] = []
    with staging() as stage:
        for kept, images in image_batches(paths, tokenizer.image_size, tokenizer.batch_size, skipped):
            for i, rec in zip(kept, tokenizer.reconstruct(images)):
                save_png(stage.path(outputs[i]), rec)
                written.append(outputs[i])
        report_skipped(source, names, skipped or [])
    return written


def png_names(names: Sequence[str]) -> list[str]:
    """Output PNG names for input names: the extension becomes ``.png``; where two inputs would
    collide (``a.jpg``, ``a.png``) the colliding ones keep their extension (``a.jpg.png``)."""
    stems = [os.path.splitext(n)[0] + ".png" for n in names]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s] = counts.get(s, 0) + 1
    return [n + ".png" if counts[s] > 1 and not n.endswith(".png") else s for n, s in zip(names, stems)]


def read_token_file(path: str | os.PathLike, tokenizer: Tokenizer) -> tuple[np.ndarray, list[str]]:
    """A ``tokens.npz`` (as ``titok-jax tokenize`` writes it: ``tokens`` and optional ``files``)
    checked against ``tokenizer`` -> ``(tokens, png_names)``, before anything is decoded or written.

    The PNG names come from ``files`` (:func:`png_names`) or the row index (``000000.png`` ...).
    They are relative paths that stay inside the output directory: an absolute name, a name with a
    ``..`` component, an empty name, a control character, two rows with the same output name or a
    name that is also another's directory are a ValueError (``titok_jax.data.paths``); the caller
    joins them with :func:`titok_jax.data.paths.paths_inside`, which also refuses symlinks out.

    A video tokenizer takes clip tokens (``[C, T', h, w]``, as ``tokenize`` writes for a video;
    ``Tokenizer.decode``'s shapes) and gives ``(tokens, video names)``: the ``files`` entry of each
    row as it is (the rows that share one are the clips of one video, in order; each checked as
    above, but not for repeats) or the row index (``000000`` ...); the caller picks the video file
    names (``video_files.video_file_name``) and checks them with ``paths_inside``. A token shape
    that is not this tokenizer's (image tokens for a video tokenizer or the reverse) is one
    ValueError saying the shape expected."""
    import zipfile
    path = os.fspath(path)
    try:
        data = np.load(path, allow_pickle=False)
        if not hasattr(data, "files"):  # a .npy renamed: np.load gives a bare array
            raise ValueError(f"{path} is a .npy array, not an .npz archive (write tokens with "
                             f"np.savez(path, tokens=...), or titok-jax tokenize)")
        with data:
            if "tokens" not in data.files:
                raise ValueError(f"{path} has no 'tokens' array (it has {sorted(data.files)})")
            tokens = data["tokens"]
            files = data["files"] if "files" in data.files else None
    except (OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        text = lines[0] if lines else type(e).__name__
        raise ValueError(text if text.startswith(path) else f"cannot read {path}: {text}") from None
    n = tokens.shape[0] if tokens.ndim else 0
    if files is not None and (files.ndim != 1 or len(files) != n):
        raise ValueError(f"{path}: 'files' has shape {files.shape}, expected [{n}] to match 'tokens'")
    video = bool(tokenizer.num_frames)
    try:
        tokens = tokenizer._check_tokens(tokens)
    except ValueError as e:
        hint = "" if video or tokens.ndim < 4 else \
            " (clip tokens [C, T', h, w]: decode them with the video tokenizer that wrote them)"
        raise ValueError(f"{path}: {e}{hint}") from None
    if files is None:
        width = max(6, len(str(max(n - 1, 0))))
        return tokens, [f"{i:0{width}d}" + ("" if video else ".png") for i in range(n)]
    from titok_jax.data.paths import check_names, check_relative_name
    raw = [f.decode("utf-8", "replace") if isinstance(f, bytes) else str(f) for f in files.tolist()]
    for i, name in enumerate(raw):
        check_relative_name(name, f"{path}: files[{i}]")
    if video:
        return tokens, raw
    names = png_names(raw)
    check_names(names, f"{path}: files", source=raw)
    return tokens, names
