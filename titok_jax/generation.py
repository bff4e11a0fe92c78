"""Sampling from a trained generator workdir: ``load_generator(DIR) -> Generator``.

```python
import titok_jax
gen = titok_jax.load_generator(GEN_DIR)                 # EMA params of the latest checkpoint
tok = titok_jax.load_tokenizer(TOK_DIR)
ids = gen.sample(labels=[0, 1, 2], seed=0)              # int32 [3, num_tokens]; same seed, same ids
images = tok.decode(ids)                                # float32 [3, H, W, 3] in [0, 1]
```
``sample`` takes the sampler settings of the run's config (``generator.sampler``: steps,
randomize_temperature, guidance_scale, guidance_schedule, ... for MaskGIT; temperature, top_k,
top_p, guidance_scale, max_len for the AR task) unless overridden by keyword.
A label equal to ``num_classes`` (or ``None`` for all) samples unconditionally.

Video generators (``gen.grid_shape = (T', h, w)``, MaskGIT over a video tokenizer's latent grid):
``gen.sample`` gives ids ``[B, T' h w]`` (``tok.decode`` takes them, -> clips ``[B, T, S, S, 3]``);
``gen.sample(labels, first_frame=ids)`` with ids ``[h, w]`` (one first frame for every row) or
``[B, h, w]`` keeps them as the first latent frame (frame prediction; :func:`first_frame_tokens`
encodes an image file with a causal video tokenizer). ``generate_images`` then writes a GIF (and an
mp4 with PyAV) per sample and a frame grid.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Sequence

import numpy as np


class Generator:
    """A trained token generator (build it with ``load_generator``). Attributes: ``num_tokens``,
    ``codebook_size``, ``num_classes``, ``step``, ``config``, ``sampler`` (default settings),
    ``spec`` (the task's ``GeneratorSpec``) and ``task``."""

    def __init__(self, task: Any, params: Any, config: Any, step: int):
        self.task, self.params, self.config, self.step = task, params, config, step
        self.spec = spec = task.generator_spec
        self.num_tokens = spec.num_tokens
        self.codebook_size = spec.codebook_size
        self.num_classes = spec.num_classes
        self.sampler = dict(spec.sampler)
        self.mask_token_id = spec.mask_token_id
        self.num_codebooks = spec.num_codebooks
        self.grid_shape = spec.grid_shape   # a video generator's latent grid (T', h, w), else None

    def __repr__(self) -> str:
        return (f"Generator(num_tokens={self.num_tokens}, codebook_size={self.codebook_size}, "
                f"num_classes={self.num_classes}, step={self.step})")

    def sample(self, labels: Sequence[int] | None = None, num: int | None = None, seed: int = 0,
               batch_size: int = 64, first_frame: Any = None, **sampler: Any) -> np.ndarray:
        """Token ids ``[B, num_tokens]`` (``[B, max_len]`` for an AR prefix; ``[B, ..., k]`` for an
        AR model of ``num_codebooks = k`` factorized ids): one row per label
        (``num`` null labels when ``labels`` is None). Drawn in chunks of ``batch_size`` with seeds
        ``seed + chunk``, so a run is reproducible for a given ``(seed, batch_size)``.
        ``first_frame`` (a video generator): ids ``[h, w]`` for every row, or ``[B, h, w]``, of the
        first latent frame, kept fixed."""
        if labels is None:
            labels = [self.num_classes] * int(num or 1)
        labels = np.asarray(list(labels), np.int64)
        if labels.ndim != 1 or labels.size == 0:
            raise ValueError("labels must be a non-empty list of class ids")
        bad = labels[(labels < 0) | (labels > self.num_classes)]
        if bad.size:
            raise ValueError(f"class id {int(bad[0])} is out of range: valid ids are 0..{self.num_classes - 1} "
                             f"({self.num_classes} = unconditional)")
        unknown = set(sampler) - set(self.spec.sampler_keys)
        if unknown:
            raise ValueError(f"unknown sampler settings {sorted(unknown)}; known: {sorted(self.spec.sampler_keys)}")
        frames = None if first_frame is None else self._first_frame(first_frame, len(labels))
        out = []
        for i, start in enumerate(range(0, len(labels), batch_size)):
            extra = {} if frames is None else {"first_frame": frames[start:start + batch_size]}
            out.append(self.task.sample(self.params, labels[start:start + batch_size], seed=seed + i,
                                        **extra, **sampler))
        return np.concatenate(out).astype(np.int32)

    def _first_frame(self, ids: Any, rows: int) -> np.ndarray:
        """``ids`` ``[h, w]`` / ``[h w]`` (every row) or ``[rows, h, w]`` / ``[rows, h w]`` ->
        int32 ``[rows, h w]``, checked (one-line ValueError)."""
        if not self.grid_shape:
            raise ValueError("first_frame needs a video generator (model.grid_shape: the latent grid "
                             "of a video tokenizer)")
        frame = tuple(self.grid_shape[1:])
        f = int(np.prod(frame))
        ids = np.asarray(ids)
        if ids.shape in (frame, (f,)):
            ids = np.broadcast_to(ids.reshape(1, f), (rows, f))
        elif ids.shape in ((rows, *frame), (rows, f)):
            ids = ids.reshape(rows, f)
        else:
            raise ValueError(f"first_frame must be ids {list(frame)} (or [{rows}, "
                             f"{', '.join(map(str, frame))}]), got shape {list(ids.shape)}")
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= self.codebook_size:
            raise ValueError(f"first_frame ids must be integers in 0..{self.codebook_size - 1}")
        return np.ascontiguousarray(ids, np.int32)

    def logits(self, tokens: Any, labels: Any = None) -> np.ndarray:
        """float32 logits ``[B, N, K]`` for ``tokens [B, N]`` (MaskGIT: may hold ``mask_token_id``)
        and ``labels [B]`` (None or -1 = unconditional); no dropout. An AR model with sub-tokens
        (factorized ids ``[B, N, k]`` or split bits) gives a tuple of ``[B, N, V_i]``, sub-token
        ``i`` given the true sub-tokens before it."""
        tokens = np.asarray(tokens)
        k = self.num_codebooks
        want = (self.num_tokens,) if k == 1 else (self.num_tokens, k)
        if tokens.shape[1:] != want or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"logits expects integer tokens [B, {', '.join(map(str, want))}], got "
                             f"{tokens.dtype} {tokens.shape}")
        labels = np.full(tokens.shape[0], -1) if labels is None else np.asarray(labels)
        out = self.task.logits(self.params, tokens, labels)
        if isinstance(out, (tuple, list)):
            return tuple(np.asarray(o, np.float32) for o in out)
        return np.asarray(out, np.float32)


