"""PyTorch LPIPS-VGG weights -> the file ``titok_jax.losses.perceptual.load_lpips_params`` reads.

Inputs (nothing is downloaded; the user supplies both files):

- ``--vgg``: the torchvision VGG16 state dict (``vgg16-397923af.pth``): ``features.{i}.weight``
  ``[C_out, C_in, 3, 3]`` and ``features.{i}.bias`` for the 13 convs ``i in 0, 2, 5, ..., 28``.
  Its ``classifier.*`` tensors (the fully-connected head) are not part of LPIPS and are skipped;
  any other key that is not consumed is an error.
- ``--lin``: the LPIPS linear layers (the ``lpips`` package's ``weights/v0.1/vgg.pth``):
  ``lin{k}.model.1.weight`` ``[1, C_k, 1, 1]``, ``k = 0..4``.

A full ``lpips.LPIPS`` state dict also works (both flags may name the same file): its
``net.slice{n}.{i}.*`` keys are read as ``features.{i}.*`` and its ``scaling_layer.shift`` /
``.scale`` buffers are checked against the fixed constants.

Files are read by suffix: ``.safetensors`` and ``.npz`` without torch; ``.pth`` / ``.pt`` / ``.bin``
/ ``.ckpt`` with ``torch.load(weights_only=True)`` (``pip install 'titok_jax[torch]'``).
The output (``.safetensors`` or ``.npz``) holds the flat float32 params named in
:func:`~titok_jax.losses.perceptual.lpips_param_shapes`.

Command line::

    titok-jax convert-lpips --vgg vgg16.pth --lin vgg.pth --output lpips_vgg.safetensors
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from titok_jax.convert.common import read_state_dict
from titok_jax.losses.perceptual import LPIPS_SCALE, LPIPS_SHIFT, check_lpips_params
from titok_jax.nets.vgg import VGG16_CONVS, VGG16_TAP_CHANNELS

# Keys of a torchvision VGG16 file that LPIPS does not use.
_IGNORED_VGG = re.compile(r"^classifier\.\d+\.(weight|bias)$")
_SLICE_KEY = re.compile(r"^net\.slice\d+\.(\d+)\.(weight|bias)$")


def lpips_name_table() -> list[tuple[str, str, tuple[int, ...]]]:
    """``(torch key, our flat key, torch shape)`` for every LPIPS param, in forward order."""
    table = []
    for name, idx, c_in, c_out in VGG16_CONVS:
        table.append((f"features.{idx}.weight", f"vgg/{name}/kernel", (c_out, c_in, 3, 3)))
        table.append((f"features.{idx}.bias", f"vgg/{name}/bias", (c_out,)))
    for k, c in enumerate(VGG16_TAP_CHANNELS):
        table.append((f"lin{k}.model.1.weight", f"lin{k}/kernel", (1, c, 1, 1)))
    return table


def _normalise_keys(sd: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """``net.slice{n}.{i}.*`` -> ``features.{i}.*``; check and drop the LPIPS scaling buffers."""
    out = {}
    for key, value in sd.items():
        m = _SLICE_KEY.match(key)
        if m:
            key = f"features.{m.group(1)}.{m.group(2)}"
        elif key in ("scaling_layer.shift", "scaling_layer.scale"):
            want = LPIPS_SHIFT if key.endswith("shift") else LPIPS_SCALE
            if not np.allclose(np.ravel(value), want, atol=1e-6):
                raise ValueError(f"{source}: {key} is {np.ravel(value).tolist()}, "
                                 f"expected {list(want)}")
            continue
        if key in out:
            raise ValueError(f"{source}: tensor {key!r} appears twice")
        out[key] = value
    return out


def convert_lpips_state_dicts(vgg_sd: Mapping[str, np.ndarray], lin_sd: Mapping[str, np.ndarray],
                              *, vgg_source: str = "vgg state dict",
                              lin_source: str = "lin state dict") -> dict[str, np.ndarray]:
    """torchvision VGG16 + LPIPS lin state dicts -> flat float32 params (``lpips_param_shapes``).

    Conv weights ``[out, in, kh, kw]`` -> kernels ``[kh, kw, in, out]``; lin ``[1, C, 1, 1]`` ->
    ``[C, 1]``. Every param is filled and every tensor consumed (only ``classifier.*`` of the
    VGG file is skipped, by rule); the first missing key, wrong shape or
    unknown key raises ``ValueError`` naming it and its file.
    """
    same = lin_sd is vgg_sd
    vgg = _normalise_keys(vgg_sd, vgg_source)
    lin = vgg if same else _normalise_keys(lin_sd, lin_source)
    out: dict[str, np.ndarray] = {}
    consumed: dict[int, set[str]] = {id(vgg): set(), id(lin): set()}
    for torch_key, our_key, shape in lpips_name_table():
        is_lin = torch_key.startswith("lin")
        sd, source = (lin, lin_source) if is_lin else (vgg, vgg_source)
        if torch_key not in sd:
            raise ValueError(f"{source}: missing key {torch_key!r} (shape {shape}) for {our_key}")
        value = np.asarray(sd[torch_key])
        if value.shape != shape:
            raise ValueError(f"{source}: {torch_key!r} has shape {tuple(value.shape)}, "
                             f"expected {shape} (for {our_key})")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{source}: {torch_key!r} has non-finite values")
        value = value.astype(np.float32)
        if is_lin:
            out[our_key] = np.ascontiguousarray(value.reshape(shape[1], 1))
        elif value.ndim == 4:
            out[our_key] = np.ascontiguousarray(value.transpose(2, 3, 1, 0))
        else:
            out[our_key] = value
        consumed[id(sd)].add(torch_key)
    # Every tensor must be consumed; the only skip is VGG16's fully-connected classifier head.
    for sd, source in ((vgg, vgg_source),) + (() if same else ((lin, lin_source),)):
        for key in sd:
            if key in consumed[id(sd)]:
                continue
            if sd is vgg and _IGNORED_VGG.match(key):
                continue
            raise ValueError(f"{source}: unexpected key {key!r} (not an LPIPS-VGG tensor)")
    check_lpips_params(out, source="converted params")
    return out


def save_lpips_params(flat: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write flat params as ``.safetensors`` (metadata ``format=titok_jax.lpips_vgg``) or ``.npz``.
    """
    path = os.fspath(path)
    check_lpips_params(flat, source="params to save")
    arrays = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file
        save_file(arrays, path, metadata={"format": "titok_jax.lpips_vgg"})
    elif path.endswith(".npz"):
        np.savez(path, **arrays)
    else:
        raise ValueError(f"{path}: output must end in .safetensors or .npz")


def convert_lpips_files(vgg_path: str | os.PathLike, lin_path: str | os.PathLike,
                        output_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read both inputs, convert, write ``output_path``; returns the flat params."""
    vgg_path, lin_path = os.fspath(vgg_path), os.fspath(lin_path)
    if not os.fspath(output_path).endswith((".safetensors", ".npz")):
        raise ValueError(f"{os.fspath(output_path)}: output must end in .safetensors or .npz")
    vgg_sd = read_state_dict(vgg_path)
    same = os.path.abspath(lin_path) == os.path.abspath(vgg_path)
    lin_sd = vgg_sd if same else read_state_dict(lin_path)
    flat = convert_lpips_state_dicts(vgg_sd, lin_sd, vgg_source=vgg_path, lin_source=lin_path)
    save_lpips_params(flat, output_path)
    return flat
