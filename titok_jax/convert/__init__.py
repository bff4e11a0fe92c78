"""PyTorch state dicts -> titok_jax params.

``titok_jax.convert.lpips``: torchvision VGG16 + LPIPS lin weights -> the LPIPS-VGG param file
(``python -m titok_jax.convert.lpips --vgg vgg16.pth --lin vgg.pth --output lpips_vgg.safetensors``).

Submodules are not imported here, so ``python -m titok_jax.convert.<name>`` runs without a
double-import warning; import them directly.
"""
