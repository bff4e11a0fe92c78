"""Test vectors for tests/test_fid.py: pytorch-fid's InceptionV3 run on seeded random weights.

Reference code: pytorch-fid (github.com/mseitzer/pytorch-fid, src/pytorch_fid/inception.py at the
mirrored HEAD) on torchvision 0.29.1 / torch 2.13 (CPU), in float64. Nothing is copied from it:
the script imports the reference module and runs it.

How to rerun (from the repo root; torchvision only in a throwaway target directory)::

    python -m pip install --no-deps --target /tmp/tv torchvision==0.29.1
    git -C /work/.mirror/mseitzer+pytorch-fid/repo show HEAD:src/pytorch_fid/inception.py \\
        > /tmp/pytorch_fid_inception.py
    PYTHONPATH=/tmp/tv:/tmp .venv/bin/python tests/data/fid/make_vectors.py

Writes ``inception_vectors.npz`` (the images as uint8 and, per image, the 2048-d pool3 features and
the 1008 fc logits) and ``resize_vectors.npz`` (``F.interpolate`` bilinear, with and without
antialias). The weights are not stored: :func:`random_state_dict` makes them from a seed, and the
test calls it too (it needs only NumPy).
"""
from __future__ import annotations

import os
import zlib

import numpy as np

SEED = 1234
HERE = os.path.dirname(os.path.abspath(__file__))


def random_state_dict(table, seed: int = SEED) -> dict[str, np.ndarray]:
    """Seeded float32 weights for ``table`` = ``[(torch key, our key, torch shape), ...]``.

    Each tensor has its own generator (seeded by ``seed`` and the key's CRC32), so the table order does
    not matter. Conv / linear weights are He-normal; BatchNorm scale and var are in [0.5, 1.5], its
    bias and mean N(0, 0.1^2): activations stay O(1) through the whole net.
    """
    out = {}
    for tkey, _, shape in table:
        rng = np.random.default_rng([seed, zlib.crc32(tkey.encode())])
        leaf = tkey.rsplit(".", 1)[-1]
        if len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            v = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        elif leaf in ("running_var",) or (leaf == "weight" and ".bn." in tkey):
            v = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            v = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        out[tkey] = v
    return out


def test_images() -> dict[str, np.ndarray]:
    """Two 48x48 images (upsampled to 299) and one 331x331 (downsampled): smooth + noise, uint8."""
    rng = np.random.default_rng(7)

    def img(h, w):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1)
        x = 0.5 + 0.35 * base + 0.15 * rng.standard_normal((h, w, 3))
        return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)

    return {"small": np.stack([img(48, 48), img(48, 48)[::-1]]), "large": img(331, 331)[None]}


def main() -> None:
    import sys
    import types

    # torchvision's compiled ops are not needed (and may not load next to this torch): stub them.
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)) + "/..")
    from titok_jax.convert.inception import inception_name_table
    import pytorch_fid_inception as ref  # the mirrored src/pytorch_fid/inception.py

    table = inception_name_table()
    sd = {k: torch.from_numpy(v) for k, v in random_state_dict(table).items()}
    ref.load_state_dict_from_url = lambda *a, **k: sd          # no download: our random weights
    model = ref.InceptionV3([3], resize_input=True, normalize_input=True).double().eval()
    # the name table must be exactly the reference model's state dict (minus BN counters)
    inner = ref.fid_inception_v3()
    want = {k for k in inner.state_dict() if not k.endswith("num_batches_tracked")}
    assert want == set(sd), sorted(want ^ set(sd))[:5]
    fc_w, fc_b = sd["fc.weight"].double(), sd["fc.bias"].double()

    out = {}
    with torch.no_grad():
        for name, images in test_images().items():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
            pool = model(x)[0][:, :, 0, 0]
            out[f"{name}_images"] = images
            out[f"{name}_pool"] = pool.numpy().astype(np.float32)
            out[f"{name}_logits"] = F.linear(pool, fc_w, fc_b).numpy().astype(np.float32)
            print(name, images.shape, "pool std", float(pool.std()), "max", float(pool.abs().max()))
    np.savez_compressed(os.path.join(HERE, "inception_vectors.npz"), **out)

    rng = np.random.default_rng(3)
    res = {}
    for i, (h, w, oh, ow, aa) in enumerate([(13, 9, 29, 23, False), (40, 37, 17, 11, False),
                                            (40, 37, 17, 11, True), (9, 13, 20, 7, True)]):
        x = rng.random((2, h, w, 3))
        y = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(oh, ow), mode="bilinear",
                          align_corners=False, antialias=aa).permute(0, 2, 3, 1).numpy()
        res[f"x{i}"], res[f"y{i}"], res[f"aa{i}"] = x.astype(np.float32), y.astype(np.float32), aa
    np.savez_compressed(os.path.join(HERE, "resize_vectors.npz"), **res)


if __name__ == "__main__":
    main()