def load_generator(workdir: str | os.PathLike, step: int | None = None) -> Generator:
    """The generator of a workdir written by ``train`` with a generator config (EMA params when the
    run kept them). Errors are one line: FileNotFoundError / ValueError."""
    from titok_jax.tasks.runs import restore_run

    run = restore_run(workdir, kind="generator", step=step)
    return Generator(run.task, run.params, run.config, run.step)


class GenerationScorer:
    """gFID and Inception Score of generated images: pytorch-fid InceptionV3 pool features against
    reference statistics (``fid_reference`` .npz with ``mu``/``sigma``; without one only the IS), and
    the Inception Score of the unbiased logits. ``update`` takes float images in [0, 1] (rounded to
    the uint8 grid first, as saved PNGs would be)."""

    def __init__(self, inception_weights: str, fid_reference: str | None = None):
        from titok_jax import evaluation as ev
        from titok_jax.nets.inception import POOL_FEATURES, inception_feature_fn, load_inception_params

        self.params = load_inception_params(inception_weights)
        self.reference = ev.load_reference_stats(fid_reference, POOL_FEATURES) if fid_reference else None
        self.features = inception_feature_fn()
        self.stats = ev.FeatureStats(POOL_FEATURES)
        self.logits: list[np.ndarray] = []

    def update(self, images: np.ndarray) -> None:
        out = self.features(self.params, np.asarray(images, np.float32))
        self.stats.update(np.asarray(out["pool"]))
        self.logits.append(np.asarray(out["logits_unbiased"]))

    def result(self, splits: int = 1) -> dict:
        from titok_jax import evaluation as ev
        score, spread = ev.inception_score(np.concatenate(self.logits), splits=splits)
        out = {"inception_score": float(score), "inception_score_std": float(spread)}
        if self.reference is not None:
            out["gfid"] = float(ev.frechet_distance_stats(self.reference, self.stats))
        return out


def class_labels(num: int, num_classes: int, class_id: int | None = None) -> np.ndarray:
    """``num`` class ids: ``class_id`` every time, else ``0, 1, ...`` cycling through the classes
    (zeros for a generator without classes). ``class_id == num_classes`` samples unconditionally."""
    if class_id is not None:
        return np.full(num, class_id)
    return np.arange(num) % num_classes if num_classes else np.zeros(num, np.int64)


