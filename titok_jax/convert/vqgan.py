"""Official MaskGIT-VQGAN / MaskBit-discriminator PyTorch state dicts -> our Flax params.

MaskGIT-VQGAN (``maskgit-vqgan-imagenet-f16-256.bin`` on HF ``fun-research/TiTok``; TiTok's
``PretrainedTokenizer``): keys ``encoder.*``, ``decoder.*``, ``quantize.embedding.weight``. The
two-stage TiTok holds the same decoder as ``pixel_decoder.*`` and its codebook as
``pixel_quantize.embedding.weight`` (:func:`maskgit_decoder_params_from_state_dict` reads one
decoder under any prefix). Name table (``c_i = hidden * channel_mult[i]``, ``E`` = ``encoder.``,
``D`` = ``decoder.``, PyTorch ``[out, in, kh, kw]`` -> Flax ``[kh, kw, in, out]``)::

    E conv_in.weight                      -> encoder/conv_in/kernel          (no bias)
    E down.{i}.block.{j}.{norm1,norm2}.{weight,bias} -> encoder/down_{i}/block_{j}/{norm1,norm2}/{scale,bias}
    E down.{i}.block.{j}.{conv1,conv2,nin_shortcut}.weight -> .../{conv1,conv2,nin_shortcut}/kernel
    E mid.{j}.*                           -> encoder/mid_{j}/*
    E norm_out.*, conv_out.{weight,bias}  -> encoder/norm_out/*, encoder/conv_out/{kernel,bias}
    D conv_in.{weight,bias}, mid.{j}.*    -> decoder/conv_in/*, decoder/mid_{j}/*
    D up.{i}.block.{j}.*                  -> decoder/up_{i}/block_{j}/*
    D up.{i}.upsample_conv.{weight,bias}  -> decoder/up_{i}/upsample_conv/{kernel,bias}   (i > 0)
    D norm_out.*, conv_out.*              -> decoder/norm_out/*, decoder/conv_out/*
    quantize.embedding.weight [K, z]      -> quantize/codebook [K, z]

``nin_shortcut`` exists where a block changes width (its first block when ``c_in != c_out``).

MaskBit discriminator (``modeling/modules/discriminator.py::NLayerDiscriminator``)::

    block_in.0.{weight,bias}  -> block_in/{kernel,bias}
    blocks.{i}.0.*            -> blocks_{i}_conv/*
    blocks.{i}.2.{weight,bias} -> blocks_{i}_norm/{scale,bias}
    blocks.{i}.1.kernel       (the fixed blur buffer: checked against (1,3,3,1), not a param)
    to_logits.{0,2}.*         -> to_logits_{0,2}/*

Every converter consumes every tensor, fills every param and checks every shape; the first problem
raises ``ValueError`` naming the tensor (``convert.common.StateDictReader``).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import numpy as np

from titok_jax.convert.common import StateDictReader, conv_kernel
from titok_jax.models.registry import translate_legacy_quantizer
from titok_jax.models.vqgan import MASKGIT_F16_256
from titok_jax.quantizers.factory import resolve_spec, spec_codebook_size
from titok_jax.trees import check_tree_matches, unflatten

# The official kwargs (TiTok's hard-coded PretrainedTokenizer / pixel_decoder config).
VQGAN_TORCH_DEFAULTS: dict[str, Any] = dict(MASKGIT_F16_256)
CNN_KEYS = ("hidden_channels", "channel_mult", "num_res_blocks", "z_channels")

# (torch key, flax key, torch shape, transform)
Entry = tuple[str, str, tuple[int, ...], Any]


def _cnn(kwargs: Mapping[str, Any]) -> tuple[int, tuple[int, ...], int, int]:
    kw = {**VQGAN_TORCH_DEFAULTS, **dict(kwargs)}
    return (int(kw["hidden_channels"]), tuple(int(m) for m in kw["channel_mult"]),
            int(kw["num_res_blocks"]), int(kw["z_channels"]))


def _conv(t: str, f: str, c_out: int, c_in: int, k: int, bias: bool) -> list[Entry]:
    out = [(f"{t}.weight", f"{f}/kernel", (c_out, c_in, k, k), conv_kernel)]
    if bias:
        out.append((f"{t}.bias", f"{f}/bias", (c_out,), None))
    return out


def _norm(t: str, f: str, c: int) -> list[Entry]:
    return [(f"{t}.weight", f"{f}/scale", (c,), None), (f"{t}.bias", f"{f}/bias", (c,), None)]


def _resnet(t: str, f: str, c_in: int, c_out: int) -> list[Entry]:
    rows = (_norm(f"{t}.norm1", f"{f}/norm1", c_in)
            + _conv(f"{t}.conv1", f"{f}/conv1", c_out, c_in, 3, False)
            + _norm(f"{t}.norm2", f"{f}/norm2", c_out)
            + _conv(f"{t}.conv2", f"{f}/conv2", c_out, c_out, 3, False))
    if c_in != c_out:
        rows += _conv(f"{t}.nin_shortcut", f"{f}/nin_shortcut", c_out, c_out, 1, False)
    return rows


def encoder_name_table(prefix: str, kwargs: Mapping[str, Any]) -> list[Entry]:
    """Rows for ``MaskGITEncoder`` with torch keys under ``prefix`` (e.g. ``"encoder."``)."""
    hidden, mult, blocks, z = _cnn(kwargs)
    rows = _conv(f"{prefix}conv_in", "conv_in", hidden, 3, 3, False)
    c_in = hidden
    for i, m in enumerate(mult):
        for j in range(blocks):
            rows += _resnet(f"{prefix}down.{i}.block.{j}", f"down_{i}/block_{j}", c_in, hidden * m)
            c_in = hidden * m
    for j in range(blocks):
        rows += _resnet(f"{prefix}mid.{j}", f"mid_{j}", c_in, c_in)
    rows += _norm(f"{prefix}norm_out", "norm_out", c_in)
    rows += _conv(f"{prefix}conv_out", "conv_out", z, c_in, 1, True)
    return rows


def decoder_name_table(prefix: str, kwargs: Mapping[str, Any]) -> list[Entry]:
    """Rows for ``MaskGITDecoder`` with torch keys under ``prefix`` (``"decoder."`` or
    ``"pixel_decoder."``)."""
    hidden, mult, blocks, z = _cnn(kwargs)
    c_in = hidden * mult[-1]
    rows = _conv(f"{prefix}conv_in", "conv_in", c_in, z, 3, True)
    for j in range(blocks):
        rows += _resnet(f"{prefix}mid.{j}", f"mid_{j}", c_in, c_in)
    for i in reversed(range(len(mult))):
        c_out = hidden * mult[i]
        for j in range(blocks):
            rows += _resnet(f"{prefix}up.{i}.block.{j}", f"up_{i}/block_{j}", c_in, c_out)
            c_in = c_out
        if i != 0:
            rows += _conv(f"{prefix}up.{i}.upsample_conv", f"up_{i}/upsample_conv", c_out, c_out,
                          3, True)
    rows += _norm(f"{prefix}norm_out", "norm_out", c_in)
    rows += _conv(f"{prefix}conv_out", "conv_out", 3, c_in, 3, True)
    return rows


def _read(reader: StateDictReader, rows: list[Entry], what: str) -> dict:
    flat = {}
    for t, f, shape, transform in rows:
        flat[f] = reader.take(t, shape, transform or (lambda x: x), what=f"{what}/{f}")
    return unflatten(flat)


def maskgit_decoder_params_from_state_dict(reader: StateDictReader, prefix: str,
                                           model_kwargs: Mapping[str, Any]) -> dict:
    """The ``MaskGITDecoder`` param subtree (``conv_in``, ``mid_{j}``, ``up_{i}``, ``norm_out``,
    ``conv_out``) from the tensors under ``prefix``; the caller runs ``reader.finish()``."""
    return _read(reader, decoder_name_table(prefix, model_kwargs), prefix.rstrip("."))


def _full_kwargs(model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``VQGAN_TORCH_DEFAULTS`` updated with ``model_kwargs`` (legacy flat quantizer keys
    translated), with the resolved ``quantizer`` sub-config."""
    kw = translate_legacy_quantizer({"name": "maskgit_vqgan", **dict(model_kwargs)})
    kw = {**VQGAN_TORCH_DEFAULTS, **kw}
    return {**kw, "quantizer": resolve_spec(kw["quantizer"])}   # kw["name"] = "maskgit_vqgan"


