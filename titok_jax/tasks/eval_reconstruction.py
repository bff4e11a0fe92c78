"""Reconstruction evaluation of a tokenizer task on held-out data: PSNR, SSIM (scikit-image's default window), codebook
usage / entropy / perplexity over the whole split, and an originals-vs-reconstructions grid.

rFID and Inception Score (optional, ``config.eval``; configs without an ``eval`` section skip them):

- ``eval.inception_weights``: file from ``titok-jax convert-inception`` ("" = no rFID / IS);
- ``eval.fid_reference``: ``.npz`` with ``mu`` / ``sigma`` (``titok-jax fid-reference``);
  "" = the statistics of the same split's originals, computed in the same pass;
- ``eval.fid_method``: ``sqrtm`` (pytorch-fid, default) or ``eigh`` (same value, faster on CPUs).

Clips ``[B, T, H, W, 3]`` (video tokenizers): ``psnr`` is each clip's PSNR over all its frames,
``ssim`` the mean of its per-frame SSIM (``clip_scores``), ``num_images`` counts clips, rFID / IS
are per frame, ``rfvd`` (with ``eval.fvd_weights``, ``tasks.eval_fvd``) is the Fréchet distance of
the clips' I3D features, there is no thumbnail baseline, and the ``reconstructions`` grid is one
pair of rows per clip, a column per frame (``clip_grid``).

Images (originals and clipped reconstructions) are rounded to the uint8 grid before the pytorch-fid
InceptionV3; ``rfid`` is the Fréchet distance of the 2048-d pool features, ``inception_score`` the
one-split IS of the reconstructions' unbiased 1008-way logits (as the TiTok evaluator).

Pictures (``EvalResult.images``, written by the trainer as ``samples/{name}_{step:09d}.png``):
``reconstructions`` (originals over reconstructions), ``codebook_histogram`` (discrete tokenizers:
the per-code counts of the whole split, sorted; drawn from the counts the usage metric needs, so
at every evaluation) and, when the task passes a ``prefix_decode`` (FlexTok in ``titok-jax eval``),
``coarse_to_fine`` (the first ``samples.num_images`` held-out images decoded from their first
1, 2, 4, ..., K tokens, one row per image) and ``psnr_vs_tokens``, with the metrics
``psnr_tokens_{k}`` (mean PSNR of those images from k tokens)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np

from titok_jax import data as data_lib
from titok_jax import evaluation as ev
from titok_jax.evaluation import plots
from titok_jax.evaluation.images import caption_grid, tile_grid
from titok_jax.evaluation.thumbnail import choose_thumbnail, thumbnail_psnr
from titok_jax.nets.inception import POOL_FEATURES, inception_feature_fn, load_inception_params
from titok_jax.tasks.eval_fvd import FVDEval
from titok_jax.tasks.types import EvalContext, EvalResult


_EVAL_FNS: dict = {}


def eval_fn(task: Any) -> Callable:
    """Jitted ``(model_params, model_state, images) -> (recon, indices, psnr [B], ssim [B])`` of a
    tokenizer task (built once per task object)."""
    fn = _EVAL_FNS.get(id(task))
    if fn is None or fn[0] is not task:
        def scores(model_params, model_state, images):
            rec, indices = task.reconstruct(model_params, model_state, images)
            if images.ndim == 5:   # clips: clip_scores
                return (rec, indices, *clip_scores(rec, images))
            return rec, indices, ev.psnr(rec, images, max_db=100.0), ev.ssim(rec, images)

        fn = (task, jax.jit(scores))
        _EVAL_FNS.clear()
        _EVAL_FNS[id(task)] = fn
    return fn[1]


def clip_scores(rec: jax.Array, clips: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(psnr [B], ssim [B])`` of clips ``[B, T, H, W, 3]``: the PSNR of each clip's MSE over
    all its frames, and the mean over its frames of the per-frame SSIM."""
    b, t = clips.shape[:2]
    flat = lambda x: x.reshape((b, t * x.shape[2], *x.shape[3:]))  # noqa: E731  frames stacked
    per_frame = lambda x: x.reshape((b * t, *x.shape[2:]))  # noqa: E731
    ssim = ev.ssim(per_frame(rec), per_frame(clips)).reshape((b, t)).mean(axis=1)
    return ev.psnr(flat(rec), flat(clips), max_db=100.0), ssim