def check_tokenizer(generator: Generator, tokenizer: Any, tokenizer_name: str = "") -> None:
    """A ValueError unless ``tokenizer`` decodes the ids ``generator`` makes (same number of tokens,
    same codebook, as many ids per token); ``tokenizer_name`` (e.g. its workdir) names it in the
    message."""
    from titok_jax.tasks.generator import check_num_codebooks
    name = f"the tokenizer {tokenizer_name}" if tokenizer_name else "the tokenizer"
    check_num_codebooks(tokenizer.num_codebooks, getattr(generator, "num_codebooks", 1), name,
                        "the generator")
    if tokenizer.codebook_size != generator.codebook_size or tokenizer.num_tokens != generator.num_tokens:
        raise ValueError(f"the generator makes {generator.num_tokens} ids from {generator.codebook_size} "
                         f"codes but {name} takes {tokenizer.num_tokens} from {tokenizer.codebook_size}")
    grid = getattr(generator, "grid_shape", None)
    latent = getattr(tokenizer, "latent_shape", None)
    if (grid or latent) and tuple(grid or ()) != tuple(latent or ()):
        raise ValueError(f"the generator makes ids of the latent grid {tuple(grid) if grid else None} "
                         f"but {name} decodes {tuple(latent) if latent else 'images'}")


def first_frame_tokens(tokenizer: Any, path: str) -> np.ndarray:
    """int32 ``[h, w]``: the ids of the image file ``path`` (resized / centre-cropped to the
    tokenizer's size) encoded alone, as a 1-frame clip, by a causal video tokenizer (MAGVIT-v2:
    its first latent frame sees the first frame only, so these are the ids any clip starting with
    that frame has). A tokenizer that cannot encode one frame is a one-line ValueError."""
    from titok_jax.data.transforms import load_image
    if not getattr(tokenizer, "num_frames", 0):
        raise ValueError("a first frame needs a video tokenizer")
    try:
        tokenizer.model.check_frames(1)
    except ValueError:
        raise ValueError("a first frame needs a causal video tokenizer (MAGVIT-v2), which encodes "
                         "the first frame alone; this one takes whole clips only") from None
    image = load_image(path, tokenizer.image_size)
    ids = np.asarray(tokenizer.encode(image[None, None]))
    if ids.shape[1] != 1:
        raise ValueError(f"the tokenizer made {ids.shape[1]} latent frames of one frame")
    return ids[0, 0]


