"""The PyTorch ``InceptionI3d`` state dict (piergiaj/pytorch-i3d layout) -> the file
:func:`titok_jax.nets.i3d.load_i3d_params` reads.

Input: ``i3d_pretrained_400.pt`` (the Kinetics-400 weights VideoGPT / TATS / Open-MAGVIT2 compute FVD
with; nothing is downloaded here), piergiaj's ``rgb_imagenet.pt``, or the same state dict saved as
``.safetensors`` / ``.npz``. Its keys::

    {Conv3d_1a_7x7 | Conv3d_2b_1x1 | Conv3d_2c_3x3}.conv3d.weight   [out, in, kt, kh, kw]
    Mixed_{3b,3c,4b..4f,5b,5c}.{b0,b1a,b1b,b2a,b2b,b3b}.conv3d.weight
      -> .../conv3d/kernel [kt, kh, kw, in, out]
    {...}.bn.weight / .bn.bias / .bn.running_mean / .bn.running_var -> .../bn/{scale, bias, mean, var}
    logits.conv3d.weight [400, 1024, 1, 1, 1] / logits.conv3d.bias  -> logits/conv3d/{kernel, bias}

``*.num_batches_tracked`` buffers are skipped; a missing tensor, a tensor left over or a shape
mismatch is a one-line error naming it (a file of another network fails on its first foreign key).

Command line::

    titok-jax convert-i3d --input i3d_pretrained_400.pt --output i3d_fvd.safetensors
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from titok_jax.convert.common import StateDictReader, read_state_dict
from titok_jax.convert.inception import save_params
from titok_jax.nets.i3d import NUM_CLASSES, i3d_abstract_params
from titok_jax.trees import check_tree_matches, flat_shapes, unflatten

_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def torch_key(flat_key: str) -> str:
    """Our ``Mixed_4b/b1b/bn/mean`` -> the PyTorch ``Mixed_4b.b1b.bn.running_mean``."""
    *mods, leaf = flat_key.split("/")
    leaf = _BN[leaf] if mods[-1] == "bn" else ("weight" if leaf == "kernel" else leaf)
    return ".".join(mods + [leaf])


def conv3d_kernel(w: np.ndarray) -> np.ndarray:
    """``Conv3d.weight [out, in, kt, kh, kw]`` -> Flax ``Conv`` kernel ``[kt, kh, kw, in, out]``."""
    return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 4, 1, 0))


def i3d_name_table(num_classes: int = NUM_CLASSES, channel_div: int = 1
                   ) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(torch key, our flat key, torch shape)`` for every param of :class:`InceptionI3D`."""
    table = []
    for key, shape in flat_shapes(i3d_abstract_params(num_classes, channel_div)).items():
        if key.endswith("conv3d/kernel"):
            kt, kh, kw, cin, cout = shape
            shape = (cout, cin, kt, kh, kw)
        table.append((torch_key(key), key, tuple(shape)))
    return table


def convert_i3d_state_dict(sd: Mapping[str, np.ndarray], source: str = "state dict",
                           num_classes: int | None = None, channel_div: int | None = None
                           ) -> dict[str, np.ndarray]:
    """Flat torch state dict -> flat float32 params (``/``-joined keys); every tensor consumed.
    ``num_classes`` (400 for Kinetics-400, 157 for piergiaj's Charades head) and ``channel_div``
    (1 for every released file; tests narrow the net) default to what the head / stem hold."""
    for key in ("Conv3d_1a_7x7.conv3d.weight", "logits.conv3d.weight"):
        if key not in sd or np.ndim(sd[key]) != 5:
            raise ValueError(f"{source} is not an InceptionI3d state dict (piergiaj/pytorch-i3d "
                             f"layout, e.g. i3d_pretrained_400.pt): no 5-d {key!r} among "
                             f"{len(sd)} tensors")
    if num_classes is None:
        num_classes = int(np.shape(sd["logits.conv3d.weight"])[0])
    if channel_div is None:
        channel_div = max(1, 64 // int(np.shape(sd["Conv3d_1a_7x7.conv3d.weight"])[0]))
    reader = StateDictReader(sd, source)
    out = {}
    for tkey, key, shape in i3d_name_table(num_classes, channel_div):
        transform = conv3d_kernel if key.endswith("conv3d/kernel") else (lambda x: x)
        out[key] = reader.take(tkey, shape, transform, what=key)
    reader.finish(ignore=[lambda k: k.endswith(".num_batches_tracked")])
    check_tree_matches(unflatten(out), i3d_abstract_params(num_classes, channel_div),
                       source="converted params")
    return out


def convert_i3d_file(input_path: str | os.PathLike, output_path: str | os.PathLike
                     ) -> dict[str, np.ndarray]:
    """Read ``input_path``, convert, write ``output_path``; returns the flat params."""
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    if not output_path.endswith((".safetensors", ".npz")):
        raise ValueError(f"{output_path}: output must end in .safetensors or .npz")
    flat = convert_i3d_state_dict(read_state_dict(input_path), source=input_path)
    save_params(flat, output_path, "titok_jax.i3d_fvd")
    return flat
