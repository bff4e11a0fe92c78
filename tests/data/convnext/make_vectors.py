"""Test vectors for tests/test_convnext.py: torchvision's ConvNeXt and TiTok's ConvNeXt perceptual loss
on a reduced-depth network with seeded random weights.

Reference code: torchvision 0.29.1 ``torchvision.models.convnext.ConvNeXt`` (the class that
``convnext_small`` builds, here with ``depths (1, 1, 2, 1)``, ``dims (8, 16, 24, 32)``, 10 classes)
and the official TiTok ``modeling/modules/perceptual_loss.py`` (bytedance/1d-tokenizer, mirrored HEAD),
whose ``convnext_small`` constructor is patched to return that small network. torch 2.13 CPU, float64.

How to rerun (from the repo root)::

    python -m pip install --no-deps --target /tmp/tv torchvision==0.29.1
    mkdir -p /tmp/titok_ref && touch /tmp/titok_ref/__init__.py
    git -C /work/.mirror/bytedance+1d-tokenizer/repo show HEAD:modeling/modules/perceptual_loss.py \\
        > /tmp/titok_ref/perceptual_loss.py
    echo "class LPIPS: pass" > /tmp/titok_ref/lpips.py
    PYTHONPATH=/tmp/tv:/tmp .venv/bin/python tests/data/convnext/make_vectors.py

Writes ``convnext_vectors.npz``: uint8 images ``x_small`` / ``y_small`` ``[2, 40, 40, 3]`` (upsampled
to 224) and ``x_large`` / ``y_large`` ``[1, 256, 256, 3]`` (downsampled, antialiased), the logits of
the network on ``(u - mean) / std`` of the 224-resized ``x`` images, and the loss per pair. The weights
are made by :func:`random_state_dict` (NumPy only), which the test calls too.
"""
from __future__ import annotations

import os
import zlib

import numpy as np

SEED = 4321
DEPTHS, DIMS, NUM_CLASSES = (1, 1, 2, 1), (8, 16, 24, 32), 10
HERE = os.path.dirname(os.path.abspath(__file__))


def random_state_dict(table, seed: int = SEED) -> dict[str, np.ndarray]:
    """Seeded float32 tensors for ``table`` = ``[(torch key, our key, torch shape, layout), ...]``:
    conv / linear weights He-normal, LayerNorm weights in [0.5, 1.5], layer scales in [0.2, 1] (not
    torchvision's 1e-6, so every block matters), biases N(0, 0.1^2)."""
    out = {}
    for tkey, _, shape, _ in table:
        rng = np.random.default_rng([seed, zlib.crc32(tkey.encode())])
        if tkey.endswith("layer_scale"):
            v = rng.uniform(0.2, 1.0, shape)
        elif len(shape) >= 2:
            v = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif tkey.endswith("weight"):
            v = rng.uniform(0.5, 1.5, shape)
        else:
            v = 0.1 * rng.standard_normal(shape)
        out[tkey] = v.astype(np.float32)
    return out


def test_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)

    def img(n, h):
        yy, xx = np.mgrid[0:h, 0:h] / h
        base = np.stack([np.sin(5 * xx + 2 * c) * np.cos(3 * yy + c) for c in range(3)], -1)
        x = 0.5 + 0.3 * base[None] + 0.2 * rng.standard_normal((n, h, h, 3))
        return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)

    return {"x_small": img(2, 40), "y_small": img(2, 40), "x_large": img(1, 256), "y_large": img(1, 256)}


def main() -> None:
    import sys
    import types

    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import torch
    from torchvision.models import convnext as tv_convnext

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))
    from titok_jax.convert.convnext import convnext_name_table
    from titok_ref import perceptual_loss as ref   # official modeling/modules/perceptual_loss.py

    setting = [tv_convnext.CNBlockConfig(d, DIMS[i + 1] if i + 1 < len(DIMS) else None, n)
               for i, (n, d) in enumerate(zip(DEPTHS, DIMS))]
    net = tv_convnext.ConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=NUM_CLASSES)
    table = convnext_name_table(DEPTHS, DIMS, NUM_CLASSES)
    sd = {k: torch.from_numpy(v) for k, v in random_state_dict(table).items()}
    net.load_state_dict(sd, strict=True)          # the name table is exactly torchvision's keys
    net = net.double().eval()
    ref.models.convnext_small = lambda weights=None: net
    loss_fn = ref.PerceptualLoss("convnext_s").double().eval()

    images = test_images()
    out = dict(images)
    with torch.no_grad():
        for size in ("small", "large"):
            x = torch.from_numpy(images[f"x_{size}"]).permute(0, 3, 1, 2).double() / 255
            y = torch.from_numpy(images[f"y_{size}"]).permute(0, 3, 1, 2).double() / 255
            out[f"loss_{size}"] = np.float64(loss_fn(x, y).item())
            u = torch.nn.functional.interpolate(x, size=224, mode="bilinear", align_corners=False,
                                                antialias=True)
            out[f"logits_{size}"] = net((u - loss_fn.imagenet_mean) / loss_fn.imagenet_std).numpy()
            print(size, "loss", out[f"loss_{size}"], "logit std", out[f"logits_{size}"].std())
    np.savez_compressed(os.path.join(HERE, "convnext_vectors.npz"), **out)


if __name__ == "__main__":
    main()
