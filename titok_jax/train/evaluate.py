"""Reconstruction evaluation on held-out data: PSNR, SSIM (scikit-image's default window), codebook
usage / entropy / perplexity over the whole split, and an originals-vs-reconstructions grid."""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from titok_jax import data as data_lib
from titok_jax import evaluation as ev


def make_eval_fn(task: Any) -> Callable:
    """Jitted ``(model_params, model_state, images) -> (recon, indices, psnr [B], ssim [B])``."""

    def fn(model_params, model_state, images):
        rec, indices = task.reconstruct(model_params, model_state, images)
        return rec, indices, ev.psnr(rec, images, max_db=100.0), ev.ssim(rec, images)

    return jax.jit(fn)


def evaluate(task: Any, eval_fn: Callable, model_params: Any, model_state: Any, config: Any,
             mesh: Any, codebook_size: Any, max_images: int = 0) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
    """Metrics over the held-out split, plus the first batch's originals and reconstructions.
    The eval batch is rounded up to a multiple of the data shards (padding is masked out)."""
    shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
    batch = int(config.data.get("eval_batch_size", 0) or config.batch_size)
    if batch % shards:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.data.eval_batch_size = -(-batch // shards) * shards
    it = data_lib.eval_iterator_from_config(config)
    psnr_sum = ssim_sum = count = 0.0
    counter = ev.CodebookCounter(codebook_size) if codebook_size else None
    first = (None, None)
    for batch in it:
        mask = _gather(np.asarray(batch["mask"], bool))
        images = data_lib.to_global_array({"image": batch["image"]}, mesh)["image"]
        rec, indices, psnr, ssim = eval_fn(model_params, model_state, images)
        psnr, ssim = _gather(psnr), _gather(ssim)
        psnr_sum += float(psnr[mask].sum())
        ssim_sum += float(ssim[mask].sum())
        count += float(mask.sum())
        if counter is not None and indices is not None:
            counter.update(_gather(indices), mask=mask)
        if first[0] is None:
            keep = np.nonzero(mask)[0]
            first = (_gather(np.asarray(batch["image"]))[keep], _gather(rec)[keep])
        if max_images and count >= max_images:
            break
    if count == 0:
        raise ValueError("the evaluation split is empty")
    metrics = {"psnr": psnr_sum / count, "ssim": ssim_sum / count, "num_images": int(count)}
    if counter is not None and counter.num_updates:
        result = counter.result(prefix="codebook_")
        metrics.update({k: float(v) for k, v in result.items()})
    return metrics, first[0], first[1]


def _gather(x: Any) -> np.ndarray:
    """The whole batch as NumPy: a global ``jax.Array`` (which may span other processes' devices)
    or, for host data, every process's local rows concatenated in process order."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def save_grid(workdir: str, step: int, originals: np.ndarray, reconstructions: np.ndarray,
              num_images: int = 8) -> tuple[str, np.ndarray]:
    path = os.path.join(workdir, "samples", f"reconstructions_{int(step):09d}.png")
    grid = ev.save_reconstruction_grid(path, originals[:num_images], reconstructions[:num_images])
    return path, grid
