"""``config.init_from`` for a video tokenizer (the tokenizer task): start from an image model's
weights, as the MAGVIT papers do (MAGVIT v1's ``init_from.inflation = '2d->3d'``, Open-MAGVIT2's
``video_lfqgan.py``).

``init_from`` names a workdir (or ``hf:ORG/NAME``) of a finished tokenizer run. Its model params
(the EMA when the run kept one; :func:`titok_jax.tasks.runs.restore_run`) are read to the host and

- copied as they are when their tree has exactly the video model's shapes (a video run: a warm
  start or a fine-tune);
- otherwise inflated by the video model's own hook, ``model.inflate_image_params(params_2d,
  params_3d)`` (``models.video_tokenizer``): ``models.magvit2_video`` takes a ``models.magvit2``
  run (each 2-D kernel in the last time slice of the causal 3-D one), ``models.magvit3d`` its
  image twin's run (``magvit3d.image_twin``: ``temporal_kernel_size=1``, no temporal
  downsampling; each kernel in the centre time slice).

The model state (quantizer statistics) is the run's when its shapes match, else the fresh one;
the discriminator and the optimizer always start fresh. Anything that does not map is a one-line
ValueError naming the workdir. The task's ``init`` then writes these host arrays into the traced
init (``tasks.host_params.overwrite_from_host``), so the sharded init of the trainer, the dry run
and the benchmarks all see them.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from titok_jax.trees import flat_shapes


def load_video_init(init_from: str, model: Any, fresh_init: Callable[[jax.Array], tuple[dict, dict]]
                    ) -> tuple[Any, Any | None]:
    """``(model params, model state or None)`` as host numpy trees for the video tokenizer
    ``model`` from the run in ``init_from`` (module docstring). ``fresh_init(key) -> (params,
    state)`` is the task's init (``{"model": ...}`` entries), traced only for its shapes."""
    from titok_jax.tasks.runs import restore_run

    source = f"init_from {init_from}"
    if (not init_from.startswith("hf:")
            and not os.path.isfile(os.path.join(init_from, "config.json"))):
        raise FileNotFoundError(f"{source} is not a titok_jax workdir (no config.json)")
    run = restore_run(init_from, kind="tokenizer", host=True)
    fresh_params, fresh_state = nn.unbox(jax.eval_shape(fresh_init, jax.random.key(0)))
    want, want_state = fresh_params["model"], fresh_state["model"]
    if flat_shapes(run.params) == flat_shapes(want):
        params = run.params
    else:
        try:
            params = model.inflate_image_params(run.params, want)
        except (NotImplementedError, ValueError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            name = run.config.get("model", {}).get("name", "?")
            raise ValueError(f"{source}: its {name!r} model does not inflate into this "
                             f"{model.NAME}: {msg}") from None
    params = jax.tree.map(np.asarray, nn.meta.unbox(params))
    state = run.model_state if flat_shapes(run.model_state) == flat_shapes(want_state) else None
    return params, state