def generate_chunks(generator: Generator, tokenizer: Any, labels: Sequence[int], *, batch_size: int = 32,
                    seed: int = 0, tokenizer_name: str = "", first_frame: Any = None, **sampler: Any
                    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Sample one chunk of ``batch_size`` labels at a time (chunk ``i`` with seed ``seed + i``) and
    decode it with ``tokenizer``: yields ``(start, ids int32 [b, T], images float32 [b, H, W, 3])``.
    A tokenizer whose ids the generator does not make is a ValueError before any sampling.
    A video pair yields ids ``[b, T', h, w]`` and clips ``[b, T, H, W, 3]``; ``first_frame``: ids of
    the first latent frame (``Generator.sample``)."""
    check_tokenizer(generator, tokenizer, tokenizer_name)
    labels = np.asarray(labels)
    extra = {} if first_frame is None else {"first_frame": first_frame}
    for chunk, start in enumerate(range(0, len(labels), batch_size)):
        ids = generator.sample(labels[start:start + batch_size], seed=seed + chunk, batch_size=batch_size,
                               **extra, **sampler)
        if getattr(generator, "grid_shape", None):
            ids = ids.reshape(ids.shape[0], *generator.grid_shape)
        yield start, ids, tokenizer.decode(ids)


def generate_images(generator: Generator, tokenizer: Any, output: str, labels: Sequence[int], *,
                    batch_size: int = 32, seed: int = 0, sampler: dict[str, Any] | None = None,
                    inception_weights: str | None = None, fid_reference: str | None = None,
                    is_splits: int = 1, save_images: bool = True, tokenizer_name: str = "",
                    first_frame: Any = None, fps: float = 8.0) -> dict:
    """Generate ``len(labels)`` images chunk by chunk (:func:`generate_chunks`) into ``output``: a
    PNG per image (``{index:06d}_class{K}.png``, unless ``save_images`` is False), ``grid.png`` (the
    first 64) and ``tokens.npz`` (``tokens``, ``labels``). With ``inception_weights`` also gFID
    against ``fid_reference`` and the Inception Score (:class:`GenerationScorer`), written to
    ``metrics.json``. Returns ``{"grid", "tokens", "metrics"}`` (``metrics`` None without scoring).

    A video generator and tokenizer: ``{index:06d}_class{K}.gif`` per clip (and ``.mp4`` when PyAV
    is installed) at ``fps``, ``grid.png`` a frame grid (one row per clip, the first 16 clips, one
    column per frame), ``tokens`` ``[N, T', h, w]``; ``first_frame`` ids of the first latent frame
    (frame prediction); no gFID / IS."""
    import json

    from titok_jax.evaluation.images import save_png, tile_grid

    if fid_reference and not inception_weights:
        raise ValueError("fid_reference needs inception_weights")
    check_tokenizer(generator, tokenizer, tokenizer_name)
    labels = np.asarray(labels)
    video = bool(getattr(tokenizer, "num_frames", 0))
    if video:
        if inception_weights:
            raise ValueError("gFID / Inception Score are for images; a video generator writes clips")
        return _generate_videos(generator, tokenizer, output, labels, batch_size=batch_size, seed=seed,
                                sampler=sampler, save_images=save_images,
                                tokenizer_name=tokenizer_name, first_frame=first_frame, fps=fps)
    if first_frame is not None:
        raise ValueError("first_frame needs a video generator and tokenizer")
    scorer = GenerationScorer(inception_weights, fid_reference) if inception_weights else None
    os.makedirs(output, exist_ok=True)
    all_ids, grid_images = [], []
    for start, ids, images in generate_chunks(generator, tokenizer, labels, batch_size=batch_size, seed=seed,
                                              tokenizer_name=tokenizer_name, **(sampler or {})):
        all_ids.append(ids)
        grid_images.extend(images[:64 - len(grid_images)])
        if save_images:
            for i, image in enumerate(images):
                save_png(os.path.join(output, f"{start + i:06d}_class{int(labels[start + i])}.png"), image)
        if scorer is not None:
            scorer.update(images)
    grid = os.path.join(output, "grid.png")
    save_png(grid, tile_grid(np.stack(grid_images), ncol=min(8, len(grid_images))))
    tokens = os.path.join(output, "tokens.npz")
    np.savez(tokens, tokens=np.concatenate(all_ids), labels=labels.astype(np.int32))
    metrics = None
    if scorer is not None:
        metrics = {"num_images": int(len(labels)), **scorer.result(splits=is_splits)}
        with open(os.path.join(output, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(metrics, f)
    return {"grid": grid, "tokens": tokens, "metrics": metrics}


VIDEO_GRID_CLIPS = 16


def _generate_videos(generator: Generator, tokenizer: Any, output: str, labels: np.ndarray, *,
                     batch_size: int, seed: int, sampler: dict[str, Any] | None, save_images: bool,
                     tokenizer_name: str, first_frame: Any, fps: float) -> dict:
    """The video side of :func:`generate_images` (its docstring)."""
    from titok_jax.evaluation.images import save_png, tile_grid
    from titok_jax.video_files import has_pyav, write_video

    os.makedirs(output, exist_ok=True)
    mp4 = has_pyav()   # generate then also writes mp4
    all_ids, grid_clips = [], []
    for start, ids, clips in generate_chunks(generator, tokenizer, labels, batch_size=batch_size,
                                             seed=seed, tokenizer_name=tokenizer_name,
                                             first_frame=first_frame, **(sampler or {})):
        all_ids.append(ids)
        grid_clips.extend(clips[:VIDEO_GRID_CLIPS - len(grid_clips)])
        if save_images:
            for i, clip in enumerate(clips):
                stem = os.path.join(output, f"{start + i:06d}_class{int(labels[start + i])}")
                write_video(stem + ".gif", clip, fps)
                if mp4:
                    write_video(stem + ".mp4", clip, fps)
    frames = np.stack(grid_clips)   # [n, T, H, W, 3]: one row per clip, one column per frame
    grid = os.path.join(output, "grid.png")
    save_png(grid, tile_grid(frames.reshape(-1, *frames.shape[2:]), ncol=frames.shape[1]))
    tokens = os.path.join(output, "tokens.npz")
    np.savez(tokens, tokens=np.concatenate(all_ids), labels=labels.astype(np.int32))
    return {"grid": grid, "tokens": tokens, "metrics": None}
