"""Putting weights that live on the host (a loaded workdir, a converted file) into a task's traced
``init`` without embedding them in the compiled program as constants (a published model has GBs of
them): every leaf is read through ``jax.pure_callback`` when the sharded init runs."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np


def overwrite_from_host(boxed: Any, host: Any) -> Any:
    """Every leaf of a (logically boxed) traced tree replaced by the array at the same path of
    ``host``: a nested dict of host arrays, or a callable ``fetch(path: tuple[str, ...]) -> array``
    (called lazily, when the init runs). Axis metadata (logical names) is kept."""
    fetch: Callable[[tuple[str, ...]], Any] = host if callable(host) else (lambda path: _lookup(host, path))
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731

    def leaf(path, b):
        like = b.unbox() if is_box(b) else b
        key = tuple(str(getattr(k, "key", k)) for k in path)
        value = jax.pure_callback(lambda: np.asarray(fetch(key), like.dtype),
                                  jax.ShapeDtypeStruct(like.shape, like.dtype))
        return b.replace_boxed(value) if is_box(b) else value

    return jax.tree_util.tree_map_with_path(leaf, boxed, is_leaf=is_box)


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
    node = tree
    for k in path:
        node = node[k]
    return node
