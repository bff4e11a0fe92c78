"""Param trees as flat ``{"a/b/c": leaf}`` mappings, and the one "tree of shapes matches" check.

Bottom floor: imports nothing from ``titok_jax``. A path is the ``/``-joined keys of a leaf (dict
keys, sequence indices, dataclass field names), so a nested tree ``{"a": {"b": x}}`` and a flat
mapping ``{"a/b": x}`` (the format of the frozen-network param files) have the same flat view and
can be compared with each other.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np


def key_str(key: Any) -> str:
    """One path entry as text: a dict key, a sequence index or a dataclass field name."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: tuple) -> str:
    """A ``jax.tree_util`` key path as ``"a/b/c"``."""
    return "/".join(key_str(k) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` for every leaf of ``tree`` (``None`` subtrees have no leaves)."""
    return {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{"a/b/c": shape}`` for every leaf of a tree of arrays / ``jax.ShapeDtypeStruct``s."""
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(np.shape(v))
            for k, v in flatten(tree).items()}


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


def check_tree_matches(tree: Any, abstract: Any, source: str = "params", what: str = "param") -> None:
    """Every leaf of ``abstract`` (arrays or ``jax.ShapeDtypeStruct``s) is present in ``tree`` with
    the same shape, and ``tree`` holds nothing else. Either may be nested or flat (``"a/b"`` keys).

    Raises a one-line ``ValueError`` naming the first missing, mis-shaped or unexpected path:
    ``"{source}: missing {what} 'a/b' (shape (2, 3))"``, ``"{source}: {what} 'a/b' has shape (3,),
    expected (2, 3)"``, ``"{source}: unexpected {what} 'a/c' (and 2 more)"``.
    """
    got, want = flat_shapes(tree), flat_shapes(abstract)
    for key, shape in want.items():
        if key not in got:
            raise ValueError(f"{source}: missing {what} {key!r} (shape {shape})")
        if got[key] != shape:
            raise ValueError(f"{source}: {what} {key!r} has shape {got[key]}, expected {shape}")
    extra = [k for k in got if k not in want]
    if extra:
        raise ValueError(f"{source}: unexpected {what} {extra[0]!r}"
                         + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