def codebook_from_state_dict(reader: StateDictReader, key: str, model_kwargs: Mapping[str, Any]
                             ) -> np.ndarray:
    """The ``[codebook_size, z_channels]`` embedding at ``key`` (as stored: rows are codes);
    ``model_kwargs["quantizer"]`` gives ``codebook_size``."""
    kw = _full_kwargs(model_kwargs)
    k = spec_codebook_size(kw["quantizer"])
    return reader.take(key, (int(k), int(kw["z_channels"])), what="codebook")


def _abstract_vqgan_params(model_kwargs: Mapping[str, Any]) -> Any:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from titok_jax.models.registry import build_model

    kw = _full_kwargs(model_kwargs)
    if kw["quantizer"]["name"] != "vq" or kw["quantizer"]["use_ema"]:
        raise ValueError("vqgan_params_from_state_dict: the official codebook is a param of a "
                         "'vq' quantizer with use_ema=False (an EMA codebook lives in "
                         f"quantizer_stats); got quantizer {kw['quantizer']}")
    model = build_model(kw)
    s = model.image_size
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, 3), jnp.float32))
    return nn.unbox(shapes["params"])


def vqgan_params_from_state_dict(sd: Mapping[str, np.ndarray], model_kwargs: Mapping[str, Any],
                                 source: str = "state dict") -> dict:
    """Official MaskGIT-VQGAN state dict -> ``MaskGITVQGAN(**model_kwargs)`` params
    (``{"encoder", "quantize": {"codebook"}, "decoder"}``, float32 numpy)."""
    reader = StateDictReader(sd, source)
    params = {"encoder": _read(reader, encoder_name_table("encoder.", model_kwargs), "encoder"),
              "quantize": {"codebook": codebook_from_state_dict(
                  reader, "quantize.embedding.weight", model_kwargs)},
              "decoder": maskgit_decoder_params_from_state_dict(reader, "decoder.", model_kwargs)}
    reader.finish()
    check_tree_matches(params, _abstract_vqgan_params(model_kwargs), source=f"{source} (converted)")
    return params


