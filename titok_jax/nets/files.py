"""Reading the param files of the frozen feature networks (InceptionV3 for FID, ConvNeXt-S for the
perceptual loss, a KL-VAE under FlexTok) written by the ``titok_jax.convert`` scripts.

File format: ``.safetensors`` (no torch needed) or ``.npz`` holding a flat mapping of float32 arrays
keyed by the ``/``-joined Flax param path (``Mixed_5b/branch1x1/conv/kernel``). The file must match the
model exactly: every param present with its shape, nothing else (``titok_jax.trees.check_tree_matches``).
"""
from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from titok_jax.trees import check_tree_matches, unflatten


def read_flat_params(path: str | os.PathLike, what: str, hint: str) -> dict[str, np.ndarray]:
    """The flat ``{path: array}`` mapping of a ``.safetensors`` / ``.npz`` param file; one-line
    errors name the file, ``what`` it should hold and the ``hint`` command that makes it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} params file not found: {path} (create it with `{hint}`)")
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file
            return dict(load_file(path))
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
    except Exception as e:  # truncated or foreign files raise many types
        lines = str(e).strip().splitlines()
        raise ValueError(f"{path} is not a readable {what} params file: "
                         f"{lines[0] if lines else type(e).__name__}") from None
    raise ValueError(f"{path}: {what} params must be a .safetensors or .npz file (create it with `{hint}`)")


def load_frozen_params(path: str | os.PathLike, abstract: Any, what: str, hint: str,
                       param: str = "param") -> dict:
    """Read ``path`` (``.safetensors`` / ``.npz``), check it against ``abstract`` and return the nested
    params tree of float32 ``jax.Array``s. ``what`` names the network and ``hint`` the command that
    makes the file, for the error messages; ``param`` is what a missing / unexpected entry is called."""
    flat = read_flat_params(path, what, hint)
    check_tree_matches(flat, abstract, source=os.fspath(path), what=param)
    return unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})