def clip_grid(originals: np.ndarray, reconstructions: np.ndarray, max_clips: int = 4,
              max_frames: int = 8) -> np.ndarray:
    """The frame grid of clips ``[N, T, H, W, 3]``: one pair of rows per clip (its first
    ``max_frames`` frames, originals over reconstructions), ``max_clips`` clips at most."""
    a = np.asarray(originals)[:max_clips, :max_frames]
    b = np.asarray(reconstructions)[:max_clips, :max_frames]
    n, t = a.shape[:2]
    return ev.make_grid(a.reshape((n * t, *a.shape[2:])), b.reshape((n * t, *b.shape[2:])), ncol=t)


def evaluate_reconstruction(task: Any, model_params: Any, model_state: Any, ctx: EvalContext,
                            prefix_decode: Callable | None = None) -> EvalResult:
    """``TokenizerTaskBase.evaluate``: metrics over the held-out split, the grid of the first
    batch's originals over their reconstructions (``images["reconstructions"]``) and the sorted
    codebook histogram (``images["codebook_histogram"]``, discrete tokenizers). With
    ``prefix_decode`` (``(model_params, model_state, ids [B, k]) -> images``, a variable-length
    tokenizer's evaluation decode) also the coarse-to-fine pictures (``coarse_to_fine``)."""
    spec = task.token_spec
    # the same-bit thumbnail baseline is an image baseline: none for clips (video tokenizers)
    bits = spec.num_tokens * spec.bits_per_token if spec.codebook_size and not spec.is_video \
        else None
    # multi-index tokens (fq / rq): one row of counts per factor / level (codebook_usage_{i}, ...)
    r = reconstruction_pass(eval_fn(task), model_params, model_state, ctx.config, ctx.mesh,
                            spec.codebook_sizes, ctx.max_images, bits_per_image=bits)
    metrics, images = r.metrics, {}
    num = int(ctx.config.get("samples", {}).get("num_images", 8))
    if r.originals is not None and r.originals.ndim == 5:   # clips: a frame grid
        images["reconstructions"] = clip_grid(r.originals[:num], r.reconstructions[:num])
    elif r.originals is not None:
        images["reconstructions"] = ev.make_grid(r.originals[:num], r.reconstructions[:num])
    if jax.process_index() == 0 and r.counts is not None:  # only process 0 writes pictures
        hist = plots.try_plot("the codebook histogram", plots.render_codebook_histogram, r.counts)
        if hist is not None:
            images["codebook_histogram"] = hist
    if prefix_decode is not None and r.originals is not None and r.indices is not None:
        more_metrics, more_images = coarse_to_fine(prefix_decode, model_params, model_state,
                                                   r.originals[:num], r.indices[:num],
                                                   r.reconstructions[:num])
        metrics.update(more_metrics)
        images.update(more_images)
    return EvalResult(metrics=metrics, images=images)


def prefix_lengths(num_tokens: int) -> list[int]:
    """``[1, 2, 4, ..., num_tokens]``: the powers of two below ``num_tokens``, then ``num_tokens``."""
    ks = [1 << i for i in range(max(int(num_tokens), 1).bit_length()) if (1 << i) < num_tokens]
    return ks + [int(num_tokens)]


