"""pytorch-fid's InceptionV3 weights -> the file :func:`titok_jax.nets.inception.load_inception_params`
reads.

Input: ``pt_inception-2015-12-05-6726825d.pth`` (the FID Inception of pytorch-fid, released at
github.com/mseitzer/pytorch-fid/releases; nothing is downloaded here) or the same state dict saved as
``.safetensors`` / ``.npz``. Its keys are torchvision ``Inception3`` names::

    {Conv2d_1a_3x3 | Mixed_5b.branch1x1 | ...}.conv.weight   [out, in, kh, kw] -> .../conv/kernel [kh, kw, in, out]
    {...}.bn.weight / .bn.bias                               -> .../bn/scale, .../bn/bias
    {...}.bn.running_mean / .bn.running_var                  -> .../bn/mean,  .../bn/var
    fc.weight [1008, 2048] / fc.bias [1008]                  -> fc/kernel [2048, 1008], fc/bias

``*.num_batches_tracked`` buffers are skipped; any other tensor left over, any param not filled or any
shape mismatch is an error naming the tensor.

Command line::

    titok-jax convert-inception --input pt_inception-2015-12-05-6726825d.pth \\
        --output inception_fid.safetensors
"""
from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from titok_jax.convert.common import StateDictReader, conv_kernel, linear_kernel, read_state_dict
from titok_jax.nets.inception import inception_abstract_params
from titok_jax.trees import check_tree_matches, flat_shapes, unflatten

_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def torch_key(flat_key: str) -> str:
    """Our ``Mixed_5b/branch1x1/bn/mean`` -> the PyTorch ``Mixed_5b.branch1x1.bn.running_mean``."""
    *mods, leaf = flat_key.split("/")
    if mods[-1] == "bn":
        leaf = _BN[leaf]
    elif leaf == "kernel":
        leaf = "weight"
    return ".".join(mods + [leaf])


def inception_name_table() -> list[tuple[str, str, tuple[int, ...]]]:
    """``(torch key, our flat key, torch shape)`` for every param of the FID InceptionV3."""
    table = []
    for key, shape in flat_shapes(inception_abstract_params()).items():
        if key.endswith("conv/kernel"):
            kh, kw, cin, cout = shape
            shape = (cout, cin, kh, kw)
        elif key == "fc/kernel":
            shape = (shape[1], shape[0])
        table.append((torch_key(key), key, tuple(shape)))
    return table


def convert_inception_state_dict(sd: Mapping[str, np.ndarray], source: str = "state dict"
                                 ) -> dict[str, np.ndarray]:
    """Flat torch state dict -> flat float32 params (``/``-joined keys); every tensor consumed."""
    reader = StateDictReader(sd, source)
    out = {}
    for tkey, key, shape in inception_name_table():
        transform = conv_kernel if key.endswith("conv/kernel") else (
            linear_kernel if key == "fc/kernel" else (lambda x: x))
        out[key] = reader.take(tkey, shape, transform, what=key)
    reader.finish(ignore=[lambda k: k.endswith(".num_batches_tracked")])
    check_tree_matches(unflatten(out), inception_abstract_params(), source="converted params")
    return out


def save_params(flat: Mapping[str, np.ndarray], path: str, fmt: str) -> None:
    """Write flat float32 params as ``.safetensors`` (metadata ``format=fmt``) or ``.npz``."""
    arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file
        save_file(arrays, path, metadata={"format": fmt})
    elif path.endswith(".npz"):
        np.savez(path, **arrays)
    else:
        raise ValueError(f"{path}: output must end in .safetensors or .npz")


def convert_inception_file(input_path: str | os.PathLike, output_path: str | os.PathLike
                           ) -> dict[str, np.ndarray]:
    """Read ``input_path``, convert, write ``output_path``; returns the flat params."""
    input_path, output_path = os.fspath(input_path), os.fspath(output_path)
    if not output_path.endswith((".safetensors", ".npz")):
        raise ValueError(f"{output_path}: output must end in .safetensors or .npz")
    flat = convert_inception_state_dict(read_state_dict(input_path), source=input_path)
    save_params(flat, output_path, "titok_jax.inception_fid")
    return flat
