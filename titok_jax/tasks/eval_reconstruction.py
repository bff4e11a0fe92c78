"""Reconstruction evaluation of a tokenizer task on held-out data: PSNR, SSIM (scikit-image's default window), codebook
usage / entropy / perplexity over the whole split, and an originals-vs-reconstructions grid.

rFID and Inception Score (optional, ``config.eval``; configs without an ``eval`` section skip them):

- ``eval.inception_weights``: file from ``titok-jax convert-inception`` ("" = no rFID / IS);
- ``eval.fid_reference``: ``.npz`` with ``mu`` / ``sigma`` (``titok-jax fid-reference``);
  "" = the statistics of the same split's originals, computed in the same pass;
- ``eval.fid_method``: ``sqrtm`` (pytorch-fid, default) or ``eigh`` (same value, faster on CPUs).

Images (originals and clipped reconstructions) are rounded to the uint8 grid before the pytorch-fid
InceptionV3; ``rfid`` is the Fréchet distance of the 2048-d pool features, ``inception_score`` the
one-split IS of the reconstructions' unbiased 1008-way logits (as the TiTok evaluator)."""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import numpy as np

from titok_jax import data as data_lib
from titok_jax import evaluation as ev
from titok_jax.evaluation.thumbnail import choose_thumbnail, thumbnail_psnr
from titok_jax.nets.inception import POOL_FEATURES, inception_feature_fn, load_inception_params
from titok_jax.tasks.types import EvalContext, EvalResult


_EVAL_FNS: dict = {}


def eval_fn(task: Any) -> Callable:
    """Jitted ``(model_params, model_state, images) -> (recon, indices, psnr [B], ssim [B])`` of a
    tokenizer task (built once per task object)."""
    fn = _EVAL_FNS.get(id(task))
    if fn is None or fn[0] is not task:
        def scores(model_params, model_state, images):
            rec, indices = task.reconstruct(model_params, model_state, images)
            return rec, indices, ev.psnr(rec, images, max_db=100.0), ev.ssim(rec, images)

        fn = (task, jax.jit(scores))
        _EVAL_FNS.clear()
        _EVAL_FNS[id(task)] = fn
    return fn[1]


def evaluate_reconstruction(task: Any, model_params: Any, model_state: Any, ctx: EvalContext) -> EvalResult:
    """``TokenizerTaskBase.evaluate``: metrics over the held-out split and the grid of the first
    batch's originals over their reconstructions (``images["reconstructions"]``)."""
    spec = task.token_spec
    bits = (spec.num_tokens * float(np.log2(spec.codebook_size)) if spec.codebook_size else None)
    metrics, originals, recs = reconstruction_metrics(
        eval_fn(task), model_params, model_state, ctx.config, ctx.mesh,
        spec.codebook_size, ctx.max_images, bits_per_image=bits)
    images = {}
    if originals is not None:
        num = int(ctx.config.get("samples", {}).get("num_images", 8))
        images["reconstructions"] = ev.make_grid(originals[:num], recs[:num])
    return EvalResult(metrics=metrics, images=images)


def reconstruction_metrics(eval_fn: Callable, model_params: Any, model_state: Any, config: Any,
                           mesh: Any, codebook_size: Any, max_images: int = 0,
                           bits_per_image: float | None = None
                           ) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
    """Metrics over the held-out split, plus the first batch's originals and reconstructions.
    The eval batch is rounded up to a multiple of the data shards (padding is masked out).

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
    counter = ev.CodebookCounter(codebook_size) if codebook_size else None
    first = (None, None)
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
        originals = None
        if first[0] is None or bits_per_image:
            originals = _gather(np.asarray(batch["image"]))[np.nonzero(mask)[0]]
        if first[0] is None:
            first = (originals, _gather(rec)[np.nonzero(mask)[0]])
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
    if counter is not None and counter.num_updates:
        result = counter.result(prefix="codebook_")
        metrics.update({k: float(v) for k, v in result.items()})
    if fid is not None:
        metrics.update(fid.result())
    return metrics, first[0], first[1]


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
