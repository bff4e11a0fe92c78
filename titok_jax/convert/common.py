"""Shared machinery of the PyTorch -> titok_jax converters.

- :func:`read_state_dict`: a flat ``{name: float32 numpy}`` from ``.safetensors`` / ``.npz`` (no torch
  needed) or a torch pickle (``.bin`` / ``.pth`` / ``.pt`` / ``.ckpt``, needs the ``torch`` extra;
  always a weights-only load, a Lightning ``last.ckpt`` included).
- :class:`StateDictReader`: takes tensors by name with a shape check and a layout transform, records
  what it consumed, and :meth:`StateDictReader.finish` fails on the first tensor left over, so a
  name table is complete in both directions (every param filled, every tensor consumed).
- Layout transforms: PyTorch ``Linear [out, in]`` -> Flax ``Dense [in, out]``; ``Conv2d [out, in, kh,
  kw]`` -> ``Conv [kh, kw, in, out]``; a 1x1 conv used as a per-token linear -> ``[in, out]``.
Flat <-> nested param trees and the "tree of shapes matches" check are in :mod:`titok_jax.trees`.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping

import numpy as np

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | os.PathLike, state_keys: Iterable[str] = ("state_dict",)
                    ) -> dict[str, np.ndarray]:
    """Flat ``{name: numpy array}`` from a ``.safetensors``, ``.npz`` or torch pickle file. A torch
    training checkpoint gives its first entry of ``state_keys`` that is a state dict (else the file
    is taken as the state dict); DDP / ``torch.compile`` name prefixes are stripped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        try:
            return dict(load_file(path))
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    if path.endswith(".npz"):
        return _read_npz(path)
    if path.endswith(TORCH_SUFFIXES):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading {path} needs PyTorch (pip install 'titok_jax[torch]'), "
                              "or convert it to .safetensors first") from e
        try:
            obj = _torch_load(torch, path)
        except Exception as e:
            raise ValueError(f"{path} is not a readable torch state dict: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                             ) from None
        if isinstance(obj, Mapping):  # a training checkpoint: its first state dict of state_keys
            obj = next((obj[k] for k in state_keys if isinstance(obj.get(k), Mapping)), obj)
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
        out = {}
        for k, v in obj.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
            for prefix in WRAPPER_PREFIXES:  # DDP / torch.compile wrappers, if saved so
                k = k[len(prefix):] if k.startswith(prefix) else k
            out[k] = v.detach().to(torch.float32).cpu().numpy()
        return out
    raise ValueError(f"{path}: unsupported file type; expected .safetensors, .npz or "
                     f"{'/'.join(TORCH_SUFFIXES)}")


def _inert_class(qualified: str) -> type:
    """A do-nothing class standing in for the global ``qualified`` (``module.Name``) of a pickle:
    it accepts any constructor arguments and any state, and runs no code of the original."""
    module, _, name = qualified.rpartition(".")
    return type(name or qualified, (), {"__module__": module, "__init__": lambda self, *a, **k: None,
                                        "__setstate__": lambda self, state: None})


def _torch_load(torch, path: str):
    """``torch.load(weights_only=True)``; a training checkpoint that pickles other classes by
    reference (a Lightning ``last.ckpt`` keys ``callbacks`` by ``ModelCheckpoint``, so plain
    ``torch.load`` needs ``pytorch_lightning`` importable) is read again with each such global
    replaced by an inert stand-in (:func:`_inert_class`) - still a weights-only load, nothing of
    the original classes imported or run; the tensors are unaffected."""
    import pickle
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - not a zip checkpoint: report the first error
            names = []
        if not names:
            raise
        with torch.serialization.safe_globals([(_inert_class(n), n) for n in names]):
            return torch.load(path, map_location="cpu", weights_only=True)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive; a one-line ValueError naming ``path`` when it is not one
    (a ``.npy`` renamed, other bytes, a damaged zip, a pickled entry)."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise ValueError(f"{path} is a .npy array file renamed to .npz (np.save writes .npy; a state "
                         "dict .npz comes from np.savez)")
    if head[:4] not in (b"PK\x03\x04", b"PK\x05\x06"):  # a zip's first entry, or an empty zip
        raise ValueError(f"{path} is not an .npz archive (its first bytes are not a zip header)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as e:  # noqa: BLE001 - zipfile / numpy raise many types for a damaged file
        text = str(e).strip().splitlines()
        raise ValueError(f"{path} is not a readable .npz archive: "
                         f"{text[0] if text else type(e).__name__}") from None


# ----------------------------------------------------------------------------- layouts
def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """``Linear.weight [out, in]`` -> ``Dense kernel [in, out]``."""
    return np.ascontiguousarray(w.T)


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """``Conv2d.weight [out, in, kh, kw]`` -> ``Conv kernel [kh, kw, in, out]``."""
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def conv1x1_as_linear(w: np.ndarray) -> np.ndarray:
    """``Conv2d.weight [out, in, 1, 1]`` -> ``Dense kernel [in, out]``."""
    return np.ascontiguousarray(w[:, :, 0, 0].T)


def qkv_kernel(heads: int):
    """Fused ``[3W, W]`` torch in-projection -> ``[W, 3, heads, W/heads]`` (q, k, v kernels)."""
    def f(w: np.ndarray) -> np.ndarray:
        width = w.shape[1]
        return np.ascontiguousarray(w.reshape(3, heads, width // heads, width).transpose(3, 0, 1, 2))
    return f


def qkv_bias(heads: int):
    """Fused ``[3W]`` torch in-projection bias -> ``[3, heads, W/heads]``."""
    return lambda b: b.reshape(3, heads, -1)


def out_kernel(heads: int):
    """torch ``[W, W]`` out-projection -> ``[heads, W/heads, W]``."""
    return lambda w: np.ascontiguousarray(w.T.reshape(heads, w.shape[1] // heads, w.shape[0]))


def vit_grid_depth_heads(sd: Mapping[str, np.ndarray], source: str, position_key: str,
                         position_rows: int, block_key: str, width: int,
                         num_heads: int | None, family: str, head_dim: int = 64
                         ) -> tuple[int, int, int]:
    """``(grid, depth, heads)`` of a ViT state dict: the square patch grid of a position table
    of ``position_rows`` rows (a class row first), the number of blocks (``block_key.format(i)``
    present for ``i = 0, 1, ...``) and the heads (``num_heads``, default ``width / head_dim``);
    a table that is no square grid or a width the heads do not divide is a one-line error."""
    import math
    n = int(position_rows) - 1
    g = math.isqrt(max(n, 0))
    if n <= 0 or g * g != n:
        raise ValueError(f"{source}: tensor {position_key!r} has {n} patch rows, not a square grid")
    depth = 0
    while block_key.format(depth) in sd:
        depth += 1
    heads = int(num_heads) if num_heads else int(width) // head_dim
    if heads <= 0 or width % heads:
        raise ValueError(f"{source}: width {width} does not split into {heads} heads"
                         + ("" if num_heads else f" of {family}'s {head_dim}; pass num_heads"))
    return g, depth, heads


def vit_block_rows(src: str, dst: str, width: int, heads: int, names: Mapping[str, str],
                   transform: Callable[[np.ndarray], np.ndarray] | None = None) -> list[tuple]:
    """Name-table rows of one pre-LN ViT block with a fused qkv projection and a 4x MLP: torch
    ``{src}.{names[part]}`` -> our ``{dst}/ln_1|attn/qkv|attn/out|ln_2|mlp/fc_in|mlp/fc_out``.
    ``names`` gives the torch name of each weight and bias (keys ``ln_1, ln_1_bias, qkv, qkv_bias,
    out, out_bias, ln_2, ln_2_bias, fc_in, fc_in_bias, fc_out, fc_out_bias``); ``transform`` is
    applied to tensors that need no layout change (default: none)."""
    w, same = width, transform
    n = names
    return [(f"{src}.{n['ln_1']}", f"{dst}/ln_1/scale", (w,), same),
            (f"{src}.{n['ln_1_bias']}", f"{dst}/ln_1/bias", (w,), same),
            (f"{src}.{n['qkv']}", f"{dst}/attn/qkv/kernel", (3 * w, w), qkv_kernel(heads)),
            (f"{src}.{n['qkv_bias']}", f"{dst}/attn/qkv/bias", (3 * w,), qkv_bias(heads)),
            (f"{src}.{n['out']}", f"{dst}/attn/out/kernel", (w, w), out_kernel(heads)),
            (f"{src}.{n['out_bias']}", f"{dst}/attn/out/bias", (w,), same),
            (f"{src}.{n['ln_2']}", f"{dst}/ln_2/scale", (w,), same),
            (f"{src}.{n['ln_2_bias']}", f"{dst}/ln_2/bias", (w,), same),
            (f"{src}.{n['fc_in']}", f"{dst}/mlp/fc_in/kernel", (4 * w, w), linear_kernel),
            (f"{src}.{n['fc_in_bias']}", f"{dst}/mlp/fc_in/bias", (4 * w,), same),
            (f"{src}.{n['fc_out']}", f"{dst}/mlp/fc_out/kernel", (w, 4 * w), linear_kernel),
            (f"{src}.{n['fc_out_bias']}", f"{dst}/mlp/fc_out/bias", (w,), same)]


class StateDictReader:
    """Consume a flat state dict through a name table; the errors name the first problem.

    ``take(torch_key, shape, transform)`` returns ``transform(value)`` as float32 after checking
    that the key exists, has the PyTorch ``shape`` and is finite. ``finish(ignore)`` raises on the
    first key neither taken nor matched by one of the ``ignore`` predicates.
    """

    def __init__(self, state_dict: Mapping[str, np.ndarray], source: str = "state dict"):
        self.sd, self.source = state_dict, source
        self.consumed: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str, shape: Iterable[int] | None = None,
             transform: Callable[[np.ndarray], np.ndarray] = identity, *, what: str = "") -> np.ndarray:
        label = f" (for {what})" if what else ""
        if key not in self.sd:
            want = f" of shape {tuple(shape)}" if shape is not None else ""
            raise ValueError(f"{self.source}: missing tensor {key!r}{want}{label}")
        value = np.asarray(self.sd[key])
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ValueError(f"{self.source}: tensor {key!r} has shape {tuple(value.shape)}, "
                             f"expected {tuple(shape)}{label}")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{self.source}: tensor {key!r} has non-finite values")
        self.consumed.add(key)
        return np.asarray(transform(value.astype(np.float32)), np.float32)

    def finish(self, ignore: Iterable[Callable[[str], bool]] = ()) -> None:
        ignore = tuple(ignore)
        for key in self.sd:
            if key not in self.consumed and not any(p(key) for p in ignore):
                raise ValueError(f"{self.source}: unexpected tensor {key!r} "
                                 f"({len(self.sd) - len(self.consumed)} tensor(s) not consumed)")