def _shape(sd: Mapping[str, np.ndarray], key: str, source: str) -> tuple[int, ...]:
    if key not in sd:
        raise ValueError(f"{source}: missing tensor {key!r}; cannot infer the MaskGIT-VQGAN shape")
    return tuple(np.shape(sd[key]))


def infer_vqgan_kwargs(sd: Mapping[str, np.ndarray], decoder_prefix: str = "decoder.",
                       codebook_key: str = "quantize.embedding.weight",
                       encoder_prefix: str | None = "encoder.", source: str = "state dict"
                       ) -> dict[str, Any]:
    """``hidden_channels``, ``channel_mult``, ``num_res_blocks``, ``z_channels`` (and ``quantizer =
    {"name": "vq", "codebook_size": K}`` when ``codebook_key`` is present) from the tensor shapes
    of the decoder
    (``up.{i}.block.0.conv1`` widths ``c_i``; ``hidden`` = the encoder's ``conv_in`` width if present,
    else ``gcd(c_i)``; ``channel_mult = c_i / hidden``)."""
    pat = re.compile(re.escape(decoder_prefix) + r"up\.(\d+)\.block\.(\d+)\.conv1\.weight$")
    found = [tuple(map(int, m.groups())) for m in map(pat.match, sd) if m]
    if not found:
        raise ValueError(f"{source}: no {decoder_prefix}up.*.block.*.conv1.weight tensors; "
                         "not a MaskGIT-VQGAN decoder")
    levels = max(i for i, _ in found) + 1
    blocks = max(j for _, j in found) + 1
    widths = [_shape(sd, f"{decoder_prefix}up.{i}.block.0.conv1.weight", source)[0]
              for i in range(levels)]
    enc_key = f"{encoder_prefix}conv_in.weight" if encoder_prefix is not None else None
    hidden = _shape(sd, enc_key, source)[0] if enc_key and enc_key in sd else math.gcd(*widths)
    if any(w % hidden for w in widths):
        raise ValueError(f"{source}: decoder widths {widths} are not multiples of the encoder "
                         f"width {hidden}")
    kw = dict(hidden_channels=hidden, channel_mult=tuple(w // hidden for w in widths),
              num_res_blocks=blocks,
              z_channels=_shape(sd, f"{decoder_prefix}conv_in.weight", source)[1])
    if codebook_key in sd:
        k, d = _shape(sd, codebook_key, source)
        if d != kw["z_channels"]:
            raise ValueError(f"{source}: {codebook_key} has dim {d} but the decoder takes "
                             f"{kw['z_channels']} channels")
        kw["quantizer"] = {"name": "vq", "codebook_size": k}
    return kw


# ----------------------------------------------------------------------------- MaskBit
def maskbit_discriminator_name_table(hidden_channels: int = 128, num_stages: int = 3
                                     ) -> list[Entry]:
    """Rows for ``MaskBitDiscriminator`` (blur buffers excluded; see the module docstring)."""
    h = hidden_channels
    mult = (1,) + tuple(2 ** t for t in range(num_stages))
    rows = _conv("block_in.0", "block_in", h, 3, 5, True)
    for i in range(num_stages):
        c_in, c_out = h * mult[i], h * mult[i + 1]
        rows += _conv(f"blocks.{i}.0", f"blocks_{i}_conv", c_out, c_in, 3, True)
        rows += _norm(f"blocks.{i}.2", f"blocks_{i}_norm", c_out)
    c = h * mult[-1]
    rows += _conv("to_logits.0", "to_logits_0", c, c, 1, True)
    rows += _conv("to_logits.2", "to_logits_2", 1, c, 5, True)
    return rows


def maskbit_discriminator_params_from_state_dict(sd: Mapping[str, np.ndarray],
                                                 model_kwargs: Mapping[str, Any] | None = None,
                                                 source: str = "state dict") -> dict:
    """Official MaskBit discriminator state dict -> ``MaskBitDiscriminator(**model_kwargs)``
    params. ``hidden_channels`` / ``num_stages`` are read from the shapes when not given; the
    blur buffers ``blocks.{i}.1.kernel`` (if saved) must equal the model's blur kernel."""
    from titok_jax.models.discriminator import blur_kernel

    kw = dict(model_kwargs or {})
    if "hidden_channels" not in kw:
        kw["hidden_channels"] = _shape(sd, "block_in.0.weight", source)[0]
    if "num_stages" not in kw:
        kw["num_stages"] = len({k.split(".")[1] for k in sd if re.match(r"blocks\.\d+\.0\.weight$", k)})
    reader = StateDictReader(sd, source)
    params = _read(reader, maskbit_discriminator_name_table(kw["hidden_channels"],
                                                            kw["num_stages"]), "discriminator")
    want = blur_kernel(int(kw.get("blur_kernel_size", 4)))
    for i in range(kw["num_stages"]):
        key = f"blocks.{i}.1.kernel"
        if reader.has(key):
            got = reader.take(key, (1, 1) + want.shape)
            if not np.allclose(got[0, 0], want, atol=1e-6):
                raise ValueError(f"{source}: {key} is not the expected blur kernel {want.tolist()}")
    reader.finish()
    _check_discriminator(params, kw, source)
    return params


def _check_discriminator(params: dict, kw: Mapping[str, Any], source: str) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from titok_jax.models.discriminator import MaskBitDiscriminator

    model = MaskBitDiscriminator(**{k: v for k, v in kw.items()
                                    if k in MaskBitDiscriminator.__dataclass_fields__})
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    check_tree_matches(params, nn.unbox(shapes["params"]), source=f"{source} (converted)")
