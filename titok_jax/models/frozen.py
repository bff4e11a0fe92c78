"""Reading the param files of frozen helper networks (InceptionV3 for FID, ConvNeXt-S for the
perceptual loss) written by the ``titok_jax.convert`` scripts.

File format: ``.safetensors`` (no torch needed) or ``.npz`` holding a flat mapping of float32 arrays
keyed by the ``/``-joined Flax param path (``Mixed_5b/branch1x1/conv/kernel``). The file must match the
model exactly: every param present with its shape, nothing else.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def flat_shapes(abstract: Any) -> dict[str, tuple[int, ...]]:
    """``{"a/b/c": shape}`` for every leaf of a (nested dict) param tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        out["/".join(str(getattr(k, "key", k)) for k in path)] = tuple(leaf.shape)
    return out


def check_flat_params(flat: Mapping[str, Any], abstract: Any, source: str) -> None:
    """Raise ``ValueError`` naming the first missing, mis-shaped or unexpected param."""
    expected = flat_shapes(abstract)
    for key, shape in expected.items():
        if key not in flat:
            raise ValueError(f"{source}: missing param {key!r} (shape {shape})")
        got = tuple(np.shape(flat[key]))
        if got != shape:
            raise ValueError(f"{source}: param {key!r} has shape {got}, expected {shape}")
    extra = sorted(set(flat) - set(expected))
    if extra:
        raise ValueError(f"{source}: unexpected param {extra[0]!r}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """``{"a/b/c": v}`` -> ``{"a": {"b": {"c": v}}}``; a key given twice is an error."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(sep)
        for p in parents:
            node = node.setdefault(p, {})
        if leaf in node:
            raise ValueError(f"duplicate param {key!r}")
        node[leaf] = value
    return tree


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


def load_frozen_params(path: str | os.PathLike, abstract: Any, what: str, hint: str) -> dict:
    """Read ``path`` (``.safetensors`` / ``.npz``), check it against ``abstract`` and return the nested
    params tree of float32 ``jax.Array``s. ``what`` names the network and ``hint`` the command that
    makes the file, for the error messages."""
    flat = read_flat_params(path, what, hint)
    check_flat_params(flat, abstract, source=os.fspath(path))
    return unflatten({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})