def coarse_to_fine(decode: Callable, model_params: Any, model_state: Any, images: np.ndarray,
                   ids: np.ndarray, full: np.ndarray) -> tuple[dict, dict]:
    """``images`` ``[n, H, W, 3]`` decoded from the first ``k`` of their token ids ``[n, K]`` for
    each ``k`` of ``prefix_lengths(K)``: ``decode(model_params, model_state, ids[:, :k])`` (jitted
    here) for ``k < K``, and ``full`` (evaluation's own reconstructions) for ``k = K``. Returns
    ``({"psnr_tokens_{k}": mean PSNR over the images}, {"coarse_to_fine": the strip,
    "psnr_vs_tokens": the plot})``: the strip is one row per image, the original then its decodes
    from 1, 2, 4, ..., K tokens, captioned."""
    images = np.asarray(images, np.float32)
    ids = np.asarray(ids)
    ks = prefix_lengths(ids.shape[1])
    decode_fn = jax.jit(decode)
    decoded, metrics = [], {}
    for k in ks:
        rec = (np.asarray(full, np.float32) if k == ids.shape[1] else
               np.asarray(jax.device_get(decode_fn(model_params, model_state, ids[:, :k])), np.float32))
        decoded.append(rec)
        metrics[f"psnr_tokens_{k}"] = float(np.mean(np.asarray(ev.psnr(rec, images, max_db=100.0))))
    pictures: dict = {}
    if jax.process_index() == 0:
        h, w = images.shape[1:3]
        cells = np.stack([images, *decoded], axis=1).reshape(-1, *images.shape[1:])  # row = one image
        strip = tile_grid(cells, ncol=len(ks) + 1)
        pictures["coarse_to_fine"] = caption_grid(
            strip, (h, w), columns=["input", *(f"k={k}" for k in ks)])
        plot = plots.try_plot("the PSNR-vs-tokens plot", plots.render_psnr_vs_tokens, ks,
                              [metrics[f"psnr_tokens_{k}"] for k in ks], len(images))
        if plot is not None:
            pictures["psnr_vs_tokens"] = plot
    return metrics, pictures


@dataclasses.dataclass
class ReconstructionPass:
    """What one pass over the held-out split gives: the metrics, the first batch's originals,
    reconstructions and token ids (or None) and the per-code counts (``[K]`` / ``[F, K]`` int, or
    None)."""

    metrics: dict
    originals: np.ndarray | None
    reconstructions: np.ndarray | None
    indices: np.ndarray | None
    counts: np.ndarray | None


def reconstruction_metrics(eval_fn: Callable, model_params: Any, model_state: Any, config: Any,
                           mesh: Any, codebook_size: Any, max_images: int = 0,
                           bits_per_image: float | None = None
                           ) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
    """``reconstruction_pass`` as ``(metrics, originals, reconstructions)``."""
    r = reconstruction_pass(eval_fn, model_params, model_state, config, mesh, codebook_size,
                            max_images, bits_per_image)
    return r.metrics, r.originals, r.reconstructions


