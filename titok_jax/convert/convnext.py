"""torchvision ConvNeXt weights -> the file :func:`titok_jax.nets.convnext.load_convnext_params`
reads (for the ConvNeXt-S perceptual loss).

Input: torchvision's ``convnext_small`` IMAGENET1K_V1 state dict (``convnext_small-0c510722.pth``;
nothing is downloaded here), or the same tensors as ``.safetensors`` / ``.npz``. Name table in
:mod:`titok_jax.nets.convnext`; layouts: ``Conv2d [out, in, kh, kw] -> [kh, kw, in, out]``
(the depthwise ``[d, 1, 7, 7] -> [7, 7, 1, d]``), ``Linear [out, in] -> [in, out]``,
``layer_scale [d, 1, 1] -> [d]``, LayerNorm ``weight -> scale``. Every tensor must be consumed and
every param filled; the first mismatch is an error naming it.

Command line::

    titok-jax convert-convnext --input convnext_small-0c510722.pth \\
        --output convnext_s.safetensors
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from titok_jax.convert.common import StateDictReader, conv_kernel, linear_kernel, read_state_dict
from titok_jax.convert.inception import save_params
from titok_jax.nets.convnext import CONVNEXT_SMALL, convnext_abstract_params
from titok_jax.trees import check_tree_matches, unflatten


def _ln(torch_prefix: str, ours: str, d: int) -> list[tuple[str, str, tuple[int, ...], str]]:
    return [(f"{torch_prefix}.weight", f"{ours}/scale", (d,), "id"),
            (f"{torch_prefix}.bias", f"{ours}/bias", (d,), "id")]


def convnext_name_table(depths: Sequence[int] = CONVNEXT_SMALL["depths"],
                        dims: Sequence[int] = CONVNEXT_SMALL["dims"], num_classes: int = 1000
                        ) -> list[tuple[str, str, tuple[int, ...], str]]:
    """``(torch key, our flat key, torch shape, layout)`` for every param; layout is one of
    ``id``, ``conv``, ``linear``, ``scale`` (``[d, 1, 1] -> [d]``)."""
    t = [("features.0.0.weight", "stem_conv/kernel", (dims[0], 3, 4, 4), "conv"),
         ("features.0.0.bias", "stem_conv/bias", (dims[0],), "id")]
    t += _ln("features.0.1", "stem_norm", dims[0])
    for s, (depth, d) in enumerate(zip(depths, dims)):
        if s > 0:
            i, c = 2 * s, dims[s - 1]
            t += _ln(f"features.{i}.0", f"down{s - 1}_norm", c)
            t += [(f"features.{i}.1.weight", f"down{s - 1}_conv/kernel", (d, c, 2, 2), "conv"),
                  (f"features.{i}.1.bias", f"down{s - 1}_conv/bias", (d,), "id")]
        for j in range(depth):
            tp, ours = f"features.{2 * s + 1}.{j}", f"stage{s}_block{j}"
            t += [(f"{tp}.layer_scale", f"{ours}/gamma", (d, 1, 1), "scale"),
                  (f"{tp}.block.0.weight", f"{ours}/dwconv/kernel", (d, 1, 7, 7), "conv"),
                  (f"{tp}.block.0.bias", f"{ours}/dwconv/bias", (d,), "id")]
            t += _ln(f"{tp}.block.2", f"{ours}/norm", d)
            t += [(f"{tp}.block.3.weight", f"{ours}/fc1/kernel", (4 * d, d), "linear"),
                  (f"{tp}.block.3.bias", f"{ours}/fc1/bias", (4 * d,), "id"),
                  (f"{tp}.block.5.weight", f"{ours}/fc2/kernel", (d, 4 * d), "linear"),
                  (f"{tp}.block.5.bias", f"{ours}/fc2/bias", (d,), "id")]
    t += _ln("classifier.0", "head_norm", dims[-1])
    t += [("classifier.2.weight", "head_fc/kernel", (num_classes, dims[-1]), "linear"),
          ("classifier.2.bias", "head_fc/bias", (num_classes,), "id")]
    return t


_LAYOUTS = {"id": lambda x: x, "conv": conv_kernel, "linear": linear_kernel,
            "scale": lambda x: x.reshape(-1)}


def convert_convnext_state_dict(sd: Mapping[str, np.ndarray], source: str = "state dict",
                                depths: Sequence[int] = CONVNEXT_SMALL["depths"],
                                dims: Sequence[int] = CONVNEXT_SMALL["dims"],
                                num_classes: int = 1000) -> dict[str, np.ndarray]:
    """Flat torchvision state dict -> flat float32 params (``/``-joined keys)."""
    reader = StateDictReader(sd, source)
    out = {key: reader.take(tkey, shape, _LAYOUTS[layout], what=key)
           for tkey, key, shape, layout in convnext_name_table(depths, dims, num_classes)}
    reader.finish()
    check_tree_matches(unflatten(out), convnext_abstract_params(depths, dims, num_classes),
                       source="converted params")
    return out


def torchvision_arch(sd: Mapping[str, np.ndarray], source: str = "state dict") -> dict:
    """``depths``, ``dims``, ``num_classes`` of a torchvision ConvNeXt state dict, read from its
    ``features.{2s+1}.{j}.layer_scale`` and ``classifier.2.bias`` tensors."""
    depths, dims = [], []
    while f"features.{2 * len(depths) + 1}.0.layer_scale" in sd:
        i = 2 * len(depths) + 1
        depths.append(sum(1 for k in sd if k.startswith(f"features.{i}.") and k.endswith("layer_scale")))
        dims.append(int(np.shape(sd[f"features.{i}.0.layer_scale"])[0]))
    if not depths or "classifier.2.bias" not in sd:
        raise ValueError(f"{source}: not a torchvision ConvNeXt state dict "
                         "(no features.1.0.layer_scale / classifier.2.bias)")
    return {"depths": tuple(depths), "dims": tuple(dims),
            "num_classes": int(np.shape(sd["classifier.2.bias"])[0])}


def convert_convnext_file(input_path: str | os.PathLike, output_path: str | os.PathLike
                          ) -> dict[str, np.ndarray]:
    """Read a torchvision ConvNeXt state dict (ConvNeXt-S for the perceptual loss; the size is read
    from the file), convert, write ``output_path``; returns the flat params."""
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    if not output_path.endswith((".safetensors", ".npz")):
        raise ValueError(f"{output_path}: output must end in .safetensors or .npz")
    sd = read_state_dict(input_path)
    flat = convert_convnext_state_dict(sd, source=input_path, **torchvision_arch(sd, input_path))
    save_params(flat, output_path, "titok_jax.convnext_small")
    return flat
