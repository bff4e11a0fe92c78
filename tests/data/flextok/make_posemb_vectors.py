"""Reference 2D sin-cos position tables from the OFFICIAL FlexTok code (apple/ml-flextok).

Official commit: 87d00cc8babf4a25ffce0f3f0c4d8b529d3d6abf (2025-04-03), file
``flextok/model/utils/posembs.py``: ``build_2d_sincos_posemb`` (lines 18-40) and
``PositionalEmbedding`` (``posemb_type="sincos"``, ``posemb_scaling="absolute"``: the table is built
once for ``max_sizes`` and cropped to the input grid, lines 90-124). Nothing of that code is copied
here or into titok_jax: this script loads the file from a path and runs it.

How to rerun (torch, einops, numpy; no GPU, no network)::

    git -C <mirror of apple/ml-flextok> show HEAD:flextok/model/utils/posembs.py > /tmp/posembs.py
    python tests/data/flextok/make_posemb_vectors.py --official /tmp/posembs.py

Adapted at run time: ``posembs.py`` imports ``mup`` (used only by ``init_weights_muP``), which is
replaced by an empty stub module.

What the official function computes: ``meshgrid(arange(w), arange(h), indexing="ij")`` (shapes
``(W, H)``, flattened w-major), ``omega_i = 1 / 10000**(i / (D/4))``, ``i < D/4``, channels
``[sin(gw omega), cos(gw omega), sin(gh omega), cos(gh omega)]``, then the flat axis is read as
``(h w)``. On a square grid that puts the ROW index in the first half and the column in the
second: ``emb[r*W + c] = [sin r, cos r, sin c, cos c]``. On a non-square grid the flat order does
not match the ``(h w)`` read and the table is scrambled (``raw_3x4_d8``); FlexTok never builds one:
its ``max_sizes`` are square and smaller grids are crops (``crop_3x4_d8_of_4x4``).

Arrays in ``posemb_vectors.npz`` (float32, ``[h*w, D]``, tokens row-major, channels last):

- ``square_4x4_d16``: ``build_2d_sincos_posemb(4, 4, 16)``.
- ``square_3x3_d8``: ``build_2d_sincos_posemb(3, 3, 8)``.
- ``crop_3x4_d8_of_4x4``: ``PositionalEmbedding(8, [4, 4])([3, 4])``, the table FlexTok adds to a
  3x4 patch grid.
- ``raw_3x4_d8``: ``build_2d_sincos_posemb(3, 4, 8)`` as is (the scrambled non-square layout: it is
  the row-first table of a 4x3 grid read as 3x4; kept to document it, not a target).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types

import numpy as np


def _load(path: str):
    sys.modules.setdefault("mup", types.ModuleType("mup"))
    spec = importlib.util.spec_from_file_location("official_flextok_posembs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(t) -> np.ndarray:
    """``[1, D, h, w]`` -> ``[h*w, D]`` float32."""
    a = t.detach().cpu().numpy()[0]
    return np.ascontiguousarray(a.reshape(a.shape[0], -1).T.astype(np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, help="path to the official posembs.py")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "posemb_vectors.npz"))
    args = ap.parse_args()
    pe = _load(args.official)
    out = {
        "square_4x4_d16": _rows(pe.build_2d_sincos_posemb(4, 4, embed_dim=16)),
        "square_3x3_d8": _rows(pe.build_2d_sincos_posemb(3, 3, embed_dim=8)),
        "crop_3x4_d8_of_4x4": _rows(
            pe.PositionalEmbedding(8, [4, 4], "sincos", "absolute")([3, 4])),
        "raw_3x4_d8": _rows(pe.build_2d_sincos_posemb(3, 4, embed_dim=8)),
    }
    np.savez(args.out, **out)
    for k, v in out.items():
        print(k, v.shape)


if __name__ == "__main__":
    main()