def reconstruction_pass(eval_fn: Callable, model_params: Any, model_state: Any, config: Any,
                        mesh: Any, codebook_size: Any, max_images: int = 0,
                        bits_per_image: float | None = None) -> ReconstructionPass:
    """Metrics over the held-out split, plus the first batch's originals and reconstructions and
    the codebook counts. The eval batch is rounded up to a multiple of the data shards (padding is
    masked out).

    With ``bits_per_image`` (a discrete tokenizer: tokens x log2 codebook) the same-bit thumbnail
    baseline is measured on the same images (``evaluation.thumbnail``; its size and bit depth
    chosen on the first batch): ``bits_per_image``, ``thumbnail_psnr``, ``thumbnail_side``,
    ``thumbnail_bits``."""
    shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
    batch = int(config.data.get("eval_batch_size", 0) or config.batch_size)
    if batch % shards:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.data.eval_batch_size = -(-batch // shards) * shards
    it = data_lib.eval_iterator_from_config(config)
    psnr_sum = ssim_sum = count = thumb_sum = 0.0
    thumb = None   # (side, bits per channel) of the same-bit thumbnail baseline
    fid = InceptionEval.from_config(config, mesh)
    fvd = FVDEval.from_config(config, mesh)
    counter = ev.CodebookCounter(codebook_size) if codebook_size else None
    first = (None, None, None)
    for batch in it:
        mask = _gather(np.asarray(batch["mask"], bool))
        if max_images:  # count exactly max_images: drop the surplus rows of the last batch
            mask &= np.cumsum(mask) <= max_images - count
        images = data_lib.to_global_array({"image": batch["image"]}, mesh)["image"]
        rec, indices, psnr, ssim = eval_fn(model_params, model_state, images)
        psnr, ssim = _gather(psnr), _gather(ssim)
        psnr_sum += float(psnr[mask].sum())
        ssim_sum += float(ssim[mask].sum())
        count += float(mask.sum())
        if counter is not None and indices is not None:
            counter.update(_gather(indices), mask=mask)
        if fid is not None:
            fid.update(images, rec, mask)
        if fvd is not None:
            fvd.update(images, rec, mask)
        originals = None
        if first[0] is None or bits_per_image:
            originals = _gather(np.asarray(batch["image"]))[np.nonzero(mask)[0]]
        if first[0] is None:
            rows = np.nonzero(mask)[0]
            first = (originals, _gather(rec)[rows], None if indices is None else _gather(indices)[rows])
            if bits_per_image:
                thumb = choose_thumbnail(originals[:16], bits_per_image)
        if thumb is not None:
            thumb_sum += float(thumbnail_psnr(originals, *thumb).sum())
        if max_images and count >= max_images:
            break
    if count == 0:
        raise ValueError("the evaluation split is empty")
    metrics = {"psnr": psnr_sum / count, "ssim": ssim_sum / count, "num_images": int(count)}
    if thumb is not None:
        metrics.update(bits_per_image=float(bits_per_image), thumbnail_psnr=thumb_sum / count,
                       thumbnail_side=thumb[0], thumbnail_bits=thumb[1])
    counts = None
    if counter is not None and counter.num_updates:
        result = counter.result(prefix="codebook_")
        metrics.update({k: float(v) for k, v in result.items()})
        counts = np.asarray(jax.device_get(counter.counts))
    if fid is not None:
        metrics.update(fid.result())
    if fvd is not None:
        metrics.update(fvd.result())
    return ReconstructionPass(metrics, *first, counts)


_INCEPTION_CACHE: dict = {}


class InceptionEval:
    """Accumulates Inception features of originals and reconstructions over an evaluation.

    ``rfid = frechet_distance(reference, reconstructions)`` where the reference is the ``.npz`` of
    ``fid_reference`` or the originals' own statistics; ``inception_score`` over the reconstructions.
    """

    def __init__(self, params: Any, reference: tuple[np.ndarray, np.ndarray] | None,
                 method: str = "sqrtm"):
        self.params, self.reference, self.method = params, reference, method
        self.features = inception_feature_fn()
        self.fake = ev.FeatureStats(POOL_FEATURES)
        self.real = ev.FeatureStats(POOL_FEATURES) if reference is None else None
        self.logits: list[np.ndarray] = []

    @classmethod
    def from_config(cls, config: Any, mesh: Any) -> "InceptionEval | None":
        """``None`` unless ``config.eval.inception_weights`` is set. The weights are read once per
        (file, mesh) and replicated over the mesh."""
        ecfg = config.get("eval", None) or {}
        weights = str(ecfg.get("inception_weights", "") or "")
        if not weights:
            return None
        method = str(ecfg.get("fid_method", "sqrtm") or "sqrtm")
        if method not in ("sqrtm", "eigh"):
            raise ValueError(f"eval.fid_method must be 'sqrtm' or 'eigh', got {method!r}")
        ref_path = str(ecfg.get("fid_reference", "") or "")
        reference = ev.load_reference_stats(ref_path, POOL_FEATURES) if ref_path else None
        key = (os.path.abspath(weights), os.path.getmtime(weights) if os.path.exists(weights) else 0,
               id(mesh))
        if key not in _INCEPTION_CACHE:
            from jax.sharding import NamedSharding, PartitionSpec
            params = load_inception_params(weights)
            _INCEPTION_CACHE.clear()
            _INCEPTION_CACHE[key] = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        return cls(_INCEPTION_CACHE[key], reference, method)

    def update(self, images: Any, reconstructions: Any, mask: np.ndarray) -> None:
        if images.ndim == 5:   # clips: every frame is an image (a per-frame rFID)
            t = images.shape[1]
            images, reconstructions = (x.reshape((-1, *x.shape[2:]))
                                       for x in (images, reconstructions))
            mask = np.repeat(mask, t)
        out = self.features(self.params, reconstructions)
        self.fake.update(_gather(out["pool"]), mask)
        self.logits.append(_gather(out["logits_unbiased"])[mask])
        if self.real is not None:
            self.real.update(_gather(self.features(self.params, images)["pool"]), mask)

    def result(self) -> dict[str, float]:
        real = self.reference if self.real is None else self.real
        rfid = ev.frechet_distance_stats(real, self.fake, method=self.method)
        score, _ = ev.inception_score(np.concatenate(self.logits), splits=1)
        return {"rfid": rfid, "inception_score": score}


def _gather(x: Any) -> np.ndarray:
    """The whole batch as NumPy: a global ``jax.Array`` (which may span other processes' devices)
    or, for host data, every process's local rows concatenated in process order."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
